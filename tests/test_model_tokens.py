"""Sequences as the model expects them: its BOS, its own logits (final transform), its stop
tokens, conversations tokenised as rendered, template failures as bad rows, ``hetlora chat``
rendering as the run trained, and ROUGE-L on any script."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_model
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from hetlora.config import make_config
from hetlora.data import Example, load_clients
from hetlora.data.batching import collate, start_ids
from hetlora.data.chat import make_renderer, render_conversation
from hetlora.errors import HetLoRAError
from hetlora.evaluate import (
    _transform,
    generate_greedy,
    linear_cross_entropy,
    response_nll,
    rouge_l,
    rouge_sums,
    stop_ids,
    words,
)

LONG = "Now is the winter of our discontent made glorious summer by this sun of York; " * 4
PAIR = Example(prompt=LONG, response="And all the clouds that lour'd upon our house.")


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory) -> Path:
    """A tiny Gemma 2 whose tokenizer adds BOS and whose logits are soft-capped at 0.02 (its
    random logits are small)."""
    folder = tmp_path_factory.mktemp("gemma2")
    return make_tiny_model(folder, arch="gemma2", bos=True, final_logit_softcapping=0.02)


@pytest.fixture(scope="module")
def granite(tmp_path_factory) -> Path:
    """A tiny Granite whose tokenizer adds BOS and whose logits are divided by
    ``logits_scaling = 0.25``."""
    folder = tmp_path_factory.mktemp("granite")
    return make_tiny_model(folder, arch="granite", bos=True, logits_scaling=0.25)


def test_raw_rows_start_with_bos_kept_through_left_truncation(gemma2: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gemma2)
    assert start_ids(tok) == [tok.bos_token_id] and tok.bos_token_id != tok.eos_token_id
    renderer = make_renderer(tok, "auto", [PAIR])
    item = renderer.tokenize(PAIR, 24)  # the prompt alone is longer: cut on the left
    plain = tok(PAIR.prompt, add_special_tokens=False)["input_ids"]
    assert len(item.ids) == 24 and item.ids[0] == tok.bos_token_id
    assert item.ids[1 : item.n_prompt] == tuple(plain[-(item.n_prompt - 1) :])
    assert item.ids[item.n_prompt] == tok(PAIR.response, add_special_tokens=False)["input_ids"][0]
    text = Example(prompt="", response="Words, words, words.")
    ids = renderer.tokenize(text, 64).ids
    assert list(ids) == tok(text.response)["input_ids"] + [tok.eos_token_id]
    assert renderer.prompt(PAIR)[:2] == [tok.bos_token_id, plain[0]]
    assert renderer.chat_prompt([("user", "Hail!")]) == tok("Hail!")["input_ids"]


def _batch(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    renderer = make_renderer(tok, "auto")
    items = [renderer.tokenize(Example(prompt="", response=t), 64) for t in texts]
    return collate(items, tok.pad_token_id)


@pytest.mark.parametrize("which", ["gemma2", "granite"])
def test_loss_is_the_models_own(which: str, request) -> None:
    folder = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    batch = _batch(tok, ["To be, or not to be: that is the question.", "Alas, poor Yorick!"])
    own = model(**batch).loss  # HF's mean over the labelled next tokens
    for fused in (True, False):
        nll, n = response_nll(model, batch, fused)
        assert float(nll / n) == pytest.approx(float(own), rel=1e-5)
    head = model.get_output_embeddings().weight
    plain = F.linear(model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state, head)
    mask = batch["labels"][:, 1:] != -100
    untransformed = F.cross_entropy(plain[:, :-1][mask], batch["labels"][:, 1:][mask])
    assert abs(float(untransformed) - float(own)) > 0.01  # the transform matters here


NEWER = ["qwen3", "smollm3", "gemma3n_text", "gemma4_text", "qwen3_5_text", "lfm2"]


@pytest.mark.parametrize("arch", NEWER)
def test_newer_families_loss_and_targets(arch: str, tmp_path: Path) -> None:
    """The newer on-device families (Gemma 3n with its logit softcapping, AltUp and per-layer
    inputs; Gemma 4; the hybrids Qwen3.5 and LFM2, whose attention is one layer in several):
    the loss of a batch is the model's own, through an adapter on the default targets, which
    are the attention's query and value layers and nothing else."""
    from hetlora.adapters import wrap
    from hetlora.models import default_target_modules

    folder = make_tiny_model(tmp_path / arch, arch=arch, layers=2)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    targets = default_target_modules(model)
    assert targets == ["q_proj", "v_proj"]
    kinds = getattr(model.config, "layer_types", None) or ["full_attention"] * 2
    softmax = [i for i, kind in enumerate(kinds) if kind in ("full_attention", "sliding_attention")]
    if arch in ("qwen3_5_text", "lfm2"):
        assert softmax == [1]  # the hybrid's first layer is its other mixer (linear, conv)
    attention = {f"model.layers.{i}.self_attn.{n}" for i in softmax for n in ("q_proj", "v_proj")}
    peft = wrap(model, 2, 2.0, targets)
    for name, module in peft.named_modules():
        if name.endswith(("lora_B.default", "lora_B.global")):
            torch.nn.init.normal_(module.weight, std=0.1)  # an adapter that changes the logits
    adapted = {
        n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A")
    }
    assert adapted == attention and attention  # a hybrid's other mixers stay as they are
    batch = _batch(tok, ["To be, or not to be: that is the question.", "Alas, poor Yorick!"])
    with torch.no_grad():
        own = float(peft(**batch).loss)
        with peft.disable_adapter():
            assert abs(float(peft(**batch).loss) - own) > 1e-4  # the adapter is in the loss
        for fused in (True, False):
            nll, n = response_nll(peft, batch, fused)
            assert float(nll / n) == pytest.approx(own, rel=1e-5)


@pytest.mark.parametrize("which", ["gemma2", "granite"])
def test_a_run_on_a_local_bos_model_trains_and_generates_from_bos_with_its_own_loss(
    which: str, request, tmp_path: Path, monkeypatch
) -> None:
    """A whole `hetlora run` on a local folder of a BOS-adding, logit-transformed model (Gemma 2
    softcapping, Granite scaling): every training batch row and every generation prompt starts
    with the tokenizer's BOS, and every training loss is the model's own (HF's ``loss`` of the
    same batch through the same adapter)."""
    import transformers.generation.utils as generation

    from hetlora import client
    from hetlora.runtime.local import LocalRun

    folder = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(folder)
    data = tmp_path / "data.jsonl"
    lines = [
        {"client_id": f"c{c}", "prompt": f"Speak, friend {i} of house {c}.", "response": LONG[:60]}
        for c in range(2)
        for i in range(30)
    ]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    losses: list[tuple[float, float]] = []
    starts: list[int] = []
    prompts: list[int] = []
    real_nll = client.response_nll

    def spy_nll(model, batch, fused=True):
        nll, n = real_nll(model, batch, fused)
        first = batch["attention_mask"].float().argmax(dim=1)  # first real token of each row
        starts.extend(batch["input_ids"][torch.arange(len(first)), first].tolist())
        with torch.no_grad():
            own = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
            ).loss
        losses.append((float(nll.detach()) / n, float(own)))
        return nll, n

    real_generate = generation.GenerationMixin.generate

    def spy_generate(self, *args, **kwargs):
        prompts.append(int(kwargs["input_ids"][0, 0]))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(client, "response_nll", spy_nll)
    monkeypatch.setattr(generation.GenerationMixin, "generate", spy_generate)
    cfg = make_config(
        {
            "model": str(folder),
            "data": str(data),
            "min_examples": 10,
            "rounds": 1,
            "clients_per_round": 2,
            "local_steps": 2,
            "batch_size": 4,
            "eval_examples": 8,
            "rouge_examples": 2,
            "max_new_tokens": 3,
            "precision": "fp32",
            "compile": "off",
            "r_min": 2,
            "r_max": 4,
        }
    )
    summary = LocalRun(cfg).run(tmp_path / "run")
    assert len(losses) == 2 * 2 and starts and prompts  # 2 clients x 2 local steps
    assert set(starts) == {tok.bos_token_id} and set(prompts) == {tok.bos_token_id}
    for ours, own in losses:
        assert ours == pytest.approx(own, rel=1e-5)
    assert summary["final_ppl"] > 1


def test_a_logit_transform_it_cannot_fuse_runs_the_models_own_forward(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: out * 3.0)
    batch = _batch(tok, ["Friends, Romans, countrymen, lend me your ears."])
    nll, n = response_nll(model, batch)
    assert float(nll / n) == pytest.approx(float(model(**batch).loss), rel=1e-5)


@pytest.mark.parametrize("scale, cap", [(4.0, None), (0.7, 0.5), (1.0, 2.0)])
def test_fused_transform_gradients_match_autograd(scale: float, cap: float | None) -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (300,), generator=gen)
    ours = linear_cross_entropy(hidden, weight, targets, scale, cap)
    g_h, g_w = torch.autograd.grad(2.5 * ours, (hidden, weight))
    ref = F.cross_entropy(_transform(hidden @ weight.T, scale, cap), targets, reduction="sum")
    r_h, r_w = torch.autograd.grad(2.5 * ref, (hidden, weight))
    assert float(ours) == pytest.approx(float(ref), rel=1e-12)
    assert torch.allclose(g_h, r_h, rtol=1e-10) and torch.allclose(g_w, r_w, rtol=1e-10)


def test_generation_starts_with_bos_and_stops_at_every_stop_id(granite: Path) -> None:
    tok = AutoTokenizer.from_pretrained(granite)
    model = AutoModelForCausalLM.from_pretrained(granite, dtype=torch.float32)
    seen: list[list[int]] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    prompt = "Good morrow, cousin."
    model.generation_config.eos_token_id = tok.eos_token_id
    free = generate_greedy(model, tok, [prompt], 6, "cpu")[0]
    assert seen[0] == tok(prompt)["input_ids"] and seen[0][0] == tok.bos_token_id
    ids = tok(prompt)["input_ids"]
    run_on = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=-1)
    new = run_on[0, len(ids) :].tolist()
    assert tok.eos_token_id not in new and free == tok.decode(new).strip()
    model.generation_config.eos_token_id = [tok.eos_token_id, new[0]]  # as Gemma: two stops
    assert stop_ids(model, tok) == [tok.eos_token_id, new[0]]
    stopped = generate_greedy(model, tok, [prompt], 6, "cpu")[0]
    assert stopped == tok.decode(new[:1]).strip() != free


def test_generation_is_greedy_whatever_the_models_generation_config_sets(granite: Path) -> None:
    """A model folder's own repetition penalty, n-gram ban, minimum length or suppressed tokens
    do not apply: the generation is the argmax of every step (and the config is given back)."""
    tok = AutoTokenizer.from_pretrained(granite)
    model = AutoModelForCausalLM.from_pretrained(granite, dtype=torch.float32)
    ids = tok("Good morrow, cousin.")["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(8):
            x = torch.cat([x, model(x).logits[0, -1].argmax().view(1, 1)], 1)
    argmax = x[0, len(ids) :].tolist()
    config = model.generation_config
    config.eos_token_id = -1  # no stop: 8 tokens
    config.repetition_penalty, config.no_repeat_ngram_size = 1.5, 1
    config.min_new_tokens, config.suppress_tokens = 8, [argmax[0]]
    (text,) = generate_greedy(model, tok, [ids], 8, "cpu")
    assert text == tok.decode(argmax, skip_special_tokens=True).strip()
    assert model.generation_config is config and config.repetition_penalty == 1.5


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_template_end_of_turn_is_a_stop_and_a_base_models_reply_ends_there(
    granite: Path, tmp_path: Path
) -> None:
    """A base model's generation config names only its end of text, while templated examples
    end each reply with the template's end-of-turn token (ChatML's ``<|im_end|>`` here): the
    renderer finds that token, and a generation stops at it."""
    tok = AutoTokenizer.from_pretrained(granite)
    assert make_renderer(tok, "auto").end_of_turn == []  # no template
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    end = tok.convert_tokens_to_ids("<|im_end|>")
    renderer = make_renderer(tok, "auto")
    assert renderer.end_of_turn == [end] and end != tok.eos_token_id
    tok.chat_template = CHATML.replace("<|im_end|>", "<|eot_id|>")  # special, not named
    tok.add_tokens([AddedToken("<|eot_id|>", special=True)])
    assert make_renderer(tok, "auto").end_of_turn == [tok.convert_tokens_to_ids("<|eot_id|>")]
    tok.chat_template = CHATML.replace("<|im_end|>", "")  # a turn ended by plain text: none
    assert make_renderer(tok, "auto").end_of_turn == []
    tok.chat_template = CHATML.replace("<|im_end|>", "{{ eos_token }}")
    assert make_renderer(tok, "auto").end_of_turn == [tok.eos_token_id]

    model = AutoModelForCausalLM.from_pretrained(granite, dtype=torch.float32)
    model.generation_config.eos_token_id = -1
    ids = tok("Good morrow, cousin.")["input_ids"]
    free = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    new = free[0, len(ids) :].tolist()
    (stopped,) = generate_greedy(model, tok, [ids], 6, "cpu", extra_stops=[new[1]])
    assert stopped == tok.decode(new[:1]).strip()


#: A Llama 2 style template over a Metaspace tokenizer: turns written back to back.
INST_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant turns') }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def metaspace_tok() -> PreTrainedTokenizerFast:
    """A BPE tokenizer with a Metaspace pre-tokenizer (``▁`` for spaces, as Llama 2 and
    Mistral) and a Llama 2 style chat template that refuses system turns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hetlora.data.shakespeare import load_shakespeare

    clients = load_shakespeare()
    text = [ex.prompt + ex.response for c in list(clients)[:30] for ex in clients[c]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # as Llama 2
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>", "[INST]", "[/INST]"], show_progress=False
    )
    tok.train_from_iterator(text, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.chat_template = INST_TEMPLATE
    return fast


#: Two exchanges, the second answer longer than the first.
LEAR = (
    ("user", "What say you?"),
    ("assistant", "Nothing, my lord."),
    ("user", "Nothing?"),
    ("assistant", "Nothing will come of nothing."),
)


def test_a_conversation_is_tokenised_once_as_rendered(metaspace_tok) -> None:
    tok = metaspace_tok
    turns = LEAR
    item = render_conversation(tok, turns, 256)
    text = tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
    assert list(item.ids) == tok(text, add_special_tokens=False)["input_ids"]
    answers = [t for t, keep in zip(item.ids, item.target, strict=True) if keep]
    assert tok.decode(answers) == "Nothing, my lord.</s>Nothing will come of nothing.</s>"
    assert item.n_prompt == item.target.index(True) > 0
    cut = render_conversation(tok, turns, len(item.ids) - 1)  # the second exchange is dropped
    assert cut.ids == item.ids[: len(cut.ids)] and cut.target[-1]
    assert tok.decode([t for t, k in zip(cut.ids, cut.target, strict=True) if k]).endswith(
        "lord.</s>"
    )


#: Phi-3's chat template: every turn ends with ``<|end|>``, and only a whole conversation
#: (no generation prompt) with the end-of-text token after its last turn.
PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}"
    "{{ eos_token }}{% endif %}"
)
#: A template that renders an earlier assistant turn otherwise than the last one (Qwen3's
#: reasoning block, kept on the last turn only).
LAST_TURN_ONLY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if loop.last and m['role'] == 'assistant' %}"
    "<think></think>{% endif %}{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: gpt-oss's way: the last assistant turn ends with <|return|> where earlier ones end with
#: <|end|> (the closing replaces a turn's own end, it is not written after it).
LAST_TURN_ENDS_OTHERWISE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if loop.last and m['role'] == 'assistant' and not add_generation_prompt %}"
    "{{ eos_token }}{% else %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_markup_after_a_whole_conversation_belongs_to_its_last_turn(tiny_model: Path) -> None:
    """Phi-3 closes a whole conversation with its end-of-text token, not written between
    turns: a multi-turn conversation is tokenised as the template renders it, each turn trained
    up to its ``<|end|>``, the last one with the end-of-text token too; a template that renders
    an earlier turn otherwise, or ends the last turn with other markup than the earlier ones,
    is still refused."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>", "<|think|>"]}
    )
    tok.chat_template = PHI3_TEMPLATE
    turns = LEAR
    item = render_conversation(tok, turns, 256)
    text = tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
    assert text.endswith("<|end|>\n<|endoftext|>") and "<|end|>\n<|user|>" in text
    assert list(item.ids) == tok(text, add_special_tokens=False)["input_ids"]
    answers = [t for t, keep in zip(item.ids, item.target, strict=True) if keep]
    assert tok.decode(answers) == (
        "Nothing, my lord.<|end|>\nNothing will come of nothing.<|end|>\n<|endoftext|>"
    )
    cut = render_conversation(tok, turns, len(item.ids) - 1)  # the first exchange only
    assert cut.ids == item.ids[: len(cut.ids)]
    assert tok.decode([t for t, k in zip(cut.ids, cut.target, strict=True) if k]) == (
        "Nothing, my lord.<|end|>\n"
    )
    assert render_conversation(tok, turns[:2], 256).ids[-1] == tok.eos_token_id
    assert make_renderer(tok, "auto").end_of_turn == [tok.convert_tokens_to_ids("<|end|>")]
    tok.chat_template = LAST_TURN_ONLY_TEMPLATE
    render_conversation(tok, turns[:2], 256)  # one exchange: nothing to compare
    with pytest.raises(HetLoRAError, match="renders the start of a conversation differently"):
        render_conversation(tok, turns, 256)
    same = (*turns[:2], ("user", "Again?"), turns[1])  # the same answer twice
    with pytest.raises(HetLoRAError, match="renders the start of a conversation differently"):
        render_conversation(tok, same, 256)
    tok.chat_template = LAST_TURN_ENDS_OTHERWISE_TEMPLATE  # a closing in place of <|end|>
    with pytest.raises(HetLoRAError, match="renders the start of a conversation differently"):
        render_conversation(tok, turns, 256)


#: Llama 3.1-3.3's system header: today's date unless the caller gives ``date_string``.
DATED_TEMPLATE = (
    "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}"
    "{% endif %}<|system|>Today Date: {{ date_string }}<|end|>"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_template_that_writes_todays_date_renders_one_fixed_day(tiny_model: Path) -> None:
    """Llama 3's template writes the day it renders into every conversation: the tokens of a
    run would change with the day it (or its resume, ``hetlora evaluate``) runs. Every
    rendering sees `TEMPLATE_DATE`, and the template keeps the caller's clock otherwise."""
    import datetime

    from hetlora.data.chat import TEMPLATE_DATE

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]}
    )
    tok.chat_template = DATED_TEMPLATE
    turns = (("user", "What say you?"), ("assistant", "Nothing, my lord."))
    today = datetime.datetime.now().strftime("%d %b %Y")
    assert today in tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    item = render_conversation(tok, turns, 256)
    text = tok.decode(item.ids)
    assert "Today Date: 26 Jul 2024" in text and TEMPLATE_DATE.strftime("%d %b %Y") in text
    renderer = make_renderer(tok, "auto", [Example("", "", messages=turns)])
    assert "26 Jul 2024" in tok.decode(renderer.prompt(Example("", "", messages=turns)))
    assert today in tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)


def test_renderings_in_threads_leave_the_callers_clock() -> None:
    """Two threads inside the fixed-date patch at once, the first leaving first: without a
    lock the second would restore the patched clock and keep it for everyone after."""
    from transformers.utils import chat_template_utils as templates

    from hetlora.data.chat import _template_date

    clock, entered, release = templates.datetime, threading.Event(), threading.Event()

    def second() -> None:
        with _template_date():
            entered.set()
            release.wait(10)

    with _template_date():
        other = threading.Thread(target=second)
        other.start()
        entered.wait(0.5)  # with the lock it waits for this block to end
    release.set()
    other.join(10)
    assert entered.is_set() and templates.datetime is clock


def test_a_row_the_template_refuses_is_a_bad_row_before_training(metaspace_tok, tmp_path) -> None:
    rows = [
        {"client_id": f"c{i % 2}", "messages": [{"role": "user", "content": f"Say {i}."}]}
        for i in range(6)
    ]
    for i, row in enumerate(rows):
        row["messages"].append({"role": "assistant", "content": f"{i}, my lord."})
    rows[3]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sum(map(len, load_clients(str(path)).values())) == 6  # structure alone: all fine
    with pytest.raises(HetLoRAError, match=r"1 bad row of 6: row 4: .*only user and assistant"):
        load_clients(str(path), tokenizer_loader=lambda: metaspace_tok)
    report: dict[str, int] = {}
    kept = load_clients(
        str(path), tokenizer_loader=lambda: metaspace_tok, on_bad_rows="skip", report=report
    )
    assert report["bad_rows_skipped"] == 1 and sum(map(len, kept.values())) == 5


def test_federated_splits_render_every_conversation(tiny_chat_model: Path, tmp_path) -> None:
    from hetlora.runtime.splits import federated_splits

    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_chat_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = INST_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    turns = [{"role": "user", "content": "Hail."}, {"role": "assistant", "content": "Hail!"}]
    rows = [{"client_id": "a", "messages": turns}] * 3 + [
        {"client_id": "a", "messages": turns[1:]}  # starts with the assistant: refused
    ]
    rows[2] = {"client_id": "a", "messages": [{"role": "system", "content": "x"}, *turns]}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config({"model": str(folder), "data": str(path), "test_fraction": 0.0})
    with pytest.raises(HetLoRAError, match=r"2 bad rows of 4: row 3: .*turns; row 4: .*empty"):
        federated_splits(cfg)


def test_chat_on_a_raw_run_prompts_raw(tiny_chat_model: Path, tmp_path: Path) -> None:
    from hetlora.chat import load_chat_model
    from hetlora.runtime.local import run

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    raw = make_renderer(tok, "auto", [PAIR])
    assert not raw.templated and raw.chat_prompt([("user", "Hail!")]) == tok("Hail!")["input_ids"]
    assert make_renderer(tok, "on", [PAIR]).templated
    settings = {
        "model": str(tiny_chat_model),
        "rounds": 1,
        "clients_per_round": 1,
        "local_steps": 1,
        "batch_size": 2,
        "max_clients": 2,
        "min_examples": 4,
        "max_seq_len": 32,
        "eval_examples": 4,
        "rouge_examples": 0,
        "precision": "fp32",
    }
    summary = run(make_config(settings), tmp_path / "run")
    assert summary["chat_template_used"] is False
    chat = load_chat_model(tmp_path / "run", max_new_tokens=2)
    assert chat.renderer.chat_prompt([("user", "Hail!")]) == tok("Hail!")["input_ids"]


@pytest.mark.parametrize(("text", "why"), [("{", "unreadable"), ("[1]", "JSON object")])
def test_a_corrupt_summary_is_one_error_line(tmp_path: Path, text: str, why: str) -> None:
    from hetlora.chat import load_chat_model

    make_config({}).save(tmp_path / "config.toml")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(HetLoRAError, match=f"summary.json: .*{why}"):
        load_chat_model(tmp_path)


def test_the_logit_probe_restores_training_mode_when_the_model_fails() -> None:
    from hetlora.evaluate import logit_transform

    class Broken(torch.nn.Module):
        config = type("Config", (), {})()

        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(2, 3)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.head

        def forward(self, **_) -> None:
            raise RuntimeError("out of memory")

    model = Broken().train()
    with pytest.raises(RuntimeError):
        logit_transform(model)
    assert model.training


def test_rouge_l_reads_every_script() -> None:
    from rouge_score import rouge_scorer

    assert rouge_l(["Привет, мир"], ["привет мир!"]) == 1.0
    assert rouge_l(["東京タワー"], ["東京駅"]) == pytest.approx(0.5)  # LCS 2 of 5 and 3
    assert rouge_l(["Ça va très bien"], ["ça va bien"]) == pytest.approx(2 * 3 / 7)
    english = ["The cats were sitting on the mat", "To be or not"]
    refs = ["A cat sits on the mat", "to be, or not to be"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # unchanged on English
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(english, refs, strict=True)]
    assert rouge_l(english, refs) == pytest.approx(sum(expected) / 2, rel=1e-12)


def test_combining_marks_stay_in_their_word() -> None:
    assert words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs and virama kept
    assert rouge_l(["हिन्दी भाषा"], ["हिन्दू भाषा"]) == pytest.approx(0.5)
    # Thai has no spaces: a character with its vowel and tone marks is a word
    assert words("ที่นี่") == ["ที่", "นี่"]
    assert rouge_l(["ที่นี่"], ["ที่นั่น"]) == pytest.approx(2 * (1 / 2 * 1 / 3) / (1 / 2 + 1 / 3))
    assert rouge_sums(["हिन्दी", "东京"], ["हिन्दू", "東京"]) == (0.5, 2)


def test_english_words_are_rouge_scores_own_tokens() -> None:
    from nltk.stem import porter
    from rouge_score import tokenize

    from hetlora.data.shakespeare import load_shakespeare

    texts = [ex.response for v in load_shakespeare().values() for ex in v][::8]
    stemmer = porter.PorterStemmer()
    assert len(texts) > 3000
    assert all(words(t) == tokenize.tokenize(t, stemmer) for t in texts if t.isascii())


@pytest.mark.parametrize(
    ("which", "prompt", "response"),
    [
        ("metaspace", "Q: who comes here?\n", "The king."),  # no space in the text before "The"
        ("metaspace", "Q: who comes here?", " The king."),
        ("byte-level", "Answer: ", "the king."),  # the space merges into the response's word
        ("byte-level", "Answer:\n", "the king."),
    ],
)
def test_a_raw_row_is_tokenised_as_one_text_cut_where_the_prompt_ends(
    which, prompt, response, metaspace_tok, tiny_model
) -> None:
    """Prompt and response tokenised apart would start the response as a text of its own (a
    Metaspace tokenizer puts a space before it; a prompt ending in a space leaves a lone space
    token). As one text: the ids are the joint text's, a token reaching into the response is a
    target, and a generation continues from the same prompt ids."""
    tok = metaspace_tok if which == "metaspace" else AutoTokenizer.from_pretrained(tiny_model)
    joint = tok(prompt + response, add_special_tokens=False)
    item = make_renderer(tok, "auto").tokenize(Example(prompt, response), 512)
    start = start_ids(tok)
    assert list(item.ids) == start + joint["input_ids"] + [tok.eos_token_id]
    ends = [
        end
        for _, end in tok(prompt + response, return_offsets_mapping=True, add_special_tokens=False)[
            "offset_mapping"
        ]
    ]
    n = len(start) + sum(1 for end in ends if end <= len(prompt))
    assert item.n_prompt == n and n < len(item.ids) - 1
    assert make_renderer(tok, "auto").prompt(Example(prompt, response)) == list(item.ids[:n])
    apart = tok(prompt, add_special_tokens=False)["input_ids"]
    apart += tok(response, add_special_tokens=False)["input_ids"]
    if (which, prompt[-1]) in (("metaspace", "\n"), ("byte-level", " ")):
        assert apart != joint["input_ids"]  # the case the joint text is for


def test_an_exported_tokenizer_keeps_its_own_pad_token(tmp_path: Path) -> None:
    """Training pads with the end-of-sequence token where a tokenizer has no pad token (the
    loss mask goes by position); an export saves the tokenizer as it came, since a collator
    that masks pad tokens would take the end of sequence out of the loss."""
    from hetlora.models import load_tokenizer

    folder = make_tiny_model(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    assert load_tokenizer(str(folder)).pad_token == tok.eos_token
    assert load_tokenizer(str(folder), pad=False).pad_token is None

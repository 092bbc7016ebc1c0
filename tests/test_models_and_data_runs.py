"""Bring your own model and data: other architecture families, user files, clear model errors."""

from __future__ import annotations

import json
import types

import pytest
import torch
from tiny import make_tiny_model
from typer.testing import CliRunner

from hetlora.cli import app
from hetlora.errors import HetLoRAError
from hetlora.models import resolve_model

TINY_RUN = [
    "rounds=1",
    "clients_per_round=2",
    "local_steps=2",
    "batch_size=2",
    "eval_examples=8",
    "rouge_examples=1",
    "max_new_tokens=4",
    "precision='fp32'",
    "r_min=2",
    "r_max=4",
]


def run_cli(out, *items):
    args = ["run", "--out", str(out)]
    for item in [*TINY_RUN, *items]:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma", "phi3", "gemma3", "qwen3_5_text"])
def test_other_architecture_families(arch, tmp_path):
    folder = make_tiny_model(tmp_path / arch, arch=arch)
    out = tmp_path / "out"
    result = run_cli(out, f"model='{folder}'", "min_examples=150")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    language = [  # multimodal Gemma 3: its language model's layers, not its vision tower's
        f"model.language_model.layers.{i}.self_attn.{n}"
        for i in (0, 1)
        for n in ("q_proj", "v_proj")
    ]
    expected = {"gpt2": ["c_attn"], "phi3": ["qkv_proj"], "gemma3": language}.get(
        arch, ["q_proj", "v_proj"]
    )
    assert summary["target_modules"] == expected
    assert summary["final_ppl"] > 0


def test_default_targets_where_peft_lists_none() -> None:
    """PEFT lists no LoRA targets for Phi-3, Granite, SmolLM3, OLMo 2 or LFM2: the attention's
    query and value layers by their usual names are taken (Phi-3 fuses them as qkv_proj); a
    model with neither, or a multimodal one without a language model of such layers, is one
    error that lists its linear layers."""
    from transformers import AutoModelForCausalLM, GraniteConfig, Phi3Config

    from hetlora.models import default_target_modules

    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    phi3 = AutoModelForCausalLM.from_config(Phi3Config(**small, pad_token_id=0))
    granite = AutoModelForCausalLM.from_config(GraniteConfig(**small))
    assert default_target_modules(phi3) == ["qkv_proj"]
    assert default_target_modules(granite) == ["q_proj", "v_proj"]
    odd = torch.nn.Sequential(torch.nn.Linear(4, 4))
    odd.config = types.SimpleNamespace(model_type="odd")
    with pytest.raises(
        HetLoRAError, match=r"model type 'odd'; set target_modules \(its linear layers: 0\)"
    ):
        default_target_modules(odd)
    odd.config.model_type = "gemma4"  # PEFT's default is a pattern: multimodal, no decoder
    with pytest.raises(HetLoRAError, match=r"'gemma4' \(a multimodal model whose language"):
        default_target_modules(odd)


def test_custom_target_modules(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        out,
        f"model='{tiny_model}'",
        "min_examples=150",
        "target_modules=['q_proj','k_proj','o_proj']",
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "o_proj"}


@pytest.mark.parametrize("modules", ["['nope']", "['q_proj','qkv_proj','gate_up_proj']"])
def test_unknown_target_module_is_a_clear_error(modules, tiny_model, tmp_path):
    """A name that matches no module is refused, also beside names that match (PEFT alone
    would adapt q_proj only, as a Llama list on Phi-3's fused layers would)."""
    result = run_cli(
        tmp_path / "out", f"model='{tiny_model}'", "min_examples=150", f"target_modules={modules}"
    )
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    unmatched = [m for m in ("nope", "qkv_proj", "gate_up_proj") if m in modules]
    assert f"target_modules {unmatched} name no module" in result.stderr
    assert "q_proj" in result.stderr.split("its linear layers:")[1]  # what it could name


def test_user_jsonl_with_clients(tiny_model, tmp_path):
    rows = [
        {"client_id": f"user{u}", "prompt": f"Q{i}: what is {i} plus {u}?", "response": f" {i + u}"}
        for u in range(4)
        for i in range(12)
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = run_cli(out, f"model='{tiny_model}'", f"data='{data}'", "min_examples=5")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clients"] == 4


def test_skipped_bad_rows_are_counted_in_the_summary(tiny_model, tmp_path):
    rows = [
        {"client_id": f"user{u}", "prompt": f"Q{i}: what is {i} plus {u}?", "response": f" {i + u}"}
        for u in range(4)
        for i in range(12)
    ]
    for index in (3, 17, 30):  # three empty responses, as in a real chat export
        rows[index]["response"] = ""
    rows[40]["prompt"] = None
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stopped = run_cli(tmp_path / "a", f"model='{tiny_model}'", f"data='{data}'", "min_examples=5")
    assert stopped.exit_code == 2 and len(stopped.stderr.strip().splitlines()) == 1
    assert "4 bad rows of 48: row 4: column 'response' is empty; row 18" in stopped.stderr
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    result = run_cli(
        out, f"model='{tiny_model}'", f"data='{data}'", "min_examples=5", "on_bad_rows='skip'"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_rows_skipped"] == 4 and summary["clients"] == 4


def test_user_text_csv_partitioned_iid(tiny_model, tmp_path):
    data = tmp_path / "text.csv"
    data.write_text("text\n" + "".join(f"line number {i} of the corpus\n" for i in range(60)))
    out = tmp_path / "out"
    result = run_cli(
        out, f"model='{tiny_model}'", f"data='{data}'", "min_examples=2", "num_partitions=5"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["clients"] == 5


def test_model_resolution_errors(tmp_path):
    with pytest.raises(HetLoRAError, match="model path not found"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(HetLoRAError, match="model path not found"):
        resolve_model("./relative/missing")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_a_gguf_file_is_a_model(tmp_path, monkeypatch):
    """``model = "x.gguf"``: converted once into a plain folder in the cache whose logits are
    the original's (llama.cpp's q/k layout undone), then run; a later load converts nothing.
    Another file, or a GGUF transformers cannot read, is one clear error."""
    from tiny import make_tiny_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hetlora import models

    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))
    path = make_tiny_gguf(tmp_path / "gguf")
    folder = resolve_model(str(path))
    assert folder.startswith(str(tmp_path / "cache" / "models" / "tiny-"))
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf" / "hf")
    converted = AutoModelForCausalLM.from_pretrained(folder)
    text = "To be, or not to be: that is the question."
    ids = AutoTokenizer.from_pretrained(tmp_path / "gguf" / "hf")(text, return_tensors="pt")
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == ids["input_ids"][0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(converted(**ids).logits, original(**ids).logits)
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("converted twice"))
    result = run_cli(tmp_path / "out", f"model='{path}'", "min_examples=150")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["final_ppl"] > 0
    monkeypatch.undo()
    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HetLoRAError, match=r"is a file: give a Hugging Face model folder"):
        resolve_model(str(tmp_path / "gguf" / "hf" / "config.json"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(HetLoRAError, match=r"cannot load GGUF file .*bad\.gguf: "):
        resolve_model(str(tmp_path / "bad.gguf"))
    import gguf

    adapter = gguf.GGUFWriter(str(tmp_path / "adapter.gguf"), "llama")
    adapter.add_type(gguf.GGUFType.ADAPTER)
    adapter.add_tensor("blk.0.attn_q.weight.lora_a", torch.zeros(2, 64).numpy())
    adapter.write_header_to_file()
    adapter.write_kv_data_to_file()
    adapter.write_tensors_to_file()
    adapter.close()
    with pytest.raises(HetLoRAError, match=r"adapter\.gguf is a LoRA adapter, not a model"):
        resolve_model(str(tmp_path / "adapter.gguf"))  # not a default 7B Llama made at random
    models = tmp_path / "cache" / "models"
    left = [p.name for p in models.iterdir() if not p.name.endswith(".lock")]
    assert left == [folder.rsplit("/", 1)[-1]]  # the refused files left nothing half-written


def test_hub_id_offline_is_a_clear_error(tmp_path):
    # HF_HUB_OFFLINE=1 in tests: a hub id cannot be fetched, and says so in one line
    result = run_cli(tmp_path / "out", "model='someone/not-a-cached-model'", "min_examples=150")
    assert result.exit_code == 2
    assert "cannot load model" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_hetlora_data_shows_clients_tokens_and_the_loss_of_an_example(tiny_model, tmp_path):
    """``hetlora data`` counts what a run with the same keys trains on (its splits), the
    examples' lengths, the share max_seq_len cuts and the loss tokens, and shows the first
    example in order with its loss tokens apart."""
    from hetlora.config import make_config
    from hetlora.data.chat import make_renderer
    from hetlora.models import load_tokenizer
    from hetlora.runtime.splits import federated_splits

    sizes = {"u0": 20, "u1": 30, "u2": 40, "u3": 60}
    rows = [
        {"client_id": c, "prompt": f"Question {i}?", "response": "Answer " * (1 + i % 7)}
        for c, n in sizes.items()
        for i in range(n)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": str(tiny_model),
        "data": str(path),
        "min_examples": 5,
        "max_seq_len": 16,
        "val_fraction": 0.2,
    }
    args = ["data", "--json"] + [a for k, v in cfg.items() for a in ("--set", f"{k}={v!r}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    train, val, test = federated_splits(make_config(cfg))
    assert facts["clients"] == 4 and facts["train"] == sum(map(len, train.values()))
    assert facts["val"] == sum(map(len, val.values())) > 0
    assert facts["test"] == sum(map(len, test.values()))
    assert facts["examples_per_client"] == {
        "min": 20,
        "p10": 20,
        "median": 30,
        "p90": 40,
        "max": 60,
    }
    assert facts["per_client"] == [60, 40, 30, 20]
    renderer = make_renderer(load_tokenizer(str(tiny_model)), "auto")
    every = [ex for c in sorted(train) for ex in train[c]]
    lengths = [len(renderer.tokenize(ex, 1 << 30).ids) for ex in every]
    cut = [renderer.tokenize(ex, 16) for ex in every]
    assert facts["tokens_sampled"] == len(lengths) and facts["tokens_max"] == max(lengths)
    assert facts["tokens_mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert facts["truncated"] == pytest.approx(sum(n > 16 for n in lengths) / len(lengths))
    assert facts["loss_mean"] == pytest.approx(sum(c.n_target for c in cut) / len(cut))
    assert 0 < facts["truncated"] < 1 and facts["kept_mean"] <= 16
    first = train["u0"][0]
    (context, on_context), (answer, on_answer) = facts["example"]["segments"]
    assert not on_context and on_answer and context.startswith(first.prompt[:8])
    assert answer.startswith(first.response.strip().split()[0])
    plot = tmp_path / "data.png"
    shown = CliRunner().invoke(app, [*args[:1], *args[2:], "--plot", str(plot)])
    assert shown.exit_code == 0 and "with loss" in shown.stdout and "loss in bold" in shown.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_hetlora_data_shows_a_conversation_in_order(tiny_chat_model, tmp_path):
    """A multi-turn conversation's example is shown as it is rendered: each answer after its
    question, the loss on the answers alone."""
    from hetlora.config import make_config
    from hetlora.runtime.splits import data_overview

    turns = [("user", "Hello there"), ("assistant", "First answer"), ("user", "Second question")]
    turns.append(("assistant", "Second answer"))
    row = {"client_id": "a", "messages": [{"role": r, "content": c} for r, c in turns]}
    path = tmp_path / "chat.jsonl"
    path.write_text((json.dumps(row) + "\n") * 10)
    cfg = {"model": str(tiny_chat_model), "data": str(path), "min_examples": 5}
    segments = data_overview(make_config(cfg))["example"]["segments"]
    assert [loss for _, loss in segments] == [False, True, False, True]
    text = "".join(t for t, _ in segments)
    assert text.index("First answer") < text.index("Second question") < text.index("Second answer")
    assert "Hello" in segments[0][0] and "First answer" in segments[1][0]


def test_compile_takes_a_multimodal_models_language_layers(tmp_path):
    """The layers ``compile = "on"`` compiles are the language model's, not the vision
    tower's, even where both have as many."""
    from transformers import AutoModelForCausalLM

    from hetlora.hardware import compile_layers

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_model(tmp_path / "g3", arch="gemma3", layers=1)
    )
    assert compile_layers(model, backend="aot_eager") == 1
    language = model.model.language_model.layers[0]
    vision = model.model.vision_tower.encoder.layers[0]
    assert language._compiled_call_impl is not None and vision._compiled_call_impl is None

"""Conversational data: ``messages`` rows, the chat template, the assistant-only loss mask,
``datasets`` folders and hub ids, and the ``chat_template`` key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizer

from hetlora.config import make_config
from hetlora.data import Example, load_clients
from hetlora.data.batching import IGNORE, collate, tokenize
from hetlora.data.chat import make_renderer, messages_problem, render_conversation
from hetlora.errors import HetLoRAError

TURNS = (
    ("system", "Be brief."),
    ("user", "Who art thou?"),
    ("assistant", "A friend."),
    ("user", "And then?"),
    ("assistant", "Good night."),
)


def conversation(i: int, client: str | None = None) -> dict:
    """A two-exchange conversation whose answers depend on ``i``."""
    row = {
        "messages": [
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": f"What is {i} and {i}?"},
            {"role": "assistant", "content": f"{i} and {i} is {2 * i}."},
            {"role": "user", "content": "And twice that?"},
            {"role": "assistant", "content": f"That is {4 * i}."},
        ]
    }
    if client is not None:
        row["client_id"] = client
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from tiny import make_tiny_model

    return AutoTokenizer.from_pretrained(
        make_tiny_model(tmp_path_factory.mktemp("tok"), chat_template=True)
    )


def test_assistant_only_mask_on_a_multi_turn_example(chat_tok) -> None:
    item = render_conversation(chat_tok, TURNS, 512)
    text = chat_tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in TURNS], tokenize=False
    )
    # Pieces tokenised along the turn cuts give the same ids as the whole text here.
    assert list(item.ids) == chat_tok(text, add_special_tokens=False)["input_ids"]
    # Independently: the tokens whose characters fall in an assistant turn (its content, the
    # end-of-turn token and the newline the template puts after it).
    enc = chat_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for answer in (" A friend.", " Good night."):
        start = text.index(answer)
        spans.append((start, start + len(answer) + len("<|endoftext|>\n")))
    expected = [
        i
        for i, (a, b) in enumerate(enc["offset_mapping"])
        if any(s <= a and b <= e for s, e in spans)
    ]
    positions = [i for i, t in enumerate(item.target) if t]
    assert positions == expected
    assert positions == list(range(44, 52)) + list(range(76, 84))  # this tokenizer's positions
    assert chat_tok.decode([item.ids[i] for i in positions]) == (
        " A friend.<|endoftext|>\n Good night.<|endoftext|>\n"
    )
    assert item.n_target == 16
    labels = collate([item, tokenize(chat_tok, "x", "y", 16)], chat_tok.pad_token_id)["labels"][0]
    assert [i for i, v in enumerate(labels.tolist()) if v != IGNORE] == positions
    assert labels[positions].tolist() == [item.ids[i] for i in positions]


def test_truncation_keeps_whole_turns_and_never_ends_on_a_prompt(chat_tok) -> None:
    full = render_conversation(chat_tok, TURNS, 512)
    first_exchange = 52  # the context and the first answer (positions above)
    for max_len in (first_exchange, 60, len(full.ids) - 1):
        cut = render_conversation(chat_tok, TURNS, max_len)
        assert cut.ids == full.ids[:first_exchange]  # the second exchange does not fit whole
        assert cut.target == full.target[:first_exchange] and cut.target[-1]
    assert render_conversation(chat_tok, TURNS, len(full.ids)) == full
    # The first exchange alone is too long: its context is cut on the left, the answer kept.
    short = render_conversation(chat_tok, TURNS, 20)
    assert len(short.ids) == 20 and short.ids == full.ids[32:52]
    assert short.target == (False,) * 12 + (True,) * 8
    # Shorter than the answer: half the budget for the answer's start, half for the context.
    tiny = render_conversation(chat_tok, TURNS, 8)
    assert tiny.ids == full.ids[40:48] and tiny.target == (False,) * 4 + (True,) * 4


def test_messages_row_problems_are_named() -> None:
    assert messages_problem(conversation(1)["messages"]) is None
    cases = {
        "null": (None, "is null"),
        "not a list": ("hi", "non-empty list"),
        "empty": ([], "non-empty list"),
        "turn not an object": ([["user", "hi"]], "messages[0] must be an object"),
        "bad role": ([{"role": "bot", "content": "x"}], "messages[0] role must be one of"),
        "content not text": (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}],
            "messages[1] content must be a string or a list of text parts, got int",
        ),
        "an image part": (
            [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}],
            "messages[0] content must be a string or a list of text parts, got a 'image' part",
        ),
        "no answer": ([{"role": "user", "content": "q"}], "no assistant turn"),
        "blank answer": (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
            "no assistant turn",
        ),
    }
    for name, (value, reason) in cases.items():
        assert reason in (messages_problem(value) or ""), name


def test_every_bad_messages_row_is_reported(tmp_path: Path) -> None:
    rows = [conversation(i, "a") for i in range(4)]
    rows[1]["messages"] = [{"role": "user", "content": "q"}]
    rows[3]["messages"][0]["role"] = "narrator"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(HetLoRAError) as info:
        load_clients(str(path))
    message = str(info.value)
    assert "2 bad rows of 4" in message and "\n" not in message
    assert "row 2: messages has no assistant turn" in message
    assert "row 4: messages[0] role must be one of system, user, assistant" in message


def test_messages_rows_make_clients_with_and_without_client_id(tmp_path: Path) -> None:
    rows = [conversation(i, "ab"[i % 2]) for i in range(6)]
    clients = load_clients(str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert sorted(clients) == ["a", "b"]
    first = clients["a"][0]
    assert first.response == "That is 0." and first.prompt == "And twice that?"
    assert first.messages[2] == ("assistant", "0 and 0 is 0.")
    for row in rows:
        del row["client_id"]
    parts = load_clients(
        str(write_jsonl(tmp_path / "p.jsonl", rows)), num_partitions=3, partitioner="iid"
    )
    assert sorted(parts) == ["partition-000", "partition-001", "partition-002"]
    assert sorted(ex.response for v in parts.values() for ex in v) == sorted(
        f"That is {4 * i}." for i in range(6)
    )


def test_text_parts_are_a_turns_text(tmp_path: Path) -> None:
    """Content as a list of text parts (the OpenAI form), in some rows of a file and plain
    strings in others, reads as the parts' texts joined (and a string answer that looks like
    a number stays that string)."""
    rows = [conversation(i, "a") for i in range(4)]
    rows[3]["messages"][-1]["content"] = "42"
    for row in rows[:2]:
        for turn in row["messages"]:
            words = turn["content"].split(" ", 1)
            turn["content"] = [{"type": "text", "text": w} for w in (words[0] + " ", words[1])]
    for suffix in (".jsonl", ".parquet"):
        path = tmp_path / f"parts{suffix}"
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows[:2]), path)
            plain = [conversation(i, "a") for i in range(2)]
        else:
            write_jsonl(path, rows)
            plain = [conversation(i, "a") for i in range(4)]
            plain[3]["messages"][-1]["content"] = "42"
        got = [ex.messages for ex in load_clients(str(path))["a"]]
        assert got == [tuple((t["role"], t["content"]) for t in r["messages"]) for r in plain]
    jsonl = [ex.messages for ex in load_clients(str(tmp_path / "parts.jsonl"))["a"]]
    (tmp_path / "rows.json").write_text(json.dumps(rows))  # one JSON document, the same rows
    assert [ex.messages for ex in load_clients(str(tmp_path / "rows.json"))["a"]] == jsonl
    one = json.loads(json.dumps(rows[0]))
    one["messages"][0]["content"] = "Answer in one line."  # one line, its contents mixed
    write_jsonl(tmp_path / "one.jsonl", [one])
    assert [ex.messages for ex in load_clients(str(tmp_path / "one.jsonl"))["a"]] == jsonl[:1]


def test_sharegpt_conversations_read_as_messages(tmp_path: Path, chat_tok) -> None:
    """ShareGPT's ``conversations`` (``from``: system / human / gpt, ``value``) reads as the
    same conversations as ``messages``; a turn of another speaker or shape is a bad row named
    in ShareGPT's terms, and with the tokenizer the rows are rendered while checking."""
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    rows = [conversation(i, "ab"[i % 2]) for i in range(6)]
    shared = [
        {
            "client_id": r["client_id"],
            "conversations": [
                {"from": speaker[t["role"]], "value": t["content"]} for t in r["messages"]
            ],
        }
        for r in rows
    ]
    want = load_clients(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    got = load_clients(str(write_jsonl(tmp_path / "s.jsonl", shared)))
    assert {c: [ex.messages for ex in v] for c, v in got.items()} == {
        c: [ex.messages for ex in v] for c, v in want.items()
    }
    assert got["a"][0].response == "That is 0."
    checked = load_clients(str(tmp_path / "s.jsonl"), tokenizer_loader=lambda: chat_tok)
    assert sum(map(len, checked.values())) == 6
    refusing = copy.deepcopy(chat_tok)  # a template that refuses system turns: rendered, so refused
    refusing.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}"
        "{% endif %}" + chat_tok.chat_template
    )
    with pytest.raises(HetLoRAError, match=r"6 bad rows of 6: row 1: .*no system turns"):
        load_clients(str(tmp_path / "s.jsonl"), tokenizer_loader=lambda: refusing)
    shared[1]["conversations"][1]["from"] = "function_call"
    shared[2]["conversations"][1]["from"] = ["gpt"]
    shared[4]["conversations"][0] = {"role": "system", "content": "x"}
    shared[5]["conversations"][-1]["value"] = 3
    for skip in (False, True):
        path = write_jsonl(tmp_path / "bad.jsonl", shared)
        if skip:
            kept = load_clients(str(path), on_bad_rows="skip")
            assert sum(map(len, kept.values())) == 2
            continue
        with pytest.raises(HetLoRAError) as info:
            load_clients(str(path))
    message = str(info.value)
    assert "4 bad rows of 6" in message
    assert "row 2: conversations[1] 'from' must be one of system, human, user, gpt" in message
    assert "row 3: conversations[1] 'from' must be one of" in message
    assert "row 5: conversations[0] must be an object with 'from' and 'value'" in message
    assert "row 6: conversations[4] value must be a string or a list of text parts" in message


def test_saved_datasets_folders_read_like_the_file(tmp_path: Path) -> None:
    import datasets

    rows = [conversation(i, "ab"[i % 2]) for i in range(6)]
    from_file = load_clients(str(write_jsonl(tmp_path / "c.jsonl", rows)))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert load_clients(str(tmp_path / "one")) == from_file
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows),
            "test": datasets.Dataset.from_list(rows[:2]),
        }
    ).save_to_disk(str(tmp_path / "dict"))
    assert load_clients(str(tmp_path / "dict"), split="train") == from_file
    assert sum(map(len, load_clients(str(tmp_path / "dict"), split="test").values())) == 2
    with pytest.raises(HetLoRAError, match=r"holds the splits test, train: set split"):
        load_clients(str(tmp_path / "dict"))
    with pytest.raises(HetLoRAError, match=r"split 'valid' is not in .*its splits: test, train"):
        load_clients(str(tmp_path / "dict"), split="valid")
    with pytest.raises(HetLoRAError, match=r"one Dataset, not a DatasetDict"):
        load_clients(str(tmp_path / "one"), split="train")
    with pytest.raises(HetLoRAError, match=r"split 'train' applies only to"):
        load_clients(str(tmp_path / "c.jsonl"), split="train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(HetLoRAError, match=r"not written by Dataset.save_to_disk"):
        load_clients(str(tmp_path / "plain"))


def test_a_hub_id_offline_is_one_error_line() -> None:
    with pytest.raises(HetLoRAError) as info:
        load_clients("HuggingFaceH4/no_robots", split="train")
    assert "hub is offline" in str(info.value) and "\n" not in str(info.value)


def test_chat_template_modes(chat_tok, tiny_model: Path) -> None:
    pair = Example(prompt="Who art thou?", response="A friend.")
    chat = Example(prompt="Who art thou?", response="A friend.", messages=TURNS[1:3])
    auto = make_renderer(chat_tok, "auto", [pair])
    assert auto.tokenize(pair, 64) == tokenize(chat_tok, pair.prompt, pair.response, 64)
    assert chat_tok.decode(auto.prompt(pair)) == "Who art thou?"
    assert auto.tokenize(chat, 64) == render_conversation(chat_tok, TURNS[1:3], 64)
    on = make_renderer(chat_tok, "on", [pair])
    assert on.tokenize(pair, 64) == render_conversation(chat_tok, TURNS[1:3], 64)
    assert (
        chat_tok.decode(on.prompt(pair)) == "### user: Who art thou?<|endoftext|>\n### assistant:"
    )
    alpaca = Example(prompt="Who art thou?\n\n", response="A friend.")  # Alpaca's separator
    assert on.tokenize(alpaca, 64) == on.tokenize(pair, 64)
    assert make_renderer(chat_tok, "off", [pair]).tokenize(pair, 64) == auto.tokenize(pair, 64)
    text = Example(prompt="", response="Words, words, words.")
    with pytest.raises(HetLoRAError, match=r"this data has no prompts \(text rows\)"):
        make_renderer(chat_tok, "on", [text])
    with pytest.raises(HetLoRAError, match=r"chat_template = 'off' cannot read messages rows"):
        make_renderer(chat_tok, "off", [chat])
    plain = AutoTokenizer.from_pretrained(tiny_model)  # no chat template
    assert make_renderer(plain, "auto", [pair]).tokenize(pair, 64) == auto.tokenize(pair, 64)
    for mode, examples, what in (("auto", [chat], "messages rows need"), ("on", [pair], "'on'")):
        with pytest.raises(HetLoRAError, match=what) as info:
            make_renderer(plain, mode, examples)
        assert "tokenizer_config.json" in str(info.value) and "\n" not in str(info.value)


def test_config_keys_are_checked() -> None:
    assert make_config({"report_to": ["tensorboard", "wandb"]}).report_to == [
        "tensorboard",
        "wandb",
    ]
    assert make_config({"report_to": "mlflow"}).report_to == ["mlflow"]
    for values, message in (
        ({"chat_template": "yes"}, "'chat_template' must be one of auto, on, off"),
        ({"report_to": ["comet"]}, "takes names from tensorboard, mlflow, wandb"),
        ({"report_to": ["mlflow", "mlflow"]}, "names a tracker twice"),
    ):
        with pytest.raises(HetLoRAError, match=message):
            make_config(values)


def test_a_bos_the_template_writes_stays_through_left_truncation(chat_tok) -> None:
    from tiny import TINY_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(chat_tok.name_or_path)
    tok.add_special_tokens({"bos_token": "<s>"})  # named, but never added by the tokenizer
    bos = tok.bos_token_id
    tok.chat_template = "{{ bos_token }}" + TINY_CHAT_TEMPLATE
    full = render_conversation(tok, TURNS, 512)
    assert full.ids[0] == bos and tok("x")["input_ids"][0] != bos
    short = render_conversation(tok, TURNS, 20)
    first = full.target.index(True)
    answer = full.ids[first : first + 8]  # the first answer, 8 tokens, kept whole
    assert short.ids == (bos, *full.ids[first - 11 : first], *answer)
    assert short.target == (False,) * 12 + (True,) * 8
    # A template that only starts with the token named BOS (SmolLM2's <|im_start|> turn
    # header) does not write a BOS: the context is cut as before.
    tok.chat_template = "<s>" + TINY_CHAT_TEMPLATE
    plain = render_conversation(tok, TURNS, 20)
    assert plain.ids == (*full.ids[first - 12 : first], *answer)


class CharTokenizer(PreTrainedTokenizer):
    """A slow (pure Python) tokenizer of one token per character: no character offsets."""

    def __init__(self, **kwargs) -> None:
        self.vocab = {"</s>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
        super().__init__(eos_token="</s>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index: int) -> str:
        return {v: k for k, v in self.vocab.items()}.get(index, "</s>")


def test_a_slow_tokenizer_is_refused_once_not_row_by_row(chat_tok, tmp_path: Path) -> None:
    slow = CharTokenizer()
    slow.chat_template = chat_tok.chat_template
    assert not slow.is_fast and slow.apply_chat_template(
        [{"role": r, "content": c} for r, c in TURNS], tokenize=False
    )
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(i, "a") for i in range(4)])
    for action in ("error", "skip"):
        with pytest.raises(HetLoRAError, match=r"^conversations need a fast tokenizer"):
            load_clients(str(path), on_bad_rows=action, tokenizer_loader=lambda: slow)

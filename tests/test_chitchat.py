"""The Chit Chat Challenge data set: turns, per-participant examples, their rendering, and the
client counts docs/data.md and the module docstring state."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from hetlora.config import make_config
from hetlora.data import load_clients
from hetlora.data.chat import make_renderer
from hetlora.data.chitchat import SYSTEM, conversation_turns, participant_clients
from hetlora.errors import HetLoRAError


def msg(sender: str, text: str) -> dict:
    return {"text": text, "timestamp": "2018-04-19T19:57:51", "sender": sender}


# Two conversations of ann; the later one (by start) is listed first.
CONVERSATIONS = {
    "c2": {
        "start": "2018-05-01T10:00:00",
        "messages": [
            [msg("ann", "Hello"), msg("ann", "  "), msg("ann", "how are you?")],
            [msg("bob", "Fine.")],
            [msg("ann", "Good to hear")],
            [msg("bob", "And you?")],
            [msg("ann", "Tired.")],
        ],
    },
    "c1": {
        "start": "2018-04-01T10:00:00",
        "messages": [[msg("cat", "Hi ann")], [msg("ann", "Hi cat")]],
    },
    "alone": {"start": "2018-03-01T10:00:00", "messages": [[msg("dan", "anyone?")]]},
}


def test_a_turn_joins_the_nonblank_messages_of_one_sender():
    turns = conversation_turns("c2", CONVERSATIONS["c2"])
    assert turns == [
        ("ann", "Hello\nhow are you?"),
        ("bob", "Fine."),
        ("ann", "Good to hear"),
        ("bob", "And you?"),
        ("ann", "Tired."),
    ]
    # A blank message between two of one sender's groups joins them into one turn.
    merged = {"messages": [[msg("a", "x")], [msg("b", " ")], [msg("a", "y")], [msg("b", "z")]]}
    assert conversation_turns("m", merged) == [("a", "x\ny"), ("b", "z")]


@pytest.mark.parametrize(
    "conv",
    [{}, {"messages": "hi"}, {"messages": [[{"text": "hi"}]]}, {"messages": [[msg("a", 3)]]}],
)
def test_a_malformed_conversation_is_an_error_naming_it(conv):
    with pytest.raises(HetLoRAError, match="chitchat conversation c9"):
        conversation_turns("c9", conv)


def test_every_answering_turn_is_an_example_of_its_sender_with_capped_context():
    clients = participant_clients(CONVERSATIONS)
    assert list(clients) == ["ann", "bob"]  # dan never answered; cat only opened
    ann = clients["ann"]
    # c1 starts first, so its turn comes first; c2's opening turn answers nobody.
    assert [ex.response for ex in ann] == ["Hi cat", "Good to hear", "Tired."]
    assert ann[0].messages == (("system", SYSTEM), ("user", "Hi ann"), ("assistant", "Hi cat"))
    # "Tired." sees the other's last turn as the user turn and two earlier turns in the system
    # turn; c2's first turn is beyond CONTEXT_TURNS = 3 and left out.
    assert ann[2].prompt == "And you?"
    assert ann[2].messages == (
        ("system", f"{SYSTEM}\nEarlier in this chat:\nThem: Fine.\nYou: Good to hear"),
        ("user", "And you?"),
        ("assistant", "Tired."),
    )
    bob = clients["bob"]
    assert bob[1].messages[0] == (
        "system",
        f"{SYSTEM}\nEarlier in this chat:\nThem: Hello\nhow are you?\nYou: Fine.",
    )


def test_the_loss_is_on_the_participants_turn_only(tiny_chat_model: Path):
    from transformers import AutoTokenizer

    ex = participant_clients(CONVERSATIONS)["ann"][2]
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    item = make_renderer(tok, "auto", [ex]).tokenize(ex, 256)
    answer = [i for i, keep in zip(item.ids, item.target, strict=True) if keep]
    assert tok.decode(answer) == f" Tired.{tok.eos_token}\n"  # the template's turn text
    # A long context is cut on the left; the answer (at most half of max_len) stays whole.
    max_len = 2 * len(answer) + 3
    assert len(item.ids) > max_len
    cut = make_renderer(tok, "auto", [ex]).tokenize(ex, max_len)
    assert len(cut.ids) == max_len and cut.ids[-len(answer) :] == item.ids[-len(answer) :]
    assert [i for i, k in zip(cut.ids, cut.target, strict=True) if k] == answer


def test_the_packaged_corpus_gives_the_documented_clients():
    clients = load_clients("chitchat", min_examples=40)
    sizes = sorted(len(v) for v in clients.values())
    assert (len(sizes), sum(sizes), sizes[-1]) == (337, 122505, 12214)
    assert statistics.median(sizes) == 109
    everyone = load_clients("chitchat")  # cached parse: fast the second time
    assert (len(everyone), sum(len(v) for v in everyone.values())) == (1113, 131548)
    ex = next(iter(clients.values()))[0]
    assert [role for role, _ in ex.messages] == ["system", "user", "assistant"]
    assert ex.response == ex.messages[-1][1] and ex.prompt == ex.messages[1][1]


@pytest.mark.parametrize(
    "key, value", [("on_bad_rows", "skip"), ("partitioner", "dirichlet"), ("split", "train")]
)
def test_keys_of_data_files_do_not_apply_to_chitchat(key, value):
    with pytest.raises(HetLoRAError, match=f"'{key}'.*not data = 'shakespeare' or 'chitchat'"):
        make_config({"data": "chitchat", key: value})
    assert make_config({"data": "chitchat"}).data == "chitchat"


NO_SYSTEM_TEMPLATE = (  # as Gemma's: a system turn is an error raised by the template
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
)


def test_a_template_without_system_turns_gets_the_system_text_in_the_user_turn(
    tiny_chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import json

    from transformers import AutoTokenizer

    from hetlora.data import chitchat
    from hetlora.data.chat import render_conversation

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    tok.chat_template = NO_SYSTEM_TEMPLATE + tok.chat_template
    ex = participant_clients(CONVERSATIONS)["ann"][2]
    with pytest.raises(HetLoRAError, match="System role not supported"):
        render_conversation(tok, ex.messages, 256)
    (tmp_path / "dataset.json").write_text(json.dumps(CONVERSATIONS))
    monkeypatch.setattr(chitchat, "_data_file", lambda: tmp_path / "dataset.json")
    chitchat._load_cached.cache_clear()
    try:
        folded = load_clients("chitchat", tokenizer_loader=lambda: tok)["ann"][2]
        kept = load_clients(
            "chitchat", tokenizer_loader=lambda: AutoTokenizer.from_pretrained(tiny_chat_model)
        )["ann"][2]
    finally:
        chitchat._load_cached.cache_clear()
    assert kept == ex  # a template with system turns: unchanged
    system, user, answer = ex.messages
    assert folded.messages == (("user", f"{system[1]}\n\n{user[1]}"), answer)
    assert (folded.prompt, folded.response) == (ex.prompt, ex.response)
    item = render_conversation(tok, folded.messages, 256)
    assert tok.decode([i for i, k in zip(item.ids, item.target, strict=True) if k]).startswith(
        " Tired."
    )

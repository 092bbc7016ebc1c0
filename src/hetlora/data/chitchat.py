"""The Chit Chat Challenge corpus as federated chat data: one client per participant.

The conversations are the JSON file shipped with the ``chitchat-dataset`` package
(``chitchat_dataset/dataset.json``, MIT; BYU PCC lab, Myers, Etchart and Fulda,
"Conversational Scaffolding", 2020): 7,168 conversations, 258,145 messages, 1,315 participants.
Only the file is read; the package's Python code is not imported. Format::

    {"<conversation uuid>": {"prompt": "...", "start": "...", "ratings": {...},
                             "messages": [[{"text", "timestamp", "sender"}, ...], ...]}}

A *turn* is a run of consecutive non-blank messages by one sender, joined with a newline.
Every turn that answers a turn of the other person is an example of its sender, rendered with
the model's chat template (`hetlora.data.chat`), the sender being the assistant:

* ``user``: the other person's turn just before;
* ``assistant``: the sender's turn (the only turn with loss);
* ``system``: ``"You are chatting with someone."`` and, if the conversation has them, up to
  ``CONTEXT_TURNS - 1`` turns before that as a transcript (``Them: ...`` / ``You: ...``).

For a model whose chat template refuses a system turn (Gemma's), the system text opens the
user turn instead, separated by a blank line (`fold_system`): the corpus is ours, so
its examples are adapted to the template rather than all refused.

Earlier turns go into the transcript rather than into assistant turns because the chat
renderer puts loss on every assistant turn: the sender's own earlier turns are other
examples' targets, which would then be trained on twice and leak across the test split.
The context is capped at the last ``CONTEXT_TURNS`` = 3 turns so a typical example fits the
default ``max_seq_len`` of 128 tokens (median turn: 16 SmolLM2 tokens, 90th percentile 47);
a longer prompt is cut on the left.

Conversations with one sender (3,150, mostly unanswered openers) give no example. What is
left is 131,548 examples of 1,113 participants, very unequal: the largest client has 12,214
examples, the median one 16. With the default ``min_examples = 40``, 337 participants are
clients (122,505 examples), with examples per client at the 10/25/50/75/90 % quantiles of
48/62/109/238/667; ``max_examples_per_client`` and ``max_clients`` keep a run's size sane.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hetlora.data import Example
from hetlora.errors import HetLoRAError

__all__ = [
    "CONTEXT_TURNS",
    "SYSTEM",
    "conversation_turns",
    "fold_system",
    "load_chitchat",
    "participant_clients",
]

logger = logging.getLogger(__name__)

#: Turns an example sees before the one it predicts: the other person's last turn (the user
#: turn) and up to ``CONTEXT_TURNS - 1`` earlier ones (the system turn's transcript).
CONTEXT_TURNS = 3

#: The system turn every example starts with (the transcript follows it).
SYSTEM = "You are chatting with someone."


def _data_file() -> Path:
    """The ``dataset.json`` of the ``chitchat-dataset`` package, found without importing it."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise HetLoRAError(
            "data = 'chitchat' needs the 'chitchat-dataset' package, which is not installed: "
            "pip install chitchat-dataset==0.9.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset.json"
    if not path.is_file():
        raise HetLoRAError(f"the 'chitchat-dataset' package has no dataset.json at {path}")
    return path


def conversation_turns(conv_id: str, conv: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ``(sender, text)`` turns of one conversation: consecutive non-blank messages of one
    sender joined with a newline, in order.

    Raises:
        HetLoRAError: the conversation is not shaped as the module docstring says.
    """
    groups = conv.get("messages") if isinstance(conv, Mapping) else None
    if not isinstance(groups, list):
        raise HetLoRAError(f"chitchat conversation {conv_id}: 'messages' must be a list")
    turns: list[tuple[str, list[str]]] = []
    for group in groups:
        for msg in group if isinstance(group, list) else [group]:
            if not (
                isinstance(msg, Mapping)
                and isinstance(msg.get("sender"), str)
                and msg["sender"]
                and isinstance(msg.get("text"), str)
            ):
                raise HetLoRAError(
                    f"chitchat conversation {conv_id}: a message needs string 'sender' and "
                    f"'text', got {msg!r:.80}"
                )
            text = msg["text"].strip()
            if not text:
                continue
            if turns and turns[-1][0] == msg["sender"]:
                turns[-1][1].append(text)
            else:
                turns.append((msg["sender"], [text]))
    return [(sender, "\n".join(lines)) for sender, lines in turns]


def _example(turns: list[tuple[str, str]], i: int) -> Example:
    """The example of turn ``i`` (``i >= 1``) with its capped context."""
    sender, text = turns[i]
    earlier = turns[max(0, i - CONTEXT_TURNS) : i - 1]
    system = SYSTEM
    if earlier:
        lines = [f"{'You' if who == sender else 'Them'}: {said}" for who, said in earlier]
        system += "\nEarlier in this chat:\n" + "\n".join(lines)
    messages = (("system", system), ("user", turns[i - 1][1]), ("assistant", text))
    return Example(prompt=turns[i - 1][1], response=text, messages=messages)


def participant_clients(conversations: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Example]]:
    """One client per participant, keyed by sender id in sorted order; each client's examples
    follow the conversations' start times (then ids) and the turns' order."""
    clients: dict[str, list[Example]] = defaultdict(list)
    order = sorted(conversations, key=lambda c: (str(conversations[c].get("start", "")), c))
    for conv_id in order:
        turns = conversation_turns(conv_id, conversations[conv_id])
        for i in range(1, len(turns)):
            clients[turns[i][0]].append(_example(turns, i))
    return {cid: clients[cid] for cid in sorted(clients)}


@functools.lru_cache(maxsize=1)
def _load_cached() -> tuple[tuple[str, tuple[Example, ...]], ...]:
    """Parse the corpus once per process; immutable so the cache cannot be altered."""
    path = _data_file()
    try:
        conversations = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HetLoRAError(f"cannot read the chitchat data {path}: {exc}") from exc
    if not isinstance(conversations, dict):
        raise HetLoRAError(f"{path}: expected an object of conversations")
    clients = participant_clients(conversations)
    logger.debug(
        "parsed %d chitchat conversations: %d examples of %d participants",
        len(conversations),
        sum(len(v) for v in clients.values()),
        len(clients),
    )
    return tuple((cid, tuple(examples)) for cid, examples in clients.items())


def fold_system(example: Example) -> Example:
    """``example`` with its system turn moved into the user turn after it: ``system`` + a
    blank line + ``user``, for templates that refuse a system turn."""
    turns = list(example.messages)
    if len(turns) < 2 or turns[0][0] != "system" or turns[1][0] != "user":
        return example
    folded = (("user", f"{turns[0][1]}\n\n{turns[1][1]}"), *turns[2:])
    return Example(prompt=example.prompt, response=example.response, messages=folded)


def load_chitchat(tokenizer: Any = None) -> dict[str, list[Example]]:
    """One client per participant of the Chit Chat Challenge corpus (see the module docstring),
    keyed by the participant's id in sorted order; with the model's ``tokenizer``, the system
    turn folded into the user turn (`fold_system`) when its chat template refuses one
    (`hetlora.data.chat.refuses_system`)."""
    from hetlora.data.chat import refuses_system

    if tokenizer is not None and refuses_system(tokenizer):
        logger.info("the chat template refuses a system turn: folded into the user turn")
        return {cid: [fold_system(ex) for ex in examples] for cid, examples in _load_cached()}
    return {cid: list(examples) for cid, examples in _load_cached()}

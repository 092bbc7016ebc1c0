"""Conversational examples: ``messages`` rows rendered with the model's chat template.

The conventions are those of the Hugging Face ecosystem (TRL's ``SFTTrainer`` with
``assistant_only_loss``): a row is a ``messages`` list of ``{"role", "content"}`` turns
(``system``, ``user``, ``assistant``), the text the model sees is the tokenizer's own chat
template applied to them, and the loss is on the assistant turns only, every one of them in a
multi-turn conversation (each predicted from the whole conversation before it).

The token positions of each assistant turn come from rendering growing prefixes of the
conversation: with ``render(m)`` the template applied to the turns ``m``, assistant turn ``i``
is the text between ``render(m[:i], add_generation_prompt=True)`` and ``render(m[:i+1])``.
The conversation is tokenised piece by piece along these cuts, so the mask is exact whatever
the tokenizer; a template whose renderings are not prefixes of each other is refused.

``chat_template`` (a config key) decides which rows go through the template:

* ``auto`` (default): ``messages`` rows do (the tokenizer must have a template);
  ``prompt``/``response`` and ``text`` rows are tokenised raw, as before;
* ``on``: ``prompt``/``response`` rows too, as one user turn and one assistant turn;
* ``off``: nothing does (``messages`` rows are then refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hetlora.data import Example
from hetlora.data.batching import Tokenized, fit, token_ids, tokenize
from hetlora.errors import HetLoRAError, first_line

__all__ = [
    "ROLES",
    "Renderer",
    "example_from_messages",
    "make_renderer",
    "messages_problem",
    "render_conversation",
]

#: Roles a ``messages`` turn may have.
ROLES = ("system", "user", "assistant")

_FIX = (
    "use an instruct model whose tokenizer has one, or add a Jinja 'chat_template' to the "
    "model folder's tokenizer_config.json"
)


def messages_problem(value: Any) -> str | None:
    """Why one ``messages`` value is not a usable conversation, or ``None`` if it is.

    A usable conversation is a non-empty list of ``{"role", "content"}`` objects with roles in
    :data:`ROLES`, string contents, and at least one assistant turn with non-blank content.
    """
    if value is None:
        return "column 'messages' is null"
    if not isinstance(value, list) or not value:
        return f"column 'messages' must be a non-empty list of turns, got {value!r:.60}"
    has_answer = False
    for j, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            return f"messages[{j}] must be an object with 'role' and 'content', got {turn!r:.60}"
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            return f"messages[{j}] role must be one of {', '.join(ROLES)}, got {role!r:.40}"
        if not isinstance(content, str):
            return f"messages[{j}] content must be a string, got {type(content).__name__}"
        has_answer = has_answer or (role == "assistant" and bool(content.strip()))
    if not has_answer:
        return "messages has no assistant turn with content (nothing to train on)"
    return None


def example_from_messages(value: list[dict[str, Any]]) -> Example:
    """An :class:`Example` holding a checked conversation (see :func:`messages_problem`).

    ``response`` is the last assistant turn (the ROUGE-L reference) and ``prompt`` the last
    non-assistant turn before it (shown next to it in ``samples.jsonl``).
    """
    turns = tuple((str(t["role"]), str(t["content"])) for t in value)
    last = max(i for i, (role, content) in enumerate(turns) if role == "assistant" and content)
    before = [content for role, content in turns[:last] if role != "assistant"]
    return Example(prompt=before[-1] if before else "", response=turns[last][1], messages=turns)


def _apply(tokenizer, turns: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in turns],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except Exception as exc:  # a Jinja error raised by the template itself
        raise HetLoRAError(
            f"the tokenizer's chat template failed on a conversation: {first_line(exc)}"
        ) from exc


def render_conversation(tokenizer, turns: Sequence[tuple[str, str]], max_len: int) -> Tokenized:
    """Tokenise a conversation with the chat template; loss on every assistant turn only.

    The conversation is cut into exchanges: the template text before assistant turn ``i``
    (system and user turns, the assistant header) and turn ``i`` itself (its content and the
    template's end-of-turn text). Turns after the last assistant turn carry no loss and are
    dropped. Truncation to ``max_len`` keeps the longest run of whole exchanges from the start;
    when even the first does not fit, it is cut as prompt/response rows are
    (:func:`~hetlora.data.batching.fit`), so an example always ends in answer tokens and never
    trains on a cut-off prompt alone.

    Raises:
        HetLoRAError: the template fails, or renders a prefix of the conversation as text
            that is not a prefix of the whole (the assistant positions would be ambiguous).
    """
    exchanges: list[tuple[list[int], list[int]]] = []
    done = ""
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _apply(tokenizer, turns[:i], generation_prompt=True)
        after = _apply(tokenizer, turns[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise HetLoRAError(
                "the tokenizer's chat template renders the start of a conversation differently "
                "from the whole conversation, so the assistant turns cannot be located; "
                "use a template whose renderings of growing conversations extend each other"
            )
        exchanges.append(
            (token_ids(tokenizer, before[len(done) :]), token_ids(tokenizer, after[len(before) :]))
        )
        done = after
    exchanges = [(ctx, ans) for ctx, ans in exchanges if ans or ctx]
    kept: list[tuple[list[int], list[int]]] = []
    total = 0
    for ctx, ans in exchanges:
        if total + len(ctx) + len(ans) > max_len:
            break
        kept.append((ctx, ans))
        total += len(ctx) + len(ans)
    if not kept:
        kept = [fit(*exchanges[0], max_len)]
    ids: list[int] = []
    target: list[bool] = []
    for ctx, ans in kept:
        ids += ctx + ans
        target += [False] * len(ctx) + [True] * len(ans)
    return Tokenized(ids=tuple(ids), n_prompt=len(kept[0][0]), target=tuple(target))


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class Renderer:
    """How the examples of a run become tokens and generation prompts (training, evaluation,
    ROUGE-L generations, ``hetlora evaluate`` and ``hetlora chat`` all use one); ``mode`` is
    the ``chat_template`` key (see the module docstring)."""

    tokenizer: Any
    mode: str

    def conversation(self, example: Example) -> tuple[tuple[str, str], ...] | None:
        """The turns ``example`` is rendered from, or ``None`` for raw prompt + response."""
        if example.messages:
            return example.messages
        if self.mode == "on":
            return (("user", example.prompt), ("assistant", example.response))
        return None

    def tokenize(self, example: Example, max_len: int) -> Tokenized:
        """Token ids and loss mask of one example."""
        turns = self.conversation(example)
        if turns is None:
            return tokenize(self.tokenizer, example.prompt, example.response, max_len)
        return render_conversation(self.tokenizer, turns, max_len)

    def tokenize_all(self, examples: Sequence[Example], max_len: int) -> list[Tokenized]:
        """:meth:`tokenize` of every example."""
        return [self.tokenize(ex, max_len) for ex in examples]

    def prompt(self, example: Example) -> str:
        """The text a generation continues: every turn before the last assistant turn, with
        the template's assistant header (or the raw prompt)."""
        turns = self.conversation(example)
        if turns is None:
            return example.prompt
        last = max(i for i, (role, text) in enumerate(turns) if role == "assistant" and text)
        return _apply(self.tokenizer, turns[:last], generation_prompt=True)

    def chat_prompt(self, turns: Sequence[tuple[str, str]]) -> str:
        """The text a chat reply continues: ``turns`` (ending with a user turn) through the
        template (unless ``chat_template = "off"`` or the tokenizer has none), else the last
        turn raw, as such a run trained on prompts."""
        if self.mode != "off" and has_chat_template(self.tokenizer):
            return _apply(self.tokenizer, turns, generation_prompt=True)
        return turns[-1][1]


def make_renderer(tokenizer, mode: str, examples: Sequence[Example] = ()) -> Renderer:
    """The :class:`Renderer` for ``chat_template = mode`` and a run's ``examples``.

    Raises:
        HetLoRAError: ``messages`` examples with ``mode = "off"``, ``mode = "on"`` for text
            rows (no example has a prompt), or a template needed
            (``messages`` examples, or ``mode = "on"``) and the tokenizer has none.
    """
    has_messages = any(ex.messages for ex in examples)
    if has_messages and mode == "off":
        raise HetLoRAError(
            "chat_template = 'off' cannot read messages rows (they need the chat template); "
            "use chat_template = 'auto'"
        )
    if mode == "on" and examples and not has_messages and not any(ex.prompt for ex in examples):
        raise HetLoRAError(
            "chat_template = 'on' renders prompt/response rows as a user and an assistant turn; "
            "this data has no prompts (text rows): use chat_template = 'auto' or 'off'"
        )
    needs = has_messages or mode == "on"
    if needs and not has_chat_template(tokenizer):
        what = "messages rows need" if has_messages else "chat_template = 'on' needs"
        raise HetLoRAError(f"{what} a chat template and the model's tokenizer has none: {_FIX}")
    return Renderer(tokenizer=tokenizer, mode=mode)

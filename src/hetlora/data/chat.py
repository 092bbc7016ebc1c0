"""Conversational examples: ``messages`` rows rendered with the model's chat template.

The conventions are those of the Hugging Face ecosystem (TRL's ``SFTTrainer`` with
``assistant_only_loss``): a row is a ``messages`` list of ``{"role", "content"}`` turns
(``system``, ``user``, ``assistant``), the text the model sees is the tokenizer's own chat
template applied to them, and the loss is on the assistant turns only, every one of them in a
multi-turn conversation (each predicted from the whole conversation before it).

The characters of each assistant turn come from rendering growing prefixes of the
conversation: with ``render(m)`` the template applied to the turns ``m``, assistant turn ``i``
is the text between ``render(m[:i], add_generation_prompt=True)`` and ``render(m[:i+1])``.
The whole rendering is tokenised once, as Hugging Face's ``apply_chat_template(tokenize=True)``
does (no special tokens added: the template writes its own BOS), and a token is trained on
when its character offsets overlap an assistant turn, so the ids are the rendered
conversation's whatever the tokenizer (byte-level or Metaspace). Markup written only after
a whole conversation (Phi-3's end-of-text token) belongs to its last assistant turn; any other
template whose renderings are not prefixes of each other is refused.

``chat_template`` (a config key) decides which rows go through the template:

* ``auto`` (default): ``messages`` rows do (the tokenizer must have a template);
  ``prompt``/``response`` and ``text`` rows are tokenised raw, as before;
* ``on``: ``prompt``/``response`` rows too, as one user turn (the prompt without its trailing
  white space, e.g. the blank line after an Alpaca instruction) and one assistant turn;
* ``off``: nothing does (``messages`` rows are then refused).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from hetlora.data import Example
from hetlora.data.batching import Tokenized, fit, pair_ids, start_ids, token_ids, tokenize
from hetlora.errors import HetLoRAError, first_line

__all__ = [
    "ROLES",
    "Renderer",
    "SHAREGPT_ROLES",
    "example_from_messages",
    "from_sharegpt",
    "conversation_problem",
    "make_renderer",
    "messages_problem",
    "refuses_system",
    "render_conversation",
    "sharegpt_problem",
    "require_offsets",
    "template_bos",
    "turn_text",
]

#: Roles a ``messages`` turn may have.
ROLES = ("system", "user", "assistant")
#: The values of the config key ``chat_template`` (`make_renderer`'s ``mode``).
CHAT_TEMPLATES = ("auto", "on", "off")

_NOT_PREFIXES = (
    "the tokenizer's chat template renders the start of a conversation differently from the "
    "whole conversation, so the assistant turns cannot be located; use a template whose "
    "renderings of growing conversations extend each other"
)
_FIX = (
    "use an instruct model whose tokenizer has one, or add a Jinja 'chat_template' to the "
    "model folder's tokenizer_config.json"
)


def messages_problem(value: Any) -> str | None:
    """Why one ``messages`` value is not a usable conversation, or ``None`` if it is.

    A usable conversation is a non-empty list of ``{"role", "content"}`` objects with roles in
    `ROLES`, contents that are strings or lists of text parts (`turn_text`), and at least one
    assistant turn with non-blank content.
    """
    if value is None:
        return "column 'messages' is null"
    if not isinstance(value, list) or not value:
        return f"column 'messages' must be a non-empty list of turns, got {value!r:.60}"
    has_answer = False
    for j, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            return f"messages[{j}] must be an object with 'role' and 'content', got {turn!r:.60}"
        role = turn["role"]
        if role not in ROLES:
            return f"messages[{j}] role must be one of {', '.join(ROLES)}, got {role!r:.40}"
        try:
            content = turn_text(turn["content"])
        except ValueError as exc:
            return f"messages[{j}] content must be a string or a list of text parts, {exc}"
        has_answer = has_answer or (role == "assistant" and bool(content.strip()))
    if not has_answer:
        return "messages has no assistant turn with content (nothing to train on)"
    return None


#: The speakers of a ShareGPT ``conversations`` turn (its ``from``) and the roles they are.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def from_sharegpt(value: Any) -> Any:
    """A ShareGPT ``conversations`` value (``[{"from": "human", "value": ...}, {"from": "gpt",
    ...}]``, as axolotl and LLaMA-Factory read it) as a ``messages`` value; a turn of another
    shape, or from another speaker, is kept as it is for `sharegpt_problem` to name."""
    if not isinstance(value, list):
        return value
    return [
        {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}
        if isinstance(turn, dict) and _speaker(turn) in SHAREGPT_ROLES and "value" in turn
        else turn
        for turn in value
    ]


def sharegpt_problem(value: Any) -> str | None:
    """Why one ``conversations`` value is not a usable conversation (`messages_problem` of
    `from_sharegpt`), or ``None`` if it is."""
    if isinstance(value, list):
        for j, turn in enumerate(value):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                return (
                    f"conversations[{j}] must be an object with 'from' and 'value', "
                    f"got {turn!r:.60}"
                )
            if _speaker(turn) not in SHAREGPT_ROLES:
                return (
                    f"conversations[{j}] 'from' must be one of {', '.join(SHAREGPT_ROLES)}, "
                    f"got {turn['from']!r:.40}"
                )
    why = messages_problem(from_sharegpt(value))
    if why is None:
        return None
    return why.replace("messages", "conversations", 1).replace("] content must", "] value must")


def _speaker(turn: dict[str, Any]) -> str | None:
    """A ShareGPT turn's ``from``, where it is a string."""
    speaker = turn.get("from")
    return speaker if isinstance(speaker, str) else None


def turn_text(content: Any) -> str:
    """A turn's text: its ``content`` string, or the texts of a list of parts (the OpenAI
    form, ``[{"type": "text", "text": ...}]``) joined as chat templates write them.

    Raises:
        ValueError: ``content`` is neither, or has a part other than text (an image).
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"got {type(content).__name__}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if kind else f"the part {part!r:.40}"
            raise ValueError(f"got {what} (only text parts can be trained on)")
        texts.append(part["text"])
    return "".join(texts)


def example_from_messages(value: list[dict[str, Any]]) -> Example:
    """An `Example` holding a checked conversation (see `messages_problem`).

    ``response`` is the last assistant turn (the ROUGE-L reference) and ``prompt`` the last
    non-assistant turn before it (shown next to it in ``samples.jsonl``).
    """
    turns = tuple((str(t["role"]), turn_text(t["content"])) for t in value)
    last = max(i for i, (role, content) in enumerate(turns) if role == "assistant" and content)
    before = [content for role, content in turns[:last] if role != "assistant"]
    return Example(prompt=before[-1] if before else "", response=turns[last][1], messages=turns)


#: The day a chat template that writes today's date (Llama 3.1-3.3's "Today Date", Granite's)
#: sees: Llama 3.1's own fallback date, so that a run's tokens do not depend on the day it runs
#: (a resume, ``hetlora evaluate`` or ``hetlora chat`` on another day renders the same text).
TEMPLATE_DATE = datetime.datetime(2024, 7, 26)


class _TemplateClock(datetime.datetime):
    """The ``datetime`` Hugging Face's ``strftime_now`` reads, stopped at `TEMPLATE_DATE`."""

    @classmethod
    def now(cls, tz=None):
        return TEMPLATE_DATE


_TEMPLATE_LOCK = threading.RLock()


@contextlib.contextmanager
def _template_date() -> Iterator[None]:
    """Templates rendered inside see `TEMPLATE_DATE` as today (every template call of
    ``strftime_now``, the date Llama 3's template writes when no ``date_string`` is given)."""
    from transformers.utils import chat_template_utils as templates

    with _TEMPLATE_LOCK:  # one thread's restore must not undo, or keep, another's patch
        clock, templates.datetime = templates.datetime, _TemplateClock
        try:
            yield
        finally:
            templates.datetime = clock


def _apply(tokenizer, turns: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
    try:
        with _template_date():
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
    (`hetlora.data.batching.fit`, the BOS kept at position 0: the tokenizer's own, or the
    one the template writes, `template_bos`), so an example
    always ends in answer tokens and never trains on a cut-off prompt alone.

    A template may close a whole conversation with markup it does not write between turns
    (Phi-3's EOS after the last ``<|end|>``): that text belongs to the last assistant turn only.

    Raises:
        HetLoRAError: the template fails, renders a prefix of the conversation as text that is
            not a prefix of the whole (the assistant positions would be ambiguous), or the
            tokenizer gives no character offsets (a slow tokenizer).
    """
    require_offsets(tokenizer)
    spans: list[tuple[int, int]] = []  # characters of each assistant turn
    done, closing = "", ""
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _apply(tokenizer, turns[:i], generation_prompt=True)
        after = _apply(tokenizer, turns[: i + 1], generation_prompt=False)
        if spans and not before.startswith(done):  # text written only after a whole conversation
            keep = _token_boundary(tokenizer, done, len(os.path.commonprefix([done, before])))
            closing = closing or done[keep:]
            if (
                done[keep:] != closing
                or keep <= spans[-1][0]
                or not _is_markup(tokenizer, closing)
                # written after any whole conversation (Phi-3's EOS), not in place of a turn's
                # own end (gpt-oss's <|return|> for <|end|>)
                or not _apply(tokenizer, turns[:i], generation_prompt=False).endswith(closing)
            ):
                raise HetLoRAError(_NOT_PREFIXES)
            spans[-1] = (spans[-1][0], keep)
        if not after.startswith(before):
            raise HetLoRAError(_NOT_PREFIXES)
        spans.append((len(before), len(after)))
        done = after
    if not done.endswith(closing):
        raise HetLoRAError(_NOT_PREFIXES)
    enc = tokenizer(done, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    target = [any(s < end and max(e, s + 1) > begin for begin, end in spans) for s, e in offsets]
    ends = [sum(1 for s, _ in offsets if s < end) for _, end in spans]  # exchange boundaries
    cut = max((b for b in ends if b <= max_len), default=0)
    if cut:
        ids, target = ids[:cut], target[:cut]
    else:  # the first exchange alone is too long
        first = target.index(True) if True in target else ends[0]
        start = start_ids(tokenizer) or template_bos(tokenizer)
        keep = len(start) if ids[: len(start)] == start and first >= len(start) else 0
        ctx, ans = fit(ids[keep:first], ids[first : ends[0]], max(max_len - keep, 1))
        ids = ids[:keep] + ctx + ans
        target = [False] * (keep + len(ctx)) + [True] * len(ans)
    n_prompt = target.index(True) if True in target else len(ids)
    return Tokenized(ids=tuple(ids), n_prompt=n_prompt, target=tuple(target))


def _token_boundary(tokenizer, text: str, at: int) -> int:
    """The last token end of ``text`` at or before character ``at`` (a shared character prefix
    may end inside a token: Phi-3's closing ``<|endoftext|>`` and its next ``<|user|>`` share
    ``<|``)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return max((e for _, e in offsets["offset_mapping"] if e <= at), default=0)


def _is_markup(tokenizer, text: str) -> bool:
    """Whether ``text`` is special tokens and white space only (template markup, no words)."""
    return all(
        i in _special_ids(tokenizer) or not tokenizer.decode([i]).strip()
        for i in token_ids(tokenizer, text)
    )


def _special_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens: its named ones and its special added tokens (Llama 3's
    ``<|eot_id|>``)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


def require_offsets(tokenizer) -> None:
    """Refuse, once for the whole tokenizer, one that gives no character offsets (a slow
    tokenizer): `render_conversation` locates the assistant turns by them.

    Raises:
        HetLoRAError: ``tokenizer`` is not a fast tokenizer.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise HetLoRAError(
            "conversations need a fast tokenizer (one with character offsets) to locate the "
            "assistant turns; give the model folder a tokenizer.json"
        )


def template_bos(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the chat template writes the tokenizer's BOS itself (it uses
    the ``bos_token`` variable, as Gemma's, Llama 3's and Mistral's do), else ``[]``: a template
    that merely starts with the token that happens to be named BOS (SmolLM2's ``<|im_start|>``
    turn header) does not write a BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return (
        [bos]
        if bos is not None and "bos_token" in str(getattr(tokenizer, "chat_template", None) or "")
        else []
    )


def refuses_system(tokenizer) -> bool:
    """Whether ``tokenizer``'s chat template refuses a ``system`` turn (Gemma's raises
    "System role not supported") while it renders the same conversation without one."""
    if not has_chat_template(tokenizer):
        return False
    turns = (("user", "Hello."), ("assistant", "Hello!"))
    try:
        _apply(tokenizer, turns, generation_prompt=False)
    except HetLoRAError:
        return False  # refuses more than the system turn: the rows are checked as they are
    try:
        _apply(tokenizer, (("system", "Be brief."), *turns), generation_prompt=False)
    except HetLoRAError:
        return True
    return False


def conversation_problem(tokenizer, value: Any) -> str | None:
    """Why a ``messages`` value cannot be trained on with ``tokenizer``'s chat template, or
    ``None``: `messages_problem`, then the template rendered and the conversation
    tokenised (a template error, a conversation it refuses such as one that starts with an
    assistant turn). A tokenizer without a template renders nothing here (the run is refused
    for it as a whole, by `make_renderer`).

    Raises:
        HetLoRAError: a tokenizer no conversation can be tokenised with
            (`require_offsets`), rather than every row reported bad.
    """
    if (why := messages_problem(value)) is not None or not has_chat_template(tokenizer):
        return why
    require_offsets(tokenizer)
    try:
        render_conversation(tokenizer, example_from_messages(value).messages, 1 << 30)
    except HetLoRAError as exc:
        return str(exc)
    return None


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class Renderer:
    """How the examples of a run become tokens and generation prompts (training, evaluation,
    ROUGE-L generations, ``hetlora evaluate`` and ``hetlora chat`` all use one); ``mode`` is
    the ``chat_template`` key (see the module docstring), ``templated`` whether the run's
    training examples went through the chat template (``messages`` rows, or ``mode = "on"``).

    Raw rows start as the tokenizer starts a text (`hetlora.data.batching.start_ids`:
    its BOS where it adds one); rendered conversations as the template writes them.
    """

    tokenizer: Any
    mode: str
    templated: bool = False

    @cached_property
    def start(self) -> list[int]:
        """The ids a raw sequence starts with (`hetlora.data.batching.start_ids`)."""
        return start_ids(self.tokenizer)

    def conversation(self, example: Example) -> tuple[tuple[str, str], ...] | None:
        """The turns ``example`` is rendered from, or ``None`` for raw prompt + response."""
        if example.messages:
            return example.messages
        if self.mode == "on":  # the separator raw concatenation needs is not the user's text
            return (("user", example.prompt.rstrip()), ("assistant", example.response))
        return None

    @cached_property
    def end_of_turn(self) -> list[int]:
        """The special token the chat template ends an assistant turn with (``<|im_end|>``,
        ``<|eot_id|>``, ``<end_of_turn>``), found by rendering a probe conversation; empty
        without a template or where the turn ends otherwise. A generation stops there too: a
        base model's generation config names only its end of text, while the examples it was
        trained on end each reply with this token."""
        if not getattr(self.tokenizer, "chat_template", None):
            return []
        probe = (("user", "Hi"), ("assistant", "Hello"))
        try:
            head = _apply(self.tokenizer, probe[:1], generation_prompt=True) + probe[1][1]
            full = _apply(self.tokenizer, probe, generation_prompt=False)
        except HetLoRAError:
            return []
        if not full.startswith(head) or not full[len(head) :]:
            return []
        first = token_ids(self.tokenizer, full[len(head) :])[:1]
        return first if first and first[0] in _special_ids(self.tokenizer) else []

    def tokenize(self, example: Example, max_len: int) -> Tokenized:
        """Token ids and loss mask of one example."""
        turns = self.conversation(example)
        if turns is None:
            return tokenize(self.tokenizer, example.prompt, example.response, max_len, self.start)
        return render_conversation(self.tokenizer, turns, max_len)

    def tokenize_all(self, examples: Sequence[Example], max_len: int) -> list[Tokenized]:
        """`tokenize` of every example."""
        return [self.tokenize(ex, max_len) for ex in examples]

    def _template_ids(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        return token_ids(self.tokenizer, _apply(self.tokenizer, turns, generation_prompt=True))

    def prompt(self, example: Example) -> list[int]:
        """The token ids a generation continues: every turn before the last assistant turn,
        with the template's assistant header (or the raw prompt after `start`, as training cut
        it from the response: `hetlora.data.batching.pair_ids`)."""
        turns = self.conversation(example)
        if turns is None:  # the prompt as training cut it from its response
            return self.start + pair_ids(self.tokenizer, example.prompt, example.response)[0]
        last = max(i for i, (role, text) in enumerate(turns) if role == "assistant" and text)
        return self._template_ids(turns[:last])

    def chat_prompt(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        """The token ids a chat reply continues: ``turns`` (ending with a user turn) through
        the template when the run trained on it (`templated`), else the last turn raw
        after `start`, as such a run trained on prompts."""
        if self.templated:
            return self._template_ids(turns)
        return self.start + token_ids(self.tokenizer, turns[-1][1])


def make_renderer(
    tokenizer, mode: str, examples: Sequence[Example] = (), templated: bool | None = None
) -> Renderer:
    """The `Renderer` for ``chat_template = mode`` and a run's training ``examples``
    (``templated``, when given, says instead whether they went through the template).

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
    if (
        mode == "on"
        and examples
        and not has_messages
        and not any(ex.prompt.strip() for ex in examples)
    ):
        raise HetLoRAError(
            "chat_template = 'on' renders prompt/response rows as a user and an assistant turn; "
            "this data has no prompts (text rows): use chat_template = 'auto' or 'off'"
        )
    needs = (has_messages or mode == "on") if templated is None else templated
    if needs and not has_chat_template(tokenizer):
        what = "messages rows need" if has_messages else "chat_template = 'on' needs"
        raise HetLoRAError(f"{what} a chat template and the model's tokenizer has none: {_FIX}")
    return Renderer(tokenizer=tokenizer, mode=mode, templated=needs)

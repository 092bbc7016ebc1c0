"""Tokenised examples, padded batches and a seeded batch stream per client.

An example is ``start + prompt + response + eos``, where ``start`` is what the tokenizer puts
before a text by default (`start_ids`: the BOS token of Gemma or Llama 3, nothing for
SmolLM2 or GPT-2); labels are ``-100`` on the prompt and on padding,
so the loss (training and evaluation) is on response tokens only. A conversation rendered with
a chat template (`hetlora.data.chat`) carries a per-token ``target`` mask instead: the
loss is on its assistant turns only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one example and how many of them belong to the prompt.

    ``target`` (conversations only): per token, whether the loss is taken on it (the assistant
    turns); ``None`` means every token after the first ``n_prompt``.
    """

    ids: tuple[int, ...]
    n_prompt: int
    target: tuple[bool, ...] | None = None

    @property
    def n_target(self) -> int:
        """Tokens the loss is computed on (the response, predicted from what precedes it)."""
        if self.target is not None:
            return sum(self.target[1:])
        return len(self.ids) - max(self.n_prompt, 1)


def token_ids(tokenizer, text: str) -> list[int]:
    """The token ids of ``text``, without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def start_ids(tokenizer) -> list[int]:
    """The special tokens ``tokenizer`` puts before a text with its defaults (its BOS where it
    adds one, through ``add_bos_token`` or a post-processor; usually none or one token).

    Found by tokenising a probe text with and without special tokens: whatever precedes the
    plain ids in the default encoding.
    """
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def fit(context: list[int], answer: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut ``context`` on the left and ``answer`` on the right to ``max_len`` tokens in all;
    the answer keeps at least half of ``max_len``."""
    if len(context) + len(answer) > max_len:
        answer = answer[: max(max_len // 2, max_len - len(context))]
        context = context[len(context) - (max_len - len(answer)) :] if max_len > len(answer) else []
    return context, answer


def pair_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """The ids of ``prompt + response`` tokenised as one text, cut where the prompt ends: a
    token that ends within the prompt is the prompt's, one that reaches into the response
    (``"Answer:" + " The"`` as ``Ġ``+``The`` merged: ``ĠThe``) is the response's.

    Tokenising the two apart would start the response as a text of its own: a Metaspace
    tokenizer (Llama 2, Mistral, Phi-3) puts a space before it that the text does not have, and
    a prompt ending in a space leaves a lone space token no text tokenises to. A tokenizer
    without character offsets (a slow one) tokenises them apart.
    """
    if not response or not prompt or not getattr(tokenizer, "is_fast", False):
        return token_ids(tokenizer, prompt), token_ids(tokenizer, response)
    enc = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    n = 0
    while n < len(ids) and offsets[n][1] <= len(prompt):
        n += 1
    return list(ids[:n]), list(ids[n:])


def tokenize(
    tokenizer, prompt: str, response: str, max_len: int, start: Sequence[int] | None = None
) -> Tokenized:
    """Tokenise one example as ``start + prompt + response + eos`` (`pair_ids`) in at most
    ``max_len`` tokens: the prompt is cut on the left (after ``start``, which always stays at
    position 0) and the response on the right. ``start`` defaults to `start_ids`; it is part
    of the prompt (never a target).
    """
    start = start_ids(tokenizer) if start is None else list(start)
    p, r = pair_ids(tokenizer, prompt, response)
    p, r = fit(p, r + [tokenizer.eos_token_id], max(max_len - len(start), 1))
    return Tokenized(ids=tuple(start + p + r), n_prompt=len(start) + len(p))


def tokenize_all(tokenizer, examples: Sequence, max_len: int) -> list[Tokenized]:
    """Tokenise ``Example`` objects (with ``prompt`` and ``response``)."""
    start = start_ids(tokenizer)
    return [tokenize(tokenizer, ex.prompt, ex.response, max_len, start) for ex in examples]


def collate(items: Sequence[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item; labels ignore prompt and padding."""
    width = max(len(t.ids) for t in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.ids)
        ids = torch.tensor(t.ids, dtype=torch.long)
        input_ids[i, :n] = ids
        mask[i, :n] = 1
        if t.target is None:
            labels[i, t.n_prompt : n] = ids[t.n_prompt :]
        else:
            keep = torch.tensor(t.target, dtype=torch.bool)
            labels[i, :n] = torch.where(keep, ids, torch.full_like(ids, IGNORE))
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batch_stream(
    items: Sequence[Tokenized],
    batch_size: int,
    rng: np.random.Generator,
    pad_id: int,
    group: int = 8,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs over ``items`` in length-grouped batches of ``batch_size``.

    Each epoch is shuffled, cut into windows of ``group * batch_size`` examples, each window is
    sorted by length and cut into batches, and the batches are shuffled again. Examples of similar
    length share a batch, so little compute goes to padding, while every example is still seen
    once per epoch in random company. ``group=1`` gives plain shuffled batches.
    """
    if not items:
        raise ValueError("no examples to batch")
    window = max(1, group) * batch_size
    while True:
        order = rng.permutation(len(items))
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda j: len(items[j].ids))
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for k in rng.permutation(len(batches)):
            yield collate([items[j] for j in batches[k]], pad_id)


def eval_batches(
    items: Sequence[Tokenized], batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed batches for evaluation, grouped by length so little is padded."""
    order = sorted(range(len(items)), key=lambda j: len(items[j].ids))
    for start in range(0, len(order), batch_size):
        yield collate([items[j] for j in order[start : start + batch_size]], pad_id)

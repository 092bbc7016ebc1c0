"""Evaluation: token-level perplexity on response tokens, ROUGE-L of greedy generations.

The losses are the model's own: its final logit transform (Gemma 2's
``final_logit_softcapping``, Granite's ``logits_scaling``, Cohere's ``logit_scale``) applied
inside the fused cross-entropy, or, for a model whose logits that does not reproduce, its own
forward (`logit_transform`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterable, Sequence

import regex
import torch
import torch.nn.functional as F

from hetlora.data.batching import IGNORE, Tokenized, eval_batches, start_ids
from hetlora.hardware import autocast, no_compile

CE_CHUNK = 256  # rows of logits alive at once in `LinearCrossEntropy`


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, fused and chunked.

    The [N, vocab] logits never exist whole and autograd never stores them: each chunk of
    ``CE_CHUNK`` rows is projected (in ``dtype``: bf16 under autocast), its log-sum-exp taken
    in fp32, and the gradients ``(softmax - onehot) @ weight`` (and ``.T @ hidden`` when the
    weight trains) computed on the spot, so backward is one multiplication by the incoming
    scalar. With a 49k vocabulary this removes the fp32 log-softmax and its backward, which
    otherwise cost as much as a fifth of a LoRA training step on CPU.

    ``scale`` and ``cap`` are the model's final logit transform ``z = cap * tanh(scale * x / cap)``
    (``z = scale * x`` without ``cap``), applied in fp32 before the softmax; the gradient is
    multiplied by ``dz/dx = scale * (1 - (z / cap)^2)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, scale=1.0, cap=None):  # noqa: D102
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # fp32 softmax, fp64 when given fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], CE_CHUNK):
            h = hidden[start : start + CE_CHUNK].to(dtype)
            t = targets[start : start + CE_CHUNK]
            logits = _transform((h @ w.t()).to(acc), scale, cap)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                slope = scale * (1.0 - (logits / cap) ** 2) if cap is not None else scale
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                if cap is not None or scale != 1.0:
                    probs = probs * slope
                probs = probs.to(dtype)
                if need_h:
                    grad_h[start : start + CE_CHUNK] = (probs @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (probs.t() @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float = 1.0,
    cap: float | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(f(hidden @ weight.T), targets, reduction="sum")`` without the logits,
    with ``f`` the logit transform of `LinearCrossEntropy` (identity by default).

    The projection runs in the autocast dtype when autocast is on (as ``nn.Linear`` would),
    the softmax in fp32.
    """
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropy.apply(hidden, weight, targets, dtype, scale, cap)


def _transform(logits: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    if scale != 1.0:
        logits = logits * scale
    return torch.tanh(logits / cap) * cap if cap is not None else logits


#: base model -> (scale, cap) of its final logit transform, or None: its own forward is used
_TRANSFORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def logit_transform(base: torch.nn.Module) -> tuple[float, float | None] | None:
    """The final logit transform of ``base`` as ``(scale, cap)`` (see
    `LinearCrossEntropy`), read from its config: ``final_logit_softcapping`` (Gemma 2
    and 3) is ``cap``, ``scale`` is ``logit_scale`` (Cohere) divided by ``logits_scaling``
    (Granite). ``None`` when that does not reproduce the model's own logits.

    Checked once per model on a four-token probe: the model's own forward against the head's
    weights applied to its decoder's output with this transform (eager, no gradient, under the
    caller's autocast).
    """
    if base in _TRANSFORMS:
        return _TRANSFORMS[base]
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else None
    config = config or base.config
    cap = getattr(config, "final_logit_softcapping", None) or None
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    found: tuple[float, float | None] | None = (scale, cap)
    head = base.get_output_embeddings()
    device = head.weight.device
    probe = (torch.arange(4, device=device) % head.weight.shape[0])[None]
    was_training = base.training
    base.eval()
    low = torch.is_autocast_enabled(device.type)  # as the caller runs (a bf16 base needs it)
    try:
        with torch.no_grad(), no_compile():
            own = base(input_ids=probe, use_cache=False).logits.float()
            hidden = base.get_decoder()(input_ids=probe, use_cache=False).last_hidden_state
            fused = type(head) is torch.nn.Linear  # the fused path reads the weights
            logits = F.linear(hidden, head.weight, head.bias) if fused else head(hidden)
            ours = _transform(logits.float(), scale, cap)
    finally:
        base.train(was_training)
    tol = 2e-2 if low else 1e-4
    if own.shape != ours.shape or not torch.allclose(own, ours, rtol=tol, atol=tol):
        found = None
    _TRANSFORMS[base] = found
    return found


def response_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool = True
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled (response) tokens, and how many there were.

    The output projection runs only at positions whose next token is labelled, not over the
    whole padded batch (with a 49k vocabulary that is most of a small model's compute), and
    through `linear_cross_entropy`, which never materialises the logits, with the
    model's final logit transform (`logit_transform`). The softmax is fp32 whatever the
    autocast dtype. ``fused = False`` takes the plain head and ``F.cross_entropy`` instead
    (the benchmark measures both). A model whose logits the transform does not reproduce runs
    its own forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    targets = labels[keep]
    transform = logit_transform(base)
    if transform is None:  # the model's own logits, whole
        logits = base(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        return F.cross_entropy(logits[:, :-1][keep].float(), targets, reduction="sum"), int(
            keep.sum()
        )
    scale, cap = transform
    hidden = base.get_decoder()(  # no key/value cache: nothing is generated here
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    hidden = hidden[:, :-1][keep]
    head = base.get_output_embeddings()
    if not fused or getattr(head, "bias", None) is not None or type(head) is not torch.nn.Linear:
        logits = _transform(head(hidden).float(), scale, cap)  # the plain path
        nll = F.cross_entropy(logits, targets, reduction="sum")
    else:
        nll = linear_cross_entropy(hidden, head.weight, targets, scale, cap)
    return nll, int(keep.sum())


@torch.no_grad()
def nll_sums(
    model: torch.nn.Module,
    items: Sequence[Tokenized],
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> tuple[float, int]:
    """Summed response-token NLL of ``model`` on ``items`` and the number of tokens summed:
    what one holder of examples (the in-process run, or a node on its own) contributes to a
    perplexity (`combine_nll`).

    ``bf16`` runs the model under bf16 autocast (as training does where the hardware has it);
    the NLL is always accumulated in fp32/fp64.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(items, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(torch.device(device), bf16):
            nll, n = response_nll(model, batch)
        total += float(nll)
        count += n
    model.train(was_training)
    return total, count


def combine_nll(sums: Iterable[tuple[float, int]]) -> tuple[float, float]:
    """Mean token NLL and perplexity ``exp(sum NLL / sum tokens)`` of `nll_sums` parts
    (NaN for no tokens)."""
    total, count = 0.0, 0
    for nll, n in sums:
        total += nll
        count += n
    if count == 0:
        return float("nan"), float("nan")
    loss = total / count
    return loss, math.exp(min(loss, 50.0))


def stop_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """The tokens a generation stops at: the union of the model's generation config's
    ``eos_token_id`` (one id or a list, as ``<end_of_turn>`` and ``<eos>`` of Gemma) and the
    tokenizer's end-of-sequence token."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def perplexity(
    model: torch.nn.Module,
    items: Sequence[Tokenized],
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> tuple[float, float]:
    """Mean token NLL and perplexity ``exp(mean NLL)`` of ``model`` on ``items``
    (`combine_nll` of one `nll_sums`)."""
    return combine_nll([nll_sums(model, items, batch_size, pad_id, device, bf16)])


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    device,
    bf16: bool = False,
    extra_stops: Sequence[int] = (),
) -> list[str]:
    """Greedy continuations of ``prompts``, one at a time, cut at the first stop token
    (`stop_ids`, and ``extra_stops``: the chat template's end of turn,
    `hetlora.data.chat.Renderer.end_of_turn`), whatever sampling or penalties the model's
    generation config sets (`_only_greedy`).

    A prompt is token ids (as `hetlora.data.chat.Renderer.prompt` gives them), or a text,
    which is tokenised as the tokenizer starts a text
    (`hetlora.data.batching.start_ids`: its BOS where it adds one). ``bf16`` generates
    under bf16 autocast, as training and evaluation run.
    """
    was_training = model.training
    model.eval()
    stops = stop_ids(model, tokenizer)
    stops += [i for i in extra_stops if i not in stops]
    with _only_greedy(model):
        outs = _generate(model, tokenizer, prompts, max_new_tokens, device, bf16, stops)
    model.train(was_training)
    return outs


#: What greedy decoding keeps of a model's own generation config: its special tokens and its
#: cache (Gemma 2's ``hybrid``); its sampling and penalties (``repetition_penalty``,
#: ``no_repeat_ngram_size``, ``min_length``, ``suppress_tokens``...) go.
_KEPT_GENERATION_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "cache_implementation",
)


@contextlib.contextmanager
def _only_greedy(model: torch.nn.Module):
    """The model's generation config reduced to `_KEPT_GENERATION_KEYS` for the block
    (``generate`` fills every setting it is not given from it, a config passed in too)."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = getattr(target, "generation_config", None)
    if own is None:
        yield
        return
    kept = {k: getattr(own, k) for k in _KEPT_GENERATION_KEYS if getattr(own, k, None) is not None}
    target.generation_config = GenerationConfig(**kept)
    try:
        yield
    finally:
        target.generation_config = own


def _generate(model, tokenizer, prompts, max_new_tokens, device, bf16, stops) -> list[str]:
    """`generate_greedy`'s loop over the prompts."""
    start = None
    outs = []
    for prompt in prompts:
        if isinstance(prompt, str):
            start = start_ids(tokenizer) if start is None else start
            prompt = start + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([list(prompt) or [tokenizer.eos_token_id]], device=device)
        with autocast(torch.device(device), bf16):
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
            )
        outs.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outs


#: Scripts written without spaces between words, or read a character at a time (Han, kana,
#: hangul as before; Thai, Lao, Khmer, Myanmar): each letter of these, with the combining marks
#: that follow it (a Thai vowel or tone mark), is a word of its own.
_BY_CHARACTER = (
    r"\p{scx=Han}\p{scx=Hiragana}\p{scx=Katakana}\p{scx=Hangul}"
    r"\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
)
#: A word of `words`: a letter or digit of `_BY_CHARACTER` with its marks, else a
#: run of letters, combining marks and digits of any other script (the underscore, punctuation
#: and spaces separate).
_WORD = regex.compile(
    rf"[[\p{{L}}\p{{N}}]&&[{_BY_CHARACTER}]]\p{{M}}*|[[\p{{L}}\p{{M}}\p{{N}}]--[{_BY_CHARACTER}]]+",
    regex.V1,
)
_ASCII_WORD = regex.compile("[a-z0-9]+")


@functools.cache
def _stem() -> Callable[[str], str]:
    from nltk.stem import porter

    return porter.PorterStemmer().stem


def words(text: str) -> list[str]:
    """``text`` lowercased and cut into Unicode words (`_WORD`), ASCII words of more than
    three characters Porter-stemmed: ``"Ça va, 東京! Running हिन्दी"`` ->
    ``["ça", "va", "東", "京", "run", "हिन्दी"]``. On ASCII text these are exactly
    ``rouge-score``'s default tokens with ``use_stemmer=True``."""
    stem = _stem()
    return [
        stem(w) if len(w) > 3 and _ASCII_WORD.fullmatch(w) else w
        for w in _WORD.findall(text.lower())
    ]


class _Words:
    """``rouge-score``'s tokenizer interface over `words`."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())


def _f1(prediction: str, reference: str) -> float:
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (``rouge-score``'s longest common subsequence) over Unicode words
    (`words`: lowercased runs of letters, combining marks and digits of any script; each
    Han, kana, hangul, Thai, Lao, Khmer or Myanmar character a word of its own), so that text in
    any language scores."""
    if not predictions:
        return float("nan")
    scores = [_f1(pred, ref) for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def rouge_sums(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, int]:
    """The sum of the per-example ROUGE-L F1 scores of `rouge_l` and how many were scored:
    what one holder of examples (the in-process run, or a node on its own) contributes to a
    ROUGE-L (`combine_rouge`)."""
    scores = [_f1(pred, ref) for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores), len(scores)


def combine_rouge(sums: Iterable[tuple[float, int]]) -> float:
    """Mean ROUGE-L F1 of `rouge_sums` parts, ``sum F / sum n`` (NaN for no examples):
    `rouge_l` of the union of their examples, up to float summation order."""
    total, count = 0.0, 0
    for score, n in sums:
        total += score
        count += n
    return total / count if count else float("nan")

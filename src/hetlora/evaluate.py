"""Evaluation: token-level perplexity on response tokens, ROUGE-L of greedy generations."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from hetlora.data.batching import IGNORE, Tokenized, eval_batches
from hetlora.hardware import autocast

CE_CHUNK = 256  # rows of logits alive at once in :class:`LinearCrossEntropy`


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, fused and chunked.

    The [N, vocab] logits never exist whole and autograd never stores them: each chunk of
    ``CE_CHUNK`` rows is projected (in ``dtype``: bf16 under autocast), its log-sum-exp taken
    in fp32, and the gradients ``(softmax - onehot) @ weight`` (and ``.T @ hidden`` when the
    weight trains) computed on the spot, so backward is one multiplication by the incoming
    scalar. With a 49k vocabulary this removes the fp32 log-softmax and its backward, which
    otherwise cost as much as a fifth of a LoRA training step on CPU.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):  # noqa: D102
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
            logits = (h @ w.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
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
        return gh, gw, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` without the logits.

    The projection runs in the autocast dtype when autocast is on (as ``nn.Linear`` would),
    the softmax in fp32.
    """
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropy.apply(hidden, weight, targets, dtype)


def response_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool = True
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled (response) tokens, and how many there were.

    The output projection runs only at positions whose next token is labelled, not over the
    whole padded batch (with a 49k vocabulary that is most of a small model's compute), and
    through :func:`linear_cross_entropy`, which never materialises the logits. The softmax is
    fp32 whatever the autocast dtype. ``fused = False`` takes the plain head and
    ``F.cross_entropy`` instead (the benchmark measures both).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(  # no key/value cache: nothing is generated here
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    hidden, targets = hidden[:, :-1][keep], labels[keep]
    head = base.get_output_embeddings()
    if not fused or getattr(head, "bias", None) is not None or type(head) is not torch.nn.Linear:
        nll = F.cross_entropy(head(hidden).float(), targets, reduction="sum")  # the plain path
    else:
        nll = linear_cross_entropy(hidden, head.weight, targets)
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
    perplexity (:func:`combine_nll`).

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
    """Mean token NLL and perplexity ``exp(sum NLL / sum tokens)`` of :func:`nll_sums` parts
    (NaN for no tokens)."""
    total, count = 0.0, 0
    for nll, n in sums:
        total += nll
        count += n
    if count == 0:
        return float("nan"), float("nan")
    loss = total / count
    return loss, math.exp(min(loss, 50.0))


def perplexity(
    model: torch.nn.Module,
    items: Sequence[Tokenized],
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> tuple[float, float]:
    """Mean token NLL and perplexity ``exp(mean NLL)`` of ``model`` on ``items``
    (:func:`combine_nll` of one :func:`nll_sums`)."""
    return combine_nll([nll_sums(model, items, batch_size, pad_id, device, bf16)])


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    device,
    bf16: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts``, one at a time, cut at the end-of-sequence token.

    ``bf16`` generates under bf16 autocast, as training and evaluation run.
    """
    was_training = model.training
    model.eval()
    outs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            ids = torch.tensor([[tokenizer.eos_token_id]])
        ids = ids.to(device)
        with autocast(torch.device(device), bf16):
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        outs.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return outs


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (``rouge-score``, with stemming)."""
    from rouge_score import rouge_scorer

    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)


def rouge_sums(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, int]:
    """The sum of the per-example ROUGE-L F1 scores of :func:`rouge_l` and how many were scored:
    what one holder of examples (the in-process run, or a node on its own) contributes to a
    ROUGE-L (:func:`combine_rouge`)."""
    scores = [rouge_l([pred], [ref]) for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores), len(scores)


def combine_rouge(sums: Iterable[tuple[float, int]]) -> float:
    """Mean ROUGE-L F1 of :func:`rouge_sums` parts, ``sum F / sum n`` (NaN for no examples):
    :func:`rouge_l` of the union of their examples, up to float summation order."""
    total, count = 0.0, 0
    for score, n in sums:
        total += score
        count += n
    return total / count if count else float("nan")

"""Evaluation: token-level perplexity on response tokens, ROUGE-L of greedy generations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hetlora.data.batching import IGNORE, Tokenized, eval_batches
from hetlora.hardware import autocast


def response_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled (response) tokens, and how many there were.

    The output projection runs only at positions whose next token is labelled, not over the
    whole padded batch: with a 49k vocabulary that is most of a small model's compute. The
    cross-entropy runs in fp32 whatever the autocast dtype.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    nll = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
    return nll, int(keep.sum())


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    items: Sequence[Tokenized],
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> tuple[float, float]:
    """Mean token NLL and perplexity ``exp(mean NLL)`` of ``model`` on ``items``.

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
    if count == 0:
        return float("nan"), float("nan")
    loss = total / count
    return loss, math.exp(min(loss, 50.0))


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, device
) -> list[str]:
    """Greedy continuations of ``prompts``, one at a time, cut at the end-of-sequence token."""
    was_training = model.training
    model.eval()
    outs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            ids = torch.tensor([[tokenizer.eos_token_id]])
        ids = ids.to(device)
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

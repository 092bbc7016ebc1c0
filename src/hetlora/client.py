"""Local training of one client with HetLoRA's rank self-pruning (Cho et al. 2024, Sec. 3.2).

The client receives the global factors truncated to its rank r_k, minimises

    loss_k + lambda * sum_modules ||B_k[:, g:r_k]||_F * ||A_k[g:r_k, :]||_F,   g = floor(gamma r_k)

for ``local_steps`` AdamW steps, then applies the pruning rule once: if the tail norm shrank
below its value as received, r_k <- max(r_min, floor(gamma r_k)). It uploads the factors cut to
the (possibly lower) rank. The loop is plain and top to bottom, like nanoGPT's ``train.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from peft import PeftModel

from hetlora import adapters
from hetlora.evaluate import response_nll
from hetlora.hardware import autocast
from hetlora.lora import Factors, pruned_rank, rank_of, tail_norm, truncate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of local training (see :class:`hetlora.config.Config`)."""

    local_steps: int
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lambda_: float = 0.0
    gamma: float = 0.99
    r_min: int = 1
    pruning: bool = True
    lora_scale: float = 2.0
    bf16: bool = False


@dataclass
class ClientResult:
    """What a client uploads (``factors`` at ``rank``) and what it measured on the way."""

    factors: Factors
    rank_received: int
    rank: int
    train_loss: float
    tail_before: float
    tail_after: float
    tokens: int
    steps: int
    seconds: float


def train_client(
    peft_model: PeftModel,
    factors: Factors,
    batches: Iterator[dict[str, torch.Tensor]],
    settings: TrainSettings,
    target_modules: list[str],
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> ClientResult:
    """Train the client adapter holding ``factors`` (rank r_k) and return the pruned upload.

    ``batches`` yields padded batches from the client's own data; ``on_step(step, loss)`` is
    called after every optimizer step (for progress displays).
    """
    start = time.perf_counter()
    rank = rank_of(factors)
    tail_before = float(tail_norm(factors, settings.gamma))
    live = adapters.attach(peft_model, factors, rank, settings.lora_scale, target_modules)
    params = [p for pair in live.values() for p in pair]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    peft_model.train()
    losses, tokens = [], 0
    try:
        for step in range(settings.local_steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with autocast(device, settings.bf16):
                nll, n = response_nll(peft_model, batch)
            loss = nll / max(n, 1)
            objective = loss
            if settings.lambda_ > 0:
                objective = loss + settings.lambda_ * tail_norm(live, settings.gamma)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            tokens += int(batch["attention_mask"].sum())
            if on_step is not None:
                on_step(step + 1, losses[-1])
        trained = adapters.read_factors(peft_model, adapters.CLIENT)
    finally:
        adapters.detach(peft_model)
    tail_after = float(tail_norm(trained, settings.gamma))
    new_rank = rank
    if settings.pruning:
        new_rank = pruned_rank(rank, settings.r_min, settings.gamma, tail_before, tail_after)
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    return ClientResult(
        factors=truncate(trained, new_rank),
        rank_received=rank,
        rank=new_rank,
        train_loss=mean_loss,
        tail_before=tail_before,
        tail_after=tail_after,
        tokens=tokens,
        steps=len(losses),
        seconds=time.perf_counter() - start,
    )

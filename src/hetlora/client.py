"""Local training of one client with HetLoRA's rank self-pruning (Cho et al. 2024, Sec. 3.2).

The client receives the global factors truncated to its rank r_k, minimises

    loss_k + lambda * sum_modules ||B_k[:, g:r_k]||_F * ||A_k[g:r_k, :]||_F,   g = floor(gamma r_k)

for ``local_steps`` AdamW steps, then applies the pruning rule once: if the tail norm shrank
below its value as received, r_k <- max(r_min, floor(gamma r_k)). It uploads the factors cut to
the (possibly lower) rank. The loop is plain and top to bottom, like nanoGPT's ``train.py``.

With ``fixed_rank`` (= r_max) the step's shapes do not depend on r_k: the client trains the
fixed adapter at r_max (`hetlora.adapters.attach_fixed`) with its factors in the first r_k
positions; positions above r_k start at zero and their gradients are zeroed after every
backward, so AdamW (zero moments, zero update, decay of zero) keeps them exactly zero. The
regulariser is `hetlora.lora.masked_tail_norm`, and the upload is cut back to r_k (or the
pruned rank) as before. This is the path a compiled model (`hetlora.hardware.compile_layers`)
runs without recompiling for every rank.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from peft import PeftModel

from hetlora import adapters, dp
from hetlora.errors import HetLoRAError
from hetlora.evaluate import response_nll
from hetlora.hardware import autocast, compile_seconds
from hetlora.lora import Factors, masked_tail_norm, pruned_rank, rank_of, tail_norm, truncate
from hetlora.methods.base import ClientTask, Reply, TrainSettings, TrainStats

log = logging.getLogger(__name__)


def _local_steps(
    peft_model: PeftModel,
    params: list[torch.Tensor],
    batches: Iterator[dict[str, torch.Tensor]],
    settings: TrainSettings,
    device: torch.device,
    regulariser: Callable[[], torch.Tensor] | None,
    on_step: Callable[[int, float], None] | None,
    mask_grads: Callable[[], None] | None = None,
) -> tuple[list[float], int, int, float, float]:
    """The local loop: AdamW on ``params`` for ``settings.local_steps`` batches.

    ``mask_grads`` runs after every backward (the fixed-shape step zeroes the gradients above
    r_k there). Returns the per-step losses, the real (non-padding) tokens and the labelled
    tokens seen, the seconds spent in the steps (forward, backward, optimizer; not making
    batches, not compiling) and the seconds spent compiling during them.
    """
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    peft_model.train()
    losses, tokens, targets, busy = [], 0, 0, 0.0
    compiled = compile_seconds()
    compiling = 0.0
    for step in range(settings.local_steps):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        start = time.perf_counter()
        with autocast(device, settings.bf16):
            nll, n = response_nll(peft_model, batch, settings.fused_ce)
        loss = nll / max(n, 1)
        objective = loss if regulariser is None else loss + settings.lambda_ * regulariser()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if mask_grads is not None:
            mask_grads()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))  # waits for the step to finish (CUDA too)
        now = compile_seconds()  # a step that (re)compiled counts that time apart
        compiling += now - compiled
        busy += time.perf_counter() - start - (now - compiled)
        compiled = now
        tokens += int(batch["attention_mask"].sum())
        targets += n
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses, tokens, targets, busy, compiling


def train_client(
    peft_model: PeftModel,
    factors: Factors,
    batches: Iterator[dict[str, torch.Tensor]],
    settings: TrainSettings,
    target_modules: list[str],
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> Reply:
    """Train the client adapter holding ``factors`` (rank r_k) and return the pruned upload
    (`run_task` adds the client's id and example count).

    ``batches`` yields padded batches from the client's own data; ``on_step(step, loss)`` is
    called after every optimizer step (for progress displays). The regulariser is added when
    ``settings.lambda_ > 0``; the pruning rule is applied when ``settings.pruning``.
    """
    start = time.perf_counter()
    rank = rank_of(factors)
    tail_before = float(tail_norm(factors, settings.gamma))
    fixed = settings.fixed_rank
    if fixed and rank > fixed:
        raise HetLoRAError(f"a client of rank {rank} does not fit the fixed rank {fixed}")
    if fixed:
        adapter = adapters.FIXED
        live = adapters.attach_fixed(
            peft_model, factors, fixed, settings.lora_scale, target_modules
        )

        def regularise() -> torch.Tensor:
            return masked_tail_norm(live, rank, settings.gamma)

        def mask_grads() -> None:  # positions >= r_k get no gradient: they stay exactly zero
            for b, a in live.values():
                if b.grad is not None:
                    b.grad[:, rank:] = 0
                if a.grad is not None:
                    a.grad[rank:] = 0

    else:
        adapter = adapters.CLIENT
        live = adapters.attach(peft_model, factors, rank, settings.lora_scale, target_modules)

        def regularise() -> torch.Tensor:
            return tail_norm(live, settings.gamma)

        mask_grads = None
    if not settings.train_a:  # FFA-LoRA: A is frozen (attach made it trainable again)
        for _, a in live.values():
            a.requires_grad_(False)
    params = [p for pair in live.values() for p in pair if p.requires_grad]
    regulariser = regularise if settings.lambda_ > 0 else None
    try:
        losses, tokens, targets, busy, compiling = _local_steps(
            peft_model, params, batches, settings, device, regulariser, on_step, mask_grads
        )
        trained = truncate(adapters.read_factors(peft_model, adapter), rank)
    finally:
        if fixed:
            adapters.release_fixed(peft_model)
        else:
            adapters.detach(peft_model)
    tail_after = float(tail_norm(trained, settings.gamma))
    new_rank = rank
    if settings.pruning:
        new_rank = pruned_rank(rank, settings.r_min, settings.gamma, tail_before, tail_after)
    stats = TrainStats(
        rank_received=rank,
        train_loss=sum(losses) / len(losses) if losses else math.nan,
        tail_before=tail_before,
        tail_after=tail_after,
        tokens=tokens,
        target_tokens=targets,
        steps=len(losses),
        seconds=time.perf_counter() - start,
        step_seconds=busy,
        compile_seconds=compiling,
    )
    return Reply(factors=truncate(trained, new_rank), rank=new_rank, stats=stats)


def train_full(
    peft_model: PeftModel,
    weights: dict[str, torch.Tensor],
    batches: Iterator[dict[str, torch.Tensor]],
    settings: TrainSettings,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> Reply:
    """Full fine-tuning of one client: load ``weights``, train every base weight, reply with
    them.

    The LoRA adapters are switched off meanwhile; the model's weights are the client's own
    until the runtime loads the next global weights.
    """
    start = time.perf_counter()
    params = adapters.base_parameters(peft_model)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    for p in params.values():
        p.requires_grad_(True)
    try:
        with peft_model.disable_adapter():
            losses, tokens, targets, busy, compiling = _local_steps(
                peft_model, list(params.values()), batches, settings, device, None, on_step
            )
        trained = {n: p.detach().float().cpu().clone() for n, p in params.items()}
    finally:
        for p in params.values():
            p.requires_grad_(False)
    stats = TrainStats(
        train_loss=sum(losses) / len(losses) if losses else math.nan,
        tokens=tokens,
        target_tokens=targets,
        steps=len(losses),
        seconds=time.perf_counter() - start,
        step_seconds=busy,
        compile_seconds=compiling,
    )
    return Reply(weights=trained, stats=stats)


def run_task(
    peft_model: PeftModel,
    task: ClientTask,
    batches: Iterator[dict[str, torch.Tensor]],
    settings: TrainSettings,
    target_modules: list[str],
    device: torch.device,
    num_examples: int,
    on_step: Callable[[int, float], None] | None = None,
) -> Reply:
    """Do what the server asked of one client and build its reply (any method, any runtime)."""
    if task.kind == "full":
        if task.weights is None:
            raise HetLoRAError(f"task for {task.client_id} has no weights")
        reply = train_full(peft_model, task.weights, batches, settings, device, on_step)
    else:
        if task.factors is None:
            raise HetLoRAError(f"task for {task.client_id} has no factors")
        local = replace(
            settings,
            pruning=settings.pruning and task.pruning,
            lambda_=settings.lambda_ if task.regularise else 0.0,
            train_a=settings.train_a and task.train_a,
        )
        reply = train_client(
            peft_model, task.factors, batches, local, target_modules, device, on_step
        )
        if task.dp_clip_norm > 0:  # DP: the update is clipped here, before it leaves the device
            reply.stats.update_norm = dp.update_norm(task.factors, reply.factors)
            reply.factors = dp.clip_reply(task.factors, reply.factors, task.dp_clip_norm)
    reply.client_id, reply.num_examples = task.client_id, num_examples
    return reply

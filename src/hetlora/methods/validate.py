"""Server-side checks of a client's reply before it is aggregated (untrusted clients).

A reply is refused, with its reason, when it names the wrong modules or weights, has the wrong
shapes for the client's assigned rank, a rank above the assigned one, a non-finite value, or an
update norm above an optional bound. The caller leaves a refused reply out of the round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import product_fro_norm_sq
from hetlora.methods.base import Reply


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or infinity in ``x``, in one pass and without a mask: a NaN or an infinity makes
    the sum non-finite (+inf and -inf give NaN), and a finite sum can only come from finite
    values. (Finite values whose sum overflows fp32 are refused too: no sane update has them.)
    """
    return math.isfinite(float(x.sum()))


def check_lora_update(
    update: Reply,
    shapes: Mapping[str, tuple[int, int]],
    assigned_rank: int,
    max_norm: float = 0.0,
) -> None:
    """Raise `HetLoRAError` naming what is wrong with a LoRA reply."""
    who = f"client {update.client_id}"
    factors = update.factors
    if factors is None:
        raise HetLoRAError(f"{who}: reply carries no LoRA factors")
    if set(factors) != set(shapes):
        missing, extra = sorted(set(shapes) - set(factors)), sorted(set(factors) - set(shapes))
        raise HetLoRAError(f"{who}: wrong modules (missing {missing[:2]}, unexpected {extra[:2]})")
    if not 1 <= update.rank <= assigned_rank:
        raise HetLoRAError(f"{who}: rank {update.rank} outside [1, {assigned_rank}] (assigned)")
    norm_sq = 0.0
    for name, pair in factors.items():
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise HetLoRAError(f"{who}: {name} is not a (B, A) pair")
        b, a = pair
        d_out, d_in = shapes[name]
        if tuple(b.shape) != (d_out, update.rank) or tuple(a.shape) != (update.rank, d_in):
            raise HetLoRAError(
                f"{who}: {name} has shapes {tuple(b.shape)}, {tuple(a.shape)}; expected "
                f"({d_out}, {update.rank}), ({update.rank}, {d_in})"
            )
        if not (all_finite(b) and all_finite(a)):
            raise HetLoRAError(f"{who}: {name} has non-finite values")
        if max_norm > 0:
            norm_sq += float(product_fro_norm_sq(b, a))
    if max_norm > 0 and math.sqrt(max(norm_sq, 0.0)) > max_norm:
        raise HetLoRAError(
            f"{who}: update norm {math.sqrt(norm_sq):.3g} exceeds the bound {max_norm:g}"
        )


def check_full_update(
    update: Reply, reference: Mapping[str, torch.Tensor], max_norm: float = 0.0
) -> None:
    """Raise `HetLoRAError` naming what is wrong with a full-weights reply."""
    who = f"client {update.client_id}"
    weights = update.weights
    if weights is None:
        raise HetLoRAError(f"{who}: reply carries no weights")
    if set(weights) != set(reference):
        raise HetLoRAError(f"{who}: wrong set of weights")
    norm_sq = 0.0
    for name, value in weights.items():
        if value.shape != reference[name].shape:
            raise HetLoRAError(
                f"{who}: {name} has shape {tuple(value.shape)}, expected {tuple(reference[name].shape)}"
            )
        if not all_finite(value):
            raise HetLoRAError(f"{who}: {name} has non-finite values")
        if max_norm > 0:
            norm_sq += float((value.double() - reference[name].double()).pow(2).sum())
    if max_norm > 0 and math.sqrt(norm_sq) > max_norm:
        raise HetLoRAError(
            f"{who}: update norm {math.sqrt(norm_sq):.3g} exceeds the bound {max_norm:g}"
        )

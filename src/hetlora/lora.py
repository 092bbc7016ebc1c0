"""LoRA factor math on plain tensors: the heart of HetLoRA (Cho et al., EMNLP 2024, Sec. 3).

An adapted linear layer has frozen ``W0`` (d_out x d_in) and factors ``B`` (d_out x r),
``A`` (r x d_in); the layer computes ``W0 + s * B @ A`` with a scale ``s`` that is the same for
every rank. A *factor dict* maps a module name to its ``(B, A)`` pair. Nothing here knows about
models, runtimes or I/O, so every runtime (in-process, Flower) calls the same functions.

* `truncate` -- distribution: client k receives ``B[:, :r_k]`` and ``A[:r_k, :]``.
* `pad` -- zero-padding of a rank-r_k pair to rank r_max before aggregation.
* `tail_norm` -- the self-pruning regulariser
  ``sum_modules ||B[:, g:r]||_F * ||A[g:r, :]||_F`` with ``g = floor(gamma * r)`` (with gradient).
* `masked_tail_norm` -- the same regulariser for a rank-r_k client held at a fixed
  rank r_max (positions ``>= r_k`` zero), through a mask rather than slices.
* `pruned_rank` -- the pruning rule ``r <- max(r_min, floor(gamma * r))``.
* `product_fro_norm` -- ``||B A||_F`` from the r x r Gram matrices, never forming B A.
* `WeightedFactorSum` -- sparsity-weighted aggregation
  ``B = sum_k w_k pad(B_k)``, ``A = sum_k w_k pad(A_k)``, ``w_k ∝ ||dW_k||_F``, and the
  padding alternatives beyond the paper (`PADDINGS`).
* `live_rank` -- the rank positions where both factors are non-zero (rank dynamics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from hetlora.errors import HetLoRAError

#: How factors of different ranks are joined (`WeightedFactorSum.result`; config key
#: ``padding``): ``zero`` is the paper's zero-padding; ``keep`` and ``rankwise`` are published
#: alternatives, not in the paper.
PADDINGS = ("zero", "keep", "rankwise")

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def rank_of(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The common rank of a factor dict (every module must have the same rank)."""
    ranks = {b.shape[1] for b, _ in factors.values()} | {a.shape[0] for _, a in factors.values()}
    if len(ranks) != 1:
        raise HetLoRAError(f"factors have mixed ranks {sorted(ranks)}")
    return ranks.pop()


def truncate(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> Factors:
    """Keep the first ``rank`` columns of every B and rows of every A (HetLoRA distribution).

    Examples:
        >>> import torch
        >>> cut = truncate({"q": (torch.ones(4, 8), torch.ones(8, 6))}, 3)
        >>> tuple(cut["q"][0].shape), tuple(cut["q"][1].shape)
        ((4, 3), (3, 6))
    """
    if rank < 1:
        raise HetLoRAError(f"rank must be >= 1, got {rank}")
    out: Factors = {}
    for name, (b, a) in factors.items():
        if rank > b.shape[1]:
            raise HetLoRAError(f"cannot truncate {name} of rank {b.shape[1]} to rank {rank}")
        out[name] = (b[:, :rank].clone(), a[:rank, :].clone())
    return out


def cut(factors: Factors, rank: int | None) -> Factors:
    """``factors`` truncated to ``rank`` where it is below their rank, else as they are (``None``
    or 0: whole)."""
    if rank and rank < rank_of(factors):
        return truncate(factors, rank)
    return factors


def pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``B`` (columns) and ``A`` (rows) from their rank up to ``rank``.

    Examples:
        >>> import torch
        >>> b, a = pad(torch.ones(4, 2), torch.ones(2, 6), 5)
        >>> tuple(b.shape), float(b[:, 2:].abs().sum()), torch.equal(b @ a, torch.full((4, 6), 2.0))
        ((4, 5), 0.0, True)
    """
    r = b.shape[1]
    if r > rank:
        raise HetLoRAError(f"cannot pad rank {r} down to rank {rank}")
    b_full = torch.zeros(b.shape[0], rank, dtype=b.dtype, device=b.device)
    a_full = torch.zeros(rank, a.shape[1], dtype=a.dtype, device=a.device)
    b_full[:, :r] = b
    a_full[:r, :] = a
    return b_full, a_full


def tail_start(rank: int, gamma: float) -> int:
    """``g = floor(gamma * rank)``: the first index of the tail the regulariser penalises."""
    return math.floor(gamma * rank)


def tail_norm(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | Mapping[str, tuple[torch.Tensor, ...]],
    gamma: float,
) -> torch.Tensor:
    """Self-pruning regulariser ``sum_m ||B_m[:, g:r]||_F * ||A_m[g:r, :]||_F``.

    ``g = floor(gamma * r)`` per module (`tail_start`).

    Works on the live (trainable) tensors, so the result carries gradient to the tail columns
    of B and tail rows of A and to nothing else. Returns a 0-dim tensor.
    """
    items = pairs.values() if isinstance(pairs, Mapping) else pairs
    total: torch.Tensor | None = None
    for b, a in items:
        g = tail_start(b.shape[1], gamma)
        term = torch.linalg.vector_norm(b[:, g:]) * torch.linalg.vector_norm(a[g:, :])
        total = term if total is None else total + term
    if total is None:
        raise HetLoRAError("no LoRA modules to regularise")
    return total


def masked_tail_norm(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | Mapping[str, tuple[torch.Tensor, ...]],
    rank: int,
    gamma: float,
) -> torch.Tensor:
    """`tail_norm` of a rank-``rank`` client held in factors of a larger, fixed rank.

    The fixed-shape local step keeps every client's factors at r_max with positions
    ``>= rank`` at zero; its regulariser is ``sum_m ||B_m[:, g:r_k]||_F * ||A_m[g:r_k, :]||_F``
    with ``g = floor(gamma * r_k)`` (Cho et al. 2024, Sec. 3.2), taken through a 0/1 mask over
    the rank positions so the shapes never depend on ``rank``. Same value and same gradient as
    `tail_norm` of the truncated factors (the masked entries add exact zeros).
    """
    items = list(pairs.values() if isinstance(pairs, Mapping) else pairs)
    if not items:
        raise HetLoRAError("no LoRA modules to regularise")
    width = items[0][0].shape[1]
    if not 1 <= rank <= width:
        raise HetLoRAError(f"rank {rank} outside the factors' 1..{width}")
    positions = torch.arange(width, device=items[0][0].device)
    mask = ((positions >= tail_start(rank, gamma)) & (positions < rank)).to(items[0][0].dtype)
    total = torch.zeros((), dtype=items[0][0].dtype, device=items[0][0].device)
    for b, a in items:
        total = total + torch.linalg.vector_norm(b * mask) * torch.linalg.vector_norm(
            a * mask[:, None]
        )
    return total


def pruned_rank(rank: int, r_min: int, gamma: float, tail_before: float, tail_after: float) -> int:
    """HetLoRA's pruning rule, applied once after local training.

    If local training shrank the tail (``tail_after < tail_before``), the rank drops to
    ``max(r_min, floor(gamma * rank))``; otherwise it stays. It never grows.

    Examples:
        >>> pruned_rank(20, r_min=4, gamma=0.9, tail_before=1.0, tail_after=0.5)
        18
        >>> pruned_rank(20, r_min=4, gamma=0.9, tail_before=0.5, tail_after=1.0)
        20
    """
    if tail_after < tail_before:
        return max(r_min, min(rank, tail_start(rank, gamma)))
    return rank


def product_fro_norm_sq(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``||B A||_F^2 = sum((B^T B) * (A A^T))`` (HetLoRA's sparsity score, Cho et al. Sec. 3).

    Two r x r Gram matrices, never the d_out x d_in product: 2 r^2 (d_out + d_in) FLOPs instead
    of 2 r d_out d_in. The Grams are formed in fp64: when B A nearly cancels (columns of B
    or rows of A close to opposite), the sum of the Grams' elementwise product is a small
    difference of large terms, and fp32 Grams can be off by a multiple of the exact value.
    At r x r the fp64 cost is negligible.
    """
    b, a = b.detach().double(), a.detach().double()
    return ((b.T @ b) * (a @ a.T)).sum()


def product_fro_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``||B A||_F`` via `product_fro_norm_sq` (clamped at 0 against round-off)."""
    return product_fro_norm_sq(b, a).clamp_min(0).sqrt()


def update_norm(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``||dW_k||_F`` of one client: ``sqrt(sum_modules ||B_k A_k||_F^2)``."""
    return math.sqrt(max(0.0, sum(float(product_fro_norm_sq(b, a)) for b, a in factors.values())))


def live_rank(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
    """The live rank of a factor dict, as ``(min, max)`` over modules.

    A module's live rank is the number of rank positions j where ``B[:, j]`` and ``A[j, :]``
    are both non-zero: only those add to ``B A``. Under zero-padding with replacement (the
    paper's Fig. 2) positions above a round's largest client rank come back zero in both
    factors and never return (B = A = 0 is a fixed point of training), so the live rank of the
    global adapter is the running minimum of the rounds' largest ranks.
    """
    ranks = [int(((a != 0).any(dim=1) & (b != 0).any(dim=0)).sum()) for b, a in factors.values()]
    if not ranks:
        raise HetLoRAError("no LoRA modules")
    return min(ranks), max(ranks)


class WeightedFactorSum:
    """Running ``sum_k w_k pad(B_k)``, ``sum_k w_k pad(A_k)`` with unnormalised scores.

    Client replies are folded in one at a time, so server memory stays at a couple of rank-r_max
    copies of the adapter however many clients reply; `result` divides by the total score,
    which equals the weighted average with ``w_k = score_k / sum_j score_j``. A score is one number
    per client, or one per module (``per_module`` weighting). If every score of a module is 0
    (e.g. every client returned B = 0), the module falls back to the uniform average.

    `result` takes a ``padding`` rule (`PADDINGS`). With ``S = sum_j s_j`` over
    all clients of the round, ``R_p = sum_{k: r_k > p} s_k`` over the clients that reach
    rank position p, and ``P`` the global factors the round started from (``previous``):

    * ``zero`` (the paper, Sec. 3 and Fig. 2): ``B[:, p] = sum_{k: r_k > p} s_k B_k[:, p] / S``
      (likewise the rows of A). Position p shrinks by the weight of the clients below it, and
      every position above the round's largest rank is zero in both factors, where no later
      gradient can revive it (B and A both zero is a fixed point of training).
    * ``keep`` (not in the paper; FSLoRA's HetLoRA baseline): as ``zero`` where ``R_p`` has a
      client, ``B[:, p] = P_B[:, p]`` where no client of the round reached p.
    * ``rankwise`` (not in the paper; FediLoRA, RB-LoRA): ``B[:, p] = sum_{k: r_k > p} s_k
      B_k[:, p] / R_p``, the weights renormalised over the clients that reach p, and
      ``P_B[:, p]`` where none did.

    Where every client reaching p has score 0, the position falls back to the uniform average
    of those clients (``zero``: the module's uniform average over all its clients).
    """

    def __init__(self, r_max: int) -> None:
        self.r_max = r_max
        self._sum: dict[str, list[torch.Tensor]] = {}  # name -> [sum s*B, sum s*A]
        self._zero: dict[str, list[torch.Tensor]] = {}  # name -> [sum B, sum A] over score 0
        # name -> per rank position j: the sum of the scores of the clients reaching j, and the
        # count of those with score 0 (position 0 is reached by every client: the totals)
        self._reach: dict[str, torch.Tensor] = {}
        self._reach_zero: dict[str, torch.Tensor] = {}

    def add(
        self,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        score: float | Mapping[str, float],
    ) -> None:
        """Fold in one client's factors with its score (one number, or one per module)."""
        for name, (b, a) in factors.items():
            s = float(score[name]) if isinstance(score, Mapping) else float(score)
            if s < 0 or not math.isfinite(s):
                raise HetLoRAError(f"aggregation score for {name} must be finite and >= 0: {s}")
            b, a = b.detach().float(), a.detach().float()
            r = b.shape[1]
            if r > self.r_max:
                raise HetLoRAError(f"{name}: rank {r} above r_max = {self.r_max}")
            # zero-padding to r_max, without the padded copies: add into the first r columns/rows
            acc = self._sum.get(name)
            if acc is None:
                acc = self._sum[name] = self._zeros(b, a)
            acc[0][:, :r].add_(b, alpha=s)
            acc[1][:r].add_(a, alpha=s)
            if name not in self._reach:
                self._reach[name] = torch.zeros(self.r_max, dtype=torch.float64)
                self._reach_zero[name] = torch.zeros(self.r_max, dtype=torch.float64)
            self._reach[name][:r] += s
            if s == 0:
                self._reach_zero[name][:r] += 1
                zero = self._zero.get(name)
                if zero is None:
                    zero = self._zero[name] = self._zeros(b, a)
                zero[0][:, :r].add_(b)
                zero[1][:r].add_(a)

    def _zeros(self, b: torch.Tensor, a: torch.Tensor) -> list[torch.Tensor]:
        return [b.new_zeros(b.shape[0], self.r_max), a.new_zeros(self.r_max, a.shape[1])]

    def result(
        self,
        padding: str = "zero",
        previous: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> Factors:
        """The aggregate of everything added, at rank r_max, under the ``padding`` rule (see the
        class docstring); ``keep`` and ``rankwise`` need ``previous``, the global factors the
        round started from."""
        if not self._sum:
            raise HetLoRAError("no client updates to aggregate")
        if padding not in PADDINGS:
            raise HetLoRAError(f"padding must be one of {', '.join(PADDINGS)}; got {padding!r}")
        if padding != "zero" and previous is None:
            raise HetLoRAError(f"padding {padding!r} needs the previous global factors")
        if padding == "rankwise":
            return self._rankwise(previous)
        out = self._zero_padded()
        if padding == "keep":
            for name, (b, a) in out.items():
                prev_b, prev_a = self._previous(name, previous)
                unreached = (self._reach[name] == 0) & (self._reach_zero[name] == 0)
                b[:, unreached] = prev_b[:, unreached]
                a[unreached] = prev_a[unreached]
        return out

    def _previous(
        self, name: str, previous: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sum_b, sum_a = self._sum[name]
        prev_b, prev_a = previous[name]
        if prev_b.shape != sum_b.shape or prev_a.shape != sum_a.shape:
            raise HetLoRAError(f"{name}: previous global factors are not at rank {self.r_max}")
        return prev_b.detach().float(), prev_a.detach().float()

    def _zero_padded(self) -> Factors:
        out: Factors = {}
        for name, (sum_b, sum_a) in self._sum.items():
            total = float(self._reach[name][0])
            if total > 0:
                out[name] = (sum_b / total, sum_a / total)
            else:
                n = float(self._reach_zero[name][0])
                out[name] = (self._zero[name][0] / n, self._zero[name][1] / n)
        return out

    def _rankwise(self, previous: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Factors:
        out: Factors = {}
        for name, (sum_b, sum_a) in self._sum.items():
            prev_b, prev_a = self._previous(name, previous)
            reach, reach_zero = self._reach[name], self._reach_zero[name]
            weighted = reach > 0
            uniform = ~weighted & (reach_zero > 0)  # reached only by clients of score 0
            div = torch.where(weighted, reach, torch.where(uniform, reach_zero, 1.0)).float()
            b = prev_b.clone()
            a = prev_a.clone()
            b[:, weighted] = (sum_b / div)[:, weighted]
            a[weighted] = (sum_a / div[:, None])[weighted]
            if bool(uniform.any()):
                zero_b, zero_a = self._zero[name]
                b[:, uniform] = (zero_b / div)[:, uniform]
                a[uniform] = (zero_a / div[:, None])[uniform]
            out[name] = (b, a)
        return out

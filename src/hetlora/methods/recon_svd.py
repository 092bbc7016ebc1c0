"""Reconstruction + SVD (FlexLoRA-like): average the products, redistribute by truncated SVD.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources" (FlexLoRA, 2024), the heterogeneous-rank baseline HetLoRA is compared against. Per
module, the server forms ``dW = sum_k p_k B_k A_k`` (``p_k`` = example share), takes its SVD
``U S V^T`` and keeps rank r_max with the singular values in B (our reading of FlexLoRA's split;
its reference code, FederatedScope's FlexLoRA branch, was not at hand to check), ``B = U_r S_r``, ``A = V_r^T``. Because singular values come sorted, truncating these
factors to r_k is exactly the best rank-r_k approximation each client receives. A's rows stay
orthonormal, so rank positions beyond the rank of ``dW`` get ``B = 0`` and a unit-norm row of A,
like LoRA's own init (B = 0, A random), and a client of higher rank can still learn there; the
symmetric split ``U sqrt(S)``, ``sqrt(S) V^T`` would leave both factors near zero, a near-fixed
point of training.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors, rank_of, truncate
from hetlora.methods.base import ClientTask, ClientUpdate, Server


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U_r S_r``, ``A = V_r^T``: the best rank-``rank`` split of ``delta`` (FlexLoRA).

    Singular values below the numerical-rank tolerance (``max(S) * max(d_out, d_in) * eps``,
    as ``torch.linalg.matrix_rank``) count as zero: those positions get ``B = 0`` exactly,
    while A keeps its orthonormal row. Positions beyond ``min(d_out, d_in)`` are zero in both.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    tol = float(s.max()) * max(delta.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    kept = torch.where(s[:k] > tol, s[:k], torch.zeros_like(s[:k]))
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * kept
    a[:k] = vh[:k]
    return b.float(), a.float()


class ReconSVDServer(Server):
    """Weighted average of the clients' products, truncated SVD back to each client's rank.

    Args:
        initial_factors: PEFT-initialised global factors at r_max (round 1 sends their slices).
        ranks: every client's fixed rank (no self-pruning).
    """

    name = "recon_svd"

    def __init__(self, initial_factors: Factors, ranks: Mapping[str, int]) -> None:
        super().__init__(ranks)
        self.factors = initial_factors
        self._sum: dict[str, torch.Tensor] = {}
        self._total = 0.0
        self._weights: dict[str, float] = {}

    def task(self, client_id: str) -> ClientTask:
        rank = self.ranks[client_id]
        return ClientTask(client_id, "lora", rank=rank, factors=truncate(self.factors, rank))

    def add(self, update: ClientUpdate) -> None:
        p = float(update.num_examples)
        for name, (b, a) in update.factors.items():
            prod = b.double() @ a.double()
            acc = self._sum.get(name)
            self._sum[name] = prod * p if acc is None else acc.add_(prod, alpha=p)
        self._total += p
        self._weights[update.client_id] = p

    def finish(self) -> dict[str, float]:
        if not self._sum or self._total <= 0:
            raise HetLoRAError("no client updates to aggregate")
        r_max = rank_of(self.factors)
        self.factors = {n: svd_factors(s / self._total, r_max) for n, s in self._sum.items()}
        weights = {c: w / self._total for c, w in self._weights.items()}
        self._sum, self._total, self._weights = {}, 0.0, {}
        self.round += 1
        return weights

    def reset_round(self) -> None:
        self._sum, self._total, self._weights = {}, 0.0, {}

    def global_factors(self) -> Factors:
        return self.factors

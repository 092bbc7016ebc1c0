"""FedEx-LoRA: average the factors, fold the averaging error into the frozen base, exactly.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models" (ACL 2025; code ``CERT-Lab/fedex-lora``, ``fed_agg.py``). Averaging B and A
separately is inexact: ``B_avg A_avg != sum_k p_k B_k A_k``. FedEx-LoRA keeps the averaged
factors as the next global adapter and adds the difference, scaled by the LoRA scale s, to the
base weight of every adapted module:

    B = sum_k p_k pad(B_k),   A = sum_k p_k pad(A_k)          (zero-padded to r_max)
    W0 <- W0 + s * (sum_k p_k B_k A_k - B A)

so the global model ``W0 + s B A`` equals the weighted average of the clients' models
``W0 + s B_k A_k``, whatever their ranks. With heterogeneous ranks this corrects exactly the
error zero-padding makes (the shrinking of the positions few clients reach, and the cross terms
of averaging factors); the residual has rank at most ``sum_k r_k + r_max``. The weights are the
example shares ``p_k = n_k / sum_j n_j`` (config ``aggregation = "data_size"``, the default) or
uniform (``"uniform"``, as the repository's ``fed_agg.py`` does). Clients receive the global
factors truncated to their rank (HetLoRA's distribution), so a client below r_max starts from a
truncation of the exact average, as in HetLoRA.

What travels: each client downloads its truncated factors and the last round's residual, which
it adds to its copy of the base. The byte count charges the residual in factored form,
``[p_1 B_1, ..., p_K B_K, -B] [A_1; ...; A_K; A]`` (``(d_out + d_in)(sum_k r_k + r_max)`` numbers a
module), not the dense ``d_out x d_in`` matrix; a device that missed rounds needs every residual
since its last round, which the count does not charge (FLoRA's count has the same reading).
The server keeps the dense sum of the residuals (the changed base, for resuming and export).
The base changes every round, so FedEx-LoRA does not run on Flower (its ClientApp keeps a frozen
base).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors, WeightedFactorSum, rank_of, truncate
from hetlora.methods.base import BaseUpdate, ClientTask, Reply, Server, fedavg_weighting


class FedExServer(Server):
    """Zero-padded factor averaging plus the exact residual merged into the base.

    Args:
        initial_factors: PEFT-initialised global factors at r_max.
        ranks: every client's fixed rank.
        scale: the LoRA scale s (the base gets ``s * residual``).
        weighting: ``data_size`` (example shares) or ``uniform``.
    """

    name = "fedex"
    frozen_base = False
    options = ("tiers", "aggregation")
    aggregations = ("uniform", "data_size")

    @classmethod
    def from_config(cls, cfg, initial_factors, ranks, client_ids, base_weights):
        weighting = fedavg_weighting(cfg)
        return cls(initial_factors, ranks, cfg.lora_scale, weighting)

    def __init__(
        self,
        initial_factors: Factors,
        ranks: Mapping[str, int],
        scale: float,
        weighting: str = "data_size",
    ) -> None:
        super().__init__(ranks)
        if weighting not in ("data_size", "uniform"):
            raise HetLoRAError(f"FedEx-LoRA weights 'data_size' or 'uniform', got {weighting!r}")
        self.factors = initial_factors
        self.scale = scale
        self.weighting = weighting
        self.merged: dict[str, torch.Tensor] = {}  # sum of every round's s * residual
        self.last_residual_nbytes = 0
        self.reset_round()

    def task(self, client_id: str) -> ClientTask:
        rank = self.ranks[client_id]
        factors = truncate(self.factors, rank)
        own = sum((b.numel() + a.numel()) * b.element_size() for b, a in factors.values())
        return ClientTask(
            client_id,
            "lora",
            rank=rank,
            factors=factors,
            download_nbytes=own + self.last_residual_nbytes,
        )

    def add(self, update: Reply) -> None:
        w = float(update.num_examples) if self.weighting == "data_size" else 1.0
        self._acc.add(update.factors, w)
        for name, (b, a) in update.factors.items():
            prod = b.double() @ a.double()
            acc = self._products.get(name)
            self._products[name] = prod * w if acc is None else acc.add_(prod, alpha=w)
        self._weights[update.client_id] = w
        self._ranks_sum += update.factors[next(iter(update.factors))][0].shape[1]

    def finish(self) -> dict[str, float]:
        if not self._weights:
            raise HetLoRAError("no client updates to aggregate")
        total = sum(self._weights.values())
        averaged = self._acc.result("zero")
        r_max = rank_of(self.factors)
        nbytes = 0
        for name, (b, a) in averaged.items():
            residual = self._products[name] / total - b.double() @ a.double()
            delta = (self.scale * residual).float()
            self.merged[name] = delta if name not in self.merged else self.merged[name] + delta
            nbytes += (b.shape[0] + a.shape[1]) * (self._ranks_sum + r_max) * b.element_size()
        self.factors = averaged
        self.last_residual_nbytes = nbytes
        weights = {c: w / total for c, w in self._weights.items()}
        self.reset_round()
        self.round += 1
        return weights

    def reset_round(self) -> None:
        self._acc = WeightedFactorSum(rank_of(self.factors))
        self._products: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self._ranks_sum = 0

    def global_factors(self) -> Factors:
        return self.factors

    def base_state(self) -> BaseUpdate | None:
        return BaseUpdate(deltas=self.merged) if self.merged else None

"""Full fine-tuning with FedAvg (McMahan et al., AISTATS 2017): the upper baseline.

Every sampled client trains all weights of the base model; the server averages them weighted by
examples, ``W = sum_k p_k W_k``. Bytes and FLOPs are charged for the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hetlora.errors import HetLoRAError
from hetlora.methods.base import BaseUpdate, ClientTask, Reply, Server


class FullFTServer(Server):
    """FedAvg of every base weight, folded one reply at a time.

    Args:
        weights: the base model's parameters by name (the global model).
        client_ids: every client.
    """

    name = "full_ft"
    lora = False
    frozen_base = False
    has_global_adapter = False

    @classmethod
    def from_config(cls, cfg, initial_factors, ranks, client_ids, base_weights):
        if base_weights is None:
            raise HetLoRAError("full_ft needs the base model's weights")
        return cls(base_weights, client_ids)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.compile == "on":
            raise HetLoRAError(
                "config key 'compile' = 'on' applies to LoRA methods (a fixed-shape adapter "
                "step); full_ft trains the base weights: use 'auto' or 'off'"
            )

    def __init__(self, weights: dict[str, torch.Tensor], client_ids: Sequence[str]) -> None:
        super().__init__({c: 0 for c in client_ids})
        self.weights = {n: w.detach().float().cpu().clone() for n, w in weights.items()}
        self._sum: dict[str, torch.Tensor] = {}
        self._total = 0.0
        self._weights: dict[str, float] = {}

    def task(self, client_id: str) -> ClientTask:
        return ClientTask(client_id, "full", weights=self.weights)

    def add(self, update: Reply) -> None:
        p = float(update.num_examples)
        for name, w in update.weights.items():
            acc = self._sum.get(name)
            if acc is None:
                self._sum[name] = w.detach().float().cpu() * p
            else:
                acc.add_(w.detach().float().cpu(), alpha=p)
        self._total += p
        self._weights[update.client_id] = p

    def finish(self) -> dict[str, float]:
        if not self._sum or self._total <= 0:
            raise HetLoRAError("no client updates to aggregate")
        self.weights = {n: s / self._total for n, s in self._sum.items()}
        weights = {c: w / self._total for c, w in self._weights.items()}
        self._sum, self._total, self._weights = {}, 0.0, {}
        self.round += 1
        return weights

    def reset_round(self) -> None:
        self._sum, self._total, self._weights = {}, 0.0, {}

    def reference_weights(self) -> dict[str, torch.Tensor]:
        return self.weights

    def base_state(self) -> BaseUpdate | None:
        return BaseUpdate(weights=self.weights) if self.round else None

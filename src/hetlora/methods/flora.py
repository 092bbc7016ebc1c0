"""FLoRA: stacking heterogeneous LoRA adapters and merging them into the base every round.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations" (NeurIPS 2024). Each round every sampled client trains a fresh adapter at its own
rank (A random, B = 0). The server stacks them, ``B = [p_1 B_1, ..., p_K B_K]``,
``A = [A_1; ...; A_K]``, whose product is ``sum_k p_k B_k A_k`` (``p_k`` = example share), and
every model merges ``W0 <- W0 + s * B A`` before the next round. The stacked factors are what
clients download (their total rank grows with the number of clients), so that is what the byte
count charges.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors
from hetlora.methods.base import BaseUpdate, ClientTask, Reply, Server, tensors_nbytes


def fresh_factors(
    shapes: Mapping[str, tuple[int, int]], rank: int, generator: torch.Generator
) -> Factors:
    """PEFT's LoRA init at ``rank``: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(d_in)), B = 0."""
    out: Factors = {}
    for name, (d_out, d_in) in shapes.items():
        bound = 1.0 / math.sqrt(d_in)
        a = (torch.rand(rank, d_in, generator=generator) * 2 - 1) * bound
        out[name] = (torch.zeros(d_out, rank), a)
    return out


def stack(updates: list[tuple[float, Factors]]) -> Factors:
    """FLoRA's stacking: ``[p_1 B_1 ... p_K B_K]`` and ``[A_1; ...; A_K]`` per module."""
    names = updates[0][1].keys()
    return {
        n: (
            torch.cat([p * f[n][0] for p, f in updates], dim=1),
            torch.cat([f[n][1] for _, f in updates], dim=0),
        )
        for n in names
    }


class FLoRAServer(Server):
    """Fresh adapters per round; the stacked product is merged into the base.

    Args:
        shapes: module name -> (d_out, d_in) of every adapted module.
        ranks: every client's fixed rank.
        scale: the LoRA scale s (the merge adds ``s * B A``).
        seed: seeds the fresh adapters (per round and client).
    """

    name = "flora"
    frozen_base = False
    has_global_adapter = False
    options = ("tiers",)

    @classmethod
    def from_config(cls, cfg, initial_factors, ranks, client_ids, base_weights):
        shapes = {n: (b.shape[0], a.shape[1]) for n, (b, a) in initial_factors.items()}
        return cls(shapes, ranks, cfg.lora_scale, cfg.seed)

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        ranks: Mapping[str, int],
        scale: float,
        seed: int,
    ) -> None:
        super().__init__(ranks)
        self.shapes = dict(shapes)
        self.scale = scale
        self.seed = seed
        self._replies: list[tuple[str, float, Factors]] = []
        self.last_stack_nbytes = 0
        self.merged: dict[str, torch.Tensor] = {}  # sum of every merge so far

    def task(self, client_id: str) -> ClientTask:
        key = zlib.crc32(f"{self.seed}/{self.round}/{client_id}".encode())
        g = torch.Generator().manual_seed(key)
        rank = self.ranks[client_id]
        return ClientTask(
            client_id,
            "lora",
            rank=rank,
            factors=fresh_factors(self.shapes, rank, g),
            # the fresh adapter is drawn on the device from a seed; what travels is the last
            # round's stacked adapter, which every client merges into its copy of the base
            download_nbytes=self.last_stack_nbytes,
        )

    def add(self, update: Reply) -> None:
        self._replies.append((update.client_id, float(update.num_examples), update.factors))

    def finish(self) -> dict[str, float]:
        if not self._replies:
            raise HetLoRAError("no client updates to aggregate")
        total = sum(n for _, n, _ in self._replies)
        weights = {c: n / total for c, n, _ in self._replies}
        stacked = stack([(n / total, f) for _, n, f in self._replies])
        self.last_stack_nbytes = tensors_nbytes(stacked)
        merge = {n: self.scale * (b.double() @ a.double()).float() for n, (b, a) in stacked.items()}
        # the base state a resumed run rebuilds: W0 + sum of every round's merge so far
        for n, delta in merge.items():
            self.merged[n] = delta.clone() if n not in self.merged else self.merged[n] + delta
        self._replies = []
        self.round += 1
        return weights

    def reset_round(self) -> None:
        self._replies = []

    def base_state(self) -> BaseUpdate | None:
        return BaseUpdate(deltas=self.merged) if self.merged else None

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self.shapes)

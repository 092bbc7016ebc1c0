"""RB-LoRA: rank-balanced aggregation of the rank-one components, projected back by SVD.

Ha et al., "RB-LoRA: Rank-Balanced Aggregation for Low-Rank Adaptation with Federated
Fine-Tuning" (Findings of EACL 2026; code ``seonha01/rb-lora``). A rank-r adapter is a sum of
rank-one components ``B[:, j] A[j, :]``; position j is held only by the clients of rank above
j. Zero-padding divides every position by all the round's clients, so the high positions,
which few clients hold, shrink towards zero. RB-LoRA weights client k's component at position j
by its data share times the rarity of that position, ``p_k * (N / N_j)`` with ``N = sum_k n_k``
and ``N_j = sum_{k: r_k > j} n_k``:

    B[:, j] = sum_{k: r_k > j} n_k B_k[:, j] / N_j,   A[j, :] = sum_{k: r_k > j} n_k A_k[j, :] / N_j

(the global factors keep position j where no client of the round reached it). The server then
projects the product back: ``B A = U S V^T``, global ``B = U S``, ``A = V^T`` at r_max, and
client k receives ``B[:, :r_k]``, ``A[:r_k, :]``, the best rank-r_k approximation of ``B A``
(the repository's ``distribute_lora_weights_with_svd`` takes the SVD per client; truncating one
SVD is the same thing).

Two notes against the published code. Its ``compute_column_weights_from_ranks`` computes the
rarity weights above, but its ``train.py`` runs RB-LoRA's aggregation as plain data-size
zero-padding (``needs_column_weights`` is False for every method): we follow the paper's rule.
Its redistribution divides B by ``alpha / r`` because its clients' LoRA scale depends on their
rank; ours is one ``lora_scale`` for every rank, so the product needs no rescaling.

The rarity-weighted join is HetLoRA's ``padding = "rankwise"`` with ``data_size`` weights
(`hetlora.lora.WeightedFactorSum`); the projection is FlexLoRA's SVD split.
"""

from __future__ import annotations

from collections.abc import Mapping

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors, WeightedFactorSum, rank_of, truncate
from hetlora.methods.base import ClientTask, Reply, Server
from hetlora.methods.recon_svd import SVD_PATHS, qr_svd_factors, svd_factors


class RBLoRAServer(Server):
    """Rarity-weighted positions, then an SVD projection at r_max (``path``: ``dense`` or
    ``qr``, how the SVD of ``B A`` is taken; the same result up to round-off)."""

    name = "rblora"
    options = ("tiers", "svd_path")
    svd_default = "qr"

    @classmethod
    def from_config(cls, cfg, initial_factors, ranks, client_ids, base_weights):
        path = cfg.svd_path if cfg.svd_path != "auto" else cls.svd_default
        return cls(initial_factors, ranks, path=path)

    def __init__(
        self, initial_factors: Factors, ranks: Mapping[str, int], path: str = "qr"
    ) -> None:
        super().__init__(ranks)
        if path not in SVD_PATHS:
            raise HetLoRAError(f"SVD path must be one of {', '.join(SVD_PATHS)}; got {path!r}")
        self.factors = initial_factors
        self.path = path
        self._acc = WeightedFactorSum(rank_of(initial_factors))
        self._weights: dict[str, float] = {}

    def task(self, client_id: str) -> ClientTask:
        rank = self.ranks[client_id]
        return ClientTask(client_id, "lora", rank=rank, factors=truncate(self.factors, rank))

    def add(self, update: Reply) -> None:
        n = float(update.num_examples)
        self._acc.add(update.factors, n)
        self._weights[update.client_id] = n

    def finish(self) -> dict[str, float]:
        joined = self._acc.result("rankwise", self.factors)
        r_max = rank_of(self.factors)
        if self.path == "qr":
            self.factors = {n: qr_svd_factors(b, a, r_max) for n, (b, a) in joined.items()}
        else:
            self.factors = {
                n: svd_factors(b.double() @ a.double(), r_max) for n, (b, a) in joined.items()
            }
        total = sum(self._weights.values())
        weights = {c: w / total for c, w in self._weights.items()}
        self.reset_round()
        self.round += 1
        return weights

    def reset_round(self) -> None:
        self._acc = WeightedFactorSum(rank_of(self.factors))
        self._weights = {}

    def global_factors(self) -> Factors:
        return self.factors

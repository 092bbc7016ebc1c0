"""HomLoRA (FedIT-style federated LoRA): every client at one rank ``r``, FedAvg of A and B.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT, 2023),
as the homogeneous baseline of Cho et al. (EMNLP 2024): ``B = sum_k p_k B_k``,
``A = sum_k p_k A_k`` with ``p_k = n_k / sum_j n_j`` (examples per client; ``aggregation =
"uniform"``: ``p_k = 1 / m``). No self-pruning. The global adapter has rank ``r``; it is
HetLoRA's engine with equal ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

from hetlora import dp as dp_
from hetlora.dp import DPPlan
from hetlora.lora import Factors, truncate
from hetlora.methods.base import check_uniform_under_dp, fedavg_weighting
from hetlora.methods.hetlora import HetLoRAServer


class HomLoRAServer(HetLoRAServer):
    """Every client trains the same rank-``rank`` adapter; example-weighted FedAvg of factors.

    Args:
        initial_factors: PEFT-initialised factors (at least rank ``rank``; cut to ``rank``).
        client_ids: every client.
        rank: the one rank of all clients.
        aggregation: ``data_size`` (FedAvg weights) or ``uniform``.
        dp: client-level differential privacy (`hetlora.dp`): uniform weights instead of
            example counts (the counts are data-dependent); None: off.
    """

    name = "homlora"
    options = ("rank", "aggregation", "dp_clip_norm")
    aggregations = ("uniform", "data_size")

    @classmethod
    def from_config(cls, cfg, initial_factors, ranks, client_ids, base_weights):
        weighting = fedavg_weighting(cfg)
        dp = dp_.plan(cfg, len(client_ids))
        return cls(initial_factors, client_ids, cfg.rank or cfg.r_max, dp, aggregation=weighting)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_uniform_under_dp(cfg)

    def __init__(
        self,
        initial_factors: Factors,
        client_ids: Sequence[str],
        rank: int,
        dp: DPPlan | None = None,
        *,
        aggregation: str = "data_size",
    ) -> None:
        if aggregation not in self.aggregations:
            raise ValueError(f"aggregation must be one of {self.aggregations}, got {aggregation!r}")
        super().__init__(
            truncate(initial_factors, rank),
            {c: rank for c in client_ids},
            aggregation="uniform" if dp is not None else aggregation,
            pruning=False,
            regularise=False,
            dp=dp,
        )

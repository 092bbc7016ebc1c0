"""FFA-LoRA with heterogeneous ranks: A frozen at its seeded init, only B trained and averaged.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning" (ICLR 2024): with A fixed
at its random initialisation and only B trained, the average of the clients' B is exactly the
average of their products, ``(sum_k p_k B_k) A = sum_k p_k B_k A``, which FedAvg of both
factors is not; and under differential privacy the noise enters B only, linearly, instead of
being multiplied through ``B A``.

Here with HetLoRA's distribution: the global A is PEFT's seeded init at r_max and never
changes; a client of rank r_k receives ``(G_B[:, :r_k], A[:r_k])``, trains B only, and the
server zero-pads the clients' B to r_max and averages them (example-count weights, or uniform;
uniform under DP). With every client's A a prefix of the one global A, the padded average is
the exact average of the client products. There is no self-pruning (a client's rank is its
assignment; HetLoRA's rule reads the tail of B A, which with A fixed is just B's tail) and no
sparsity weights; the keys that configure them do not apply (``KEY_RULES``).

Replies carry A back unchanged (the one reply format of every LoRA method), and ``bytes_up``
charges it: sending B alone would halve the upload of A's share, not done here.
"""

from __future__ import annotations

from collections.abc import Mapping

from hetlora import dp as dp_
from hetlora.lora import Factors
from hetlora.methods.base import check_uniform_under_dp, fedavg_weighting
from hetlora.methods.hetlora import HetLoRAServer, ServerState


class FFAServer(HetLoRAServer):
    """Heterogeneous-rank FFA-LoRA (see the module docstring).

    Args:
        initial_factors: PEFT-initialised factors at r_max (B = 0, A random): A is kept.
        ranks: each client's assigned rank.
        aggregation: ``data_size`` (FedAvg weights) or ``uniform``.
        dp: client-level differential privacy (`hetlora.dp`; uniform weights, noise on B).
    """

    name = "ffa"
    options = ("tiers", "aggregation", "dp_clip_norm")
    aggregations = ("uniform", "data_size")
    train_a = False

    @classmethod
    def from_config(cls, cfg, initial_factors, ranks, client_ids, base_weights):
        weighting = fedavg_weighting(cfg)
        return cls(initial_factors, ranks, weighting, dp=dp_.plan(cfg, len(client_ids)))

    @classmethod
    def check_config(cls, cfg) -> None:
        check_uniform_under_dp(cfg)

    def __init__(
        self,
        initial_factors: Factors,
        ranks: Mapping[str, int],
        aggregation: str = "data_size",
        dp: dp_.DPPlan | None = None,
    ) -> None:
        super().__init__(
            initial_factors,
            ranks,
            aggregation="uniform" if dp is not None else aggregation,
            padding="zero",
            pruning=False,
            regularise=False,
            dp=dp,
        )
        self.frozen_a = {n: a.clone() for n, (_, a) in initial_factors.items()}

    def finish(self) -> dict[str, float]:
        weights = super().finish()
        # zero-padding averaged A's prefixes too (and zeroed positions no client reached):
        # the global A is the frozen init, whatever the clients replied
        factors = {n: (b, self.frozen_a[n]) for n, (b, _) in self.state.factors.items()}
        self.state = ServerState(factors=factors, ranks=self.state.ranks, round=self.state.round)
        return weights

"""HetLoRA's server side (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, arXiv 2401.06432, Sec. 3).

A pair of pure steps over an explicit `ServerState`, as in FedJAX's ``fed_avg.py``:

* `init` -- global factors at r_max (PEFT's init: A random, B = 0) and each client's rank,
  assigned once (`assign_ranks`).
* `client_message` -- distribution by truncation: client k gets B[:, :r_k], A[:r_k, :].
* `Aggregator` -- zero-padding and sparsity-weighted aggregation, folded one reply at a
  time: w_k = ||dW_k||_F / sum_j ||dW_j||_F with ||dW_k||_F^2 = sum_modules ||B_k A_k||_F^2, then
  B = sum_k w_k pad(B_k), A = sum_k w_k pad(A_k). The result replaces the global factors, and
  each client's pruned rank persists in the state (it never grows back).

The ``aggregation`` option gives the paper's ablations: ``uniform`` or ``data_size`` weights in
place of sparsity weights, or ``sparsity_data_size`` (sparsity times data size); ``per_module``
gives sparsity weights per module. The
``padding`` option gives alternatives to zero-padding that are not in the paper (``keep``,
``rankwise``; see `hetlora.lora.WeightedFactorSum`).

With a `hetlora.dp.DPPlan` (config ``dp_clip_norm > 0``) the round's aggregate is
`hetlora.dp.NoisyZeroPadSum` instead: uniform zero-padding over the clipped replies plus
Gaussian noise, divided by the number of sampled clients; pruning is off and the weights are
uniform (the config refuses anything else).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hetlora import dp as dp_
from hetlora.config import AGGREGATIONS
from hetlora.errors import HetLoRAError
from hetlora.lora import (
    PADDINGS,
    Factors,
    WeightedFactorSum,
    product_fro_norm,
    rank_of,
    truncate,
    update_norm,
)
from hetlora.methods.base import ClientTask, ClientUpdate, Server

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """Everything the server carries from one round to the next."""

    factors: Factors
    ranks: dict[str, int]
    round: int = 0

    @property
    def r_max(self) -> int:
        return rank_of(self.factors)


def assign_ranks(
    client_ids: Sequence[str],
    r_min: int,
    r_max: int,
    seed: int,
    tiers: Sequence[Mapping] | None = None,
) -> dict[str, int]:
    """Each client's starting rank, assigned once.

    Without ``tiers``: uniform over [r_min, r_max] (seeded). With ``tiers`` (``{name, rank,
    share}``): clients are shuffled (seeded) and dealt to tiers in proportion to their shares.
    """
    rng = np.random.default_rng([seed, 0x4A7])
    ids = list(client_ids)
    if not tiers:
        draws = rng.integers(r_min, r_max + 1, size=len(ids))
        return {c: int(r) for c, r in zip(ids, draws, strict=True)}
    shares = np.array([float(t.get("share", 1.0)) for t in tiers])
    counts = np.floor(shares / shares.sum() * len(ids)).astype(int)
    for i in np.argsort(-(shares / shares.sum() * len(ids) - counts))[: len(ids) - counts.sum()]:
        counts[i] += 1  # largest remainders get the leftover clients
    order = rng.permutation(len(ids))
    ranks: dict[str, int] = {}
    pos = 0
    for tier, count in zip(tiers, counts, strict=True):
        for j in order[pos : pos + count]:
            ranks[ids[j]] = int(tier["rank"])
        pos += count
    return {c: ranks[c] for c in ids}


def init(initial_factors: Factors, ranks: Mapping[str, int]) -> ServerState:
    """The round-0 state: PEFT-initialised factors at r_max and every client's rank."""
    r_max = rank_of(initial_factors)
    for c, r in ranks.items():
        if not 1 <= r <= r_max:
            raise HetLoRAError(f"client {c} has rank {r}, outside [1, {r_max}]")
    return ServerState(factors=initial_factors, ranks=dict(ranks), round=0)


def client_message(state: ServerState, client_id: str) -> Factors:
    """Distribution: the global factors truncated to the client's current rank."""
    return truncate(state.factors, state.ranks[client_id])


class Aggregator:
    """Folds client replies into the next global factors, one at a time.

    Args:
        state: the server state the round started from (ranks are checked against it).
        aggregation: ``sparsity`` (HetLoRA), ``uniform`` or ``data_size`` weights, or
            ``sparsity_data_size`` (sparsity weights times the client's number of examples).
        per_module: sparsity weights per module (||B_k A_k||_F of that module) instead of per
            client (||dW_k||_F over all modules, the paper's choice).
        padding: ``zero`` (the paper), or ``keep`` / ``rankwise`` (not in the paper): how
            factors of different ranks are joined, see `hetlora.lora.WeightedFactorSum`.
    """

    def __init__(
        self,
        state: ServerState,
        aggregation: str = "sparsity",
        per_module: bool = False,
        padding: str = "zero",
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise HetLoRAError(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}"
            )
        if padding not in PADDINGS:
            raise HetLoRAError(f"padding must be one of {', '.join(PADDINGS)}; got {padding!r}")
        self.state = state
        self.aggregation = aggregation
        self.per_module = per_module
        self.padding = padding
        self._sum = WeightedFactorSum(state.r_max)
        self.new_ranks: dict[str, int] = {}
        self.weights_raw: dict[str, float] = {}

    def score(self, update: ClientUpdate) -> float | dict[str, float]:
        """The unnormalised weight of one update (per module when ``per_module``)."""
        size = float(update.num_examples)
        if self.aggregation == "uniform":
            return 1.0
        if self.aggregation == "data_size":
            return size
        factor = size if self.aggregation == "sparsity_data_size" else 1.0
        if self.per_module:
            return {
                n: factor * float(product_fro_norm(b, a)) for n, (b, a) in update.factors.items()
            }
        return factor * update_norm(update.factors)

    def add(self, update: ClientUpdate) -> None:
        """Fold in one reply checked by `hetlora.methods.base.Server.check` (names,
        shapes at a rank within the one assigned, finite values)."""
        score = self.score(update)
        self._sum.add(update.factors, score)
        self.new_ranks[update.client_id] = update.rank
        self.weights_raw[update.client_id] = (
            sum(score.values()) if isinstance(score, dict) else float(score)
        )

    def finish(self) -> ServerState:
        """The next state: aggregated factors, pruned ranks kept, round counter advanced."""
        if not self.new_ranks:
            raise HetLoRAError("no client updates to aggregate")
        factors = self._sum.result(self.padding, self.state.factors)
        ranks = dict(self.state.ranks)
        ranks.update(self.new_ranks)
        return ServerState(factors=factors, ranks=ranks, round=self.state.round + 1)

    def weights(self) -> dict[str, float]:
        """Normalised per-client weights of the updates added so far (for logging)."""
        total = sum(self.weights_raw.values())
        n = len(self.weights_raw)
        return {c: (w / total if total > 0 else 1.0 / n) for c, w in self.weights_raw.items()}


class HetLoRAServer(Server):
    """HetLoRA as a `hetlora.methods.base.Server`: truncation out, zero-padding and
    sparsity-weighted aggregation in, pruned ranks kept.

    Args:
        initial_factors: PEFT-initialised global factors at r_max.
        ranks: every client's starting rank.
        aggregation, per_module, padding: see `Aggregator`.
        pruning: let clients apply the self-pruning rule.
        regularise: add the self-pruning regulariser to the local loss.
        dp: client-level differential privacy (`hetlora.dp`); None: off.
    """

    name = "hetlora"
    #: whether clients train A (FFA-LoRA freezes it)
    train_a = True

    def __init__(
        self,
        initial_factors: Factors,
        ranks: Mapping[str, int],
        aggregation: str = "sparsity",
        per_module: bool = False,
        padding: str = "zero",
        pruning: bool = True,
        regularise: bool = True,
        dp: dp_.DPPlan | None = None,
    ) -> None:
        if dp is not None and (
            pruning or aggregation != "uniform" or padding not in ("zero", "keep")
        ):
            raise HetLoRAError(
                "differential privacy needs pruning off, uniform weights and zero or keep padding"
            )
        super().__init__(ranks)
        self.state = init(initial_factors, ranks)
        self.options = {
            "aggregation": aggregation,
            "per_module": per_module,
            "padding": padding,
        }
        self.pruning = pruning
        self.regularise = regularise
        self.dp = dp
        self._agg: Aggregator | None = None
        self._noisy: dp_.NoisyZeroPadSum | None = None
        self._sampled_rank = 0  # the largest rank among this round's tasks (DP noise positions)

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also a checkpoint of an older version, whose options had a separate
        ``data_size_factor`` (now ``aggregation = "sparsity_data_size"``) and no DP."""
        options = state["options"]
        if options.pop("data_size_factor", False) and options["aggregation"] == "sparsity":
            options["aggregation"] = "sparsity_data_size"
        state.setdefault("dp", None)
        state.setdefault("_noisy", None)
        state.setdefault("_sampled_rank", 0)
        self.__dict__.update(state)

    def task(self, client_id: str) -> ClientTask:
        rank = self.state.ranks[client_id]
        self._sampled_rank = max(self._sampled_rank, rank)
        return ClientTask(
            client_id=client_id,
            kind="lora",
            rank=rank,
            factors=client_message(self.state, client_id),
            pruning=self.pruning,
            regularise=self.regularise,
            train_a=self.train_a,
            dp_clip_norm=self.dp.clip_norm if self.dp else 0.0,
        )

    def check(self, update: ClientUpdate, max_norm: float = 0.0) -> None:
        """As `Server.check`; under DP also the clipping bound, at the assigned rank (a
        reply a round-off above C is scaled back to C here)."""
        super().check(update, max_norm)
        if self.dp is not None:
            assigned = self.state.ranks[update.client_id]
            who = f"client {update.client_id}"
            if update.rank != assigned:
                raise HetLoRAError(
                    f"{who}: rank {update.rank}, assigned {assigned} (DP: no pruning)"
                )
            try:
                update.factors = dp_.check_reply(
                    self.state.factors, update.factors, assigned, self.dp.clip_norm
                )
            except HetLoRAError as exc:
                raise HetLoRAError(f"{who}: {exc}") from None

    def add(self, update: ClientUpdate) -> None:
        if self.dp is not None:
            if self._noisy is None:
                self._noisy = dp_.NoisyZeroPadSum(
                    self.state.factors, self.dp, self.options["padding"], noise_a=self.train_a
                )
            self._noisy.add(update.factors)
            self._dp_clients.append(update.client_id)
            return
        if self._agg is None:
            self._agg = Aggregator(self.state, **self.options)
        self._agg.add(update)

    @property
    def _dp_clients(self) -> list[str]:
        clients = self.__dict__.get("_dp_clients_list")
        if clients is None:
            clients = self.__dict__["_dp_clients_list"] = []
        return clients

    def finish(self) -> dict[str, float]:
        if self.dp is not None:
            return self._finish_dp()
        if self._agg is None:
            raise HetLoRAError("no client updates to aggregate")
        weights = self._agg.weights()
        self.state = self._agg.finish()
        self._agg = None
        self._sampled_rank = 0
        self.ranks = dict(self.state.ranks)
        self.round = self.state.round
        return weights

    def _finish_dp(self) -> dict[str, float]:
        if self._noisy is None:
            raise HetLoRAError("no client updates to aggregate")
        m = self.dp.per_round
        factors = self._noisy.result(self.state.round + 1, self._sampled_rank, m)
        weights = {c: 1.0 / m for c in self._dp_clients}
        self.state = ServerState(
            factors=factors, ranks=dict(self.state.ranks), round=self.state.round + 1
        )
        self.reset_round()
        self.round = self.state.round
        return weights

    def reset_round(self) -> None:
        self._agg = None
        self._noisy = None
        self._sampled_rank = 0
        self._dp_clients.clear()

    def global_factors(self) -> Factors:
        return self.state.factors

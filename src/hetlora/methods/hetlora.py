"""HetLoRA's server side (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, arXiv 2401.06432, Sec. 3).

One object, `HetLoRAServer`, over an explicit `ServerState` (the global factors at r_max, every
client's rank, the round), as FedJAX's ``fed_avg.py`` keeps its state apart from its steps:

* ranks are assigned once (`assign_ranks`); the state starts from PEFT's init (A random, B = 0);
* distribution by truncation: client k gets B[:, :r_k], A[:r_k, :] (`HetLoRAServer.task`);
* zero-padding and sparsity-weighted aggregation, folded one reply at a time
  (`HetLoRAServer.add`, `client_score`): w_k = ||dW_k||_F / sum_j ||dW_j||_F with
  ||dW_k||_F^2 = sum_modules ||B_k A_k||_F^2, then B = sum_k w_k pad(B_k), A = sum_k w_k
  pad(A_k). The result replaces the global factors, and each client's pruned rank persists in
  the state (it never grows back) (`HetLoRAServer.finish`).

The ``aggregation`` option gives the paper's ablations: ``uniform`` or ``data_size`` weights in
place of sparsity weights, or ``sparsity_data_size`` (sparsity times data size); ``per_module``
gives sparsity weights per module. The ``padding`` option gives alternatives to zero-padding
that are not in the paper (``keep``, ``rankwise``; see `hetlora.lora.WeightedFactorSum`).

With a `hetlora.dp.DPPlan` (config ``dp_clip_norm > 0``) the round's aggregate is
`hetlora.dp.NoisyUpdateSum` instead: the sum of the clipped, zero-padded updates plus
Gaussian noise, divided by the number of sampled clients; pruning is off, the weights are
uniform and ``padding`` does not apply (the config refuses anything else).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hetlora import dp as dp_
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
from hetlora.methods.base import ClientTask, Reply, Server

log = logging.getLogger(__name__)

#: HetLoRA's client weights (config key ``aggregation``): ``sparsity`` is the paper's;
#: ``sparsity_data_size`` is the sparsity weight times the client's number of examples.
AGGREGATIONS = ("sparsity", "uniform", "data_size", "sparsity_data_size")


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


def client_score(reply: Reply, aggregation: str, per_module: bool) -> float | dict[str, float]:
    """The unnormalised aggregation weight of one reply (per module when ``per_module``):
    ``||dW_k||_F`` (sparsity), 1 (uniform), n_k (data_size) or ``n_k ||dW_k||_F``."""
    size = float(reply.num_examples)
    if aggregation == "uniform":
        return 1.0
    if aggregation == "data_size":
        return size
    factor = size if aggregation == "sparsity_data_size" else 1.0
    if per_module:
        return {n: factor * float(product_fro_norm(b, a)) for n, (b, a) in reply.factors.items()}
    return factor * update_norm(reply.factors)


class HetLoRAServer(Server):
    """HetLoRA as a `hetlora.methods.base.Server`: truncation out, zero-padding and
    sparsity-weighted aggregation in, pruned ranks kept. ``state`` is the one record of the
    factors, the ranks and the round (``ranks`` and ``round`` read it).

    Args:
        initial_factors: PEFT-initialised global factors at r_max.
        ranks: every client's starting rank, each in [1, r_max].
        aggregation: ``sparsity`` (HetLoRA), ``uniform`` or ``data_size`` weights, or
            ``sparsity_data_size`` (sparsity weights times the client's number of examples).
        per_module: sparsity weights per module (||B_k A_k||_F of that module) instead of per
            client (||dW_k||_F over all modules, the paper's choice).
        padding: ``zero`` (the paper), or ``keep`` / ``rankwise`` (not in the paper): how
            factors of different ranks are joined, see `hetlora.lora.WeightedFactorSum`.
        pruning: let clients apply the self-pruning rule.
        regularise: add the self-pruning regulariser to the local loss.
        dp: client-level differential privacy (`hetlora.dp`); None: off.

    Examples:
        One round: two clients of ranks 2 and 4 under a rank-4 global adapter; client ``a``
        prunes to rank 1, and its rank stays pruned.

        >>> import torch
        >>> from hetlora import HetLoRAServer, Reply, truncate
        >>> g = torch.Generator().manual_seed(0)
        >>> start = {"q": (torch.zeros(6, 4), torch.randn(4, 5, generator=g))}
        >>> server = HetLoRAServer(start, {"a": 2, "b": 4})
        >>> server.task("a").factors["q"][0].shape  # truncated to the client's rank
        torch.Size([6, 2])
        >>> trained = {"q": (torch.randn(6, 4, generator=g), start["q"][1])}
        >>> server.add(Reply("a", 10, factors=truncate(trained, 1), rank=1))
        >>> server.add(Reply("b", 30, factors=trained, rank=4))
        >>> weights = server.finish()  # sparsity weights: ||B_k A_k||_F, normalised
        >>> round(sum(weights.values()), 6), server.ranks, server.round
        (1.0, {'a': 1, 'b': 4}, 1)
    """

    name = "hetlora"
    options = ("tiers", "pruning", "lambda_", "gamma", "aggregation", "per_module_weights",
               "padding", "dp_clip_norm")  # fmt: skip
    aggregations = AGGREGATIONS
    #: whether clients train A (FFA-LoRA freezes it)
    train_a = True

    @classmethod
    def from_config(cls, cfg, initial_factors, ranks, client_ids, base_weights):
        return cls(
            initial_factors,
            ranks,
            aggregation=cfg.aggregation,
            per_module=cfg.per_module_weights,
            padding=cfg.padding,
            pruning=cfg.pruning,
            regularise=cfg.pruning and cfg.lambda_ > 0,
            dp=dp_.plan(cfg, len(client_ids)),
        )

    @classmethod
    def check_config(cls, cfg) -> None:
        """Under DP, nothing a client releases may depend on its data beyond the clipped
        update: no self-pruning, uniform weights; the aggregate is `hetlora.dp`'s (the
        ``padding`` rules would make the release depend on the sampled ranks)."""
        if not cfg.dp_clip_norm > 0:
            return
        leaks = []
        if cfg.pruning:
            leaks.append("pruning = false (the self-pruned rank depends on the data)")
        if cfg.aggregation != "uniform":
            leaks.append(
                f"aggregation = 'uniform' ({cfg.aggregation!r} weights depend on the data)"
            )
        if cfg.padding != "zero":
            leaks.append(
                "padding left at 'zero' (the server averages the zero-padded updates; "
                f"{cfg.padding!r} does not apply)"
            )
        if leaks:
            raise HetLoRAError(
                "differential privacy (dp_clip_norm > 0) with method 'hetlora' needs "
                + "; ".join(leaks)
            )

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
        if aggregation not in AGGREGATIONS:
            raise HetLoRAError(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}"
            )
        if padding not in PADDINGS:
            raise HetLoRAError(f"padding must be one of {', '.join(PADDINGS)}; got {padding!r}")
        if dp is not None and (pruning or aggregation != "uniform" or padding != "zero"):
            raise HetLoRAError(
                "differential privacy needs pruning off, uniform weights and padding 'zero'"
            )
        r_max = rank_of(initial_factors)
        for c, r in ranks.items():
            if not 1 <= r <= r_max:
                raise HetLoRAError(f"client {c} has rank {r}, outside [1, {r_max}]")
        self.state = ServerState(factors=initial_factors, ranks=dict(ranks), round=0)
        self.options = {"aggregation": aggregation, "per_module": per_module, "padding": padding}
        self.pruning = pruning
        self.regularise = regularise
        self.dp = dp
        self.reset_round()

    @property
    def ranks(self) -> dict[str, int]:  # type: ignore[override]
        return self.state.ranks

    @property
    def round(self) -> int:  # type: ignore[override]
        return self.state.round

    def __setstate__(self, state: dict) -> None:
        """Unpickle, also a checkpoint of an older version: its options had a separate
        ``data_size_factor`` (now ``aggregation = "sparsity_data_size"``), it kept ``ranks``
        and ``round`` beside the state, and it had no DP. Checkpoints are written between
        rounds, so nothing folded in travels."""
        options = state["options"]
        if options.pop("data_size_factor", False) and options["aggregation"] == "sparsity":
            options["aggregation"] = "sparsity_data_size"
        for old in ("ranks", "round", "_agg", "_dp_clients_list"):
            state.pop(old, None)
        state.setdefault("dp", None)
        self.__dict__.update(state)
        self.reset_round()

    def task(self, client_id: str) -> ClientTask:
        rank = self.state.ranks[client_id]
        return ClientTask(
            client_id=client_id,
            kind="lora",
            rank=rank,
            factors=truncate(self.state.factors, rank),
            pruning=self.pruning,
            regularise=self.regularise,
            train_a=self.train_a,
            dp_clip_norm=self.dp.clip_norm if self.dp else 0.0,
        )

    def check(self, update: Reply, max_norm: float = 0.0) -> None:
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

    def add(self, update: Reply) -> None:
        """Fold in one reply checked by `check` (names, shapes at a rank within the one
        assigned, finite values; under DP the clipping bound)."""
        if self.dp is not None:
            self._dp_sum().add(update.factors)
            self._scores[update.client_id] = 1.0
            return
        score = client_score(update, self.options["aggregation"], self.options["per_module"])
        if self._sum is None:
            self._sum = WeightedFactorSum(self.state.r_max)
        self._sum.add(update.factors, score)
        self._new_ranks[update.client_id] = update.rank
        self._scores[update.client_id] = (
            sum(score.values()) if isinstance(score, dict) else float(score)
        )

    def finish(self) -> dict[str, float]:
        """Close the round: the next state (aggregated factors, pruned ranks kept, round
        advanced); returns each client's normalised weight."""
        if self.dp is not None:  # never skipped: no reply is a zero update
            m = self.dp.per_round
            factors = self._dp_sum().result(self.state.round + 1, m)
            weights = {c: 1.0 / m for c in self._scores}
        else:
            if not self._scores:
                raise HetLoRAError("no client updates to aggregate")
            total, n = sum(self._scores.values()), len(self._scores)
            weights = {c: (w / total if total > 0 else 1.0 / n) for c, w in self._scores.items()}
            factors = self._sum.result(self.options["padding"], self.state.factors)
        ranks = {**self.state.ranks, **self._new_ranks}
        self.state = ServerState(factors=factors, ranks=ranks, round=self.state.round + 1)
        self.reset_round()
        return weights

    def _dp_sum(self) -> dp_.NoisyUpdateSum:
        """The round's DP aggregate, made on first use (a checkpoint between rounds has none)."""
        if self._noisy is None:
            self._noisy = dp_.NoisyUpdateSum(self.state.factors, self.dp, self.train_a)
        return self._noisy

    def reset_round(self) -> None:
        self._sum: WeightedFactorSum | None = None
        self._noisy: dp_.NoisyUpdateSum | None = None
        self._new_ranks: dict[str, int] = {}
        self._scores: dict[str, float] = {}  # client -> unnormalised weight

    def global_factors(self) -> Factors:
        return self.state.factors

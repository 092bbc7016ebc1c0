"""What every federated method shares: the task a client receives, its reply, the server API.

A method is a `Server` over plain tensors: it says what each sampled client gets
(`Server.task`), folds replies in one at a time (`Server.add`), and closes the round
(`Server.finish`). Runtimes (in-process, Flower) move tensors and run
`hetlora.client.run_task`; they never hold a second copy of a method's math.

Two kinds of client work exist:

* ``"lora"``: train LoRA factors (given at the client's rank) with the frozen base;
* ``"full"``: train every weight of the base model (full fine-tuning).

Some methods also change the base model itself each round (FLoRA merges the stacked adapters,
full fine-tuning replaces the weights): `Server.base_state` hands the runtime everything
changed in the pristine base so far.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors, rank_of


def tensors_nbytes(tensors: Mapping[str, torch.Tensor | tuple[torch.Tensor, ...]]) -> int:
    """Bytes on the wire for named tensors (or factor pairs) at their dtype and shapes."""
    total = 0
    for value in tensors.values():
        for t in value if isinstance(value, tuple) else (value,):
            total += t.numel() * t.element_size()
    return total


@dataclass
class ClientTask:
    """What the server sends one sampled client this round.

    Attributes:
        client_id: the client.
        kind: ``"lora"`` or ``"full"``.
        rank: the client's LoRA rank (0 for ``"full"``).
        factors: initial LoRA factors at ``rank`` (``"lora"``).
        weights: the global base weights (``"full"``).
        pruning: whether the client may apply the self-pruning rule.
        regularise: whether the self-pruning regulariser is added to the loss.
        download_nbytes: bytes actually sent, where they differ from the tensors above.
        train_a: whether the client trains A (False: A frozen, B only, as in FFA-LoRA).
        dp_clip_norm: > 0: the client clips its update to this L2 norm before replying
            (`hetlora.dp.clip_reply`); 0: no clipping.
    """

    client_id: str
    kind: str
    rank: int = 0
    factors: Factors | None = None
    weights: dict[str, torch.Tensor] | None = None
    pruning: bool = False
    regularise: bool = False
    download_nbytes: int | None = None
    train_a: bool = True
    dp_clip_norm: float = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes the server sends for this task (``download_nbytes`` where the method says)."""
        if self.download_nbytes is not None:
            return self.download_nbytes
        return tensors_nbytes(self.factors if self.kind == "lora" else self.weights or {})


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of local training (see `hetlora.config.Config`): what a runtime hands
    `hetlora.client.run_task` beside the task."""

    local_steps: int
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lambda_: float = 0.0
    gamma: float = 0.99
    r_min: int = 1
    pruning: bool = True
    lora_scale: float = 2.0
    bf16: bool = False
    fixed_rank: int = 0  # > 0: the fixed-shape step with the adapter at this rank (r_max)
    fused_ce: bool = True  # the fused chunked cross-entropy (False: plain head, for the bench)
    train_a: bool = True  # False: A stays frozen at what was received, only B trains (FFA-LoRA)


@dataclass
class TrainStats:
    """What a client measured while training (logged in the round's row, never aggregated).

    Attributes:
        rank_received: the rank it was sent.
        train_loss: the mean loss over its local steps.
        tail_before, tail_after: the pruning tail norm as received and after training.
        tokens, target_tokens: tokens it trained on, and of them the tokens under the loss.
        steps: optimizer steps taken.
        seconds: its wall time; of it ``step_seconds`` inside the training steps and
            ``compile_seconds`` compiling (not in ``step_seconds``).
        update_norm: under DP, ``||trained - received||`` before clipping.
    """

    rank_received: int = 0
    train_loss: float = math.nan
    tail_before: float = 0.0
    tail_after: float = 0.0
    tokens: int = 0
    target_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0
    compile_seconds: float = 0.0
    update_norm: float = math.nan


@dataclass
class Reply:
    """One client's reply: factors at its (possibly pruned) rank, or full weights, and what it
    measured. `hetlora.client` fills ``client_id`` and ``num_examples`` last."""

    client_id: str = ""
    num_examples: int = 0
    factors: Factors | None = None
    rank: int = 0
    weights: dict[str, torch.Tensor] | None = None
    stats: TrainStats = field(default_factory=TrainStats)

    @property
    def train_loss(self) -> float:
        return self.stats.train_loss

    @property
    def nbytes(self) -> int:
        """Bytes the client sends back."""
        return tensors_nbytes(self.factors if self.factors is not None else self.weights or {})

    @property
    def trainable_params(self) -> int:
        if self.factors is not None:
            return sum(b.numel() + a.numel() for b, a in self.factors.values())
        return sum(t.numel() for t in (self.weights or {}).values())


@dataclass
class BaseUpdate:
    """A change the runtime applies to its base model after a round.

    ``deltas``: module name -> dense ``dW`` (d_out x d_in) added to that module's weight.
    ``weights``: parameter name -> new value of that base parameter.
    """

    deltas: dict[str, torch.Tensor] | None = None
    weights: dict[str, torch.Tensor] | None = None


def fedavg_weighting(cfg) -> str:
    """The client weights of a FedAvg-style method: ``uniform``, else ``data_size`` (the
    ``aggregation`` key's default, ``sparsity``, means ``data_size`` here)."""
    return "uniform" if cfg.aggregation == "uniform" else "data_size"


def check_uniform_under_dp(cfg) -> None:
    """Refuse data-size weights under differential privacy (example counts depend on the data)."""
    if cfg.dp_clip_norm > 0 and cfg.aggregation == "data_size":
        raise HetLoRAError(
            "differential privacy (dp_clip_norm > 0) weights clients uniformly: example "
            "counts depend on the data; remove aggregation = 'data_size' or set 'uniform'"
        )


class Server(ABC):
    """A federated method's server side over plain tensors.

    Attributes:
        ranks: every client's current LoRA rank (0 where the method has no ranks).
        round: completed rounds.
    """

    name: str = ""
    # What the method is, declared once; the config's rules and the runtimes read these.
    #: clients train LoRA factors (False: full fine-tuning)
    lora: bool = True
    #: the base weights never change (the runtime casts them once; Flower runs these methods)
    frozen_base: bool = True
    #: the global model is a LoRA adapter at r_max (saved as ``adapter/``)
    has_global_adapter: bool = True
    #: the method's own config keys (`hetlora.config.KEY_RULES` refuses them elsewhere);
    #: ``tiers`` means clients hold ranks assigned per client
    options: tuple[str, ...] = ()
    #: values of the ``aggregation`` key the method takes (``options`` has ``aggregation``)
    aggregations: tuple[str, ...] = ()
    #: the run's `hetlora.dp.DPPlan` where the method runs under differential privacy
    dp = None

    @classmethod
    @abstractmethod
    def from_config(
        cls,
        cfg,
        initial_factors: Factors,
        ranks: Mapping[str, int],
        client_ids: Sequence[str],
        base_weights: dict[str, torch.Tensor] | None,
    ) -> Server:
        """The method's server for a run of ``cfg`` (see `hetlora.methods.make_server`)."""

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse (`HetLoRAError`) what this method cannot run; `hetlora.config.validate`
        calls it after the checks every method shares (the default: nothing more)."""
        return None

    def __init__(self, ranks: Mapping[str, int]) -> None:
        self.ranks: dict[str, int] = dict(ranks)
        self.round = 0

    @abstractmethod
    def task(self, client_id: str) -> ClientTask:
        """The work for one sampled client this round."""

    @abstractmethod
    def add(self, update: Reply) -> None:
        """Fold in one reply that passed `check`."""

    @abstractmethod
    def finish(self) -> dict[str, float]:
        """Close the round; returns the normalised aggregation weight of each client."""

    @abstractmethod
    def reset_round(self) -> None:
        """Drop whatever was folded in this round (a skipped round leaves the state unchanged)."""

    def check(self, update: Reply, max_norm: float = 0.0) -> None:
        """Refuse a malformed reply with `HetLoRAError`: the one validator of replies,
        for every runtime (see `.validate`). `add` takes checked replies only.

        Every reply must come from a client of the run and count at least one example. LoRA
        methods check module names, shapes at the rank assigned this round, rank, finite values
        and the optional norm bound; full fine-tuning checks names, shapes, values and the norm
        of the change.
        """
        from hetlora.errors import HetLoRAError
        from hetlora.methods.validate import check_full_update, check_lora_update

        if update.client_id not in self.ranks:
            raise HetLoRAError(f"reply from unknown client {update.client_id!r}")
        if update.num_examples < 1:
            raise HetLoRAError(
                f"client {update.client_id}: num_examples must be >= 1, got {update.num_examples}"
            )
        reference = self.reference_weights()
        if reference is not None:
            check_full_update(update, reference, max_norm)
        else:
            check_lora_update(update, self.module_shapes(), self.ranks[update.client_id], max_norm)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``(d_out, d_in)`` of every adapted module."""
        factors = self.global_factors()
        return {n: (b.shape[0], a.shape[1]) for n, (b, a) in (factors or {}).items()}

    def reference_weights(self) -> dict[str, torch.Tensor] | None:
        """The global weights a full-weights reply is checked against (None for LoRA methods)."""
        return None

    def global_factors(self) -> Factors | None:
        """The global adapter at r_max (None for methods without one)."""
        return None

    def base_state(self) -> BaseUpdate | None:
        """Everything changed in the pristine base so far (to rebuild it when resuming)."""
        return None

    def r_max(self) -> int:
        factors = self.global_factors()
        return rank_of(factors) if factors else 0

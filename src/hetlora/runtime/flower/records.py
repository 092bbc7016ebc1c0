"""What travels between the ServerApp and the ClientApps, as Flower records.

A training instruction (``MessageType.TRAIN``) carries

* ``"arrays"`` (`flwr.app.ArrayRecord`): the global factors cut to the node's rank,
  ``<module>.B`` (d_out x r) and ``<module>.A`` (r x d_in) in float32;
* ``"config"`` (`flwr.app.ConfigRecord`): the client id, the round, the rank, the task
  flags (``pruning``, ``regularise``: the method server's decision, sent once) and the
  local-training hyperparameters (`HYPERPARAMETERS`).

A reply carries ``"arrays"`` (the trained factors at the possibly pruned rank) and
``"metrics"`` (`flwr.app.MetricRecord`): the number of examples, ranks, loss and the
counters of `hetlora.methods.base.TrainStats`. `read_reply` only decodes a reply
(a record that cannot be read raises `hetlora.errors.HetLoRAError`); whether its content
is acceptable is decided by the method server's one validator,
`hetlora.methods.base.Server.check`, as in-process. A node query
(``MessageType.QUERY``) is answered with `NodeInfo` (counts and ranks); an evaluation
(``MessageType.EVALUATE``: `evaluate_content`) with the NLL sums of the node's own
held-out examples (`evaluate_reply`), or, for a generation instruction, with the sum of
their ROUGE-L scores (`rouge_reply`): numbers, never text.

Nothing here knows about sockets or processes: these are plain functions over records.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors, cut
from hetlora.methods.base import ClientTask, Reply, TrainSettings, TrainStats

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

#: ConfigRecord key -> `hetlora.methods.base.TrainSettings` field: the local-training
#: hyperparameters the server sends (the node sets its own precision).
HYPERPARAMETERS = {
    "local-steps": "local_steps",
    "lr": "lr",
    "weight-decay": "weight_decay",
    "max-grad-norm": "max_grad_norm",
    "lambda": "lambda_",
    "gamma": "gamma",
    "r-min": "r_min",
    "lora-scale": "lora_scale",
}

#: MetricRecord keys of a reply -> `hetlora.methods.base.TrainStats` fields.
RESULT_METRICS = {
    "train-loss": "train_loss",
    "tail-before": "tail_before",
    "tail-after": "tail_after",
    "tokens": "tokens",
    "target-tokens": "target_tokens",
    "steps": "steps",
    "seconds": "seconds",
    "step-seconds": "step_seconds",
}
COUNTS = ("tokens", "target-tokens", "steps")  # of RESULT_METRICS: whole numbers


#: The reason a ClientApp handler that raised replies with: the exception's type only. Its
#: message may quote the device's rows (a bad row, a file path), so it is logged on the node.
NODE_ERROR = "{} on the node (see the node's log)"
_NODE_ERROR = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,63}) on the node \(see the node's log\)")


def node_error(exc: BaseException) -> Error:
    """The error reply of a handler that raised ``exc``: Flower's code and `NODE_ERROR`."""
    return Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, NODE_ERROR.format(type(exc).__name__))


def error_text(error: Error) -> str:
    """What the server records of an error reply: its code and, when the reason is exactly a
    `NODE_ERROR`, the exception type; never the reason's free text (a node may quote its
    data in it)."""
    match = _NODE_ERROR.fullmatch(str(error.reason or ""))
    what = f"{match.group(1)}, " if match else ""
    return f"error from node ({what}code {int(error.code)})"


def factors_record(factors: Factors) -> ArrayRecord:
    """``<module>.B`` and ``<module>.A`` as float32 arrays."""
    arrays: dict[str, Array] = {}
    for name, (b, a) in factors.items():
        arrays[f"{name}.B"] = Array(b.detach().float().cpu().contiguous().numpy())
        arrays[f"{name}.A"] = Array(a.detach().float().cpu().contiguous().numpy())
    return ArrayRecord(arrays)


def read_factors(record: ArrayRecord) -> Factors:
    """The factor dict of an ArrayRecord written by `factors_record`.

    Raises `HetLoRAError` when a key is not ``<module>.B``/``<module>.A``, a module
    lacks one of the two, or an array is not a 2-d float array.
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key in record.keys():
        name, dot, which = key.rpartition(".")
        if not dot or which not in ("A", "B") or not name:
            raise HetLoRAError(f"unexpected array {key!r}")
        try:
            value = np.asarray(record[key].numpy())
        except Exception as exc:  # a malformed array payload
            raise HetLoRAError(f"array {key!r} cannot be read: {exc}") from None
        if value.ndim != 2 or value.dtype.kind != "f":
            raise HetLoRAError(f"array {key!r} has shape {value.shape} and dtype {value.dtype}")
        halves.setdefault(name, {})[which] = torch.from_numpy(value.astype(np.float32))
    factors: Factors = {}
    for name, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise HetLoRAError(f"module {name!r} lacks its {'A' if 'B' in pair else 'B'} factor")
        factors[name] = (pair["B"], pair["A"])
    return factors


def train_content(
    task: ClientTask, round_idx: int, settings: TrainSettings, index: int
) -> RecordDict:
    """The content of one training instruction (LoRA tasks only); ``index`` (the client's
    position among the run's clients) seeds its batches."""
    if task.kind != "lora" or task.factors is None:
        raise HetLoRAError(f"the Flower runtime sends LoRA tasks only, not {task.kind!r}")
    config = ConfigRecord(
        {
            "client-id": task.client_id,
            "client-index": index,
            "server-round": round_idx,
            "rank": task.rank,
            "pruning": task.pruning,
            "regularise": task.regularise,
            "train-a": task.train_a,
            "dp-clip-norm": float(task.dp_clip_norm),
            **{key: getattr(settings, field) for key, field in HYPERPARAMETERS.items()},
        }
    )
    return RecordDict({ARRAYS: factors_record(task.factors), CONFIG: config})


def read_train(content: RecordDict, bf16: bool) -> tuple[ClientTask, int, TrainSettings, int]:
    """The task, round, training settings and client index of an instruction (on the
    ClientApp)."""
    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise HetLoRAError("training instruction without factors or config")
    config = content.config_records[CONFIG]
    missing = [
        k
        for k in ("client-id", "client-index", "server-round", "rank", *HYPERPARAMETERS)
        if k not in config
    ]
    if missing:
        raise HetLoRAError(f"training instruction lacks {missing}")
    factors = read_factors(content.array_records[ARRAYS])
    task = ClientTask(
        client_id=str(config["client-id"]),
        kind="lora",
        rank=int(config["rank"]),
        factors=factors,
        pruning=bool(config.get("pruning", False)),
        regularise=bool(config.get("regularise", False)),
        train_a=bool(config.get("train-a", True)),
        dp_clip_norm=float(config.get("dp-clip-norm", 0.0)),
    )
    settings = TrainSettings(
        **{field: config[key] for key, field in HYPERPARAMETERS.items()}, bf16=bf16
    )
    return task, int(config["server-round"]), settings, int(config["client-index"])


#: Of `RESULT_METRICS`, what depends on the node's data beyond the clipped factors: under
#: differential privacy a reply carries NaN for these, and 0 for the token counts (the
#: accountant bounds the factors only; the row's ``tokens`` and ``flops`` are then 0).
PRIVATE_METRICS = ("train-loss", "tail-after", "seconds", "step-seconds")
PRIVATE_COUNTS = ("tokens", "target-tokens")


def reply_content(reply: Reply, private: bool = False) -> RecordDict:
    """The content of a training reply: the uploaded factors and what the client measured
    (``private``, under differential privacy: without `PRIVATE_METRICS`)."""
    if reply.factors is None:
        raise HetLoRAError("the Flower runtime returns LoRA factors only")
    measured = {key: getattr(reply.stats, field) for key, field in RESULT_METRICS.items()}
    if private:
        measured.update({key: math.nan for key in PRIVATE_METRICS})
        measured.update({key: 0 for key in PRIVATE_COUNTS})
    metrics = MetricRecord(
        {
            "num-examples": int(reply.num_examples),
            "rank": int(reply.rank),
            "rank-received": int(reply.stats.rank_received),
            **measured,
        }
    )
    return RecordDict({ARRAYS: factors_record(reply.factors), METRICS: metrics})


def _number(metrics: MetricRecord, key: str) -> float:
    if key not in metrics:
        raise HetLoRAError(f"reply lacks metric {key!r}")
    return _as_number(metrics[key], key)


def _count(metrics: MetricRecord, key: str) -> int:
    if key not in metrics:
        raise HetLoRAError(f"reply lacks metric {key!r}")
    return _as_count(metrics[key], key)


def _as_number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HetLoRAError(f"metric {key!r} is not a number: {value!r}")
    return float(value)


def _as_count(value: object, key: str) -> int:
    number = _as_number(value, key)
    if not math.isfinite(number) or number != int(number):
        raise HetLoRAError(f"metric {key!r} is not a whole number: {value!r}")
    return int(number)


def read_reply(content: RecordDict, sent: ClientTask) -> Reply:
    """Decode one training reply to the instruction ``sent``: the factors, the declared rank and
    number of examples, and the client's counters.

    Raises `HetLoRAError` when the record cannot be read (no factors or metrics, a key
    that is not ``<module>.B``/``<module>.A``, a metric that is not a number). Names, shapes,
    rank, values and size are checked by `hetlora.methods.base.Server.check`.
    """
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        raise HetLoRAError("reply without factors or metrics")
    metrics = content.metric_records[METRICS]
    factors = read_factors(content.array_records[ARRAYS])
    values = {
        field: (_count if key in COUNTS else _number)(metrics, key)
        for key, field in RESULT_METRICS.items()
    }
    return Reply(
        sent.client_id,
        _count(metrics, "num-examples"),
        factors=factors,
        rank=_count(metrics, "rank"),
        stats=TrainStats(rank_received=sent.rank, **values),
    )


@dataclass(frozen=True)
class NodeInfo:
    """What a SuperNode declares about itself (its answer to a query): counts and ranks, never
    text or token ids.

    Attributes:
        client_id: the client (data partition) the node trains.
        num_examples: its training examples.
        num_val: its validation examples.
        num_test: its test (held-out) examples.
        rank: its rank budget from the node config (0: none declared).
        tier: its device tier from the node config ("" if none).
        templated: whether its examples go through the chat template (how its renderer
            resolved ``chat_template``, `hetlora.data.chat.make_renderer`): a flag.
    """

    client_id: str
    num_examples: int
    num_val: int = 0
    num_test: int = 0
    rank: int = 0
    tier: str = ""
    templated: bool = False

    def record(self) -> ConfigRecord:
        return ConfigRecord({key.replace("_", "-"): value for key, value in asdict(self).items()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> NodeInfo:
        """The declaration of a reply; a missing or mistyped field raises HetLoRAError."""
        values = {}
        for name, kind in (("client-id", str), ("tier", str)):
            value = record.get(name, "")
            if not isinstance(value, kind):
                raise HetLoRAError(f"malformed node info: {name} is {value!r}")
            values[name.replace("-", "_")] = value
        for name in ("num-examples", "num-val", "num-test", "rank"):
            value = record.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HetLoRAError(f"malformed node info: {name} is {value!r}")
            values[name.replace("-", "_")] = value
        templated = record.get("templated", False)
        if not isinstance(templated, bool):
            raise HetLoRAError(f"malformed node info: templated is {templated!r}")
        if not values["client_id"]:
            raise HetLoRAError("malformed node info: no client-id")
        values["templated"] = templated
        return cls(**values)


#: The NLL sums of an evaluation reply (`hetlora.evaluate.nll_sums`).
NLL, TOKENS = "nll-sum", "tokens"
#: The ROUGE-L sums of a generation reply (`hetlora.evaluate.rouge_sums`).
ROUGE, SCORED = "rouge-l-sum", "examples"


def evaluate_content(
    factors: Factors,
    split: str,
    positions: list[int],
    round_idx: int,
    generate: bool = False,
    ranks: Sequence[int] = (0,),
) -> RecordDict:
    """An evaluation instruction: the global factors, the split, the positions of the node's
    examples in the held-out sample, and either the ranks to measure the factors' NLL at (each
    a cut of the factors; 0: as sent), one entry of the reply per rank, or ``generate``: score
    greedy generations of the examples (ROUGE-L) instead."""
    config = ConfigRecord(
        {
            "split": split,
            "positions": positions,
            "server-round": round_idx,
            "generate": generate,
            "ranks": [int(r) for r in ranks],
        }
    )
    return RecordDict({ARRAYS: factors_record(factors), CONFIG: config})


@dataclass(frozen=True)
class Evaluation:
    """An evaluation instruction as the ClientApp reads it (`read_evaluate`)."""

    factors: Factors
    split: str
    positions: list[int]
    generate: bool
    ranks: list[int]

    def at(self, rank: int) -> Factors:
        """The factors cut to ``rank`` (0, or a rank at or above theirs: as sent)."""
        return cut(self.factors, rank)


def read_evaluate(content: RecordDict) -> Evaluation:
    """An evaluation instruction, checked (on the ClientApp)."""
    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise HetLoRAError("evaluation instruction without factors or config")
    config = content.config_records[CONFIG]
    split, positions = config.get("split"), config.get("positions", [])
    ranks = config.get("ranks", [0])
    if split not in ("test", "val") or not isinstance(positions, list):
        raise HetLoRAError(f"malformed evaluation instruction: split {split!r}")
    if (
        not isinstance(ranks, list)
        or not ranks
        or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks)
    ):
        raise HetLoRAError(f"malformed evaluation instruction: ranks {ranks!r}")
    return Evaluation(
        read_factors(content.array_records[ARRAYS]),
        str(split),
        [int(p) for p in positions],
        bool(config.get("generate", False)),
        [int(r) for r in ranks],
    )


def evaluate_reply(sums: Sequence[tuple[float, int]]) -> RecordDict:
    """The content of an evaluation reply: the summed NLL and its token count at each rank of the
    instruction, in its order; nothing else."""
    nll = [float(n) for n, _ in sums]
    tokens = [int(t) for _, t in sums]
    return RecordDict({METRICS: MetricRecord({NLL: nll, TOKENS: tokens})})


def read_evaluate_reply(content: RecordDict, count: int) -> list[tuple[float, int]]:
    """The (NLL sum, tokens) of an evaluation reply at each of the instruction's ``count``
    ranks: finite NLLs >= 0 and whole token counts >= 0 (tokens > 0 where the NLL is), else
    HetLoRAError."""
    if METRICS not in content.metric_records:
        raise HetLoRAError("evaluation reply without metrics")
    metrics = content.metric_records[METRICS]
    nll, tokens = metrics.get(NLL), metrics.get(TOKENS)
    if not isinstance(nll, list) or not isinstance(tokens, list):
        raise HetLoRAError(f"evaluation reply without {NLL!r} and {TOKENS!r} lists")
    if len(nll) != count or len(tokens) != count:
        raise HetLoRAError(f"evaluation reply with {len(nll)} sums, {count} ranks were asked")
    out = []
    for n, t in zip(nll, tokens, strict=True):
        n = _as_number(n, NLL)
        t = _as_count(t, TOKENS)
        if not math.isfinite(n) or n < 0 or t < 0 or (n > 0 and t == 0):
            raise HetLoRAError(f"evaluation reply with NLL {n!r} over {t} tokens")
        out.append((n, t))
    return out


def rouge_reply(score_sum: float, scored: int) -> RecordDict:
    """The content of a generation reply: the sum of the per-example ROUGE-L F1 scores and how
    many examples were scored; no text."""
    return RecordDict({METRICS: MetricRecord({ROUGE: float(score_sum), SCORED: int(scored)})})


def read_rouge_reply(content: RecordDict, asked: int) -> tuple[float, int]:
    """The (ROUGE-L sum, examples) of a generation reply: exactly the ``asked`` examples scored,
    a sum in [0, examples] (each F1 lies in [0, 1]), else HetLoRAError."""
    if METRICS not in content.metric_records:
        raise HetLoRAError("generation reply without metrics")
    metrics = content.metric_records[METRICS]
    score, scored = _number(metrics, ROUGE), _count(metrics, SCORED)
    if scored != asked:
        raise HetLoRAError(f"generation reply scores {scored} examples, {asked} were asked")
    if not math.isfinite(score) or not 0 <= score <= scored:
        raise HetLoRAError(f"generation reply with ROUGE-L sum {score!r} over {scored} examples")
    return score, scored

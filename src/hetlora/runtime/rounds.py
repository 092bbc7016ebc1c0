"""One federated round, the same for every transport: sample, exchange, check, fold, finish.

A round is drawn in three boxes::

    sample_clients --> transport.exchange(server, sampled) --> fold(server, replies)
                          (in-process: Workspace.train;        (server.check, server.add,
                           Flower: the Grid's messages)          server.finish or reset_round)

`play_round` runs them and builds the round's row of ``metrics.jsonl`` with
`round_row`, the one row builder of both runtimes; `round_line` is the one way a row
is printed. A reply the server refuses, or one that never came, is *rejected* (the row's
``rejected``: client -> reason); with fewer than ``min_clients`` accepted replies the round is
``skipped`` and the server's state is unchanged (not under differential privacy, where a
missing reply is a zero update: `hetlora.dp`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hetlora import dp
from hetlora.accounting import ModelSize, train_flops
from hetlora.errors import HetLoRAError
from hetlora.lora import live_rank
from hetlora.methods.base import ClientTask, Reply, Server

log = logging.getLogger(__name__)


@dataclass
class Exchange:
    """One sampled client's part of a round.

    Attributes:
        client: the client.
        task: what was sent (None when nothing could be sent, e.g. its node is not connected).
        reply: the client's reply (None when there is none).
        problem: why there is no usable reply (set by the transport; empty otherwise).
        extra: fields the transport adds to the client's entry in the row (Flower: ``node``).
    """

    client: str
    task: ClientTask | None = None
    reply: Reply | None = None
    problem: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Transport(Protocol):
    """Moves a round's tasks to the sampled clients and their replies back, one at a time."""

    def exchange(
        self, round_idx: int, server: Server, sampled: Sequence[str]
    ) -> Iterator[Exchange]:
        """Send ``server.task(client)`` to every sampled client; yield their replies."""
        ...


class InProcessClients:
    """The in-process transport: each sampled client trains in turn on the shared model.

    ``train(task, round_idx, on_step)`` is `hetlora.runtime.workspace.Workspace.train`;
    ``emit`` receives the client and step progress events.
    """

    def __init__(
        self,
        train: Callable[..., Reply],
        local_steps: int,
        emit: Callable[..., None],
    ) -> None:
        self.train = train
        self.local_steps = local_steps
        self.emit = emit

    def exchange(
        self, round_idx: int, server: Server, sampled: Sequence[str]
    ) -> Iterator[Exchange]:
        for i, client in enumerate(sampled):
            task = server.task(client)
            self.emit(
                "client_start", round=round_idx, client=client, index=i, of=len(sampled),
                rank=task.rank,
            )  # fmt: skip
            reply = self.train(
                task,
                round_idx,
                lambda step, loss, c=client: self.emit(
                    "step", round=round_idx, client=c, step=step, of=self.local_steps, loss=loss
                ),
            )
            yield Exchange(client, task, reply)
            self.emit(
                "client_end", round=round_idx, client=client, loss=reply.train_loss,
                rank=reply.rank, rank_received=task.rank,
            )  # fmt: skip


#: Keys of ``metrics.jsonl`` rows renamed since files were first written (the test set's loss
#: and perplexity were ``eval_loss``/``eval_ppl``): older files read with today's names.
RENAMED = {"eval_loss": "test_loss", "eval_ppl": "test_ppl"}


def current_names(row: dict[str, Any]) -> dict[str, Any]:
    """A ``metrics.jsonl`` row with today's key names (`RENAMED`)."""
    return {RENAMED.get(k, k): v for k, v in row.items()}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file, older files included, with today's key names."""
    return [
        current_names(json.loads(line)) for line in path.read_text().splitlines() if line.strip()
    ]


def sample_clients(
    seed: int, client_ids: Sequence[str], per_round: int, round_idx: int
) -> list[str]:
    """The round's clients: a seeded choice without replacement, in ``client_ids`` order."""
    return _choose(np.random.default_rng([seed, round_idx, 0x5A]), client_ids, per_round)


def _choose(rng: np.random.Generator, client_ids: Sequence[str], per_round: int) -> list[str]:
    k = min(per_round, len(client_ids))
    picked = sorted(rng.choice(len(client_ids), k, replace=False))
    return [client_ids[i] for i in picked]


def round_clients(cfg, server: Server, client_ids: Sequence[str], round_idx: int) -> list[str]:
    """The round's clients: `sample_clients` from the config's ``seed``, or under differential
    privacy with a secret noise seed from that secret (`hetlora.dp.noise_generator`'s stream 1)."""
    plan = getattr(server, "dp", None)
    if plan is not None and plan.secret:
        rng = dp.noise_generator(plan.noise_seed, round_idx, stream=1)
        return _choose(rng, client_ids, cfg.clients_per_round)
    return sample_clients(cfg.seed, client_ids, cfg.clients_per_round, round_idx)


def client_entry(ex: Exchange, size: ModelSize) -> dict[str, Any]:
    """One client's entry in the row's ``clients`` (an exchange with a task and a reply)."""
    task, reply = ex.task, ex.reply
    assert task is not None and reply is not None
    stats, params = reply.stats, reply.trainable_params
    return {
        "rank_received": task.rank,
        "rank": reply.rank,
        "train_loss": stats.train_loss,
        "bytes_down": task.nbytes,
        "bytes_up": reply.nbytes,
        "trainable_params": params,
        "flops": train_flops(size, stats.tokens, stats.target_tokens, params, task.kind == "full"),
        "tokens": stats.tokens,
        "step_s": stats.step_seconds,
        "compile_s": stats.compile_seconds,
        **({} if math.isnan(stats.update_norm) else {"update_norm": stats.update_norm}),
        **ex.extra,
    }


@dataclass
class RoundOutcome:
    """What `play_round` saw: the tasks sent, every client's entry, rejections, weights."""

    round: int
    sampled: list[str]
    tasks: dict[str, ClientTask] = field(default_factory=dict)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


def fold(
    server: Server,
    exchanges: Iterable[Exchange],
    min_clients: int,
    max_update_norm: float,
    outcome: RoundOutcome,
    size: ModelSize,
) -> RoundOutcome:
    """Check every reply with the server's validator and fold the valid ones in, in order; then
    close the round (``server.finish``), or skip it with fewer than ``min_clients`` accepted.

    Each reply's entry is recorded as soon as it arrives and the reply is then dropped (the
    in-process transport trains one client at a time).
    """
    accepted = 0
    for ex in exchanges:
        client = ex.client
        if ex.task is not None:
            outcome.tasks[client] = ex.task
        if ex.reply is None:
            outcome.rejected[client] = ex.problem or "no reply"
            log.warning("round %d: %s rejected: %s", outcome.round, client, ex.problem)
            continue
        outcome.clients[client] = client_entry(ex, size)
        try:
            server.check(ex.reply, max_update_norm)
            server.add(ex.reply)
            accepted += 1
        except HetLoRAError as exc:
            log.warning("round %d: reply of %s rejected: %s", outcome.round, client, exc)
            outcome.rejected[client] = str(exc)
        ex.reply = None  # only the entry is kept
    if accepted < min_clients and getattr(server, "dp", None) is None:
        log.warning(
            "round %d skipped: %d valid replies, fewer than min_clients = %d",
            outcome.round,
            accepted,
            min_clients,
        )
        server.reset_round()
        outcome.skipped = True
    else:
        outcome.weights = server.finish()
    return outcome


def play_round(
    round_idx: int,
    server: Server,
    transport: Transport,
    sampled: Sequence[str],
    min_clients: int,
    max_update_norm: float,
    size: ModelSize,
) -> RoundOutcome:
    """One round over ``transport``: exchange tasks and replies with ``sampled``, fold them."""
    outcome = RoundOutcome(round_idx, list(sampled))
    replies = transport.exchange(round_idx, server, list(sampled))
    return fold(server, replies, min_clients, max_update_norm, outcome, size)


def counts(values: Iterable[int]) -> dict[str, int]:
    """How many clients hold each rank (rank as a string, ascending)."""
    return {str(v): n for v, n in sorted(Counter(values).items())}


def rank_dynamics(server: Server) -> dict[str, Any]:
    """Ranks after the round, for the metrics row.

    ``global_rank``: the live rank of the global adapter (`hetlora.lora.live_rank`:
    positions where both global factors are non-zero), the largest over modules, and
    ``global_rank_min`` the smallest; absent for methods without a global adapter (FLoRA,
    full fine-tuning). ``ranks``: every client's current rank (sampled or not; absent where the
    method has no ranks).
    """
    out: dict[str, Any] = {}
    factors = server.global_factors() if server.has_global_adapter else None
    if factors:
        out["global_rank_min"], out["global_rank"] = live_rank(factors)
    if any(server.ranks.values()):
        out["ranks"] = dict(server.ranks)
    return out


def round_row(outcome: RoundOutcome, server: Server) -> dict[str, Any]:
    """The round's row of ``metrics.jsonl`` (evaluation and timing are added by the caller).
    Under differential privacy it has ``epsilon``, spent after this round (every round counts,
    a skipped one too), and ``clipped``, the share of replies whose update the client clipped
    (where the clients report their norms: the in-process runtime)."""
    entries = outcome.clients.values()
    ranks = server.ranks
    losses = [c["train_loss"] for c in entries]
    privacy: dict[str, Any] = {}
    if server.dp is not None:
        privacy["epsilon"] = server.dp.epsilon(outcome.round)
        norms = [c["update_norm"] for c in entries if "update_norm" in c]
        if norms:
            privacy["clipped"] = float(np.mean([n > server.dp.clip_norm for n in norms]))
    return {
        "round": outcome.round,
        "train_loss": float(np.mean(losses)) if losses else math.nan,
        "client_ranks": {c: ranks[c] for c in outcome.tasks},
        "ranks_received": {c: t.rank for c, t in outcome.tasks.items()},
        "rank_counts": counts(ranks.values()),
        **rank_dynamics(server),
        "weights": outcome.weights,
        "bytes_up": sum(c["bytes_up"] for c in entries),
        "bytes_down": sum(t.nbytes for t in outcome.tasks.values()),
        "flops": sum(c["flops"] for c in entries),
        "tokens": sum(c["tokens"] for c in entries),
        "step_s": sum(c["step_s"] for c in entries),
        "compile_s": sum(c["compile_s"] for c in entries),
        "clients": outcome.clients,
        "rejected": outcome.rejected,
        "skipped": outcome.skipped,
        **privacy,
    }


def round_line(row: dict[str, Any]) -> str:
    """One line for a row of ``metrics.jsonl``: loss, perplexities, ranks, rejections, the
    clients an evaluation went without, time."""
    parts = [f"round {row['round']:>3}"]
    loss = row.get("train_loss")
    if loss is not None and not math.isnan(loss):
        parts.append(f"train loss {loss:.3f}")
    if "test_ppl" in row:
        parts.append(f"test ppl {row['test_ppl']:.2f}")
    if "server_eval_ppl" in row:
        parts.append(f"server ppl {row['server_eval_ppl']:.2f}")
    ranks = row.get("client_ranks")
    if ranks and any(ranks.values()):
        parts.append(f"ranks {sorted(ranks.values())}")
    if "epsilon" in row:
        parts.append(f"epsilon {row['epsilon']:.3g}")
    if row.get("rejected"):
        parts.append("rejected: " + "; ".join(f"{c} ({r})" for c, r in row["rejected"].items()))
    if row.get("eval_missing"):
        missing = "; ".join(f"{c} ({r})" for c, r in row["eval_missing"].items())
        parts.append(f"evaluated without: {missing}")
    if row.get("skipped"):
        parts.append("SKIPPED")
    parts.append(f"({row.get('wall_s', 0.0):.1f}s)")
    return "  ".join(parts)

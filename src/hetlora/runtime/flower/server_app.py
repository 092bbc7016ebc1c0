"""The ServerApp: the in-process engine's run, with local training replaced by Flower messages.

:class:`FlowerRun` is a :class:`~hetlora.runtime.local.Simulation` (same data, held-out set,
PEFT-initialised global adapter, evaluation, output directory) whose :meth:`FlowerRun.run_round`
sends the round's tasks to SuperNodes through :class:`~.strategy.HetLoRAStrategy` instead of
training in this process. Before round 1 it asks every connected SuperNode which client it holds
and at which rank (:mod:`.client_app`): a node's declared ``rank`` budget (capped at r_max) or
``tier`` wins; a node that declares neither gets the rank the in-process engine would assign to
its client (the seeded draw over the run's clients). With every client on a node and the same
config, a Flower run asks the same clients, at the same ranks, with the same batch seeds as
``hetlora run``.

The run directory is the one ``hetlora run`` writes (``config.toml``, ``metrics.jsonl``,
``adapter/``, ``samples.jsonl``, ``summary.json``); rows of ``metrics.jsonl`` also name the
clients left out of a round (``left_out``: client -> reason) and whether it was ``skipped``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from hetlora import adapters
from hetlora.accounting import train_flops
from hetlora.config import Config
from hetlora.errors import HetLoRAError
from hetlora.methods import make_server
from hetlora.runtime.flower import records
from hetlora.runtime.flower.project import (
    RunOptions,
    check_supported,
    config_from_run_config,
    options_from_run_config,
)
from hetlora.runtime.flower.strategy import HetLoRAStrategy
from hetlora.runtime.local import Progress, Simulation, _counts, check_out_dir

log = logging.getLogger(__name__)


class FlowerRun(Simulation):
    """A federated run whose clients are Flower SuperNodes.

    Args:
        cfg: the run's config (the same one every ClientApp reads).
        grid: Flower's Grid of the ServerApp.
        options: Flower-specific settings (timeouts, minimum nodes and clients).
        progress: the engine's progress callback.
    """

    trains_locally = False  # clients train on their SuperNodes: compile = "auto" stays off

    def __init__(
        self, cfg: Config, grid: Grid, options: RunOptions, progress: Progress | None = None
    ) -> None:
        check_supported(cfg)
        super().__init__(cfg, progress)
        self.grid = grid
        self.options = options
        assigned = dict(self.server.ranks)  # the in-process engine's seeded rank of every client
        self.nodes, ranks = self._discover(assigned)
        self.client_ids = sorted(ranks)
        initial = adapters.read_factors(self.peft_model)  # PEFT's init: nothing trained yet
        self.server = make_server(cfg, initial, ranks, self.client_ids)
        self._initial_ranks = dict(self.server.ranks)
        self.strategy = HetLoRAStrategy(
            self.server,
            self.nodes,
            self.settings,
            sample_clients=self.sample_clients,
            min_clients=options.min_clients or cfg.min_clients,
            max_update_norm=cfg.max_update_norm,
        )
        self.strategy.summary()
        self._rounds_done = 0
        self.left_out: dict[str, dict[str, str]] = {}

    def _wait_for_nodes(self) -> list[int]:
        want = self.options.min_nodes or min(self.cfg.clients_per_round, len(self.client_ids))
        deadline = time.monotonic() + self.options.node_wait_s
        last_note = 0.0
        while len(ids := sorted(self.grid.get_node_ids())) < want:
            if time.monotonic() >= deadline:
                log.warning(
                    "waited %.0fs: %d of %d nodes connected",
                    self.options.node_wait_s,
                    len(ids),
                    want,
                )
                break
            if time.monotonic() - last_note > 10:
                log.info("waiting for SuperNodes: %d of %d connected", len(ids), want)
                last_note = time.monotonic()
            time.sleep(1.0)
        return ids

    def _discover(self, assigned: Mapping[str, int]) -> tuple[dict[int, str], dict[str, int]]:
        """Ask every connected node for its client and rank; returns node -> client, ranks."""
        ids = self._wait_for_nodes()
        query = RecordDict({records.CONFIG: ConfigRecord({"server-round": 0})})
        messages = [
            Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in ids
        ]
        replies = self.grid.send_and_receive(messages, timeout=self.options.round_timeout_s)
        tiers = {str(t.get("name", "")): int(t["rank"]) for t in self.cfg.tiers}
        nodes: dict[int, str] = {}
        ranks: dict[str, int] = {}
        for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise HetLoRAError(f"error from node: {reply.error.reason}")
                if records.INFO not in reply.content.config_records:
                    raise HetLoRAError("reply without node info")
                info = records.NodeInfo.from_record(reply.content.config_records[records.INFO])
                client = info.client_id
                if client not in assigned:
                    raise HetLoRAError(f"client {client!r} is not a client of this run")
                if client in ranks:
                    raise HetLoRAError(f"client {client!r} is already held by another node")
                rank = self._node_rank(info, assigned[client], tiers)
            except HetLoRAError as exc:
                log.warning("node %s left out of the run: %s", node, exc)
                continue
            nodes[node] = client
            ranks[client] = rank
            log.info(
                "node %s: client %s, rank %d (%s)",
                node,
                client,
                rank,
                "budget" if info.rank else f"tier {info.tier}" if info.tier else "assigned",
            )
        if not nodes:
            raise HetLoRAError(f"no usable SuperNode among the {len(ids)} connected")
        return nodes, ranks

    def _node_rank(self, info: records.NodeInfo, assigned: int, tiers: Mapping[str, int]) -> int:
        cfg = self.cfg
        if info.rank:
            if info.rank < cfg.r_min:
                raise HetLoRAError(f"rank budget {info.rank} is below r_min = {cfg.r_min}")
            return min(info.rank, cfg.r_max)
        if info.tier:
            if info.tier not in tiers:
                raise HetLoRAError(f"unknown tier {info.tier!r}; the run has {sorted(tiers)}")
            return tiers[info.tier]
        return assigned

    def run_round(self) -> dict[str, Any]:
        """One round over Flower: sample, send truncated factors, aggregate the valid replies."""
        cfg = self.cfg
        t0 = time.perf_counter()
        round_idx = self._rounds_done + 1
        strategy = self.strategy
        messages = strategy.configure_train(
            round_idx, strategy.global_arrays(), ConfigRecord(), self.grid
        )
        replies = self.grid.send_and_receive(messages, timeout=self.options.round_timeout_s)
        strategy.aggregate_train(round_idx, replies)
        report = strategy.report
        if not report.skipped:
            self._apply_base_update()
        self._rounds_done = round_idx
        self.round = round_idx  # the engine's count of rounds attempted
        ranks = self.server.ranks
        per_client: dict[str, dict[str, Any]] = {}
        for client, (update, result) in sorted(report.replies.items()):
            task = report.tasks[client]
            params = update.trainable_params
            per_client[client] = {
                "rank_received": task.rank,
                "rank": update.rank,
                "train_loss": result.train_loss,
                "bytes_down": task.nbytes,
                "bytes_up": update.nbytes,
                "trainable_params": params,
                "flops": train_flops(self.size, result.tokens, result.target_tokens, params, False),
                "tokens": result.tokens,
                "node": next(n for n, c in self.nodes.items() if c == client),
            }
        losses = [c["train_loss"] for c in per_client.values()]
        row: dict[str, Any] = {
            "round": round_idx,
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "client_ranks": {c: ranks[c] for c in report.tasks},
            "ranks_received": {c: t.rank for c, t in report.tasks.items()},
            "rank_counts": _counts(ranks.values()),
            **self.rank_dynamics(),
            "weights": report.weights,
            "bytes_up": sum(c["bytes_up"] for c in per_client.values()),
            "bytes_down": sum(t.nbytes for t in report.tasks.values()),
            "flops": sum(c["flops"] for c in per_client.values()),
            "tokens": sum(c["tokens"] for c in per_client.values()),
            "clients": per_client,
            "left_out": dict(report.left_out),
            "skipped": report.skipped,
        }
        if report.left_out:
            self.left_out[str(round_idx)] = dict(report.left_out)
        if round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds:
            self._emit("eval", round=round_idx)
            row.update(self.evaluations())
        row["wall_s"] = time.perf_counter() - t0
        return row

    def _summary(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        summary = super()._summary(metrics)
        summary["runtime"] = "flower"
        summary["nodes"] = {client: node for node, client in sorted(self.nodes.items())}
        summary["left_out"] = self.left_out
        summary["rounds_skipped"] = sum(1 for m in metrics if m.get("skipped"))
        return summary


def log_progress(event: dict[str, Any]) -> None:
    """The engine's progress events as log lines (Flower streams the ServerApp's output)."""
    if event["event"] != "round_end":
        return
    row = event["row"]
    parts = [f"round {row['round']:>3}"]
    if row.get("train_loss") is not None and not math.isnan(row["train_loss"]):
        parts.append(f"train loss {row['train_loss']:.3f}")
    if "eval_ppl" in row:
        parts.append(f"eval ppl {row['eval_ppl']:.2f}")
    if row.get("client_ranks"):
        parts.append(f"ranks {sorted(row['client_ranks'].values())}")
    if row.get("left_out"):
        parts.append(f"left out {sorted(row['left_out'])}")
    if row.get("skipped"):
        parts.append("SKIPPED")
    parts.append(f"({row['wall_s']:.1f}s)")
    log.info("  ".join(parts))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config, run every round over the connected SuperNodes, write the run dir."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hetlora %(levelname)s: %(message)s"))
    root = logging.getLogger("hetlora")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        cfg = config_from_run_config(context.run_config)
        options = options_from_run_config(context.run_config)
        out_dir = Path(options.out_dir)
        check_out_dir(out_dir, options.overwrite)
        run = FlowerRun(cfg, grid, options, progress=log_progress)
        summary = run.run(out_dir, overwrite=options.overwrite)
        log.info(
            "perplexity %.2f (base) -> %.2f (final); run directory %s",
            summary["base_ppl"],
            summary["final_ppl"],
            out_dir,
        )
    except HetLoRAError as exc:
        log.error("%s", exc)
        raise
    finally:
        root.removeHandler(handler)

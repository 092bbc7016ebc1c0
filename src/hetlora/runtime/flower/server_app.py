"""The ServerApp: the shared round loop over Flower's Grid instead of in-process clients.

:func:`flower_run` builds a :class:`~hetlora.runtime.local.RoundLoop` by composition: the same
workspace (data, held-out set, PEFT-initialised global adapter), method server, round loop,
metrics row and run directory as ``hetlora run``, with :class:`GridTransport` as the transport.
Before round 1 it asks every connected SuperNode which client it holds and at which rank
(:mod:`.client_app`): a node's declared ``rank`` budget (capped at r_max) or ``tier`` wins; a
node that declares neither gets the rank the in-process runtime would assign to its client (the
seeded draw over the run's clients). With every client on a node and the same config, a Flower
run asks the same clients, at the same ranks, with the same batch seeds as ``hetlora run``.

The run directory is the one ``hetlora run`` writes; a row's client entries also name the
``node``, and ``summary.json`` adds ``runtime = "flower"`` and ``nodes`` (client -> node id).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from hetlora.config import Config
from hetlora.errors import HetLoRAError
from hetlora.methods.base import Server
from hetlora.runtime.flower import records
from hetlora.runtime.flower.project import (
    RunOptions,
    check_supported,
    config_from_run_config,
    options_from_run_config,
)
from hetlora.runtime.flower.strategy import HetLoRAStrategy
from hetlora.runtime.local import (
    Progress,
    RoundLoop,
    assigned_ranks,
    check_out_dir,
    initial_server,
)
from hetlora.runtime.rounds import Reply, round_line, sample_clients
from hetlora.runtime.workspace import build_workspace

log = logging.getLogger(__name__)


class GridTransport:
    """The Flower transport of the round loop: the strategy's messages over the Grid."""

    def __init__(self, grid: Grid, strategy: HetLoRAStrategy, timeout_s: float) -> None:
        self.grid = grid
        self.strategy = strategy
        self.timeout_s = timeout_s

    def exchange(self, round_idx: int, server: Server, sampled: Sequence[str]) -> Iterator[Reply]:
        self.strategy.server = server  # the loop's server (a resumed run restores another)
        messages = self.strategy.instructions(round_idx, sampled, self.grid.get_node_ids())
        answers = self.grid.send_and_receive(messages, timeout=self.timeout_s)
        yield from self.strategy.replies(round_idx, answers)


def wait_for_nodes(grid: Grid, want: int, wait_s: float) -> list[int]:
    """The connected nodes, once ``want`` are there or after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    last_note = 0.0
    while len(ids := sorted(grid.get_node_ids())) < want:
        if time.monotonic() >= deadline:
            log.warning("waited %.0fs: %d of %d nodes connected", wait_s, len(ids), want)
            break
        if time.monotonic() - last_note > 10:
            log.info("waiting for SuperNodes: %d of %d connected", len(ids), want)
            last_note = time.monotonic()
        time.sleep(1.0)
    return ids


def node_rank(cfg: Config, info: records.NodeInfo, assigned: int) -> int:
    """A node's rank: its declared budget (capped at r_max), its tier's rank, or ``assigned``."""
    tiers = {str(t.get("name", "")): int(t["rank"]) for t in cfg.tiers}
    if info.rank:
        if info.rank < cfg.r_min:
            raise HetLoRAError(f"rank budget {info.rank} is below r_min = {cfg.r_min}")
        return min(info.rank, cfg.r_max)
    if info.tier:
        if info.tier not in tiers:
            raise HetLoRAError(f"unknown tier {info.tier!r}; the run has {sorted(tiers)}")
        return tiers[info.tier]
    return assigned


def discover(
    grid: Grid, cfg: Config, ids: list[int], assigned: Mapping[str, int], timeout_s: float
) -> tuple[dict[int, str], dict[str, int]]:
    """Ask every node for its client and rank; returns node -> client and client -> rank."""
    query = RecordDict({records.CONFIG: ConfigRecord({"server-round": 0})})
    messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in ids]
    replies = grid.send_and_receive(messages, timeout=timeout_s)
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
            rank = node_rank(cfg, info, assigned[client])
        except HetLoRAError as exc:
            log.warning("node %s left out of the run: %s", node, exc)
            continue
        nodes[node] = client
        ranks[client] = rank
        how = "budget" if info.rank else f"tier {info.tier}" if info.tier else "assigned"
        log.info("node %s: client %s, rank %d (%s)", node, client, rank, how)
    if not nodes:
        raise HetLoRAError(f"no usable SuperNode among the {len(ids)} connected")
    return nodes, ranks


def flower_run(
    cfg: Config, grid: Grid, options: RunOptions, progress: Progress | None = None
) -> RoundLoop:
    """The run of a ServerApp: the shared :class:`RoundLoop` with :class:`GridTransport`."""
    check_supported(cfg)
    ws = build_workspace(cfg, trains_locally=False, progress=progress)
    want = options.min_nodes or min(cfg.clients_per_round, len(ws.client_ids))
    ids = wait_for_nodes(grid, want, options.node_wait_s)
    nodes, ranks = discover(
        grid, cfg, ids, assigned_ranks(cfg, ws.client_ids), options.round_timeout_s
    )
    clients = sorted(ranks)
    server = initial_server(cfg, ws, ranks)
    min_clients = options.min_clients or cfg.min_clients
    strategy = HetLoRAStrategy(
        server,
        nodes,
        ws.settings,
        ws.size,
        sample_clients=lambda r: sample_clients(cfg.seed, clients, cfg.clients_per_round, r),
        min_clients=min_clients,
        max_update_norm=cfg.max_update_norm,
    )
    strategy.summary()
    extra = {"runtime": "flower", "nodes": {c: n for n, c in sorted(nodes.items())}}
    transport = GridTransport(grid, strategy, options.round_timeout_s)
    return RoundLoop(ws, server, transport, clients, min_clients, progress, extra)


def log_progress(event: dict[str, Any]) -> None:
    """The run's progress events as log lines (Flower streams the ServerApp's output)."""
    if event["event"] == "round_end":
        log.info(round_line(event["row"]))


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
        summary = flower_run(cfg, grid, options, log_progress).run(out_dir, options.overwrite)
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

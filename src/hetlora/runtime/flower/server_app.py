"""The ServerApp: the shared round loop over Flower's Grid instead of in-process clients.

The server holds no client data and never opens the run's ``data``. `flower_run` builds a
`hetlora.runtime.loop.RoundLoop` by composition: the same model (PEFT-initialised
global adapter), method server, round loop, metrics row and run directory as ``hetlora run``,
with `GridTransport` as the transport and `.held_out.FederatedHeldOut` as the
held-out sets (the nodes measure the global adapter on their own examples and reply with sums).

Before round 1 it asks every connected SuperNode what it holds (`.client_app`): its client
id, its example counts (train, validation, test) and its rank budget or tier. A node whose
counts do not follow the run's split rule, or whose client another node already declared, is
left out with a logged reason, as is a node whose examples go through the chat template when
most nodes' do not, or the other way round (the run's ``chat_template_used`` is the nodes'
agreed rendering). A declared ``rank`` budget (capped at r_max) or ``tier`` wins; a
node that declares neither gets the rank the in-process runtime would assign (the seeded draw
over the registered clients). Each client's batches are seeded by its index among the
registered clients, which the server sends. With every client on a node and the same config, a
Flower run asks the same clients, at the same ranks, with the same batch seeds, and measures the
same held-out examples as ``hetlora run``.

The run directory is the one ``hetlora run`` writes; a row's client entries also name the
``node``, and ``summary.json`` adds ``runtime = "flower"`` and ``nodes`` (client -> node id).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from hetlora.config import Config
from hetlora.data import split_sizes
from hetlora.data.chat import make_renderer
from hetlora.errors import HetLoRAError
from hetlora.methods.base import Server
from hetlora.runtime.flower import records
from hetlora.runtime.flower.held_out import FederatedHeldOut
from hetlora.runtime.flower.project import (
    RunOptions,
    check_supported,
    config_from_run_config,
    options_from_run_config,
)
from hetlora.runtime.flower.strategy import HetLoRAStrategy
from hetlora.runtime.loop import RoundLoop, assigned_ranks, check_out_dir, initial_server
from hetlora.runtime.rounds import Exchange, round_clients, round_line
from hetlora.runtime.workspace import Progress, build_workspace

log = logging.getLogger(__name__)


class GridTransport:
    """The Flower transport of the round loop: the strategy's messages over the Grid."""

    def __init__(self, grid: Grid, strategy: HetLoRAStrategy, timeout_s: float) -> None:
        self.grid = grid
        self.strategy = strategy
        self.timeout_s = timeout_s

    def exchange(
        self, round_idx: int, server: Server, sampled: Sequence[str]
    ) -> Iterator[Exchange]:
        self.strategy.server = server  # the loop's server (a resumed run restores another)
        messages = self.strategy.instructions(round_idx, sampled, self.grid.get_node_ids())
        answers = self.grid.send_and_receive(messages, timeout=self.timeout_s)
        yield from self.strategy.exchanges(round_idx, answers)


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


def declared_rank(cfg: Config, info: records.NodeInfo) -> int:
    """A node's declared rank: its budget (capped at r_max) or its tier's rank; 0 for none."""
    tiers = {str(t.get("name", "")): int(t["rank"]) for t in cfg.tiers}
    if info.rank:
        if info.rank < cfg.r_min:
            raise HetLoRAError(f"rank budget {info.rank} is below r_min = {cfg.r_min}")
        return min(info.rank, cfg.r_max)
    if info.tier:
        if info.tier not in tiers:
            raise HetLoRAError(f"unknown tier {info.tier!r}; the run has {sorted(tiers)}")
        return tiers[info.tier]
    return 0


def check_counts(cfg: Config, info: records.NodeInfo) -> None:
    """Declared counts must be those the run's split rule gives a client of that many examples
    (`hetlora.data.split_sizes`), within ``max_examples_per_client``."""
    n = info.num_examples + info.num_val + info.num_test
    declared = (info.num_examples, info.num_val, info.num_test)
    expected = split_sizes(n, cfg.test_fraction, cfg.val_fraction)
    if info.num_examples < 1 or declared != expected:
        raise HetLoRAError(
            f"declared (train, validation, test) = {declared}, but the run splits {n} examples "
            f"into {expected}"
        )
    if cfg.max_examples_per_client and n > cfg.max_examples_per_client:
        raise HetLoRAError(f"{n} examples above max_examples_per_client")


def discover(
    grid: Grid, cfg: Config, ids: list[int], timeout_s: float
) -> dict[int, records.NodeInfo]:
    """Ask every node what it holds; returns node -> its (checked) declaration."""
    query = RecordDict({records.CONFIG: ConfigRecord({"server-round": 0})})
    messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in ids]
    replies = grid.send_and_receive(messages, timeout=timeout_s)
    infos: dict[int, records.NodeInfo] = {}
    held: dict[str, int] = {}
    for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):
        node = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise HetLoRAError(f"{records.error_text(reply.error)}; the node's log says why")
            if records.INFO not in reply.content.config_records:
                raise HetLoRAError("reply without node info")
            info = records.NodeInfo.from_record(reply.content.config_records[records.INFO])
            check_counts(cfg, info)
            declared_rank(cfg, info)
            if info.client_id in held:
                raise HetLoRAError(
                    f"client {info.client_id!r} is already held by node {held[info.client_id]}"
                )
        except HetLoRAError as exc:
            log.warning("node %s left out of the run: %s", node, exc)
            continue
        infos[node] = info
        held[info.client_id] = node
    if not infos:
        raise HetLoRAError(f"no usable SuperNode among the {len(ids)} connected")
    return agree_on_template(infos)


def agree_on_template(infos: dict[int, records.NodeInfo]) -> dict[int, records.NodeInfo]:
    """The nodes whose examples go through the chat template as most nodes' do (``templated``;
    a tie goes to the first node's); the others are left out with a logged reason, since one
    global adapter is trained on one rendering."""
    votes = [info.templated for _, info in sorted(infos.items())]
    templated = votes.count(True) > votes.count(False) or (
        votes.count(True) == votes.count(False) and votes[0]
    )
    for node, info in sorted(infos.items()):
        if info.templated != templated:
            log.warning(
                "node %s left out of the run: its examples %s the chat template, the other "
                "nodes' %s",
                node,
                "go through" if info.templated else "do not go through",
                "do" if templated else "do not",
            )
    return {node: info for node, info in infos.items() if info.templated == templated}


def flower_run(
    cfg: Config, grid: Grid, options: RunOptions, progress: Progress | None = None
) -> RoundLoop:
    """The run of a ServerApp: the shared `RoundLoop` with `GridTransport` and
    federated evaluation; the server's workspace holds the model and no data."""
    check_supported(cfg)
    ws = build_workspace(cfg, trains_locally=False, progress=progress, splits=({}, {}, {}))
    want = options.min_nodes or cfg.clients_per_round
    ids = wait_for_nodes(grid, want, options.node_wait_s)
    infos = discover(grid, cfg, ids, options.round_timeout_s)
    clients = sorted(info.client_id for info in infos.values())
    assigned = assigned_ranks(cfg, clients)
    ranks = {}
    for node, info in sorted(infos.items()):
        client = info.client_id
        ranks[client] = declared_rank(cfg, info) or assigned[client]
        how = "budget" if info.rank else f"tier {info.tier}" if info.tier else "assigned"
        log.info("node %s: client %s, rank %d (%s)", node, client, ranks[client], how)
    nodes = {node: info.client_id for node, info in infos.items()}
    ws.client_ids = clients
    # the server holds no examples: its renderer (server_eval_data, summary) follows the nodes'
    templated = next(iter(infos.values())).templated
    ws.renderer = make_renderer(ws.tokenizer, cfg.chat_template, templated=templated)
    server = initial_server(cfg, ws, ranks)
    min_clients = options.min_clients or cfg.min_clients
    strategy = HetLoRAStrategy(
        server,
        nodes,
        ws.settings,
        ws.size,
        sample_clients=lambda r: round_clients(cfg, server, clients, r),
        min_clients=min_clients,
        max_update_norm=cfg.max_update_norm,
    )
    strategy.summary()
    held_out = FederatedHeldOut(grid, infos, cfg, options.round_timeout_s)
    extra = {"runtime": "flower", "nodes": {c: n for n, c in sorted(nodes.items())}}
    transport = GridTransport(grid, strategy, options.round_timeout_s)
    sizes = {info.client_id: info.num_examples for info in infos.values()}
    return RoundLoop(ws, server, transport, clients, min_clients, progress, extra, held_out, sizes)


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
        if "epsilon" in summary:
            log.info(
                "differential privacy: epsilon %.3g at delta %.3g (clip %g, noise multiplier %.4g)",
                summary["epsilon"],
                summary["delta"],
                summary["dp_clip_norm"],
                summary["dp_noise_multiplier"],
            )
    except HetLoRAError as exc:
        log.error("%s", exc)
        raise
    finally:
        root.removeHandler(handler)

"""The ClientApp: one SuperNode trains one client, with the in-process runtime's client code.

A SuperNode says which client it is and what it can afford in its node config
(``flower-supernode --node-config '...'``):

* ``partition-id``: the client's index in the run's sorted client list (Flower's simulation
  runtime sets it for every virtual SuperNode), or ``client-id``: the client's name;
* ``rank``: its rank budget (the server caps it at r_max), or ``tier``: the name of one of the
  run's ``tiers``; with neither, the server assigns the rank the in-process runtime would;
* ``data`` (optional): a local data file or ``save_to_disk`` folder in place of the run's
  ``data`` (the device's own data, in any format the run's ``data`` takes: ``prompt``/
  ``response``, ``text`` or ``messages`` rows; only this node reads it), with ``split``
  (optional) for a ``DatasetDict`` folder.

Messages:

* ``query``: the node's :class:`~.records.NodeInfo` (client, index, examples, rank, tier);
* ``train``: :meth:`~hetlora.runtime.workspace.Workspace.train` (:func:`hetlora.client.run_task`
  on the factors received, with the client's own seeded batches: the same stream as in-process)
  and the hyperparameters of the ConfigRecord; replies with the factors at the (possibly pruned)
  rank and the counters of the local training.

A node builds only what a client needs: the data and the PEFT-wrapped model
(:func:`~hetlora.runtime.workspace.build_workspace`), no held-out set and no server. They are
built once per process and kept (Flower's simulation runtime reuses its worker processes; the
deployment runtime starts one per message).
"""

from __future__ import annotations

import functools
import logging
import sys
import tomllib
from dataclasses import replace
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from hetlora.config import Config, make_config
from hetlora.errors import HetLoRAError
from hetlora.runtime.flower import records
from hetlora.runtime.flower.project import config_from_run_config
from hetlora.runtime.workspace import Workspace, build_workspace, federated_splits

log = logging.getLogger(__name__)

NODE_KEYS = ("partition-id", "num-partitions", "client-id", "rank", "tier", "data", "split")


def node_config(cfg: Config, node: dict[str, Any]) -> Config:
    """The run's config as this node reads it (its own ``data`` file, if it names one).

    ``report_to`` is dropped: the server reports, a device needs no tracker package.
    """
    unknown = sorted(set(node) - set(NODE_KEYS))
    if unknown:
        log.warning("node config keys %s are not used by hetlora", unknown)
    cfg = replace(cfg, report_to=[])
    data = node.get("data")
    if data:
        return replace(cfg, data=str(data), split=str(node.get("split", "")))
    if node.get("split"):
        raise HetLoRAError("node config 'split' applies only with the node's own 'data'")
    return cfg


def node_client(client_ids: list[str], node: dict[str, Any]) -> str:
    """The client this node holds: ``client-id``, else the ``partition-id``-th client."""
    if node.get("client-id") not in (None, ""):
        client = str(node["client-id"])
        if client not in client_ids:
            raise HetLoRAError(f"node config client-id {client!r} is not a client of this run")
        return client
    if "partition-id" not in node:
        raise HetLoRAError("the node config needs 'partition-id' or 'client-id'")
    index = node["partition-id"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(client_ids):
        raise HetLoRAError(f"partition-id {index!r} outside [0, {len(client_ids) - 1}]")
    return client_ids[index]


def node_info(cfg: Config, node: dict[str, Any]) -> records.NodeInfo:
    """What the node declares: its client (from the data, without loading the model) and rank."""
    train_data, _, _ = federated_splits(cfg)
    client_ids = [str(c) for c in sorted(train_data)]
    client = node_client(client_ids, node)
    rank = node.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise HetLoRAError(f"node config rank must be a positive integer, got {rank!r}")
    return records.NodeInfo(
        client_id=client,
        index=client_ids.index(client),
        num_examples=len(train_data[client]),
        rank=rank,
        tier=str(node.get("tier", "")),
    )


@functools.lru_cache(maxsize=1)
def _workspace(config_toml: str) -> Workspace:
    """This node's data and model (kept for the process)."""
    return build_workspace(make_config(tomllib.loads(config_toml)))


@functools.cache
def _log_to_stderr() -> None:
    """Show hetlora's log lines in the SuperNode's output (once per process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hetlora %(levelname)s: %(message)s"))
    root = logging.getLogger("hetlora")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's question: which client, which rank."""
    _log_to_stderr()
    cfg = node_config(config_from_run_config(context.run_config), dict(context.node_config))
    info = node_info(cfg, dict(context.node_config))
    log.info("node %s holds client %s", context.node_id, info.client_id)
    return Message(RecordDict({records.INFO: info.record()}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the client's adapter from the factors received; reply with the upload."""
    _log_to_stderr()
    cfg = node_config(config_from_run_config(context.run_config), dict(context.node_config))
    ws = _workspace(cfg.to_toml())
    client = node_client([str(c) for c in ws.client_ids], dict(context.node_config))
    task, round_idx, settings = records.read_train(msg.content, ws.bf16)
    if task.client_id != client:
        raise HetLoRAError(f"task for client {task.client_id!r} sent to the node of {client!r}")
    update, result = ws.train(task, round_idx, settings=settings)
    log.info(
        "round %d: client %s rank %d -> %d, loss %.3f",
        round_idx,
        client,
        result.rank_received,
        result.rank,
        result.train_loss,
    )
    return Message(records.reply_content(update, result), reply_to=msg)

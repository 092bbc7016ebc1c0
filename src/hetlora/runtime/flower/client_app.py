"""The ClientApp: one SuperNode trains and evaluates one client, on its own data only.

A SuperNode says which client it is and what it can afford in its node config
(``flower-supernode --node-config '...'``):

* ``data``: the device's own data file or ``save_to_disk`` folder (any format the run's ``data``
  takes: ``prompt``/``response``, ``text`` or ``messages`` rows, read with the run's data keys),
  with ``split`` (optional) for a ``DatasetDict`` folder. In a deployment it is the node's only
  data, and the server's config names none (``data = ""``): a node without it stops with one
  error line. Without it (Flower's simulation runtime, local demos and tests) the node takes its
  client out of the run's shared ``data``;
* ``client-id``: the client's name: needed for a file without a ``client_id`` column (the whole
  file is that client) and to pick one of several clients of a file with one (a file of one
  named client needs none), or ``partition-id``: the client's index in the sorted client list
  of the data (Flower's simulation runtime sets it for every virtual SuperNode);
* ``rank``: its rank budget (the server caps it at r_max), or ``tier``: the name of one of the
  run's ``tiers``; with neither, the server assigns the rank the in-process runtime would;
* ``min-eval-examples`` (optional, default 1): the fewest of its held-out examples an
  evaluation may name (`guard_evaluation`).

Messages:

* ``query``: the node's `.records.NodeInfo`: its client id and example counts (train,
  validation, test), its rank budget or tier, and whether its examples go through the chat
  template; never text or token ids;
* ``train``: `hetlora.runtime.workspace.Workspace.train` (`hetlora.client.run_task`
  on the factors received, its batches seeded by the client index the server sends: the same
  stream as in-process) and the hyperparameters of the ConfigRecord; replies with the factors
  at the (possibly pruned) rank and the counters of the local training;
* ``evaluate``: the global factors received, written into the node's model (cut to each
  rank the server names: the final evaluation asks for every tier in one message), measured
  on the positions of its own test or validation split the server names
  (`hetlora.evaluate.nll_sums`); replies with the NLL sums and token counts only; or,
  for a generation instruction, greedy generations of those examples scored against their
  responses on the node (`hetlora.evaluate.rouge_sums`): replies with the ROUGE-L sum and
  the number of examples, never the text. A request an honest server would not make is
  refused first (`guard_evaluation`).

A handler that fails replies with an error that names only the exception's type
(`.records.node_error`); the error itself, which may quote the device's rows, is logged
on the node.

A node builds only what a client needs: its own splits and the PEFT-wrapped model
(`hetlora.runtime.workspace.build_workspace`), no server. They are built once per
process and kept (Flower's simulation runtime reuses its worker processes; the deployment
runtime starts one per message).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import tomllib
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from hetlora.config import Config, make_config
from hetlora.data import PARTITION_DEFAULTS, has_client_ids
from hetlora.data.chat import make_renderer
from hetlora.errors import HetLoRAError
from hetlora.evaluate import generate_greedy, nll_sums, rouge_sums
from hetlora.hardware import no_compile
from hetlora.models import load_tokenizer
from hetlora.runtime.flower import records
from hetlora.runtime.flower.project import config_from_run_config
from hetlora.runtime.splits import Splits, client_splits, federated_splits, load_data

if TYPE_CHECKING:
    from hetlora.runtime.workspace import Workspace

log = logging.getLogger(__name__)

NODE_KEYS = (
    "partition-id",
    "num-partitions",
    "client-id",
    "rank",
    "tier",
    "data",
    "split",
    "min-eval-examples",
)
#: The node's record, in its run's ``context.state``, of the evaluations it has answered.
EVALUATIONS = "hetlora-evaluations"


def node_config(cfg: Config, node: dict[str, Any]) -> Config:
    """The run's config as this node uses it (checked against its node config).

    ``report_to`` is dropped: the server reports, a device needs no tracker package.
    """
    unknown = sorted(set(node) - set(NODE_KEYS))
    if unknown:
        log.warning("node config keys %s are not used by hetlora", unknown)
    if node.get("split") and not node.get("data"):
        raise HetLoRAError("node config 'split' applies only with the node's own 'data'")
    if not node.get("data") and not cfg.data.strip():
        raise HetLoRAError(
            "this node has no data: name its own file in its node config "
            "(flower-supernode --node-config 'data=\"/path/to/data.jsonl\"'); the run names none"
        )
    return replace(cfg, report_to=[])


def node_client(client_ids: list[str], node: dict[str, Any]) -> str:
    """The client this node holds: ``client-id``, else the ``partition-id``-th client."""
    if node.get("client-id") not in (None, ""):
        client = str(node["client-id"])
        if client not in client_ids:
            raise HetLoRAError(f"node config client-id {client!r} is not a client of the data")
        return client
    if "partition-id" not in node:
        raise HetLoRAError("the node config needs 'partition-id' or 'client-id'")
    index = node["partition-id"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(client_ids):
        raise HetLoRAError(f"partition-id {index!r} outside [0, {len(client_ids) - 1}]")
    return client_ids[index]


def node_splits(cfg: Config, node: dict[str, Any]) -> tuple[Splits, Splits, Splits]:
    """This node's one client: its training, validation and test examples.

    From the node's own ``data``: a file without a ``client_id`` column is one client, the
    node's ``client-id`` (required then); one with it is read as it is, and ``client-id`` or
    ``partition-id`` picks a client (a file of one client needs neither). Without ``data``,
    from the run's shared ``data``. The splits are those of
    `hetlora.runtime.splits.client_splits`, as in-process.
    """
    if node.get("data"):
        path, split = str(node["data"]), str(node.get("split", ""))
        named = node.get("client-id") not in (None, "")
        if not has_client_ids(path, split):  # the whole file is the one client it names
            if not named:
                raise HetLoRAError(
                    f"{path} has no client_id column: name the node's client in its node "
                    'config (client-id="...")'
                )
            one = replace(cfg, partitioner="iid", num_partitions=1)
            (rows,) = load_data(one, path, split=split).values()
            return client_splits({str(node["client-id"]): rows}, cfg)
        clients = load_data(replace(cfg, **PARTITION_DEFAULTS), path, split=split)
        if len(clients) == 1 and "partition-id" not in node and not named:
            client = next(iter(clients))
        else:
            client = node_client(sorted(clients), node)
        return client_splits({client: clients[client]}, cfg)
    train, val, test = federated_splits(cfg)
    client = node_client(sorted(train), node)
    return {client: train[client]}, {client: val[client]}, {client: test[client]}


def node_info(cfg: Config, node: dict[str, Any]) -> records.NodeInfo:
    """What the node declares: its client and example counts (without loading the model), its
    rank budget or tier, and whether its examples go through the chat template (its renderer
    as `hetlora.runtime.workspace.build_workspace` makes it, from the tokenizer)."""
    train, val, test = node_splits(cfg, node)
    (client,) = train
    renderer = make_renderer(load_tokenizer(cfg.model), cfg.chat_template, train[client])
    rank = node.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise HetLoRAError(f"node config rank must be a positive integer, got {rank!r}")
    return records.NodeInfo(
        client_id=client,
        num_examples=len(train[client]),
        num_val=len(val[client]),
        num_test=len(test[client]),
        rank=rank,
        tier=str(node.get("tier", "")),
        templated=renderer.templated,
    )


@functools.lru_cache(maxsize=1)
def _workspace(config_toml: str, node_json: str) -> Workspace:
    """This node's own splits and model (kept for the process)."""
    # PEFT and the model load here, not at import: a process that only answers the query
    # message imports neither
    from hetlora.runtime.workspace import build_workspace

    cfg = make_config(tomllib.loads(config_toml))
    return build_workspace(cfg, splits=node_splits(cfg, json.loads(node_json)))


def node_workspace(context: Context) -> Workspace:
    """The workspace of the node of ``context``: one client, its own data."""
    node = dict(context.node_config)
    cfg = node_config(config_from_run_config(context.run_config), node)
    return _workspace(cfg.to_toml(), json.dumps(node, sort_keys=True))


@functools.cache
def _log_to_stderr() -> None:
    """Show hetlora's log lines in the SuperNode's output (once per process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hetlora %(levelname)s: %(message)s"))
    root = logging.getLogger("hetlora")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def on_the_node(handler: Callable[[Message, Context], Message]):
    """A message handler whose errors stay on the node: an exception is logged here and
    answered with `.records.node_error` (its type only), since its message may quote
    the device's rows or paths and Flower would send that text to the server.

    A `HetLoRAError` (bad node config, data or task: the user's to fix) is logged as one
    error line saying why; any other exception with its traceback (a bug to report)."""

    @functools.wraps(handler)
    def handle(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except HetLoRAError as exc:  # the user's to fix: one line, the reason
            log.error("%s on node %s: %s", handler.__name__, context.node_id, exc)
            return Message(records.node_error(exc), reply_to=msg)
        except Exception as exc:  # answered as an error reply; the full error is logged here
            log.exception("%s failed on node %s", handler.__name__, context.node_id)
            return Message(records.node_error(exc), reply_to=msg)

    return handle


app = ClientApp()


@app.query()
@on_the_node
def query(msg: Message, context: Context) -> Message:
    """Answer the server's question: which client, how many examples, which rank."""
    _log_to_stderr()
    cfg = node_config(config_from_run_config(context.run_config), dict(context.node_config))
    info = node_info(cfg, dict(context.node_config))
    log.info("node %s holds client %s", context.node_id, info.client_id)
    return Message(RecordDict({records.INFO: info.record()}), reply_to=msg)


@app.train()
@on_the_node
def train(msg: Message, context: Context) -> Message:
    """Train the client's adapter from the factors received; reply with the upload."""
    _log_to_stderr()
    ws = node_workspace(context)
    (client,) = ws.client_ids
    task, round_idx, settings, index = records.read_train(msg.content, ws.bf16)
    if task.client_id != client:
        raise HetLoRAError(f"task for client {task.client_id!r} sent to the node of {client!r}")
    reply = ws.train(task, round_idx, settings=settings, index=index)
    log.info(
        "round %d: client %s rank %d -> %d, loss %.3f",
        round_idx,
        client,
        task.rank,
        reply.rank,
        reply.train_loss,
    )
    private = task.dp_clip_norm > 0  # DP: the factors were clipped in run_task; no loss sent
    return Message(records.reply_content(reply, private), reply_to=msg)


def guard_evaluation(
    context: Context, split: str, generate: bool, positions: list[int], rounds: int
) -> None:
    """What a server may ask of this node's held-out examples, checked before any is used.

    The server names the examples (so that the federated sample is the in-process one), which
    would let a curious server ask for one example at a time, or for other examples each time,
    and read single examples' scores off the sums. So within a run, for each kind of
    measurement (split, and NLL or ROUGE-L): no example twice; at least the node config's
    ``min-eval-examples`` (default 1); the same examples as the first request of the run; and at
    most ``rounds + 2`` requests (an honest server makes at most one a round, the base model's
    and a final repeat for a holder that missed the last). Raises `HetLoRAError` (the node
    answers with an error and the server leaves it out of that measurement)."""
    if len(set(positions)) != len(positions):
        raise HetLoRAError("evaluation names an example more than once")
    least = context.node_config.get("min-eval-examples", 1)
    if isinstance(least, bool) or not isinstance(least, int) or least < 1:
        raise HetLoRAError(f"node config min-eval-examples must be an integer >= 1, got {least!r}")
    if len(positions) < least:
        raise HetLoRAError(
            f"evaluation asks for {len(positions)} examples, fewer than this node's "
            f"min-eval-examples {least}"
        )
    kind = f"{split}-{'rouge' if generate else 'nll'}"
    if EVALUATIONS not in context.state:
        context.state[EVALUATIONS] = ConfigRecord()
    seen = context.state[EVALUATIONS]
    if f"{kind}-positions" not in seen:
        seen[f"{kind}-positions"], seen[f"{kind}-count"] = sorted(positions), 0
    elif list(seen[f"{kind}-positions"]) != sorted(positions):
        raise HetLoRAError(
            f"evaluation ({kind}) asks for other examples than the first request of this run"
        )
    if int(seen[f"{kind}-count"]) >= rounds + 2:
        raise HetLoRAError(f"evaluation ({kind}): more than rounds + 2 = {rounds + 2} requests")
    seen[f"{kind}-count"] = int(seen[f"{kind}-count"]) + 1
    log.info("evaluation %s: request %d of this run", kind, seen[f"{kind}-count"])


@app.evaluate()
@on_the_node
def evaluate(msg: Message, context: Context) -> Message:
    """Measure the global factors received on the named examples of the node's own held-out
    split; reply with the NLL sum and token count at each rank the instruction names (the final
    evaluation asks for every tier at once: one message, one download of the adapter), or, for a
    generation instruction, with the sum of the ROUGE-L scores of greedy generations and how many
    were scored (no text)."""
    from hetlora import adapters

    _log_to_stderr()
    ws = node_workspace(context)
    (client,) = ws.client_ids
    task = records.read_evaluate(msg.content)
    examples = (ws.val_data if task.split == "val" else ws.test_data)[client]
    if any(not 0 <= i < len(examples) for i in task.positions):
        raise HetLoRAError(
            f"evaluation asks for examples outside the {len(examples)} of {task.split}"
        )
    guard_evaluation(context, task.split, task.generate, list(task.positions), ws.cfg.rounds)
    chosen = [examples[i] for i in task.positions]
    with no_compile():
        if task.generate:
            adapters.write_padded(ws.peft_model, task.factors, ws.cfg.r_max)
            prompts = [ws.renderer.prompt(ex) for ex in chosen]
            preds = generate_greedy(
                ws.peft_model,
                ws.tokenizer,
                prompts,
                ws.cfg.max_new_tokens,
                ws.device,
                ws.bf16,
                extra_stops=ws.renderer.end_of_turn,
            )
            score, scored = rouge_sums(preds, [ex.response.strip() for ex in chosen])
            return Message(records.rouge_reply(score, scored), reply_to=msg)
        items = ws.renderer.tokenize_all(chosen, ws.cfg.max_seq_len)
        sums = []
        for rank in task.ranks:
            adapters.write_padded(ws.peft_model, task.at(rank), ws.cfg.r_max)
            sums.append(
                nll_sums(
                    ws.peft_model, items, ws.cfg.eval_batch_size, ws.pad_id, ws.device, ws.bf16
                )
            )
    return Message(records.evaluate_reply(sums), reply_to=msg)

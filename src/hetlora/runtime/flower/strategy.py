"""HetLoRA as a Flower :class:`~flwr.serverapp.strategy.Strategy` (Message API).

Flower's stock strategies average arrays of one shape. Here every node trains the global adapter
cut to its own rank, so the strategy hands the work to the method's
:class:`~hetlora.methods.base.Server` (the same object the in-process engine drives):

* :meth:`HetLoRAStrategy.configure_train` -- for each sampled client, ``server.task(client)``
  (the global factors truncated to its current rank) becomes an ArrayRecord, and the rank, task
  flags and hyperparameters a ConfigRecord (:mod:`.records`);
* :meth:`HetLoRAStrategy.aggregate_train` -- each reply is checked against what was sent
  (:func:`.records.read_reply`) and folded in with ``server.add`` (zero-padding, sparsity
  weights), then ``server.finish()`` closes the round; the server keeps every client's pruned
  rank. Replies with errors, malformed replies and nodes that never answered are logged and left
  out; with fewer than ``min_clients`` valid replies the round is skipped.

Evaluation is centralised (the ServerApp measures the global adapter on the held-out set), so
:meth:`configure_evaluate` sends nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hetlora.client import ClientResult, TrainSettings
from hetlora.errors import HetLoRAError
from hetlora.methods.base import ClientTask, ClientUpdate, Server
from hetlora.runtime.flower import records

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What happened in one round, for the run's metrics.

    Attributes:
        sampled: the clients the round asked (sorted).
        tasks: client -> the task sent.
        replies: client -> (update, result) of every valid reply that was aggregated.
        left_out: client -> why its reply is missing or was refused.
        weights: client -> normalised aggregation weight (empty when skipped).
        skipped: fewer than ``min_clients`` valid replies; the global state did not change.
    """

    sampled: list[str] = field(default_factory=list)
    tasks: dict[str, ClientTask] = field(default_factory=dict)
    replies: dict[str, tuple[ClientUpdate, ClientResult]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


class HetLoRAStrategy(Strategy):
    """Heterogeneous-rank federated LoRA over Flower messages.

    Args:
        server: the method's server (:func:`hetlora.methods.make_server`): ranks, global factors,
            truncation and aggregation all live there.
        nodes: node id -> client id, for every node that declared its client.
        settings: local-training hyperparameters sent in every ConfigRecord.
        sample_clients: round -> the clients to ask (default: every client with a node). The
            ServerApp passes the in-process engine's seeded sampler, so both runtimes ask the
            same clients.
        min_clients: a round with fewer valid replies is skipped.
        max_update_norm: replies whose update norm exceeds this are refused (0: no bound); the
            check is the method's own (``Server.check``), as in-process.
    """

    def __init__(
        self,
        server: Server,
        nodes: Mapping[int, str],
        settings: TrainSettings,
        sample_clients: Callable[[int], Sequence[str]] | None = None,
        min_clients: int = 1,
        max_update_norm: float = 0.0,
    ) -> None:
        self.server = server
        self.nodes = dict(nodes)
        self.node_of = {client: node for node, client in self.nodes.items()}
        self.settings = settings
        self.sample_clients = sample_clients or (lambda _round: sorted(self.node_of))
        self.min_clients = min_clients
        self.max_update_norm = max_update_norm
        self.report = RoundReport()
        self._sent: dict[int, str] = {}  # node -> client asked this round
        self._messages: dict[str, Message] = {}  # client -> the instruction sent

    def summary(self) -> None:
        log.info(
            "HetLoRAStrategy: method %s, %d nodes, min_clients %d, ranks %s",
            self.server.name,
            len(self.nodes),
            self.min_clients,
            dict(sorted(self.server.ranks.items())),
        )

    def global_arrays(self) -> ArrayRecord:
        factors = self.server.global_factors()
        return records.factors_record(factors) if factors else ArrayRecord()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled client whose node is connected: its truncated factors."""
        online = set(grid.get_node_ids())
        report = RoundReport(sampled=sorted(self.sample_clients(server_round)))
        self._sent, self._messages = {}, {}
        messages = []
        for client in report.sampled:
            node = self.node_of.get(client)
            if node is None or node not in online:
                report.left_out[client] = "node not connected"
                log.warning(
                    "round %d: client %s left out: node not connected", server_round, client
                )
                continue
            task = self.server.task(client)
            content = records.train_content(task, server_round, self.settings)
            for key, value in config.items():  # extra entries the caller wants sent
                content.config_records[records.CONFIG][key] = value
            report.tasks[client] = task
            self._sent[node] = client
            message = Message(
                content,
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            self._messages[client] = message
            messages.append(message)
        self.report = report
        log.info(
            "round %d: asked %d clients %s",
            server_round,
            len(messages),
            sorted(self._sent.values()),
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and fold in the valid replies; close the round if enough arrived."""
        report = self.report
        valid: dict[str, tuple[ClientUpdate, ClientResult]] = {}
        # Flower sets an instruction's message id when it is pushed; a reply names it. Errors
        # about a node (e.g. "Node Unavailable") come from the SuperLink, not from the node.
        asked = {
            m.metadata.message_id: c for c, m in self._messages.items() if m.metadata.message_id
        }
        for reply in replies:
            node = reply.metadata.src_node_id
            client = asked.get(reply.metadata.reply_to_message_id) or self._sent.get(node)
            if client is None:
                log.warning("round %d: reply from unexpected node %s ignored", server_round, node)
                continue
            if not reply.has_error() and self.node_of.get(client) != node:
                log.warning(
                    "round %d: reply for %s from node %s ignored", server_round, client, node
                )
                continue
            if client in valid or client in report.left_out:
                continue  # a duplicate
            if reply.has_error():
                self._leave_out(server_round, client, f"error from node: {reply.error.reason}")
                continue
            try:
                valid[client] = records.read_reply(reply.content, report.tasks[client])
            except HetLoRAError as exc:
                self._leave_out(server_round, client, f"malformed reply: {exc}")
        for client in sorted(set(self._sent.values()) - set(valid) - set(report.left_out)):
            self._leave_out(server_round, client, "no reply before the round timed out")
        if len(valid) >= self.min_clients:
            for client in sorted(valid):  # a fixed order: the same sums as the in-process engine
                update, result = valid[client]
                try:
                    self.server.check(update, self.max_update_norm)
                    self.server.add(update)
                except HetLoRAError as exc:
                    self._leave_out(server_round, client, f"refused by the server: {exc}")
                    continue
                report.replies[client] = (update, result)
        if len(report.replies) < self.min_clients:
            log.warning(
                "round %d skipped: %d valid replies, fewer than min_clients = %d",
                server_round,
                len(report.replies),
                self.min_clients,
            )
            if report.replies:  # some were folded in before the server refused others
                self.server.reset_round()
            report.replies.clear()
            report.skipped = True
            return None, None
        report.weights = self.server.finish()
        metrics = MetricRecord(
            {
                "clients": len(report.replies),
                "left-out": len(report.left_out),
                "train-loss": sum(r.train_loss for _, r in report.replies.values())
                / len(report.replies),
            }
        )
        return self.global_arrays(), metrics

    def _leave_out(self, server_round: int, client: str, reason: str) -> None:
        self.report.left_out[client] = reason
        log.warning("round %d: client %s left out: %s", server_round, client, reason)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the ServerApp evaluates the global adapter itself."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

"""HetLoRA as a Flower `flwr.serverapp.strategy.Strategy` (Message API).

Flower's stock strategies average arrays of one shape. Here every node trains the global adapter
cut to its own rank, so the strategy hands the work to the method's
`hetlora.methods.base.Server` (the same object the in-process runtime drives):

* `HetLoRAStrategy.instructions` -- for each sampled client, ``server.task(client)``
  (the global factors truncated to its current rank) becomes an ArrayRecord, and the rank, task
  flags and hyperparameters a ConfigRecord (`.records`);
* `HetLoRAStrategy.exchanges` -- each answer decoded into a `hetlora.runtime.rounds.
  Exchange` (errors, undecodable replies and nodes that never answered become rejections);
* the round is then closed by `hetlora.runtime.rounds.fold`, the in-process runtime's own
  step: ``server.check`` (the one validator), ``server.add``, ``server.finish``.

The ServerApp drives these through `.server_app.GridTransport` and the shared round loop;
`configure_train` / `aggregate_train` are the same steps behind Flower's Strategy
interface. Evaluation is federated but driven by the round loop (`.held_out`: the nodes
reply with NLL sums), so `configure_evaluate` sends nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hetlora.accounting import ModelSize
from hetlora.errors import HetLoRAError
from hetlora.methods.base import ClientTask, Server, TrainSettings
from hetlora.runtime.flower import records
from hetlora.runtime.rounds import Exchange, RoundOutcome, fold

log = logging.getLogger(__name__)


class HetLoRAStrategy(Strategy):
    """Heterogeneous-rank federated LoRA over Flower messages.

    Args:
        server: the method's server (`hetlora.methods.make_server`): ranks, global factors,
            truncation, validation and aggregation all live there.
        nodes: node id -> client id, for every node that declared its client.
        settings: local-training hyperparameters sent in every ConfigRecord.
        size: the base model's size (`hetlora.accounting.model_size`), for the FLOPs of
            each client's entry in the round's row.
        sample_clients: round -> the clients to ask (default: every client with a node). The
            ServerApp passes the in-process runtime's seeded sampler, so both ask the same clients.
        min_clients: a round with fewer valid replies is skipped.
        max_update_norm: replies whose update norm exceeds this are rejected (0: no bound).
    """

    def __init__(
        self,
        server: Server,
        nodes: Mapping[int, str],
        settings: TrainSettings,
        size: ModelSize,
        sample_clients: Callable[[int], Sequence[str]] | None = None,
        min_clients: int = 1,
        max_update_norm: float = 0.0,
    ) -> None:
        self.server = server
        self.nodes = dict(nodes)
        self.node_of = {client: node for node, client in self.nodes.items()}
        # a client's index among the run's clients seeds its batches, as in-process
        self.index = {client: i for i, client in enumerate(sorted(self.node_of))}
        self.settings = settings
        self.sample_clients = sample_clients or (lambda _round: sorted(self.node_of))
        self.min_clients = min_clients
        self.max_update_norm = max_update_norm
        self.size = size
        self._tasks: dict[str, ClientTask] = {}  # client -> the task sent this round
        self._messages: dict[str, Message] = {}  # client -> the instruction sent
        self._unsent: dict[str, str] = {}  # client -> why nothing was sent

    def summary(self) -> None:  # Flower's Strategy requires it
        log.info(
            "HetLoRAStrategy: method %s, %d nodes, min_clients %d, ranks %s",
            self.server.name,
            len(self.nodes),
            self.min_clients,
            dict(sorted(self.server.ranks.items())),
        )

    def instructions(
        self,
        server_round: int,
        sampled: Sequence[str],
        online: Iterable[int],
        config: ConfigRecord | None = None,
    ) -> list[Message]:
        """One message per sampled client whose node is connected: its truncated factors."""
        online = set(online)
        self._tasks, self._messages, self._unsent = {}, {}, {}
        for client in sorted(sampled):
            node = self.node_of.get(client)
            if node is None or node not in online:
                self._unsent[client] = "node not connected"
                continue
            task = self.server.task(client)
            content = records.train_content(task, server_round, self.settings, self.index[client])
            for key, value in (config or {}).items():  # extra entries the caller wants sent
                content.config_records[records.CONFIG][key] = value
            self._tasks[client] = task
            self._messages[client] = Message(
                content,
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
        log.info(
            "round %d: asked %d clients %s", server_round, len(self._tasks), sorted(self._tasks)
        )
        return list(self._messages.values())

    def exchanges(self, server_round: int, answers: Iterable[Message]) -> list[Exchange]:
        """Every sampled client's `hetlora.runtime.rounds.Exchange`, sorted by client."""
        # Flower sets an instruction's message id when it is pushed; a reply names it. Errors
        # about a node (e.g. "Node Unavailable") come from the SuperLink, not from the node.
        asked = {
            m.metadata.message_id: c for c, m in self._messages.items() if m.metadata.message_id
        }
        sent = {self.node_of[c]: c for c in self._tasks}
        out = {c: Exchange(c, problem=why) for c, why in self._unsent.items()}
        for answer in answers:
            node = answer.metadata.src_node_id
            client = asked.get(answer.metadata.reply_to_message_id) or sent.get(node)
            if client is None:
                log.warning("round %d: reply from unexpected node %s ignored", server_round, node)
                continue
            if not answer.has_error() and self.node_of.get(client) != node:
                log.warning(
                    "round %d: reply for %s from node %s ignored", server_round, client, node
                )
                continue
            if client in out:
                continue  # a duplicate
            ex = Exchange(client, self._tasks[client], extra={"node": self.node_of[client]})
            if answer.has_error():
                ex.problem = records.error_text(answer.error)
            else:
                try:
                    ex.reply = records.read_reply(answer.content, ex.task)
                except HetLoRAError as exc:
                    ex.problem = f"malformed reply: {exc}"
            out[client] = ex
        for client in set(self._tasks) - set(out):
            out[client] = Exchange(
                client, self._tasks[client], problem="no reply before the round timed out"
            )
        return [out[c] for c in sorted(out)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's entry point: `instructions` for this round's seeded sample."""
        return self.instructions(
            server_round, self.sample_clients(server_round), grid.get_node_ids(), config
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's entry point: `replies`, then `hetlora.runtime.rounds.fold`."""
        outcome = RoundOutcome(server_round, sorted(self._tasks) + sorted(self._unsent))
        fold(
            self.server,
            self.exchanges(server_round, replies),
            self.min_clients,
            self.max_update_norm,
            outcome,
            self.size,
        )
        if outcome.skipped:
            return None, None
        losses = [c["train_loss"] for c in outcome.clients.values()]
        metrics = MetricRecord(
            {
                "clients": len(outcome.weights),
                "rejected": len(outcome.rejected),
                "train-loss": sum(losses) / len(losses),
            }
        )
        factors = self.server.global_factors()
        return records.factors_record(factors) if factors else ArrayRecord(), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

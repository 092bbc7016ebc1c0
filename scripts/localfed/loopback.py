"""A Flower Grid whose SuperNodes are ClientApps called in this process.

:class:`LoopbackGrid` implements Flower's :class:`~flwr.serverapp.Grid` for tests of the
strategy and the ServerApp: every message pushed to a node is handed to the real ClientApp with
that node's :class:`~flwr.app.Context` (its node config, its state, the run config), as a
SuperNode would, and the reply (or an error reply, when the ClientApp raises, as Flower's
ClientApp runner makes one) is what the next pull returns. No SuperLink, no sockets, no
processes: what it does not test is Flower's transport, which the process tests in
``tests/test_flower.py`` cover.

``deliver(instruction, reply)`` may change what the server receives: return the reply, another
message, or None for a node that never answers (the round's timeout path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

# Flower's code for "the ClientApp raised an exception" (flwr.common.constant.ErrorCode)
CLIENT_APP_RAISED_EXCEPTION = 2

Deliver = Callable[[Message, Message], Message | None]


class LoopbackGrid(Grid):
    """Nodes ``1..N`` with the given node configs, each answered by ``client_app`` in-process."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any],
        deliver: Deliver | None = None,
    ) -> None:
        self.client_app = client_app
        self.run_config = dict(run_config)
        self.deliver = deliver or (lambda instruction, reply: reply)
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config=dict(config),
                state=RecordDict(),
                run_config=self.run_config,
            )
            for node_id, config in enumerate(node_configs, start=1)
        }
        self.sent: list[Message] = []  # every instruction, in order
        self._replies: dict[str, Message] = {}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _answer(self, message: Message) -> Message:
        context = self.contexts[message.metadata.dst_node_id]
        try:
            return self.client_app(message, context)
        except Exception as exc:  # noqa: BLE001 -- Flower turns it into an error reply
            reason = f"{type(exc).__name__}: {exc}"
            return Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            self.sent.append(message)
            reply = self.deliver(message, self._answer(message))
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Every answer at once; a dropped one is simply missing, as after a real timeout."""
        return list(self.pull_messages(list(self.push_messages(messages))))


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """The task identity Flower's ServerApp runner gives its process (run 1, the server's node
    0), which creating a Message needs; restored afterwards."""
    saved = {name: getattr(TaskIdentity, f"_{name}") for name in ("run_id", "node_id", "task_id")}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, f"_{name}", value)


def run_server_app(server_app: ServerApp, grid: LoopbackGrid) -> None:
    """Run ``server_app`` over ``grid`` in this process, as Flower's ServerApp runner would."""
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=grid.run_config
    )
    with server_identity():
        server_app(grid, context)

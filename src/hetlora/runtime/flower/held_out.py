"""Federated evaluation: the nodes measure the global adapter on their own held-out examples.

The held-out sample is the in-process run's (:func:`~hetlora.runtime.workspace.held_out_order`:
the clients' test, or validation, splits pooled, shuffled and capped at ``eval_examples``),
computed from the counts the nodes declared: each node is told which positions of its own split
are in it. A node replies with the summed NLL and token count of those examples
(:func:`hetlora.evaluate.nll_sums`); the sums combine into the perplexity the in-process run
reports (:func:`hetlora.evaluate.combine_nll`), up to float summation order. Every node with an
example in the sample is asked each time; a node that fails or does not answer is left out of
that measurement with a logged warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from hetlora.config import Config
from hetlora.errors import HetLoRAError
from hetlora.lora import rank_of, truncate
from hetlora.methods.base import Server
from hetlora.runtime.flower import records
from hetlora.runtime.workspace import held_out_order

log = logging.getLogger(__name__)


class FederatedHeldOut:
    """The held-out sets of a Flower run, on its nodes (a :class:`~hetlora.runtime.local.HeldOut`).

    Args:
        grid: the run's Grid.
        infos: node id -> its declaration (:class:`~.records.NodeInfo`: test and validation
            counts).
        cfg: the run's config (``eval_examples``, ``seed``, ``val_fraction``).
        timeout_s: how long an evaluation waits for replies.
    """

    def __init__(
        self, grid: Grid, infos: Mapping[int, records.NodeInfo], cfg: Config, timeout_s: float
    ) -> None:
        self.grid = grid
        self.timeout_s = timeout_s
        node_of = {info.client_id: node for node, info in infos.items()}
        counts = {
            "test": {info.client_id: info.num_test for info in infos.values()},
            "val": {info.client_id: info.num_val for info in infos.values()},
        }
        if cfg.val_fraction == 0:
            counts["val"] = {}
        self.positions: dict[str, dict[int, list[int]]] = {}
        self.counts: dict[str, int] = {}
        for split, per_client in counts.items():
            order = held_out_order(per_client, cfg.eval_examples, cfg.seed)
            by_node: dict[int, list[int]] = {}
            for client, position in order:
                by_node.setdefault(node_of[client], []).append(position)
            self.positions[split] = by_node
            self.counts[split] = len(order)
        if not self.counts["test"]:
            raise HetLoRAError("no held-out examples on the nodes: raise test_fraction")

    def sums(self, server: Server, rank: int | None, split: str) -> list[tuple[float, int]]:
        """The nodes' (NLL sum, tokens) for the global adapter cut to ``rank``, by node id."""
        factors = server.global_factors()
        if factors is None:
            raise HetLoRAError("federated evaluation needs a global adapter")
        if rank is not None and rank < rank_of(factors):
            factors = truncate(factors, rank)
        asked = self.positions[split]
        messages = [
            Message(
                records.evaluate_content(factors, split, positions, 0),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
                group_id=f"evaluate-{split}",
            )
            for node, positions in sorted(asked.items())
        ]
        got: dict[int, tuple[float, int]] = {}
        seen: set[int] = set()
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout_s):
            node = reply.metadata.src_node_id
            if node not in asked or node in seen:
                log.warning("evaluation: reply from node %s ignored", node)
                continue
            seen.add(node)
            try:
                if reply.has_error():
                    raise HetLoRAError(f"error from node: {reply.error.reason}")
                got[node] = records.read_evaluate_reply(reply.content)
            except HetLoRAError as exc:
                log.warning("evaluation (%s): node %s left out: %s", split, node, exc)
        for node in sorted(set(asked) - seen):
            log.warning("evaluation (%s): node %s left out: no reply", split, node)
        return [got[node] for node in sorted(got)]

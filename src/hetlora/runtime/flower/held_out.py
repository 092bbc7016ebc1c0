"""Federated evaluation: the nodes measure the global adapter on their own held-out examples.

The held-out sample is the in-process run's (`hetlora.runtime.splits.held_out_order`:
the clients' test, or validation, splits pooled, shuffled and capped at ``eval_examples``),
computed from the counts the nodes declared: each node is told which positions of its own split
are in it. A node replies with the summed NLL and token count of those examples
(`hetlora.evaluate.nll_sums`); the sums combine into the perplexity the in-process run
reports (`hetlora.evaluate.combine_nll`), up to float summation order. Every node with an
example in the sample is asked each time; a node that fails or does not answer is left out of
that measurement with a logged warning and recorded (the metrics row's ``eval_missing``).

ROUGE-L is federated the same way: the ROUGE sample is the head of the test sample (the
in-process run's first ``rouge_examples``); each node generates greedily for its share, scores
the generations against its own responses and replies with the sum of the F1 scores and their
count (`hetlora.evaluate.rouge_sums`), which combine into the in-process ROUGE-L
(`hetlora.evaluate.combine_rouge`). No generation leaves a node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from hetlora.config import Config
from hetlora.errors import HetLoRAError
from hetlora.lora import cut
from hetlora.methods.base import Server
from hetlora.runtime.flower import records
from hetlora.runtime.splits import held_out_order

log = logging.getLogger(__name__)
T = TypeVar("T")


class FederatedHeldOut:
    """The held-out sets of a Flower run, on its nodes (a `hetlora.runtime.loop.HeldOut`).

    Args:
        grid: the run's Grid.
        infos: node id -> its declaration (`.records.NodeInfo`: test and validation
            counts).
        cfg: the run's config (``eval_examples``, ``rouge_examples``, ``seed``,
            ``val_fraction``).
        timeout_s: how long an evaluation waits for replies.

    ``missing`` collects client -> why it was left out, over every measurement since it was last
    cleared (the round loop clears it and records it in the metrics row).
    """

    def __init__(
        self, grid: Grid, infos: Mapping[int, records.NodeInfo], cfg: Config, timeout_s: float
    ) -> None:
        self.grid = grid
        self.timeout_s = timeout_s
        self.client_of = {node: info.client_id for node, info in infos.items()}
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
            if split == "test":  # the ROUGE sample: the head of the test sample, as in-process
                self.positions["rouge"] = by_node(order[: cfg.rouge_examples], node_of)
            self.positions[split] = by_node(order, node_of)
            self.counts[split] = len(order)
        if not self.counts["test"]:
            raise HetLoRAError("no held-out examples on the nodes: raise test_fraction")
        self.missing: dict[str, str] = {}

    def sums(
        self, server: Server, ranks: Sequence[int | None], split: str
    ) -> dict[int | None, list[tuple[float, int]]]:
        """The nodes' (NLL sum, tokens) for the global adapter cut to each of ``ranks`` (None:
        whole), by rank: one message per node for all of them."""
        asked = len(ranks)
        by_node = self._ask(
            server,
            split,
            [0 if r is None else r for r in ranks],
            lambda node, content: records.read_evaluate_reply(content, asked),
        )
        return {rank: [sums[i] for sums in by_node] for i, rank in enumerate(ranks)}

    def rouge_sums(self, server: Server) -> list[tuple[float, int]]:
        """The nodes' (ROUGE-L sum, examples) of greedy generations of the global adapter on
        their share of the ROUGE sample (the first ``rouge_examples`` of the test sample)."""
        asked = self.positions["rouge"]

        def read(node: int, content: RecordDict) -> tuple[float, int]:
            return records.read_rouge_reply(content, len(asked[node]))

        return self._ask(server, "rouge", [0], read)

    def _ask(
        self, server: Server, which: str, ranks: list[int], read: Callable[[int, RecordDict], T]
    ) -> list[T]:
        """Send every node with examples in sample ``which`` the global factors (cut to the
        largest of ``ranks``, 0 meaning whole) and the ranks to measure them at; returns what
        ``read`` (the one check of a reply) makes of each reply, in node order. A node that
        errs, sends a reply ``read`` refuses, or does not answer is left out, logged and
        recorded in `missing`."""
        factors = server.global_factors()
        if factors is None:
            raise HetLoRAError("federated evaluation needs a global adapter")
        if 0 not in ranks:
            factors = cut(factors, max(ranks))
        asked = self.positions[which]
        split = "test" if which == "rouge" else which
        messages = [
            Message(
                records.evaluate_content(factors, split, positions, 0, which == "rouge", ranks),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
                group_id=f"evaluate-{which}",
            )
            for node, positions in sorted(asked.items())
        ]
        got: dict[int, T] = {}
        seen: set[int] = set()
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout_s):
            node = reply.metadata.src_node_id
            if node not in asked or node in seen:
                log.warning("evaluation: reply from node %s ignored", node)
                continue
            seen.add(node)
            try:
                if reply.has_error():
                    raise HetLoRAError(records.error_text(reply.error))
                got[node] = read(node, reply.content)
            except HetLoRAError as exc:
                self._leave_out(node, which, str(exc))
        for node in sorted(set(asked) - seen):
            self._leave_out(node, which, "no reply")
        return [got[node] for node in sorted(got)]

    def _leave_out(self, node: int, which: str, why: str) -> None:
        log.warning("evaluation (%s): node %s left out: %s", which, node, why)
        self.missing.setdefault(self.client_of[node], f"{which}: {why}")


def by_node(order: list[tuple[str, int]], node_of: Mapping[str, int]) -> dict[int, list[int]]:
    """Sample pairs (client, position) as node -> the positions of its client, in sample order."""
    out: dict[int, list[int]] = {}
    for client, position in order:
        out.setdefault(node_of[client], []).append(position)
    return out

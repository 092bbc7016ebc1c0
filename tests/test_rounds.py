"""The round loop's pieces on a real method server, without a model: fold, row, line."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from hetlora.accounting import ModelSize
from hetlora.lora import truncate
from hetlora.methods.base import Reply, TrainStats
from hetlora.methods.hetlora import HetLoRAServer
from hetlora.runtime.rounds import Exchange, RoundOutcome, fold, round_line, round_row

SIZE = ModelSize(body=1000, head=100, total=1200)


def _factors(rank: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "l0.q": (torch.randn(6, rank, generator=g), torch.randn(rank, 5, generator=g)),
        "l0.v": (torch.randn(4, rank, generator=g), torch.randn(rank, 5, generator=g)),
    }


def _reply(server: HetLoRAServer, client: str, rank: int, loss: float, seed: int) -> Exchange:
    task = server.task(client)
    factors = truncate(_factors(8, seed), rank)
    stats = TrainStats(task.rank, loss, 1.0, 0.5, 40, 20, 2, 0.1)
    return Exchange(client, task, Reply(client, 10, factors=factors, rank=rank, stats=stats))


def test_fold_rejects_with_the_servers_validator_and_builds_one_row():
    server = HetLoRAServer(_factors(8), {"a": 4, "b": 6, "c": 3, "d": 2})
    good_a, good_b = _reply(server, "a", 3, 2.0, 1), _reply(server, "b", 6, 4.0, 2)
    bad = _reply(server, "c", 3, 9.0, 3)
    bad.reply.factors["l0.q"][0][0, 0] = float("nan")
    missing = Exchange("d", server.task("d"), problem="no reply before the round timed out")
    outcome = fold(
        server, [good_a, good_b, bad, missing], 2, 0.0, RoundOutcome(1, list("abcd")), SIZE
    )
    assert not outcome.skipped and set(outcome.weights) == {"a", "b"}
    assert "non-finite" in outcome.rejected["c"] and "timed out" in outcome.rejected["d"]
    assert server.ranks == {"a": 3, "b": 6, "c": 3, "d": 2}  # a pruned 4 -> 3, kept
    row = round_row(outcome, server)
    assert row["rejected"] == outcome.rejected and row["skipped"] is False
    assert set(row["clients"]) == {"a", "b", "c"}  # c replied (and was rejected); d did not
    assert row["train_loss"] == pytest.approx((2.0 + 4.0 + 9.0) / 3)
    assert row["client_ranks"] == {"a": 3, "b": 6, "c": 3, "d": 2}
    assert row["bytes_down"] == sum(r.task.nbytes for r in (good_a, good_b, bad, missing))
    assert row["bytes_up"] == sum(row["clients"][c]["bytes_up"] for c in "abc")
    line = round_line({**row, "wall_s": 1.0})
    assert line.startswith("round   1  train loss 5.000") and "rejected: c (" in line
    evaluated = {**row, "test_ppl": 12.5, "server_eval_ppl": 30.25, "wall_s": 1.0}
    line = round_line({**evaluated, "eval_missing": {"b": "test: no reply"}})
    assert "test ppl 12.50  server ppl 30.25" in line
    assert "evaluated without: b (test: no reply)" in line
    assert "evaluated without" not in round_line({**evaluated, "eval_missing": {}})


def test_a_round_below_min_clients_is_skipped_and_changes_nothing():
    server = HetLoRAServer(_factors(8), {"a": 4, "b": 6})
    before = {n: (b.clone(), a.clone()) for n, (b, a) in server.global_factors().items()}
    replies = [_reply(server, "a", 3, 2.0, 1), Exchange("b", None, problem="node not connected")]
    outcome = fold(server, replies, 2, 0.0, RoundOutcome(1, ["a", "b"]), SIZE)
    assert outcome.skipped and outcome.weights == {} and server.ranks == {"a": 4, "b": 6}
    for n, (b, a) in server.global_factors().items():
        assert torch.equal(b, before[n][0]) and torch.equal(a, before[n][1])
    row = round_row(outcome, server)
    assert row["client_ranks"] == {"a": 4} and row["rejected"] == {"b": "node not connected"}
    assert "SKIPPED" in round_line({**row, "wall_s": 0.0})
    empty = round_row(fold(server, [], 1, 0.0, RoundOutcome(2, []), SIZE), server)
    assert math.isnan(empty["train_loss"]) and empty["skipped"]


def test_no_flower_class_inherits_the_in_process_run():
    """Composition: the ServerApp builds the shared RoundLoop; nothing subclasses it."""
    from hetlora.runtime import loop
    from hetlora.runtime.flower import client_app, server_app, strategy

    for module in (server_app, client_app, strategy):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                assert not issubclass(cls, loop.RoundLoop), cls

"""The paper-regime study's machinery on the tiny model: the validation split in a run, rank
dynamics in metrics.jsonl, and seeded comparisons tuned on validation."""

from __future__ import annotations

import json

import pytest

from hetlora.config import make_config
from hetlora.runtime.local import Simulation

FAST = {
    "rounds": 3,
    "clients_per_round": 3,
    "local_steps": 2,
    "batch_size": 4,
    "lr": 0.01,
    "eval_examples": 16,
    "rouge_examples": 0,
    "precision": "fp32",
    "min_examples": 100,
    "max_clients": 6,
    "max_examples_per_client": 30,
    "r_min": 2,
    "r_max": 8,
    "max_seq_len": 32,
}


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_validation_split_is_evaluated_next_to_the_test_set(tiny_model, tmp_path):
    plain = Simulation(make_config({"model": str(tiny_model), **FAST}))
    cfg = make_config({"model": str(tiny_model), **FAST, "val_fraction": 0.2, "eval_every": 2})
    sim = Simulation(cfg)
    # the test set is the one a run without validation has; training gives up the validation
    assert sim.eval_examples == plain.eval_examples
    assert len(sim.val_items) == 16 and not set(sim.val_items) & set(sim.eval_items)
    for c in sim.client_ids:
        assert len(sim.train_data[c]) == 30 - 6 - 6 < len(plain.train_data[c]) == 24
    summary = sim.run(tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    evaluated = [r for r in rows if "eval_ppl" in r]
    assert [r["round"] for r in evaluated] == [0, 2, 3]
    for r in evaluated:
        assert r["val_ppl"] > 1 and r["eval_ppl"] > 1 and r["val_ppl"] != r["eval_ppl"]
    best = min(evaluated, key=lambda r: r["val_ppl"])
    assert summary["final_val_ppl"] == evaluated[-1]["val_ppl"]
    assert summary["best_val_ppl"] == best["val_ppl"]
    assert summary["best_val_round"] == best["round"]
    assert summary["test_ppl_at_best_val"] == best["eval_ppl"]
    assert summary["final_ppl"] == evaluated[-1]["eval_ppl"]  # final_ppl stays the test set
    without = plain.run(tmp_path / "plain")
    assert "val_ppl" not in rows_of(tmp_path / "plain")[0] and "final_val_ppl" not in without


@pytest.mark.parametrize(
    ("padding", "join"),
    [("zero", min), ("keep", max)],  # zero: running min of the rounds' largest ranks
)
def test_live_global_rank_follows_the_padding_rule(tiny_model, tmp_path, padding, join):
    cfg = make_config(
        {"model": str(tiny_model), **FAST, "padding": padding, "pruning": False, "rounds": 4}
    )
    Simulation(cfg).run(tmp_path / padding)
    rows = rows_of(tmp_path / padding)
    assert rows[0]["global_rank"] == 0  # PEFT's init: B = 0, so no position adds to B A
    expected, tops = None, []
    for r in rows[1:]:
        tops.append(max(r["client_ranks"].values()))
        expected = tops[-1] if expected is None else join(expected, tops[-1])
        assert r["global_rank"] == r["global_rank_min"] == expected
        assert len(r["ranks"]) == 6 and all(2 <= v <= 8 for v in r["ranks"].values())
    assert len(set(tops)) > 1  # the rounds' largest ranks differ: the rule is visible

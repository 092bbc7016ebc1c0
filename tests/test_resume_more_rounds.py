"""`hetlora run --resume RUN --set rounds=N` extends a finished run to N rounds, ending equal to
a straight N-round run; every other key, and fewer rounds than done, are still refused."""

from __future__ import annotations

import json
import tomllib

import torch
from typer.testing import CliRunner

from hetlora.cli import app
from hetlora.export import read_adapter

SETTINGS = [
    "clients_per_round=2",
    "local_steps=2",
    "batch_size=4",
    "lr=0.01",
    "eval_examples=16",
    "rouge_examples=1",
    "max_new_tokens=4",
    "precision='fp32'",
    "min_examples=120",
    "r_min=2",
    "r_max=8",
    "lambda_=1.0",
    "gamma=0.8",
]


def _run(*args):
    return CliRunner().invoke(app, ["run", *args])


def _sets(items):
    return [x for item in items for x in ("--set", item)]


def _untimed(value):
    """``value`` without its timings (keys ending in ``_s``, at any depth)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not k.endswith("_s")}
    return value


def _rows(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [_untimed(json.loads(line)) for line in lines]


def test_a_finished_run_extended_by_a_round_equals_a_straight_run(tiny_model, tmp_path):
    model = f"model='{tiny_model}'"
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    res = _run("--out", str(straight), *_sets([model, "rounds=3", *SETTINGS]))
    assert res.exit_code == 0, res.output
    res = _run("--out", str(extended), *_sets([model, "rounds=2", *SETTINGS]))
    assert res.exit_code == 0, res.output
    assert len(_rows(extended)) == 3  # rounds 0-2: finished

    res = _run("--resume", str(extended), "--set", "rounds=1")
    assert res.exit_code == 2 and "rounds must be at least 2" in res.stderr, res.output
    res = _run("--resume", str(extended), "--set", "rounds=3", "--set", "lr=0.02")
    assert res.exit_code == 2 and "differs in: lr" in res.stderr, res.output
    res = _run("--resume", str(extended), "--set", "rounds=3")
    assert res.exit_code == 0, res.output

    assert _rows(extended) == _rows(straight)
    assert tomllib.loads((extended / "config.toml").read_text())["rounds"] == 3
    a, b = (json.loads((d / "summary.json").read_text()) for d in (extended, straight))
    for key in (
        "final_ppl",
        "best_ppl",
        "tier_ppl",
        "rouge_l",
        "rounds",
        "bytes_up",
        "bytes_down",
        "flops",
    ):
        assert a[key] == b[key], key
    fa, _ = read_adapter(extended / "adapter")
    fb, _ = read_adapter(straight / "adapter")
    assert fa.keys() == fb.keys()
    for name in fa:
        assert torch.equal(fa[name][0], fb[name][0]) and torch.equal(fa[name][1], fb[name][1])


def test_more_rounds_are_refused_where_the_noise_was_calibrated_for_the_plan(tmp_path):
    from hetlora.errors import HetLoRAError
    from hetlora.runtime.checkpoint import check_matches

    saved = {"rounds": 2, "dp_target_epsilon": 3.0}
    payload = {"config": saved, "round": 2, "model": "m", "data": "d"}
    from hetlora.config import Config

    config = {**Config().to_dict(), **saved, "rounds": 3}
    try:
        check_matches(payload, config, "m", "d")
    except HetLoRAError as exc:
        assert "calibrated for 2 rounds" in str(exc)
    else:
        raise AssertionError("a DP run with a target epsilon was extended")
    check_matches(payload, {**config, "rounds": 2}, "m", "d")  # the same plan resumes


def test_a_dp_run_with_a_given_sigma_extends_as_a_straight_one(tiny_model, tmp_path):
    """With sigma given (no target epsilon) more rounds are allowed: the accountant composes them
    all, the seeded noise goes on, and the summary's planned rounds are the new ones."""
    dp = ["pruning=false", "aggregation='uniform'", "dp_clip_norm=0.05"]
    dp += ["dp_noise_multiplier=1.0", "dp_noise_seed=5", "rouge_examples=0", "eval_examples=8"]
    settings = [f"model='{tiny_model}'", *[s for s in SETTINGS if not s.startswith("lambda_")]]
    settings = [s for s in settings if not s.startswith(("gamma", "rouge", "eval_ex"))] + dp
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    assert _run("--out", str(straight), *_sets([*settings, "rounds=2"])).exit_code == 0
    assert _run("--out", str(extended), *_sets([*settings, "rounds=1"])).exit_code == 0
    res = _run("--resume", str(extended), "--set", "rounds=2")
    assert res.exit_code == 0, res.output
    assert _rows(extended) == _rows(straight)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (extended, straight))
    assert a["dp_planned_rounds"] == b["dp_planned_rounds"] == 2
    assert a["epsilon"] == b["epsilon"] > 0

"""The paper-regime study's machinery on the tiny model: the validation split in a run, rank
dynamics in metrics.jsonl, and seeded comparisons tuned on validation."""

from __future__ import annotations

import json
import math

import pytest

from hetlora.config import make_config
from hetlora.runtime.local import LocalRun

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
    plain = LocalRun(make_config({"model": str(tiny_model), **FAST}))
    cfg = make_config({"model": str(tiny_model), **FAST, "val_fraction": 0.2, "eval_every": 2})
    sim = LocalRun(cfg)
    # the test set is the one a run without validation has; training gives up the validation
    assert sim.model.eval_examples == plain.model.eval_examples
    assert len(sim.model.val_items) == 16 and not set(sim.model.val_items) & set(
        sim.model.eval_items
    )
    for c in sim.client_ids:
        assert len(sim.ws.train_data[c]) == 30 - 6 - 6 < len(plain.ws.train_data[c]) == 24
    summary = sim.run(tmp_path / "run")
    rows = rows_of(tmp_path / "run")
    evaluated = [r for r in rows if "test_ppl" in r]
    assert [r["round"] for r in evaluated] == [0, 2, 3]
    for r in evaluated:
        assert r["val_ppl"] > 1 and r["test_ppl"] > 1 and r["val_ppl"] != r["test_ppl"]
    best = min(evaluated, key=lambda r: r["val_ppl"])
    assert summary["final_val_ppl"] == evaluated[-1]["val_ppl"]
    assert summary["best_val_ppl"] == best["val_ppl"]
    assert summary["best_val_round"] == best["round"]
    assert summary["test_ppl_at_best_val"] == best["test_ppl"]
    assert summary["final_ppl"] == evaluated[-1]["test_ppl"]  # final_ppl stays the test set
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
    LocalRun(cfg).run(tmp_path / padding)
    rows = rows_of(tmp_path / padding)
    assert rows[0]["global_rank"] == 0  # PEFT's init: B = 0, so no position adds to B A
    expected, tops = None, []
    for r in rows[1:]:
        tops.append(max(r["client_ranks"].values()))
        expected = tops[-1] if expected is None else join(expected, tops[-1])
        assert r["global_rank"] == r["global_rank_min"] == expected
        assert len(r["ranks"]) == 6 and all(2 <= v <= 8 for v in r["ranks"].values())
    assert len(set(tops)) > 1  # the rounds' largest ranks differ: the rule is visible


SEEDED = """
rounds = 2
clients_per_round = 2
local_steps = 2
batch_size = 4
eval_examples = 8
rouge_examples = 0
precision = "fp32"
min_examples = 100
max_clients = 4
max_examples_per_client = 20
max_seq_len = 32
val_fraction = 0.2
r_min = 2
r_max = 6
seeds = [0, 1]

[[compare]]
name = "H, lr 1e-4"
group = "H"
lr = 1e-4

[[compare]]
name = "H, lr 3e-2"
group = "H"
lr = 3e-2
lambda_ = 0.5

[[compare]]
name = "Hom r=2"
method = "homlora"
rank = 2
lr = 3e-2
seeds = [1]
"""


def test_seeded_comparison_tunes_on_validation_and_resumes_per_seed(
    tiny_model, tmp_path, monkeypatch
):
    import csv

    from typer.testing import CliRunner

    from hetlora.cli import app
    from hetlora.study import compare as compare_mod

    config = tmp_path / "study.toml"
    config.write_text(f"model = '{tiny_model}'\n" + SEEDED)
    entries = compare_mod.load_comparison(config)
    assert [(e.slug, e.seed) for e in entries] == [
        ("h-lr-1e-4/seed-0", 0),
        ("h-lr-1e-4/seed-1", 1),
        ("h-lr-3e-2/seed-0", 0),
        ("h-lr-3e-2/seed-1", 1),
        ("hom-r-2/seed-1", 1),
    ]
    assert [e.cfg.seed for e in entries] == [0, 1, 0, 1, 1]

    # Interrupted in the second seed of the second grid point: resuming keeps the rest.
    real_round = LocalRun.run_round

    def interrupted(self):
        if self.cfg.lr == 3e-2 and self.cfg.seed == 1 and self.round == 1:
            raise KeyboardInterrupt
        return real_round(self)

    out = tmp_path / "study"
    monkeypatch.setattr(LocalRun, "run_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare_mod.run_comparison(entries, out)
    monkeypatch.setattr(LocalRun, "run_round", real_round)
    kept = (out / "h-lr-3e-2" / "seed-0" / "metrics.jsonl").read_text()
    assert compare_mod._resume_state(entries[3], out / entries[3].slug) == "partial"
    args = ["compare", "--config", str(config), "--out", str(out), "--resume"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "H, lr 3e-2, seed 0 (finished earlier, kept)" in result.output
    assert (out / "h-lr-3e-2" / "seed-0" / "metrics.jsonl").read_text() == kept

    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["name"], r["method"], r["seed"]) for r in rows] == [
        ("H, lr 1e-4", "H", "0"),
        ("H, lr 1e-4", "H", "1"),
        ("H, lr 3e-2", "H", "0"),
        ("H, lr 3e-2", "H", "1"),
        ("Hom r=2", "Hom r=2", "1"),
    ]
    for r in rows:
        summary = json.loads((out / _slug_of(r) / "summary.json").read_text())
        assert float(r["val_ppl"]) == pytest.approx(summary["final_val_ppl"])
        assert float(r["test_ppl"]) == pytest.approx(summary["final_ppl"])
    assert [float(r["lr"]) for r in rows] == [1e-4, 1e-4, 3e-2, 3e-2, 3e-2]
    assert rows[2]["lambda_"] == "0.5" and rows[4]["lambda_"] == "nan"  # homlora: no lambda

    # The grid point is chosen on the validation perplexity averaged over the seeds.
    val = {
        n: [float(r["val_ppl"]) for r in rows if r["name"] == n]
        for n in ("H, lr 1e-4", "H, lr 3e-2")
    }
    winner = min(val, key=lambda n: sum(val[n]) / 2)
    assert [r["selected"] for r in rows[:4]] == [str(r["name"] == winner) for r in rows[:4]]
    with (out / "summary.csv").open() as fh:
        summary_rows = {r["method"]: r for r in csv.DictReader(fh)}
    h = summary_rows["H"]
    tests = [float(r["test_ppl"]) for r in rows if r["name"] == winner]
    assert h["entry"] == winner and h["seeds"] == "2"
    assert float(h["test_mean"]) == pytest.approx(sum(tests) / 2)
    assert float(h["test_std"]) == pytest.approx(abs(tests[0] - tests[1]) / 2**0.5)
    assert h["test_per_seed"] == f"s0: {tests[0]:.2f}; s1: {tests[1]:.2f}"
    assert h["selected_on"].startswith("val")
    assert summary_rows["Hom r=2"]["seeds"] == "1" and summary_rows["Hom r=2"]["test_std"] == "nan"
    assert "| H | " in (out / "summary.md").read_text()
    with (out / "curves.csv").open() as fh:
        curves = [r for r in csv.DictReader(fh) if r["method"] == "H"]
    assert curves and {r["seeds"] for r in curves} == {"2"}  # the winner's two seeds
    assert float(curves[-1]["test_mean"]) == pytest.approx(sum(tests) / 2)
    # Paired by seed against the first method (no "HetLoRA" here): only seed 1 is common.
    with (out / "paired.csv").open() as fh:
        (pair,) = list(csv.DictReader(fh))
    hom = next(r for r in rows if r["method"] == "Hom r=2")
    ref = next(r for r in rows if r["name"] == winner and r["seed"] == "1")
    diff = float(hom["test_ppl"]) - float(ref["test_ppl"])
    assert (pair["method"], pair["reference"], pair["seeds"]) == ("Hom r=2", "H", "1")
    assert float(pair["diff_mean"]) == pytest.approx(diff)
    assert pair["diff_per_seed"] == f"s1: {diff:+.2f}"
    for name in ("ppl_vs_round.png", "val_vs_round.png", "rank_dynamics.png"):
        assert (out / name).stat().st_size > 1000, name
    with (out / "rank_dynamics.csv").open() as fh:
        dynamics = list(csv.DictReader(fh))
    assert {r["method"] for r in dynamics} == {"H", "Hom r=2"}
    assert all(float(r["global_rank_max"]) <= 6 for r in dynamics)  # the study's r_max


def _slug_of(row):
    from hetlora.study.compare import _slug

    return f"{_slug(row['name'])}/seed-{row['seed']}"


def test_seeds_errors(tmp_path):
    from hetlora.errors import HetLoRAError
    from hetlora.study.compare import load_comparison

    config = tmp_path / "c.toml"
    for text, match in (
        ('seeds = [0, 1]\nseed = 3\n[[compare]]\nname = "a"\n', "either seeds"),
        ('seeds = [0, 0]\n[[compare]]\nname = "a"\n', "distinct"),
        ('seeds = [0, 1]\n[[compare]]\nname = "a"\nseeds = [2]\n', "not all in"),
        ('[[compare]]\nname = "a"\nseeds = [0]\n', "top-level seeds"),
        ('seeds = [0]\n[[compare]]\nname = "a"\nseed = 1\n', "either seeds"),
    ):
        config.write_text(text)
        with pytest.raises(HetLoRAError, match=match):
            load_comparison(config)


def test_two_stage_tuning_runs_only_the_winner_on_the_other_seeds(tiny_model, tmp_path):
    """``tune_seeds``: every grid point runs on the tune seeds, only the winner (lowest mean
    validation perplexity there, the report's own rule) runs on the others; groups run in turn;
    a stopped study is reported on its finished runs."""
    import csv

    from hetlora.study import compare as compare_mod
    from hetlora.study.report import report

    config = tmp_path / "study.toml"
    config.write_text(
        f"model = '{tiny_model}'\n"
        + SEEDED.replace("seeds = [0, 1]", "seeds = [0, 1]\ntune_seeds = [0]")
    )
    entries = compare_mod.load_comparison(config)
    assert [(e.slug, e.deferred) for e in entries] == [
        ("h-lr-1e-4/seed-0", False),
        ("h-lr-1e-4/seed-1", True),
        ("h-lr-3e-2/seed-0", False),
        ("h-lr-3e-2/seed-1", True),
        ("hom-r-2/seed-1", False),  # a group of one has nothing to tune: all its seeds run
    ]
    started = []
    out = tmp_path / "study"
    compare_mod.run_comparison(entries, out, progress=lambda ev: started.append(ev.get("name")))
    tuned = {
        name: json.loads((out / slug / "seed-0" / "summary.json").read_text())["final_val_ppl"]
        for name, slug in (("H, lr 1e-4", "h-lr-1e-4"), ("H, lr 3e-2", "h-lr-3e-2"))
    }
    winner = min(tuned, key=tuned.get)
    loser = next(n for n in tuned if n != winner)
    assert [n for n in started if n] == [
        "H, lr 1e-4, seed 0",
        "H, lr 3e-2, seed 0",
        f"{winner}, seed 1",
        "Hom r=2, seed 1",
    ]
    assert not (out / compare_mod._slug(loser) / "seed-1").exists()
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    assert sorted((r["name"], r["seed"]) for r in runs) == sorted(
        [("H, lr 1e-4", 0), ("H, lr 3e-2", 0), (winner, 1), ("Hom r=2", 1)]
    )
    with (out / "summary.csv").open() as fh:
        h = next(r for r in csv.DictReader(fh) if r["method"] == "H")
    assert h["entry"] == winner and h["seeds"] == "2"
    assert h["selected_on"] == "val (mean over tune seeds 0)"

    # Resuming the finished study runs nothing, and lists every finished run from its start
    # (the winner's later seed too: a report made while a resumed study runs shows it).
    started.clear()
    listed = []

    def progress(ev):
        started.append(ev)
        if not listed:
            runs = json.loads((out / "comparison.json").read_text())["runs"]
            listed.extend((r["name"], r["seed"]) for r in runs)

    compare_mod.run_comparison(entries, out, resume=True, progress=progress)
    assert all(ev.get("state") == "done" for ev in started if ev.get("event") == "method_start")
    assert (winner, 1) in listed and len(listed) == 4
    (out / "hom-r-2" / "seed-1" / "summary.json").unlink()
    result = report(out)
    assert result["missing"] == ["hom-r-2/seed-1"]
    assert {r["method"] for r in result["summary"]} == {"H"}


def test_tune_seeds_errors(tmp_path):
    from hetlora.errors import HetLoRAError
    from hetlora.study.compare import load_comparison

    config = tmp_path / "c.toml"
    for text in (
        'tune_seeds = [0]\n[[compare]]\nname = "a"\n',
        'seeds = [0, 1]\ntune_seeds = [0, 1]\n[[compare]]\nname = "a"\n',
        'seeds = [0, 1]\ntune_seeds = [2]\n[[compare]]\nname = "a"\n',
    ):
        config.write_text(text)
        with pytest.raises(HetLoRAError, match="proper subset"):
            load_comparison(config)


def test_paper_config_plans_the_documented_runs():
    """configs/paper.toml as docs/reproduction.md describes it: 30 grid points on seed 0 (every LoRA
    setting at lr 3e-4, 1e-3 and 3e-3; full FT at 1e-5, 3e-5, 1e-4), each
    method's winner on seeds 1 and 2 (18 runs), and the same-lambda HetLoRA reference (a group
    of one) on all three seeds."""
    from pathlib import Path

    from hetlora.study.compare import load_comparison

    entries = load_comparison(Path(__file__).parents[1] / "configs" / "paper.toml")
    reference = "HetLoRA [5, 50] at lambda 0.01"
    first = [e for e in entries if not e.deferred and e.group != reference]
    assert len(first) == 30 and {e.seed for e in first} == {0}
    lora = [e for e in first if e.cfg.method != "full_ft"]
    settings = {(e.group, e.cfg.lambda_): set() for e in lora}
    for e in lora:
        settings[(e.group, e.cfg.lambda_)].add(e.cfg.lr)
    assert all(rates == {3e-4, 1e-3, 3e-3} for rates in settings.values())
    assert [(e.seed, e.cfg.lambda_, e.cfg.lr) for e in entries if e.group == reference] == [
        (s, 0.01, 1e-3) for s in (0, 1, 2)
    ]
    groups = {e.group for e in entries}
    assert len(groups) == 10
    later = {(e.group, e.seed) for e in entries if e.deferred}
    assert len(later) == 18 and {g for g, _ in later} == groups - {reference}
    for e in entries:
        ranks = (4, 16) if e.cfg.method == "full_ft" else (5, 50)  # r_min, r_max: LoRA only
        assert (e.cfg.r_min, e.cfg.r_max, e.cfg.clients_per_round) == (*ranks, 5)
        assert (e.cfg.local_steps, e.cfg.batch_size, e.cfg.gamma) == (5, 8, 0.99)


def test_paper_long_config_repeats_the_study_at_twice_the_budget():
    """configs/paper-long.toml: the 12-round study's chosen settings for HetLoRA, HomLoRA r=5 and
    full FT, 24 rounds, seeds 0-2, every other key as in configs/paper.toml (so rounds 1-12
    repeat the study's runs)."""
    from pathlib import Path

    from hetlora.study.compare import load_comparison

    configs = Path(__file__).parents[1] / "configs"
    study = {(e.name, e.seed): e.cfg for e in load_comparison(configs / "paper.toml")}
    entries = load_comparison(configs / "paper-long.toml")
    assert [(e.name, e.seed) for e in entries] == [
        (name, seed)
        for name in (
            "HetLoRA [5, 50], lr 1e-3, lambda 0.1",
            "HomLoRA r=5, lr 1e-3",
            "Full FT, lr 1e-5",
        )
        for seed in (0, 1, 2)
    ]
    for e in entries:
        assert e.cfg.rounds == 24 and not e.deferred
        same = study[(e.name, 0)].to_dict() | {"rounds": 24, "seed": e.seed}
        assert e.cfg.to_dict() == same


def test_paired_differences_are_taken_seed_by_seed():
    from hetlora.study.report import paired, reference_method

    study = ["HomLoRA r=5", "HomLoRA r=50", "HetLoRA [5, 50]", "HetLoRA no pruning"]
    assert reference_method(study) == "HetLoRA [5, 50]"
    assert reference_method(["H", "Hom r=2"]) == "H"

    def run(method, seed, test, val):
        return {"method": method, "seed": seed, "test_ppl": test, "val_ppl": val}

    picked = {
        "HetLoRA": [run("HetLoRA", 0, 50.0, 52.0), run("HetLoRA", 1, 40.0, 45.0)],
        "HomLoRA r=5": [run("HomLoRA r=5", 0, 53.0, 55.0), run("HomLoRA r=5", 1, 41.0, 47.0)],
        "FLoRA": [run("FLoRA", 1, 38.0, 44.0), run("FLoRA", 2, 30.0, 31.0)],
    }
    rows = {r["method"]: r for r in paired(picked, "HetLoRA")}
    assert set(rows) == {"HomLoRA r=5", "FLoRA"}
    hom = rows["HomLoRA r=5"]
    assert hom["seeds"] == 2 and hom["diff_mean"] == pytest.approx(2.0)
    assert hom["diff_std"] == pytest.approx(2**0.5)  # diffs +3 and +1, ddof 1
    assert hom["diff_per_seed"] == "s0: +3.00; s1: +1.00"
    assert hom["val_diff_mean"] == pytest.approx(2.5)
    flora = rows["FLoRA"]  # seed 2 has no reference run: left out
    assert flora["seeds"] == 1 and flora["diff_mean"] == pytest.approx(-2.0)
    assert math.isnan(flora["diff_std"])


def test_rank_table_summarises_global_and_client_ranks_per_round():
    from hetlora.study.report import rank_rows

    seed0 = [
        {"round": 0, "global_rank": 8},
        {"round": 1, "global_rank": 6, "ranks": {"a": 8, "b": 4}},
    ]
    seed1 = [
        {"round": 0, "global_rank": 8},
        {"round": 1, "global_rank": 4, "ranks": {"a": 6, "c": 2}},
        {"round": 2, "global_rank": 4, "ranks": {"a": 6}},  # past the shorter seed: left out
    ]
    rows = rank_rows({"HetLoRA": [seed0, seed1], "Full FT": [[{"round": 0}, {"round": 1}]]})
    assert [(r["method"], r["round"]) for r in rows] == [("HetLoRA", 0), ("HetLoRA", 1)]
    first, second = rows
    assert (first["global_rank_mean"], first["seeds"]) == (8, 2)
    assert math.isnan(first["client_rank_mean"])
    assert (second["global_rank_mean"], second["global_rank_min"], second["global_rank_max"]) == (
        5,
        4,
        6,
    )
    assert second["client_rank_mean"] == 5 and second["client_rank_min"] == 2
    assert second["client_rank_max"] == 8


def test_curve_table_gives_each_evaluated_round_over_seeds():
    """curves.csv: test and validation perplexity per evaluated round, over the seeds; rounds
    without an evaluation, or evaluated in only some seeds, are left out."""
    from hetlora.study.report import curve_rows

    seed0 = [
        {"round": 0, "test_ppl": 100.0, "val_ppl": 110.0},
        {"round": 1, "train_loss": 4.0},
        {"round": 2, "test_ppl": 60.0, "val_ppl": 62.0},
        {"round": 4, "test_ppl": 58.0, "val_ppl": 61.0},
    ]
    seed1 = [
        {"round": 0, "test_ppl": 90.0, "val_ppl": 100.0},
        {"round": 2, "test_ppl": 50.0, "val_ppl": 56.0},
    ]
    rows = curve_rows({"H": [seed0, seed1], "FT": [[{"round": 0, "test_ppl": 80.0}]]})
    assert [(r["method"], r["round"], r["seeds"]) for r in rows] == [
        ("H", 0, 2),
        ("H", 2, 2),
        ("FT", 0, 1),
    ]
    h2 = rows[1]
    assert (h2["test_mean"], h2["test_min"], h2["test_max"]) == (55.0, 50.0, 60.0)
    assert h2["test_std"] == pytest.approx(50**0.5)  # 60 and 50, ddof 1
    assert (h2["val_mean"], h2["val_std"]) == (59.0, pytest.approx(18**0.5))
    ft = rows[2]
    assert ft["test_mean"] == 80.0 and math.isnan(ft["test_std"]) and math.isnan(ft["val_mean"])

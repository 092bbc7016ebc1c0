"""`hetlora compare` of every method on the tiny model: one row per method, tables and plots."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from hetlora.cli import app

COMPARISON = """
rounds = 2
clients_per_round = 2
local_steps = 2
batch_size = 4
lr = 0.01
eval_examples = 16
rouge_examples = 1
max_new_tokens = 4
precision = "fp32"
min_examples = 120
r_min = 2
r_max = 8

[[compare]]
name = "HetLoRA [2, 8]"
method = "hetlora"
lambda_ = 5.0
gamma = 0.5

[[compare]]
name = "HetLoRA no pruning"
method = "hetlora"
pruning = false

[[compare]]
name = "Zero-pad uniform"
method = "hetlora"
aggregation = "uniform"

[[compare]]
name = "Zero-pad data-size"
method = "hetlora"
aggregation = "data_size"

[[compare]]
name = "HetLoRA per-module"
method = "hetlora"
per_module_weights = true

[[compare]]
name = "HomLoRA r=2"
method = "homlora"
rank = 2

[[compare]]
name = "Recon+SVD"
method = "recon_svd"

[[compare]]
name = "HLoRA"
method = "hlora"

[[compare]]
name = "RB-LoRA"
method = "rblora"

[[compare]]
name = "FedEx-LoRA"
method = "fedex"

[[compare]]
name = "FLoRA"
method = "flora"

[[compare]]
name = "Full FT"
method = "full_ft"
"""


def test_compare_all_methods_then_report(tiny_model, tmp_path):
    config = tmp_path / "compare.toml"
    config.write_text(COMPARISON)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app,
        ["compare", "--config", str(config), "--out", str(out), "--set", f"model='{tiny_model}'"],
    )
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == [
        "HetLoRA [2, 8]",
        "HetLoRA no pruning",
        "Zero-pad uniform",
        "Zero-pad data-size",
        "HetLoRA per-module",
        "HomLoRA r=2",
        "Recon+SVD",
        "HLoRA",
        "RB-LoRA",
        "FedEx-LoRA",
        "FLoRA",
        "Full FT",
    ]
    for r in rows:
        assert (
            float(r["final_ppl"]) > 0
            and float(r["total_bytes"]) > 0
            and float(r["client_flops"]) > 0
        )
    by_name = {r["name"]: r for r in rows}
    for name in ("FLoRA", "Full FT"):  # no adapter: merged into the base
        assert by_name[name]["global_rank"] == "nan"
    assert by_name["HomLoRA r=2"]["global_rank"] == "2.0"
    for r in rows[:5]:  # the saved global adapter's positions in use, at most r_max = 8
        assert 1 <= float(r["global_rank"]) <= 8
    full = next(r for r in rows if r["name"] == "Full FT")
    het = rows[0]
    assert float(full["total_bytes"]) > 10 * float(het["total_bytes"])
    md = (out / "results.md").read_text()
    assert md.count("\n") == 2 + len(rows)
    plots = ["ppl_vs_round.png", "ppl_vs_bytes.png", "ppl_vs_flops.png", "ranks.png"]
    for name in plots:
        assert (out / name).stat().st_size > 1000, name
        (out / name).unlink()
    (out / "results.md").unlink()
    redraw = CliRunner().invoke(app, ["report", str(out)])
    assert redraw.exit_code == 0, redraw.output
    assert (out / "results.md").read_text() == md
    for name in plots:
        assert (out / name).exists()


def test_compare_errors(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('rounds = 1\n[[compare]]\nname = "a"\nmethod = "nope"\n')
    result = CliRunner().invoke(
        app, ["compare", "--config", str(config), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "entry 'a'" in result.stderr and "method" in result.stderr
    config.write_text("rounds = 1\n")
    result = CliRunner().invoke(
        app, ["compare", "--config", str(config), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "no [[compare]] entries" in result.stderr
    config.write_text('rounds = 1\n[[compare]]\nname = "a"\ngroup = "G"\n')
    result = CliRunner().invoke(
        app, ["compare", "--config", str(config), "--out", str(tmp_path / "o"), "--only", "X"]
    )
    assert result.exit_code == 2 and "--only X matches no entry" in result.stderr
    assert "its groups: G" in result.stderr
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "neither a run nor a comparison" in result.stderr


def test_groups_keep_the_best_of_a_grid(tiny_model, tmp_path):
    config = tmp_path / "grid.toml"
    config.write_text(
        "rounds = 1\nclients_per_round = 2\nlocal_steps = 2\nbatch_size = 4\neval_examples = 8\n"
        'rouge_examples = 0\nprecision = "fp32"\nmin_examples = 150\nr_min = 2\nr_max = 4\n'
        '[[compare]]\nname = "H, lr 1e-4"\ngroup = "H"\nlr = 1e-4\n'
        '[[compare]]\nname = "H, lr 3e-2"\ngroup = "H"\nlr = 3e-2\n'
        '[[compare]]\nname = "Hom"\nmethod = "homlora"\nlr = 3e-2\n'
    )
    out = tmp_path / "grid"
    args = ["compare", "--config", str(config), "--out", str(out), "--set", f"model='{tiny_model}'"]
    assert CliRunner().invoke(app, args).exit_code == 0
    with (out / "results.csv").open() as fh:
        rows = {r["name"]: float(r["final_ppl"]) for r in csv.DictReader(fh)}
    with (out / "best.csv").open() as fh:
        best = [r["name"] for r in csv.DictReader(fh)]
    winner = min(("H, lr 1e-4", "H, lr 3e-2"), key=rows.get)
    assert best == [f"H ({winner})", "Hom"]
    only = tmp_path / "only"
    args = ["compare", "--config", str(config), "--out", str(only), "--only", "Hom"]
    assert CliRunner().invoke(app, [*args, "--set", f"model='{tiny_model}'"]).exit_code == 0
    with (only / "results.csv").open() as fh:
        kept = {r["name"]: float(r["final_ppl"]) for r in csv.DictReader(fh)}
    assert kept == {"Hom": pytest.approx(rows["Hom"], rel=1e-6)}  # the same run, alone


def test_resume_keeps_finished_methods_and_continues_the_interrupted_one(
    tiny_model, tmp_path, monkeypatch
):
    from hetlora.runtime.local import LocalRun
    from hetlora.study import compare as compare_mod

    base = (
        f"model = '{tiny_model}'\nrounds = 2\nclients_per_round = 2\nlocal_steps = 2\n"
        'batch_size = 4\nlr = 0.01\neval_examples = 8\nrouge_examples = 0\nprecision = "fp32"\n'
        "min_examples = 150\nr_min = 2\nr_max = 4\n"
        '[[compare]]\nname = "A"\n[[compare]]\nname = "B"\nmethod = "homlora"\nrank = 2\n'
    )
    config = tmp_path / "c.toml"
    config.write_text(base)
    straight = tmp_path / "straight"
    compare_mod.run_comparison(compare_mod.load_comparison(config), straight)

    # The same comparison, stopped in B's second round (B's round 1 is checkpointed).
    real_round = LocalRun.run_round

    def interrupted(self):
        if self.cfg.method == "homlora" and self.round == 1:
            raise KeyboardInterrupt
        return real_round(self)

    out = tmp_path / "out"
    monkeypatch.setattr(LocalRun, "run_round", interrupted)
    try:
        compare_mod.run_comparison(compare_mod.load_comparison(config), out)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(LocalRun, "run_round", real_round)
    assert (out / "a" / "summary.json").is_file() and not (out / "b" / "summary.json").exists()
    a_metrics = (out / "a" / "metrics.jsonl").read_text()
    a_entry, b_entry = compare_mod.load_comparison(config)
    assert compare_mod._resume_state(a_entry, out / "a") == "done"
    assert compare_mod._resume_state(b_entry, out / "b") == "partial"  # from its checkpoint

    # Resuming, with a method added: A is kept as it is, B goes on from round 1, C runs.
    config.write_text(base + '[[compare]]\nname = "C"\nmethod = "flora"\n')
    args = ["compare", "--config", str(config), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "not empty" in result.stderr  # no silent overwrite
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "A (finished earlier, kept)" in result.output
    assert (out / "a" / "metrics.jsonl").read_text() == a_metrics
    ppl = {}
    for folder in (straight / "b", out / "b"):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        ppl[folder.parent.name] = [r["test_ppl"] for r in rows if "test_ppl" in r]
    assert ppl["out"] == pytest.approx(ppl["straight"], rel=1e-6)
    with (out / "results.csv").open() as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == ["A", "B", "C"]

    # A folder that holds a run of another config is refused, and nothing is overwritten.
    config.write_text(base.replace("lr = 0.01", "lr = 0.02"))
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 2 and "another config" in result.stderr
    assert (out / "a" / "metrics.jsonl").read_text() == a_metrics
    result = CliRunner().invoke(app, [*args, "--resume", "--overwrite"])
    assert result.exit_code == 2 and "cannot be used together" in result.stderr


def test_adapter_rank_counts_positions_where_both_factors_live(tmp_path):
    import torch
    from safetensors.torch import save_file

    from hetlora.study.report import adapter_rank

    (tmp_path / "adapter").mkdir()
    a, b = torch.randn(8, 5), torch.randn(6, 8)
    a[5:] = 0  # positions 5..7 dead in A
    b[:, 3] = 0  # position 3 dead in B only: B A gets nothing from it either
    a2, b2 = torch.randn(8, 5), torch.randn(6, 8)
    a2[2:] = 0
    prefix = "base_model.model.layers.0.self_attn"
    save_file(
        {
            f"{prefix}.q_proj.lora_A.weight": a,
            f"{prefix}.q_proj.lora_B.weight": b,
            f"{prefix}.v_proj.lora_A.weight": a2,
            f"{prefix}.v_proj.lora_B.weight": b2,
        },
        str(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    assert adapter_rank(tmp_path) == 4.0  # q: positions 0, 1, 2, 4; v: 0, 1
    assert adapter_rank(tmp_path / "missing") != adapter_rank(tmp_path / "missing")  # NaN


def test_adapter_rank_of_a_run_kept_without_its_adapter_is_its_last_live_rank(tmp_path):
    """The study's committed runs keep summary.json but not adapter/: the table's global rank
    then comes from the last round's live rank, and stays NaN for a method without one."""
    from hetlora.study.report import adapter_rank

    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "summary.json").write_text(json.dumps({"global_rank_final": 37}))
    (tmp_path / "flora").mkdir()
    (tmp_path / "flora" / "summary.json").write_text(json.dumps({"method": "flora"}))
    assert adapter_rank(tmp_path / "lora") == 37.0
    assert math.isnan(adapter_rank(tmp_path / "flora"))

"""tools/privacy_report.py: the privacy-utility table and plot from a study's reports."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).parents[1] / "tools" / "privacy_report.py"


def _tool():
    spec = importlib.util.spec_from_file_location("privacy_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(root: Path) -> Path:
    provenance = {"commit": "abcdef0123", "host": {"cpu": "Test CPU"}}
    groups = [
        ("HetLoRA, no DP", "HetLoRA, no DP", [50.0, 52.0], {}),
        (
            "HetLoRA, eps 8",
            "HetLoRA, eps 8, C 0.1",
            [80.0, 84.0],
            {"epsilon": 7.99, "delta": 1e-5, "dp_noise_multiplier": 1.18, "dp_clip_norm": 0.1},
        ),
    ]
    with (root / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "entry", "seeds", "test_mean", "test_std", "test_per_seed"])
        for method, entry, ppl, dp in groups:
            per_seed = "; ".join(f"s{i}: {p:.2f}" for i, p in enumerate(ppl))
            writer.writerow([method, entry, 2, sum(ppl) / 2, 1.41, per_seed])
            slug = entry.lower().replace(", ", "-").replace(" ", "-").replace(".", "-")
            for seed, p in enumerate(ppl):
                run = root / slug / f"seed-{seed}"
                run.mkdir(parents=True)
                summary = {"final_ppl": p, "base_ppl": 120.0, "provenance": provenance, **dp}
                (run / "summary.json").write_text(json.dumps(summary))
    return root


def test_the_table_and_plot_come_from_the_chosen_runs(tmp_path, capsys):
    study = _study(tmp_path)
    assert _tool().main([str(study)]) == 0
    text = (study / "privacy_utility.md").read_text()
    assert "commit abcdef0 on Test CPU" in text
    assert "| HetLoRA | inf | inf | - | - | 2 | 51.00 ± 1.41 | 50.00, 52.00 |" in text
    assert "| HetLoRA | 8 | 7.99 (1e-05) | 1.180 | 0.1 | 2 | 82.00 ± 1.41 | 80.00, 84.00 |" in text
    assert (study / "privacy_utility.png").stat().st_size > 1000
    assert "plot:" in capsys.readouterr().out


def test_the_grid_of_c_marks_the_chosen_point_and_an_edge(tmp_path):
    study = _study(tmp_path)
    runs = [{"name": "HetLoRA, no DP", "dir": "hetlora-no-dp/seed-0", "seed": 0}]
    for clip, val in ((0.01, 90.0), (0.1, 85.0), (1.0, 140.0)):
        name = f"HetLoRA, eps 8, C {clip:g}"
        folder = name.lower().replace(", ", "-").replace(" ", "-").replace(".", "-") + "/seed-0"
        (study / folder).mkdir(parents=True, exist_ok=True)
        summary = {"final_ppl": val, "final_val_ppl": val, "dp_clip_norm": clip}
        if clip == 0.1:  # the chosen run the table reads keeps its facts
            summary = {**json.loads((study / folder / "summary.json").read_text()), **summary}
        (study / folder / "summary.json").write_text(json.dumps(summary))
        runs.append({"name": name, "dir": folder, "group": "HetLoRA, eps 8", "seed": 0})
    runs.append(
        {"name": "HetLoRA, eps 8, C 0.1", "dir": "x/seed-1", "group": "HetLoRA, eps 8", "seed": 1}
    )
    (study / "comparison.json").write_text(json.dumps({"runs": runs}))
    (study / "x/seed-1").mkdir(parents=True)  # the winner's other seed: not a tune seed
    (study / "x/seed-1/summary.json").write_text(
        json.dumps({"final_ppl": 50.0, "final_val_ppl": 50.0, "dp_clip_norm": 0.1})
    )
    tool = _tool()
    assert tool.main([str(study)]) == 0
    text = (study / "privacy_utility.md").read_text()
    assert "The base model's test perplexity: 120.00." in text
    assert "| HetLoRA, eps 8 | 0.01: 90.00 · **0.1: 85.00** · 1: 140.00 | 0 | no |" in text
    found = tool.rows(study)
    # the same grid with its lower edge chosen
    edge = [{**r, "entry": "HetLoRA, eps 8, C 0.01"} if r["target"] == 8 else r for r in found]
    assert "| HetLoRA, eps 8 | **0.01: 90.00** · 0.1: 85.00 · 1: 140.00 | 0 | yes |" in tool.grids(
        study, edge
    )
    # a study under way whose points share no seed yet: NaN, as the study's own choice has it
    listed = json.loads((study / "comparison.json").read_text())["runs"]
    only_one = [r for r in listed if r["seed"] == 1 or r["name"] != "HetLoRA, eps 8, C 0.1"]
    (study / "comparison.json").write_text(json.dumps({"runs": only_one}))
    assert "0.01: nan · **0.1: nan** · 1: nan |  | no |" in tool.grids(study, found)


def test_a_study_without_reports_is_an_error(tmp_path, capsys):
    assert _tool().main([str(tmp_path)]) == 2
    assert "summary.csv" in capsys.readouterr().err


def test_norms_are_the_clients_update_norms(tmp_path, capsys):
    run = tmp_path / "a"
    run.mkdir()
    rows = [
        {"round": 0},
        {"round": 1, "clients": {"x": {"update_norm": 1.0}, "y": {"update_norm": 3.0}}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _tool().main(["--norms", str(tmp_path)]) == 0
    assert "| a | 2 | 1.000 | 2.000 | 3.000 |" in capsys.readouterr().out

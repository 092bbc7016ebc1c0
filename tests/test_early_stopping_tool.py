"""tools/early_stopping.py: a seeded study read at each run's best validation round."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).parents[1] / "tools" / "early_stopping.py"


def _tool():
    spec = importlib.util.spec_from_file_location("early_stopping", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(tmp_path: Path, runs: dict[tuple[str, int], dict | None]) -> Path:
    manifest = []
    for (name, seed), summary in runs.items():
        run_dir = f"{name.lower().replace(' ', '-')}/seed-{seed}"
        manifest.append({"name": name, "dir": run_dir, "method": "x", "group": "", "seed": seed})
        if summary is not None:
            (tmp_path / run_dir).mkdir(parents=True)
            (tmp_path / run_dir / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "comparison.json").write_text(json.dumps({"runs": manifest}))
    return tmp_path


def _summary(stop_round: int, stopped: float, last: float) -> dict:
    return {"best_val_round": stop_round, "test_ppl_at_best_val": stopped, "final_ppl": last}


def test_methods_are_paired_seed_by_seed_at_the_stopping_round_and_the_last(tmp_path, capsys):
    study = _study(
        tmp_path,
        {
            ("HetLoRA", 0): _summary(6, 50.0, 55.0),
            ("HetLoRA", 1): _summary(8, 40.0, 41.0),
            ("HomLoRA r=5", 0): _summary(12, 51.0, 51.0),
            ("HomLoRA r=5", 1): _summary(10, 43.0, 44.0),
            ("Grid loser", 0): _summary(4, 60.0, 70.0),  # tuning seed only: left out
            ("Grid loser", 1): None,
            ("Unfinished", 0): _summary(2, 1.0, 1.0),
            ("Unfinished", 1): None,
        },
    )
    out_file = tmp_path / "early.md"
    _tool().main([str(study), "--out", str(out_file)])
    lines = capsys.readouterr().out.splitlines()
    assert out_file.read_text().splitlines() == lines
    assert len(lines) == 4  # header, rule, the two methods on every seed
    assert lines[2].startswith("| HetLoRA | 6, 8 | 45.00 +- 7.07 (50.00, 40.00) | 48.00 +- 9.90")
    assert lines[2].endswith("| — | — |")
    # HomLoRA minus HetLoRA: stopped +1, +3; at the last round -4, +3
    assert lines[3] == (
        "| HomLoRA r=5 | 12, 10 | 47.00 +- 5.66 (51.00, 43.00) | 47.50 +- 4.95 (51.00, 44.00) "
        "| +2.00 +- 1.41 (+1.00, +3.00) | -0.50 +- 4.95 (-4.00, +3.00) |"
    )
    assert "minus HetLoRA, stopped" in lines[0]


def test_a_run_without_a_validation_split_or_an_unknown_reference_is_refused(tmp_path):
    study = _study(tmp_path, {("HetLoRA", 0): {"final_ppl": 50.0}})
    with pytest.raises(SystemExit, match="no validation split"):
        _tool().main([str(study)])
    other = _study(tmp_path / "b", {("HetLoRA", 0): _summary(2, 1.0, 2.0)})
    with pytest.raises(SystemExit, match="reference 'FLoRA'"):
        _tool().main([str(other), "--reference", "FLoRA"])
    with pytest.raises(SystemExit, match="no comparison.json"):
        _tool().main([str(tmp_path / "nowhere")])

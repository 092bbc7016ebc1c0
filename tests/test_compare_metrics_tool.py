"""tools/compare_metrics.py: the check that a restructuring kept a run's numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).parents[1] / "tools" / "compare_metrics.py"


def _tool():
    spec = importlib.util.spec_from_file_location("compare_metrics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_dir(path: Path, rows: list[dict], summary: dict) -> Path:
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps(summary))
    return path


ROWS = [
    {"round": 0, "test_ppl": 97.97, "wall_s": 75.4},
    {"round": 1, "train_loss": 4.2, "client_ranks": {"a": 4, "b": 16}, "wall_s": 300.0},
]


def test_same_numbers_other_times_is_a_match(tmp_path, capsys):
    tool = _tool()
    a = _run_dir(tmp_path / "a", ROWS, {"final_ppl": 60.0, "wall_s": 1.0})
    later = [{**r, "wall_s": r["wall_s"] * 2} for r in ROWS]
    b = _run_dir(tmp_path / "b", later, {"final_ppl": 60.0, "wall_s": 9.0})
    assert tool.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "metrics.jsonl: 2 rows, 6 values, max abs diff 0, 0 differences" in out
    assert "summary.json: 1 rows, 1 values, max abs diff 0, 0 differences" in out


def test_a_changed_value_or_key_is_reported(tmp_path, capsys):
    tool = _tool()
    a = _run_dir(tmp_path / "a", ROWS, {"final_ppl": 60.0})
    other = [ROWS[0], {**ROWS[1], "client_ranks": {"a": 3, "b": 16}, "extra": 1}]
    b = _run_dir(tmp_path / "b", other, {"final_ppl": 60.0})
    assert tool.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "max abs diff 1," in out
    assert "'.client_ranks.a', 4, 3" in out and "['.extra']" in out


def test_a_file_with_the_old_names_matches_one_with_the_new(tmp_path, capsys):
    """Rows written as ``eval_loss``/``eval_ppl`` read as ``test_loss``/``test_ppl``, here and
    in the report."""
    from hetlora.study.report import load_run

    new = [{"round": 0, "test_loss": 4.5, "test_ppl": 90.0, "server_eval_ppl": 80.0}]
    old = [{"round": 0, "eval_loss": 4.5, "eval_ppl": 90.0, "server_eval_ppl": 80.0}]
    a = _run_dir(tmp_path / "a", new, {"final_ppl": 90.0})
    b = _run_dir(tmp_path / "b", old, {"final_ppl": 90.0})
    assert _tool().main([str(a), str(b)]) == 0
    assert (
        "metrics.jsonl: 1 rows, 4 values, max abs diff 0, 0 differences" in capsys.readouterr().out
    )
    assert load_run(b)[1] == new

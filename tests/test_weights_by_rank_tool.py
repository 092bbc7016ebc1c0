"""tools/weights_by_rank.py: aggregation weights against client ranks (docs/reproduction.md, C5)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).parents[1] / "tools" / "weights_by_rank.py"


def test_weights_by_rank_reports_range_group_means_and_correlation(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("weights_by_rank", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"round": 0},  # no weights: skipped
        {"round": 1, "client_ranks": {"a": 5, "b": 50}, "weights": {"a": 0.1, "b": 0.9}},
        {"round": 2, "client_ranks": {"a": 10, "c": 40}, "weights": {"a": 0.3, "c": 0.7}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    module.main([str(run)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4 client weights in 1 runs: 0.100 to 0.900"
    assert out[1] == "mean weight, rank <= 15: 0.200; rank >= 40: 0.800"
    assert out[2].startswith("correlation of weight and rank: 0.9")

"""tools/verdicts.py: the paired effects behind the verdicts, a column per data set."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TOOL = ROOT / "tools" / "verdicts.py"


def _tool():
    spec = importlib.util.spec_from_file_location("verdicts", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs(finals: dict[int, float], early: dict[int, float] | None = None, lam=math.nan):
    return {
        s: {"lambda_": lam, "test": {0: 100.0, 2: (early or finals)[s], 12: v}}
        for s, v in finals.items()
    }


def test_an_effect_is_the_paired_difference_with_its_t_and_interval():
    v = _tool()
    study = {
        "HomLoRA r=50": _runs({0: 60.0, 1: 50.0, 2: 58.0}, early={0: 40.0, 1: 30.0, 2: 35.0}),
        "HomLoRA r=5": _runs({0: 50.0, 1: 45.0, 2: 52.0}, early={0: 50.0, 1: 41.0, 2: 44.0}),
    }
    end = v.effect(study, v.Row("C1", "HomLoRA r=50", "HomLoRA r=5"))
    assert end["diffs"] == [10.0, 5.0, 6.0]
    assert end["mean"] == pytest.approx(7.0)
    assert end["std"] == pytest.approx(math.sqrt(7.0))  # deviations 3, -2, -1
    assert end["t"] == pytest.approx(7.0 / (math.sqrt(7.0) / math.sqrt(3)))
    half = 4.302652729749464 * math.sqrt(7.0) / math.sqrt(3)  # t(0.975, 2)
    assert (end["low"], end["high"]) == (pytest.approx(7.0 - half), pytest.approx(7.0 + half))
    early = v.effect(study, v.Row("C1", "HomLoRA r=50", "HomLoRA r=5", round=2))
    assert early["diffs"] == [-10.0, -11.0, -9.0]
    assert v.cell(early).startswith("-10.00 +- 1.00 (-10.00, -11.00, -9.00); t -17.32, [")


def test_cells_need_both_methods_and_two_common_seeds():
    v = _tool()
    study = {"Recon+SVD": _runs({0: 60.0, 1: 50.0}), v.HETLORA: _runs({1: 48.0, 2: 50.0})}
    assert v.effect(study, v.Row("C3", "Recon+SVD", v.HETLORA)) is None  # one common seed
    assert v.effect(study, v.Row("C4", v.HETLORA, "Full FT")) is None
    assert v.cell(None) == "-"
    text = v.table({"a": study, "b": {}})
    assert text.count("\n") == 2  # no row has a cell: header and rule only


def test_the_committed_shakespeare_study_gives_the_documented_c4_effect():
    """The numbers docs/reproduction.md's C4 verdict quotes, recomputed from the runs (when new
    runs of the study are committed, this changes with the doc)."""
    v = _tool()
    study = v.chosen(ROOT / "docs" / "reproduction" / "paper")
    assert sorted(study["Full FT"]) == [0, 1, 2]
    assert v.cell(v.effect(study, v.Row("C4", v.HETLORA, "Full FT"))) == (
        "-1.06 +- 2.11 (+1.13, -1.22, -3.08); t -0.87, [-6.30, +4.18]"
    )
    # this study has its own same-lambda group, so it is not aliased to the HetLoRA group
    assert study[v.SAME_LAMBDA] is not study[v.HETLORA]
    assert v.status(ROOT / "docs" / "reproduction" / "paper") == (
        "42 runs finished; 10 of 10 methods have their chosen runs on all 3 seeds (complete)"
    )
    table = v.table({"Shakespeare": study})
    assert "| C5 (same lambda) | Zero-pad uniform minus HetLoRA [5, 50] at lambda 0.01 |" in table
    assert "HLoRA" not in table  # not in this study: no row


def test_the_plot_has_a_panel_per_study_and_a_row_per_claim_with_an_effect(tmp_path):
    from PIL import Image

    v = _tool()
    a = {"Recon+SVD": _runs({0: 60.0, 1: 50.0}), v.HETLORA: _runs({0: 55.0, 1: 48.0})}
    b = {"Recon+SVD": _runs({0: 30.0, 1: 31.0}), v.HETLORA: _runs({0: 29.0, 1: 31.5})}
    path = v.plot({"a": a, "b": b}, tmp_path / "forest.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height  # two panels side by side

"""The table of bad inputs in tools/bad_inputs.py, each run as a real `hetlora` process."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "bad_inputs", Path(__file__).parents[1] / "tools" / "bad_inputs.py"
)
bad_inputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bad_inputs)


def test_every_bad_input_is_one_line_exit_2_and_loses_nothing(tmp_path):
    records = bad_inputs.run_cases(tmp_path)
    assert len(records) == len(bad_inputs.CASES)
    for r in records:
        lines = r["stderr"].splitlines()
        assert r["code"] == 2, r
        assert len(lines) == 1 and lines[0].startswith("error:"), r
        assert "Traceback" not in r["stderr"], r
        assert r["expect"] in lines[0], r
        assert r["untouched"], r
    assert not (tmp_path / "out").exists()

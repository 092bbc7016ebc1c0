"""The table of bad inputs in tools/bad_inputs.py: most cases in-process, a few as real
`hetlora` processes (the docs table, `python tools/bad_inputs.py`, runs every case as one)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "bad_inputs", Path(__file__).parents[1] / "tools" / "bad_inputs.py"
)
bad_inputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bad_inputs)

# Run as real processes: a usage error (typer's), a config error (hetlora's own, raised before
# any data is read) and a corrupt checkpoint (a failure inside torch's loader), so the console
# entry point, its exit code and its stderr are checked end to end; the in-process runner calls
# the same entry point for the rest (data and model errors take the config error's path).
IN_A_PROCESS = {
    "unknown flag",
    "unknown config key",
    "--resume of a corrupt checkpoint",
}


def test_the_processes_are_cases_of_the_table():
    assert IN_A_PROCESS <= {what for what, _, _ in bad_inputs.CASES}


def test_every_bad_input_is_one_line_exit_2_and_loses_nothing(tmp_path):
    def runner_for(what: str):
        return bad_inputs.cli if what in IN_A_PROCESS else bad_inputs.cli_in_process

    records = bad_inputs.run_cases(tmp_path, runner_for)
    assert len(records) == len(bad_inputs.CASES)
    for r in records:
        lines = r["stderr"].splitlines()
        assert r["code"] == 2, r
        assert len(lines) == 1 and lines[0].startswith("error:"), r
        assert "Traceback" not in r["stderr"], r
        assert r["expect"] in lines[0], r
        assert r["untouched"], r
        assert r["stdout"] == "", r  # nothing above the error: no stray progress bar
    assert not (tmp_path / "out").exists()
    page = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    lines = page[page.index("| bad input |") :].splitlines(keepends=True)
    written = "".join(itertools.takewhile(lambda line: line.startswith("|"), lines))
    assert written == bad_inputs.table(records, tmp_path), (
        "docs/reliability.md's table is not what the cases give now: rewrite it with "
        "`python tools/bad_inputs.py`"
    )

"""Bad input to ``hetlora run``: one clear line on stderr, exit code 2, nothing written or lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hetlora.cli import app


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


CASES = {
    "unknown key": (["--set", "learning_rate=0.1"], "unknown config key 'learning_rate'"),
    "unknown key in file": (["--config", "{bad_toml}"], "unknown config key 'rouunds'"),
    "missing config file": (["--config", "{tmp}/nope.toml"], "config file not found"),
    "invalid toml": (["--config", "{broken_toml}"], "not valid TOML"),
    "r_min > r_max": (
        ["--set", "r_min=10", "--set", "r_max=5"],
        "r_min (10) must not exceed r_max (5)",
    ),
    "rank < 1": (["--set", "r_min=0"], "must be >= 1"),
    "lambda < 0": (["--set", "lambda_=-0.5"], "'lambda_' must be >= 0"),
    "gamma above 1": (["--set", "gamma=1.5"], "'gamma' must lie in (0, 1)"),
    "gamma zero": (["--set", "gamma=0"], "'gamma' must lie in (0, 1)"),
    "wrong type": (["--set", "rounds='many'"], "'rounds' must be an integer"),
    "unknown method": (["--set", "method='fedsgd'"], "'method' must be one of"),
    "bad --set": (["--set", "rounds"], "--set expects key=value"),
    "missing data columns": (["--set", "data='{no_columns}'"], "column"),
    "empty data file": (["--set", "data='{empty}'"], "empty"),
    "missing data file": (["--set", "data='{tmp}/absent.jsonl'"], "not found"),
    "client with no examples": (["--set", "data='{few}'", "--set", "min_examples=5"], "no client"),
    "missing model path": (["--set", "model='{tmp}/no-such-model'"], "model path not found"),
    "model folder without config": (["--set", "model='{tmp}'"], "has no config.json"),
    "tiers without list": (["--set", "rank_distribution='tiers'"], "tiers"),
}


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    return {
        "tmp": str(tmp_path),
        "bad_toml": str(write(tmp_path / "bad.toml", "rouunds = 3\n")),
        "broken_toml": str(write(tmp_path / "broken.toml", "rounds = = 3\n")),
        "no_columns": str(jsonl(tmp_path / "cols.jsonl", [{"question": "a", "answer": "b"}] * 3)),
        "empty": str(write(tmp_path / "empty.jsonl", "")),
        "few": str(
            jsonl(tmp_path / "few.jsonl", [{"client_id": "a", "prompt": "p", "response": "r"}] * 2)
        ),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case, files, tmp_path):
    args, expected = CASES[case]
    args = [a.format(**files) for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_non_empty_out_dir_is_left_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    (out / "adapter").mkdir()
    (out / "adapter" / "keep.bin").write_bytes(b"\x00\x01")
    before = snapshot(out)
    result = CliRunner().invoke(app, ["run", "--out", str(out)])
    assert result.exit_code == 2
    assert "not empty" in result.stderr and "--overwrite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_out_path_that_is_a_file(tmp_path):
    target = write(tmp_path / "file.txt", "x")
    result = CliRunner().invoke(app, ["run", "--out", str(target)])
    assert result.exit_code == 2 and "not a directory" in result.stderr
    assert target.read_text() == "x"


def test_help_explains_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "defaults", "flower"):
        assert command in result.output
    run_help = CliRunner().invoke(app, ["run", "--help"]).output
    for flag in ("--config", "--out", "--set", "--overwrite"):
        assert flag in run_help


def test_defaults_print_valid_toml():
    import tomllib

    result = CliRunner().invoke(app, ["defaults"])
    values = tomllib.loads(result.output)
    for key in (
        "model",
        "data",
        "method",
        "rounds",
        "clients_per_round",
        "local_steps",
        "batch_size",
        "lr",
        "r_min",
        "r_max",
        "lambda_",
        "gamma",
        "seed",
        "eval_every",
    ):
        assert key in values


def test_first_line_is_the_message_head_or_the_type_name():
    from hetlora.errors import first_line

    assert first_line(OSError("  no such file\n  at /x/y\n")) == "no such file"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(RuntimeError("   \n ")) == "RuntimeError"

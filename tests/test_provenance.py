"""Provenance: a run's summary.json says which commit, host, versions, precision and date made
it, and ``hetlora report`` lists them per run."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import peft
import pytest
import torch
import transformers
from typer.testing import CliRunner

from hetlora import provenance
from hetlora.cli import app
from hetlora.config import make_config

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(folder: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
    }
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    done = subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@needs_git
def test_git_state_is_the_commit_and_whether_tracked_files_changed(tmp_path: Path):
    pkg = tmp_path / "repo" / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "commit", "-qm", "one")
    head = git(tmp_path / "repo", "rev-parse", "HEAD")
    (pkg / "notes.txt").write_text("untracked files do not make the tree dirty\n")
    assert provenance.git_state(pkg) == (head, False)
    (pkg / "__init__.py").write_text("x = 2\n")
    assert provenance.git_state(pkg) == (head, True)


@needs_git
def test_git_state_is_null_outside_a_checkout_or_for_an_untracked_package(tmp_path: Path):
    outside = tmp_path / "site-packages" / "pkg"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("")
    assert provenance.git_state(outside) == (None, None)
    # A package copied into an ignored folder of a checkout (a venv inside it) is not the checkout.
    repo = tmp_path / "repo"
    (repo / ".venv" / "pkg").mkdir(parents=True)
    (repo / ".gitignore").write_text(".venv/\n")
    (repo / ".venv" / "pkg" / "__init__.py").write_text("")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "one")
    assert provenance.git_state(repo / ".venv" / "pkg") == (None, None)


def test_git_state_is_null_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable on the PATH
    assert provenance.git_state() == (None, None)


def test_an_older_run_without_provenance_shows_dashes():
    row = provenance.row("old", {"final_ppl": 3.0})
    assert row["name"] == "old"
    assert {v for k, v in row.items() if k != "name"} == {"-"}


@pytest.fixture(scope="module")
def run_dir(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hetlora.runtime.local import run

    data = tmp_path_factory.mktemp("prov-data") / "rows.jsonl"
    rows = [
        {"client_id": f"c{i % 3}", "prompt": f"{i} plus {i} is", "response": f" {2 * i}."}
        for i in range(36)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("prov") / "run"
    cfg = make_config(
        {
            "model": str(tiny_chat_model),
            "data": str(data),
            "min_examples": 4,
            "rounds": 1,
            "clients_per_round": 2,
            "local_steps": 2,
            "batch_size": 4,
            "max_seq_len": 32,
            "eval_examples": 8,
            "rouge_examples": 0,
            "precision": "fp32",
        }
    )
    run(cfg, out)
    return out


def test_a_runs_summary_records_its_provenance(run_dir: Path):
    before = datetime.datetime.now(datetime.UTC)
    prov = json.loads((run_dir / "summary.json").read_text())["provenance"]
    assert set(prov) == {"commit", "dirty", "date", "precision", "host", "versions"}
    assert prov["precision"] == "fp32"
    date = datetime.datetime.fromisoformat(prov["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert before - datetime.timedelta(minutes=30) < date <= before
    host = prov["host"]
    assert host["cores"] == os.cpu_count() and isinstance(host["cpu_bf16"], bool)
    assert isinstance(host["cpu"], str) and host["cpu"]
    assert host["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["versions"]["transformers"] == transformers.__version__
    assert prov["versions"]["peft"] == peft.__version__
    # This test runs from the checkout hetlora is installed from (editable), so the commit is
    # the checkout's HEAD; a package installed from a wheel records null instead.
    src = Path(provenance.__file__).resolve().parent
    if shutil.which("git") and provenance.git_state(src) != (None, None):
        assert prov["commit"] == git(src, "rev-parse", "HEAD")
        assert isinstance(prov["dirty"], bool)
    else:
        assert prov["commit"] is None and prov["dirty"] is None


def test_report_lists_each_runs_provenance(run_dir: Path):
    prov = json.loads((run_dir / "summary.json").read_text())["provenance"]
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    date = prov["date"][:16].replace("T", " ")
    short = (prov["commit"] or "-")[:12]
    for shown in ("provenance", short, date, "fp32", f"{os.cpu_count()} cores"):
        assert shown in result.output
    table = (run_dir / "provenance.md").read_text().splitlines()
    assert table[0].startswith("| run | commit | dirty | date (UTC) | precision | CPU |")
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    commit = (prov["commit"] or "")[:12] or "-"
    assert cells[:5] == ["hetlora", commit, str(prov["dirty"]).lower(), prov["date"], "fp32"]
    assert cells[-3:] == [torch.__version__, transformers.__version__, peft.__version__]
    assert (run_dir / "provenance.csv").is_file()


def test_the_commit_is_the_one_the_process_started_with(monkeypatch: pytest.MonkeyPatch):
    """A commit made while a long study runs is not the code it runs: collect keeps the state
    code_state took first."""
    provenance.code_state.cache_clear()
    monkeypatch.setattr(provenance, "git_state", lambda: ("a" * 40, False))
    assert provenance.code_state() == ("a" * 40, False)
    monkeypatch.setattr(provenance, "git_state", lambda: ("b" * 40, True))
    prov = provenance.collect(bf16=False)
    assert (prov["commit"], prov["dirty"]) == ("a" * 40, False)
    provenance.code_state.cache_clear()

"""The README's commands and snippets, run as pasted, so that the README cannot drift.

Every ``bash`` and ``python`` block of README.md runs, in order, in one working folder that
looks like a fresh clone after the two set-up commands (``configs/``, ``scripts/`` and
``.venv`` are the checkout's), unless the comment line before it says
``<!-- docs-test: skip: why -->``. A docs page's block runs where the line before it is
``<!-- docs-test -->``. Small overrides keep it short, and nothing else is changed:

- ``hetlora run`` and ``hetlora compare`` get ``--set`` keys that make a run one small round
  (``SMALL``), added after the command's own; ``compare`` runs one entry of its file (``--only``);
- ``make TARGET`` runs the command the Makefile's recipe runs (``make -n``), with the same
  overrides;
- the README's placeholders (``/models/my-llama``, ``my.jsonl``) are a tiny Llama and a small
  data file made here;
- the PEFT snippet loads its base by the hub id the export names, which an offline test finds in
  a Hugging Face cache laid out from the packaged model's files (as a download would leave it);
- Python blocks run as written, each in a fresh interpreter; ``hetlora`` commands run in this
  process (``hetlora.cli.main``, the function the ``.venv/bin/hetlora`` entry point calls, with
  the command's arguments, working folder and environment; stdout and stderr captured), except
  ``hetlora defaults``, which runs the installed entry point itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_inputs import cli_in_process

ROOT = Path(__file__).resolve().parents[1]

#: Makes every run one small round: what the test adds to each `hetlora run` / `compare`.
SMALL = {
    "rounds": "1",
    "clients_per_round": "2",
    "local_steps": "1",
    "batch_size": "2",
    "max_seq_len": "48",
    "eval_examples": "8",
    "rouge_examples": "0",
    "compile": "'off'",
}

#: `hetlora compare` runs only this entry of its file.
COMPARE_ENTRY = "HetLoRA [4, 32], lr 1e-3"

SKIP = re.compile(r"<!--\s*docs-test:\s*skip:\s*(.+?)\s*-->")
RUN = re.compile(r"<!--\s*docs-test\s*-->")


@dataclass
class Block:
    source: str  # file:line
    lang: str
    code: str
    skip: str | None


def blocks(path: Path, every: bool) -> list[Block]:
    """The fenced ``bash``/``python`` blocks of ``path``: all of them (``every``) unless marked
    skip, else only those marked to run."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(bash|python)\s*", lines[i])
        if not fence:
            i += 1
            continue
        before = lines[i - 1] if i else ""
        end = lines.index("```", i + 1)
        skip = SKIP.search(before)
        marked = RUN.search(before) is not None
        if every or marked:
            code = "\n".join(lines[i + 1 : end])
            name = f"{path.name}:{i + 1}"
            out.append(Block(name, fence.group(1), code, skip.group(1) if skip else None))
        i = end + 1
    return out


def commands(code: str) -> list[list[str]]:
    """Shell lines of a bash block as argument lists (continuations joined, comments dropped)."""
    joined = code.replace("\\\n", " ")
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def small(argv: list[str]) -> list[str]:
    """``argv`` with the overrides that make a run small (see the module docstring)."""
    if len(argv) > 1 and argv[0].endswith("bin/hetlora") and argv[1] in ("run", "compare"):
        argv = argv + [f"--set={k}={v}" for k, v in SMALL.items()]
        if argv[1] == "compare":
            argv += ["--only", COMPARE_ENTRY]
    return argv


def make_recipe(target: str) -> list[str]:
    """The hetlora command ``make TARGET`` runs (from ``make -n``)."""
    shown = subprocess.run(
        ["make", "-n", "-s", target], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    runs = [line for line in shown if "bin/hetlora " in line]
    assert len(runs) == 1, f"make {target} runs {shown}"
    return shlex.split(runs[0])


def hub_cache(hf_home: Path) -> None:
    """The packaged model's files laid out as a hub download of its id would leave them."""
    from hetlora.models import DEFAULT_HUB_ID, resolve_model

    files = Path(resolve_model("smollm2-135m"))
    repo = hf_home / "hub" / ("models--" + DEFAULT_HUB_ID.replace("/", "--"))
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def own_data(path: Path) -> None:
    rows = [
        {"client_id": f"user-{c}", "prompt": f"Question {i} of {c}?", "response": f"Answer {i}."}
        for c in range(2)
        for i in range(50)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def clone(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder like a fresh clone after the set-up commands."""
    work = tmp_path / "clone"
    work.mkdir()
    for name in ("configs", "scripts", "Makefile"):
        (work / name).symlink_to(ROOT / name)
    (work / ".venv").symlink_to(Path(sys.prefix))
    own_data(work / "my.jsonl")
    hf_home = tmp_path / "hf"
    hub_cache(hf_home)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TINY_MODEL", str(tiny_model))
    return work


def run_block(block: Block, work: Path, log: list[str]) -> None:
    if block.lang == "python":
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", block.code], cwd=work, capture_output=True, text=True
        )
        took = time.monotonic() - start
        log.append(
            f"{block.source}: python ({took:.0f}s) -> {done.returncode}\n{done.stdout[-2000:]}"
        )
        assert done.returncode == 0, f"{block.source}:\n{block.code}\n{done.stderr[-4000:]}"
        return
    for argv in commands(block.code):
        if argv == ["make", "test"]:
            continue  # the command that runs this test
        if argv[0] == "make":
            argv = make_recipe(argv[1])
        tiny = "model=" + os.environ["TINY_MODEL"]
        argv = [tiny if a == "model=/models/my-llama" else a for a in argv]
        argv = small(argv)
        start = time.monotonic()
        if argv[0].endswith("bin/hetlora") and argv[1:2] != ["defaults"]:
            # the entry point's own function, in this process: no interpreter start per command
            done = cli_in_process(argv[1:], {}, work)
        else:  # `hetlora defaults` shows that the installed entry point itself runs
            done = subprocess.run(argv, cwd=work, capture_output=True, text=True)
        took = time.monotonic() - start
        log.append(f"{block.source}: {shlex.join(argv)} ({took:.0f}s) -> {done.returncode}")
        assert done.returncode == 0, f"{block.source}: {shlex.join(argv)}\n{done.stderr[-4000:]}"


def test_readme_blocks_are_all_accounted_for():
    found = blocks(ROOT / "README.md", every=True)
    assert len(found) >= 6
    for block in found:
        assert block.skip is None or len(block.skip) > 10, f"{block.source}: say why it is skipped"
        for argv in commands(block.code) if block.lang == "bash" else []:
            assert argv[0] in (".venv/bin/hetlora", ".venv/bin/python", "make"), (
                f"{block.source}: {argv[0]} is not a command a fresh clone has"
            )


def test_every_readme_command_and_snippet_runs_as_pasted(clone: Path):
    log: list[str] = []
    for block in blocks(ROOT / "README.md", every=True):
        if block.skip is None:
            run_block(block, clone, log)
    out = "\n".join(log)
    print(out)  # each command's time, shown by pytest -rP
    # what the README says these leave behind
    assert (clone / "runs" / "demo" / "adapter" / "adapter_config.json").exists(), out
    assert (clone / "runs" / "mine" / "summary.json").exists(), out
    assert (clone / "runs" / "cmp" / "results.md").exists(), out
    exported = json.loads((clone / "runs" / "phone-adapter" / "adapter_config.json").read_text())
    assert exported["r"] == 8
    assert (clone / "runs" / "own" / "summary.json").exists(), out
    assert (clone / "runs" / "api" / "summary.json").exists(), out


def test_docs_pages_marked_blocks_run_as_pasted(clone: Path):
    log: list[str] = []
    ran = 0
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in blocks(page, every=False):
            run_block(block, clone, log)
            ran += 1
    assert ran >= 1
    summary = json.loads((clone / "runs" / "chat" / "summary.json").read_text())
    assert summary["final_ppl"] > 0

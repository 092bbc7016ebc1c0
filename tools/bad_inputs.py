"""Every bad input we try on the CLI, run for real, as a Markdown table for docs/reliability.md.

    python tools/bad_inputs.py > docs/bad_inputs.md

Each case runs ``python -m hetlora.cli ...`` in a fresh temporary folder holding the files it
needs (and a finished tiny run for the commands that read one), and records the exit code, the
stderr line and whether the output directory was left as it was. ``tests/test_bad_inputs.py``
runs the same table and requires: exit code 2, one line on stderr, no traceback, nothing lost;
it runs most cases in-process (:func:`cli_in_process`: the console entry point ``main`` with
its own argv, stdout and stderr) and a few as real processes, to save the start-up of each.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

# (what, argv with {placeholders}, a fragment the message must contain)
CASES: list[tuple[str, list[str], str]] = [
    (
        "unknown config key",
        ["run", "--out", "{out}", "--set", "learning_rate=0.1"],
        "unknown config key 'learning_rate'",
    ),
    (
        "unknown key in a config file",
        ["run", "--out", "{out}", "--config", "{bad_key_toml}"],
        "unknown config key 'rouunds'",
    ),
    (
        "missing config file",
        ["run", "--out", "{out}", "--config", "{tmp}/nope.toml"],
        "config file not found",
    ),
    (
        "config file that is not TOML",
        ["run", "--out", "{out}", "--config", "{broken_toml}"],
        "not valid TOML",
    ),
    (
        "r_min > r_max",
        ["run", "--out", "{out}", "--set", "r_min=10", "--set", "r_max=5"],
        "must not exceed r_max",
    ),
    ("rank < 1", ["run", "--out", "{out}", "--set", "r_min=0"], "must be >= 1"),
    (
        "homlora rank outside [r_min, r_max]",
        ["run", "--out", "{out}", "--set", "method='homlora'", "--set", "rank=99"],
        "'rank' (99) must lie in",
    ),
    (
        "a key of another method (rank is homlora's)",
        ["run", "--out", "{out}", "--set", "rank=4"],
        "'rank' = 4 applies to method = 'homlora' only",
    ),
    (
        "lambda_ with pruning off",
        ["run", "--out", "{out}", "--set", "pruning=false", "--set", "lambda_=0.1"],
        "'lambda_' = 0.1 applies to method = 'hetlora' with pruning = true only",
    ),
    ("lambda < 0", ["run", "--out", "{out}", "--set", "lambda_=-0.5"], "'lambda_' must be >= 0"),
    (
        "gamma outside (0, 1)",
        ["run", "--out", "{out}", "--set", "gamma=1.5"],
        "'gamma' must lie in (0, 1)",
    ),
    ("gamma = 0", ["run", "--out", "{out}", "--set", "gamma=0"], "'gamma' must lie in (0, 1)"),
    (
        "wrong type",
        ["run", "--out", "{out}", "--set", "rounds='many'"],
        "'rounds' must be an integer",
    ),
    (
        "unknown method",
        ["run", "--out", "{out}", "--set", "method='fedsgd'"],
        "'method' must be one of",
    ),
    ("--set without =", ["run", "--out", "{out}", "--set", "rounds"], "--set expects key=value"),
    (
        "older key rank_distribution = 'tiers' without a tier list",
        ["run", "--out", "{out}", "--set", "rank_distribution='tiers'"],
        "needs a [[tiers]] list",
    ),
    (
        "negative norm bound",
        ["run", "--out", "{out}", "--set", "max_update_norm=-1"],
        "'max_update_norm' must be >= 0",
    ),
    ("negative seed", ["run", "--out", "{out}", "--set", "seed=-1"], "'seed' must lie in"),
    (
        "min_clients above clients_per_round",
        ["run", "--out", "{out}", "--set", "min_clients=5", "--set", "clients_per_round=4"],
        "'min_clients' (5) must not exceed clients_per_round (4)",
    ),
    (
        "max_new_tokens = 0 with ROUGE-L on",
        ["run", "--out", "{out}", "--set", "max_new_tokens=0"],
        "'max_new_tokens' must be >= 1 when rouge_examples > 0",
    ),
    (
        "LoRA target modules under full fine-tuning",
        [
            "run",
            "--out",
            "{out}",
            "--set",
            "method='full_ft'",
            "--set",
            "target_modules=['q_proj']",
        ],
        "'target_modules' = ['q_proj'] applies to LoRA methods",
    ),
    (
        "data file without the needed columns",
        ["run", "--out", "{out}", "--set", "data='{no_columns}'"],
        "column",
    ),
    ("empty data file", ["run", "--out", "{out}", "--set", "data='{empty}'"], "empty"),
    (
        "missing data file",
        ["run", "--out", "{out}", "--set", "data='{tmp}/absent.jsonl'"],
        "not found",
    ),
    (
        "hetlora data on a missing data file",
        ["data", "--set", "data='{tmp}/absent.jsonl'"],
        "not found",
    ),
    (
        "hetlora data --plot onto a folder",
        ["data", "--set", "model='{tiny}'", "--set", "max_clients=2", "--plot", "{empty_dir}"],
        "cannot write --plot",
    ),
    (
        "hetlora data with an unknown key",
        ["data", "--set", "max_seq=64"],
        "unknown config key 'max_seq' (did you mean 'max_seq_len'?)",
    ),
    (
        "missing data file at a relative path shaped like a hub id",
        ["run", "--out", "{out}", "--set", "data='mydata/train.jsonl'"],
        "data file not found: mydata/train.jsonl",
    ),
    (
        "partitioner key for a file with client_id",
        ["run", "--out", "{out}", "--set", "data='{few}'", "--set", "num_partitions=3"],
        "has a client_id column, so its rows are not partitioned: remove num_partitions = 3",
    ),
    (
        "malformed JSON lines",
        ["run", "--out", "{out}", "--set", "data='{malformed}'"],
        "{malformed_name}",
    ),
    ("unsupported data format", ["run", "--out", "{out}", "--set", "data='{xlsx}'"], "xlsx"),
    (
        "data file with several bad rows (all reported at once)",
        ["run", "--out", "{out}", "--set", "data='{bad_rows}'"],
        "3 bad rows of 12: row 2: column 'response' is empty; row 5: column 'prompt' is null",
    ),
    (
        "on_bad_rows for the built-in data",
        ["run", "--out", "{out}", "--set", "on_bad_rows='skip'"],
        "'on_bad_rows' = 'skip' applies to data files",
    ),
    (
        "unknown on_bad_rows value",
        ["run", "--out", "{out}", "--set", "on_bad_rows='warn'"],
        "'on_bad_rows' must be one of error, skip",
    ),
    (
        "no client with enough examples",
        ["run", "--out", "{out}", "--set", "data='{few}'", "--set", "min_examples=5"],
        "no client",
    ),
    (
        "dirichlet without a label column",
        ["run", "--out", "{out}", "--set", "data='{text}'", "--set", "partitioner='dirichlet'"],
        "partition_by",
    ),
    (
        "missing model path",
        ["run", "--out", "{out}", "--set", "model='{tmp}/no-such-model'"],
        "model path not found",
    ),
    (
        "model folder without config.json",
        ["run", "--out", "{out}", "--set", "model='{empty_dir}'"],
        "has no config.json",
    ),
    (
        "model path that is a file, not a folder",
        ["run", "--out", "{out}", "--set", "model='{a_file}'"],
        "is a file: give a Hugging Face model folder",
    ),
    (
        "a .gguf model file that is not GGUF",
        ["run", "--out", "{out}", "--set", "model='{fake_gguf}'"],
        "cannot load GGUF file",
    ),
    (
        "unknown LoRA target module",
        [
            "run",
            "--out",
            "{out}",
            "--set",
            "model='{tiny}'",
            "--set",
            "target_modules=['nope']",
            "--set",
            "min_examples=150",
        ],
        "nope",
    ),
    ("non-empty --out without --overwrite", ["run", "--out", "{full_out}"], "is not empty"),
    (
        "compare into a non-empty --out names --resume",
        ["compare", "--config", "{one_compare}", "--out", "{full_out}"],
        "use --resume to go on with it, or --overwrite",
    ),
    (
        "CSV with a messages column",
        ["run", "--out", "{out}", "--set", "data='{messages_csv}'"],
        "a CSV cannot hold lists",
    ),
    ("--out is a file", ["run", "--out", "{a_file}"], "not a directory"),
    ("unknown flag", ["run", "--bogus"], "No such option '--bogus'"),
    ("flag without its value", ["run", "--out", "{out}", "--set"], "requires an argument"),
    ("unknown command", ["train"], "No such command 'train'"),
    (
        "--resume of a folder that is no run",
        ["run", "--resume", "{empty_dir}"],
        "not a run directory",
    ),
    (
        "--resume with another config",
        ["run", "--resume", "{run}", "--set", "lr=0.5"],
        "another config",
    ),
    ("--resume of a corrupt checkpoint", ["run", "--resume", "{corrupt_run}"], "is corrupt"),
    (
        "export at a rank above the run's",
        ["export", "{run}", "--rank", "99", "--out", "{out}"],
        "--rank must lie in",
    ),
    (
        "export with a non-integer rank",
        ["export", "{run}", "--rank", "x", "--out", "{out}"],
        "is not a valid integer",
    ),
    (
        "export of a folder that is no run",
        ["export", "{empty_dir}", "--rank", "2", "--out", "{out}"],
        "not a PEFT adapter folder",
    ),
    ("evaluate a folder that is no run", ["evaluate", "{empty_dir}"], "is neither a finished run"),
    (
        "report of a folder that is no run",
        ["report", "{empty_dir}"],
        "neither a run nor a comparison",
    ),
    (
        "compare without [[compare]] entries",
        ["compare", "--config", "{plain_toml}", "--out", "{out}"],
        "no [[compare]] entries",
    ),
    (
        "compare entry with a bad key",
        ["compare", "--config", "{bad_compare}", "--out", "{out}"],
        "entry 'x'",
    ),
]

TINY_RUN = [
    "rounds=1",
    "clients_per_round=2",
    "local_steps=1",
    "batch_size=2",
    "eval_examples=4",
    "rouge_examples=0",
    "precision='fp32'",
    "min_examples=150",
    "r_min=2",
    "r_max=4",
]


def cli(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hetlora.cli", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def cli_in_process(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """What :func:`cli` returns, from ``hetlora.cli.main`` called in this process: argv, the
    environment and the working folder set for the call, stdout and stderr captured."""
    from hetlora import cli as hetlora_cli

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, saved_cwd = sys.argv, dict(os.environ), os.getcwd()
    # the root logger as a fresh process has it (no handler): the CLI's logging.basicConfig then
    # writes log lines to this call's stderr, as it would in a process
    root = logging.getLogger()
    saved_log = root.handlers[:], root.level
    root.handlers.clear()
    sys.argv = ["hetlora", *argv]
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                hetlora_cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:  # noqa: BLE001 - a crash is recorded as a process would show it
                err.write(traceback.format_exc())
                code = 1
    finally:
        root.handlers[:], root.level = saved_log
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


Runner = Callable[[list[str], dict[str, str], Path], subprocess.CompletedProcess]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    if folder.exists():
        for p in sorted(folder.rglob("*")):
            h.update(str(p.relative_to(folder)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def make_fixtures(tmp: Path, env: dict[str, str], runner: Runner = cli) -> dict[str, str]:
    """The files the cases refer to, and one finished tiny run (made by ``runner``)."""
    from tiny import make_tiny_model

    def write(name: str, text: str) -> str:
        (tmp / name).write_text(text)
        return str(tmp / name)

    def jsonl(name: str, rows: list[dict]) -> str:
        return write(name, "".join(json.dumps(r) + "\n" for r in rows))

    tiny = make_tiny_model(tmp / "tiny")
    (tmp / "empty-dir").mkdir()
    full = tmp / "full-out"
    full.mkdir()
    (full / "metrics.jsonl").write_text("precious\n")
    run = tmp / "run"
    argv = ["run", "--out", str(run), "--set", f"model='{tiny}'"]
    for item in TINY_RUN:
        argv += ["--set", item]
    done = runner(argv, env, tmp)
    if done.returncode != 0:
        raise RuntimeError(f"the tiny run failed: {done.stderr}")
    corrupt = tmp / "corrupt-run"
    subprocess.run(["cp", "-r", str(run), str(corrupt)], check=True)
    (corrupt / "checkpoint.pt").write_bytes(b"garbage")
    return {
        "tmp": str(tmp),
        "out": str(tmp / "out"),
        "tiny": str(tiny),
        "run": str(run),
        "corrupt_run": str(corrupt),
        "full_out": str(full),
        "empty_dir": str(tmp / "empty-dir"),
        "a_file": write("a-file.txt", "x"),
        "fake_gguf": write("model.gguf", "not a GGUF file"),
        "bad_key_toml": write("bad.toml", "rouunds = 3\n"),
        "broken_toml": write("broken.toml", "rounds = = 3\n"),
        "plain_toml": write("plain.toml", "rounds = 1\n"),
        "one_compare": write("one.toml", '[[compare]]\nname = "a"\nmethod = "hetlora"\n'),
        "messages_csv": write(
            "chat.csv", 'client_id,messages\na,"[{""role"": ""user"", ""content"": ""hi""}]"\n'
        ),
        "bad_compare": write("bad-compare.toml", '[[compare]]\nname = "x"\nlearning_rate = 1\n'),
        "no_columns": jsonl("cols.jsonl", [{"question": "a", "answer": "b"}] * 3),
        "empty": write("empty.jsonl", ""),
        "malformed": write("broken.jsonl", '{"client_id": "a", "text": "x"}\n{oops\n'),
        "malformed_name": "broken.jsonl",
        "xlsx": write("data.xlsx", "not really"),
        "few": jsonl("few.jsonl", [{"client_id": "a", "prompt": "p", "response": "r"}] * 2),
        "text": jsonl("text.jsonl", [{"text": f"line {i}"} for i in range(30)]),
        "bad_rows": jsonl(
            "bad-rows.jsonl",
            [
                {"client_id": "a", "prompt": None if i == 4 else "p", "response": r}
                for i, r in enumerate(["r", "", "r", "r", "r", "r", "r", "r", " ", "r", "r", "r"])
            ],
        ),
    }


def environment(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HOME": str(tmp / "hf"),
        "HETLORA_CACHE": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "COLUMNS": "200",
    }


def run_cases(tmp: Path, runner_for: Callable[[str], Runner] = lambda what: cli) -> list[dict]:
    """Run every case, each with the runner ``runner_for(what)`` (default: a real process);
    returns one record per case."""
    env = environment(tmp)
    fx = make_fixtures(tmp, env, runner_for(""))
    watched = [
        Path(fx[k]) for k in ("out", "full_out", "run", "corrupt_run", "a_file", "empty_dir")
    ]
    records = []
    for what, argv, expect in CASES:
        before = {
            str(p): _digest(p) if p.is_dir() else (p.read_bytes() if p.exists() else None)
            for p in watched
        }
        done = runner_for(what)([a.format(**fx) for a in argv], env, tmp)
        after = {
            str(p): _digest(p) if p.is_dir() else (p.read_bytes() if p.exists() else None)
            for p in watched
        }
        records.append(
            {
                "what": what,
                "argv": " ".join(a.format(**fx) for a in argv)
                .replace(f"{tmp}/", "")
                .replace(str(tmp), "."),
                "code": done.returncode,
                "stderr": done.stderr.strip(),
                "stdout": done.stdout.strip(),
                "expect": expect.format(**fx),
                "untouched": before == after,
            }
        )
    return records


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every case in this process (cli_in_process: faster, the same entry point)",
    )
    runner = cli_in_process if parser.parse_args().in_process else cli
    with tempfile.TemporaryDirectory() as tmp:
        records = run_cases(Path(tmp), lambda what: runner)
        print(table(records, Path(tmp)), end="")


def table(records: list[dict], tmp: Path) -> str:
    """The Markdown table of `run_cases`' records (run in ``tmp``), as docs/reliability.md
    has it."""
    lines = [
        "| bad input | command (in a temporary folder holding the files) | exit | message |",
        "|---|---|---|---|",
    ]
    name = str(tmp.resolve())
    for r in records:
        message = r["stderr"].replace(f"{name}/", "").replace(name, ".").replace("|", "\\|")
        lines.append(f"| {r['what']} | `hetlora {r['argv']}` | {r['code']} | {message} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

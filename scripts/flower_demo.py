#!/usr/bin/env python
"""`make flower-demo`: a private HetLoRA deployment over Flower on this machine.

Each of 3 devices gets its own data (one Shakespeare character, as a ``prompt``/``response``
file with its ``client_id``) in its own folder, ``runs/flower-demo-devices/<node>/data.jsonl``;
the server's config (configs/flower-demo.toml) names no data. It then starts a SuperLink and 3
SuperNodes of ranks 16, 8, 4 on 127.0.0.1 (certificates and keys made for the trial, the
SuperNodes' public keys registered), each reading only its own file, runs 3 rounds with the
nodes evaluating the global adapter on their own held-out examples, prints each round's
metrics, writes the run directory and stops every process it started, by process id, also on
failure or Ctrl-C. Last, it checks that no line of the devices' files (24 characters or more)
appears in the run directory, the SuperLink's, ServerApp's or SuperNodes' logs, or its own
console output, and exits 1 if one does.

    python scripts/flower_demo.py --out runs/flower-demo [--devices DIR] [--workdir DIR]
        [--stream] [--set k=v]
"""

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

from localfed.cli import app
from localfed.privacy import device_texts, leaked_into, leaks

ROOT = Path(__file__).resolve().parent.parent
DEVICES = {  # node -> (its client, its rank budget)
    "node-0": ("hamlet/HAMLET", 16),
    "node-1": ("macbeth/MACBETH", 8),
    "node-2": ("romeo-and-juliet/JULIET", 4),
}


def write_device_data(folder: Path) -> dict[str, Path]:
    """Each device's own data file: its character's lines as prompt/response rows."""
    from hetlora.data import load_clients

    plays = load_clients("shakespeare")
    files = {}
    for node, (client, _) in DEVICES.items():
        path = folder / node / "data.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {"client_id": client, "prompt": ex.prompt, "response": ex.response}
            for ex in plays[client]
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files[node] = path.resolve()
    return files


class Tee(io.TextIOBase):
    """Console output, also kept for the check at the end."""

    def __init__(self, stream) -> None:
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def check_no_device_text(files: list[Path], out: Path, logs: Path, console: str) -> int:
    """0 when no device line reached the run directory, a log or the console; 1 otherwise.
    Prints where a line was found, never the line."""
    texts = device_texts(files)
    log_files = sorted(logs.glob("*.log"))
    found = leaks([out, *log_files], texts)
    on_console = leaked_into(console, texts)
    where = f"{out}/ ({sum(1 for p in out.rglob('*') if p.is_file())} files), {len(log_files)} logs"
    if found or on_console:
        print(
            f"error: device text found in: {', '.join(found) or '-'}; console lines: {on_console}"
        )
        return 1
    print(
        f"checked: none of the {len(texts)} distinct lines (24 characters or more) of the "
        f"devices' files appears in {where} or the console output"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/flower-demo", help="run directory (the server's)")
    parser.add_argument(
        "--devices", default="runs/flower-demo-devices", help="the devices' own data folders"
    )
    parser.add_argument("--workdir", help="keep certificates, keys and logs here")
    parser.add_argument("--stream", action="store_true", help="show the ServerApp's log stream")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    files = write_device_data(Path(args.devices))
    argv = [
        "deploy",
        "--config",
        str(ROOT / "configs" / "flower-demo.toml"),
        "--out",
        args.out,
    ]
    nodes = [
        f'data="{files[node]}" client-id="{client}" rank={rank}'
        for node, (client, rank) in DEVICES.items()
    ]
    argv += ["--overwrite"] + [f"--node={node}" for node in nodes]
    argv += [f"--set={item}" for item in args.set]
    if args.stream:
        argv.append("--stream")
    with tempfile.TemporaryDirectory(prefix="hetlora-flower-demo-") as tmp:
        workdir = Path(args.workdir or tmp)
        argv += ["--workdir", str(workdir)]
        sys.stdout = tee = Tee(sys.stdout)
        try:
            app(argv, prog_name="flower_demo.py")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        finally:
            sys.stdout = tee.stream
        if code == 0:
            code = check_no_device_text(
                list(files.values()), Path(args.out), workdir / "logs", tee.kept.getvalue()
            )
    sys.exit(code)

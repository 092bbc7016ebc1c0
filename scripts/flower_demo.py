#!/usr/bin/env python
"""`make flower-demo`: HetLoRA over Flower on this machine, with TLS and SuperNode authentication.

Starts a SuperLink and 3 SuperNodes of different ranks on 127.0.0.1 (certificates and keys made
for the trial, the SuperNodes' public keys registered), runs configs/flower-demo.toml (3 rounds,
default model and data), prints each round's metrics, writes the run directory of `hetlora run`
and stops every process it started, by process id, also on failure or Ctrl-C.

    python scripts/flower_demo.py --out runs/flower-demo [--workdir DIR] [--stream] [--set k=v]
"""

import argparse
import sys
from pathlib import Path

from localfed.cli import app

ROOT = Path(__file__).resolve().parent.parent
NODES = [  # one client each, three device budgets
    'client-id="hamlet/HAMLET" rank=16',
    'client-id="macbeth/MACBETH" rank=8',
    'client-id="romeo-and-juliet/JULIET" rank=4',
]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/flower-demo", help="run directory")
    parser.add_argument("--workdir", help="keep certificates, keys and logs here")
    parser.add_argument("--stream", action="store_true", help="show the ServerApp's log stream")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    argv = [
        "deploy",
        "--config",
        str(ROOT / "configs" / "flower-demo.toml"),
        "--out",
        args.out,
    ]
    argv += ["--overwrite"] + [f"--node={node}" for node in NODES]
    argv += [f"--set={item}" for item in args.set]
    if args.workdir:
        argv += ["--workdir", args.workdir]
    if args.stream:
        argv.append("--stream")
    sys.exit(app(argv, prog_name="flower_demo.py"))

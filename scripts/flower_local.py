#!/usr/bin/env python
"""Flower on this machine, for trials and demos (package ``scripts/localfed``).

    python scripts/flower_local.py certificates certs/ --node node-0 [--host my.server]
    python scripts/flower_local.py deploy --out runs/x --config configs/flower-demo.toml \\
        --node 'partition-id=0 rank=16' --node 'partition-id=1 rank=4'
    python scripts/flower_local.py simulate --out runs/sim --supernodes 10
"""

import sys

from localfed.cli import app

if __name__ == "__main__":
    sys.exit(app(prog_name="flower_local.py"))

"""How HetLoRA's aggregation weights relate to the clients' ranks, over a study's runs.

    python tools/weights_by_rank.py RUN_DIR [RUN_DIR ...]   # e.g. docs/reproduction/paper/<entry>/seed-*

Reads every round's ``weights`` and ``client_ranks`` from each run's ``metrics.jsonl`` and prints
the range of the weights, their mean for low-rank (<= 15) and high-rank (>= 40) clients, and
their correlation with the rank (used in docs/reproduction.md, C5).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    ranks, weights = [], []
    for d in dirs:
        for line in (Path(d) / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            for client, w in (row.get("weights") or {}).items():
                ranks.append(row["client_ranks"][client])
                weights.append(w)
    low = [w for r, w in zip(ranks, weights, strict=True) if r <= 15]
    high = [w for r, w in zip(ranks, weights, strict=True) if r >= 40]
    print(
        f"{len(weights)} client weights in {len(dirs)} runs: {min(weights):.3f} to {max(weights):.3f}"
    )
    print(
        f"mean weight, rank <= 15: {statistics.mean(low):.3f}; rank >= 40: {statistics.mean(high):.3f}"
    )
    print(f"correlation of weight and rank: {statistics.correlation(ranks, weights):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])

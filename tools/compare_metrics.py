"""Are two runs' numbers the same? Compares every number of two ``metrics.jsonl`` files (and,
given run directories, of their ``summary.json``), timing keys left out.

    python tools/compare_metrics.py RUN_A RUN_B      # run directories or metrics.jsonl files

Prints the rows and values compared, the largest absolute difference and the first
differences; exits 1 if anything differs (keys, values or row count). Used to show that a
restructuring kept the method's numbers (docs/testing.md, issue 13).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from hetlora.runtime.rounds import read_metrics

#: Keys that measure time, not the method: they differ between any two runs. ``provenance``
#: (commit, dirty tree, host, versions, date) says where and when a run ran, not what it computed.
TIMING = {"wall_s", "elapsed_s", "step_s", "compile_s", "seconds", "round_compile_s", "provenance"}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}}`` -> ``{".a.b[0]": 1, ".a.b[1]": 2}``, timing keys dropped."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in TIMING:
                out.update(flatten(item, f"{prefix}.{key}"))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
    else:
        out[prefix] = value
    return out


def differences(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[int, float, list]:
    """(values compared, largest absolute difference, list of differences)."""
    found: list[tuple] = []
    if len(a) != len(b):
        found.append(("rows", len(a), len(b)))
    worst, count = 0.0, 0
    for i, (ra, rb) in enumerate(zip(a, b, strict=False)):
        fa, fb = flatten(ra), flatten(rb)
        if set(fa) != set(fb):
            found.append((i, "keys", sorted(set(fa) ^ set(fb))))
        for key in sorted(set(fa) & set(fb)):
            x, y = fa[key], fb[key]
            count += 1
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y))
            if numbers:
                if x == y or (math.isnan(x) and math.isnan(y)):
                    continue
                worst = max(worst, abs(x - y))
                found.append((i, key, x, y))
            elif x != y:
                found.append((i, key, x, y))
    return count, worst, found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    a, b = (Path(p) for p in argv)
    pairs = []
    if a.is_dir() and b.is_dir():
        pairs.append(
            ("metrics.jsonl", read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl"))
        )
        if (a / "summary.json").is_file() and (b / "summary.json").is_file():
            pairs.append(
                (
                    "summary.json",
                    [json.loads((a / "summary.json").read_text())],
                    [json.loads((b / "summary.json").read_text())],
                )
            )
    else:
        pairs.append((a.name, read_metrics(a), read_metrics(b)))
    same = True
    for name, ra, rb in pairs:
        count, worst, found = differences(ra, rb)
        print(
            f"{name}: {len(ra)} rows, {count} values, max abs diff {worst:g}, {len(found)} differences"
        )
        for item in found[:10]:
            print("   ", item)
        same = same and not found
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

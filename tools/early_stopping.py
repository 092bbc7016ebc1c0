"""A seeded study read with early stopping: each run stopped at its best validation round.

    python tools/early_stopping.py STUDY_DIR [--reference NAME] [--out FILE.md]

``hetlora report`` reports every run at its last round, as chosen before the study ran. This
reads the same runs as if each had been stopped where its validation perplexity was lowest
(``best_val_round`` and ``test_ppl_at_best_val`` in its ``summary.json``, written by every run
with a validation split): per method, the stopping rounds and the test perplexity there (mean,
sample std, per seed), next to the last round's, and each method minus the reference method,
seed by seed, at both. Methods are the entries of ``comparison.json`` with a finished run on
every seed the study has (so a grid's losers, run on the tuning seed only, are left out).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _stat(values: list[float], signed: bool = False) -> str:
    """``mean +- std (per seed)``; ``signed`` for differences."""
    fmt = "+.2f" if signed else ".2f"
    per_seed = ", ".join(format(v, fmt) for v in values)
    return f"{format(statistics.fmean(values), fmt)} +- {_std(values):.2f} ({per_seed})"


def load(study: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """method name -> seed -> summary, for the methods finished on every seed of the study."""
    manifest = study / "comparison.json"
    if not manifest.is_file():
        raise SystemExit(f"{study}: no comparison.json (not a comparison directory)")
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    seeds: set[int] = set()
    for run in json.loads(manifest.read_text())["runs"]:
        seeds.add(run["seed"])
        path = study / run["dir"] / "summary.json"
        if path.is_file():
            runs.setdefault(run["name"], {})[run["seed"]] = json.loads(path.read_text())
    complete = {name: by_seed for name, by_seed in runs.items() if set(by_seed) == seeds}
    for name, by_seed in complete.items():
        missing = [s for s, summary in by_seed.items() if "test_ppl_at_best_val" not in summary]
        if missing:
            raise SystemExit(f"{name}: seeds {missing} have no validation split to stop on")
    return dict(sorted(complete.items(), key=lambda kv: list(runs).index(kv[0])))


def table(methods: dict[str, dict[int, dict[str, Any]]], reference: str) -> str:
    """The markdown table of :func:`load`'s methods, paired against ``reference``."""
    if reference not in methods:
        raise SystemExit(f"reference {reference!r} is not a method finished on every seed")
    ref = methods[reference]
    lines = [
        "| method | stopping round per seed | test ppl at it | test ppl at the last round "
        f"| minus {reference}, stopped | minus {reference}, last round |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_seed in methods.items():
        seeds = sorted(by_seed)
        stopped = [by_seed[s]["test_ppl_at_best_val"] for s in seeds]
        last = [by_seed[s]["final_ppl"] for s in seeds]
        rounds = ", ".join(str(by_seed[s]["best_val_round"]) for s in seeds)
        if name == reference:
            diffs = ("—", "—")
        else:
            diffs = tuple(
                _stat([by_seed[s][key] - ref[s][key] for s in seeds], signed=True)
                for key in ("test_ppl_at_best_val", "final_ppl")
            )
        lines.append(
            f"| {name} | {rounds} | {_stat(stopped)} | {_stat(last)} | {diffs[0]} | {diffs[1]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--reference", default="", help="default: the first method named HetLoRA*")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    methods = load(args.study)
    if not methods:
        raise SystemExit(f"{args.study}: no method is finished on every seed yet")
    reference = args.reference or next(
        (name for name in methods if name.startswith("HetLoRA")), next(iter(methods))
    )
    text = table(methods, reference)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

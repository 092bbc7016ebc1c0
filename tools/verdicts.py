"""The effects behind docs/reproduction.md's verdicts, one column per data set.

    python tools/verdicts.py STUDY_DIR [STUDY_DIR ...] [--label NAME ...] [--out FILE.md]

Each STUDY_DIR is a seeded study (``comparison.json`` and its runs, as ``hetlora report``
reads it). Every claim of the paper is a paired difference of two methods' chosen runs (the
grid point chosen on validation, `hetlora.study.report.choose`), seed by seed over the seeds
both have, in test perplexity at the last round (or at the round a row names). Each cell gives
the mean +- sample std of the per-seed differences, the per-seed values, and as a yardstick only
(3 seeds are few, and the seeds are not a random sample of anything) the paired t statistic and
the 95% interval mean +- t(0.975, n-1) * std / sqrt(n). A cell is "-" where a study lacks one of
the two methods or has fewer than two common seeds. Negative: the first method has the lower
perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple

from scipy import stats

from hetlora.study.report import seeded_report

HETLORA = "HetLoRA [5, 50]"
SAME_LAMBDA = "HetLoRA [5, 50] at lambda 0.01"


class Row(NamedTuple):
    """One paired difference: ``first`` minus ``second`` at ``round`` (None: the last)."""

    claim: str
    first: str
    second: str
    round: int | None = None


ROWS = (
    Row("C1 (early)", "HomLoRA r=50", "HomLoRA r=5", round=2),
    Row("C1 (end)", "HomLoRA r=50", "HomLoRA r=5"),
    Row("C2 (r_min)", "HomLoRA r=5", HETLORA),
    Row("C2 (r_max)", "HomLoRA r=50", HETLORA),
    Row("C3", "Recon+SVD", HETLORA),
    Row("C4", HETLORA, "Full FT"),
    Row("C5", "Zero-pad uniform", HETLORA),
    Row("C5 (same lambda)", "Zero-pad uniform", SAME_LAMBDA),
    Row("C6", "HetLoRA no pruning", HETLORA),
    Row("keep (not in the paper)", "HetLoRA keep (not in the paper)", SAME_LAMBDA),
    Row("FLoRA", "FLoRA", HETLORA),
    Row("HLoRA", "HLoRA", HETLORA),
    Row("RB-LoRA", "RB-LoRA", HETLORA),
    Row("FedEx-LoRA", "FedEx-LoRA", HETLORA),
)


def chosen(study: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """method -> seed -> {"lambda_", "test": {round: test ppl}} of each method's chosen runs.

    A study whose HetLoRA group chose lambda 0.01 and has no separate same-lambda group gets
    that group under `SAME_LAMBDA` too (the same runs)."""
    manifest = study / "comparison.json"
    if not manifest.is_file():
        raise SystemExit(f"{study}: no comparison.json (not a comparison directory)")
    entries = [
        e
        for e in json.loads(manifest.read_text())["runs"]
        if (study / e["dir"] / "summary.json").is_file()
    ]
    rows, _, runs, _ = seeded_report(study, entries)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for method, metrics in runs.items():
        picked = [r for r in rows if r["method"] == method and r["selected"]]
        out[method] = {
            int(r["seed"]): {
                "lambda_": r["lambda_"],
                "test": {m["round"]: m["test_ppl"] for m in rounds if "test_ppl" in m},
            }
            for r, rounds in zip(picked, metrics, strict=True)
        }
    het = out.get(HETLORA, {})
    if SAME_LAMBDA not in out and het and all(s["lambda_"] == 0.01 for s in het.values()):
        out[SAME_LAMBDA] = het
    return out


def status(study: Path, done: dict[str, dict[int, dict[str, Any]]] | None = None) -> str:
    """How far a study has got: its finished runs, and how many of its methods (groups) have
    their chosen runs on every seed; ``done`` is `chosen`'s result where the caller has it."""
    entries = json.loads((study / "comparison.json").read_text())["runs"]
    groups = list(dict.fromkeys(e.get("group") or e["name"] for e in entries))
    seeds = {e["seed"] for e in entries}
    done = chosen(study) if done is None else done
    complete = sum(set(done.get(g, {})) == seeds for g in groups)
    finished = sum((study / e["dir"] / "summary.json").is_file() for e in entries)
    whole = "complete" if complete == len(groups) else "partial"
    return (
        f"{finished} runs finished; {complete} of {len(groups)} methods have their chosen runs "
        f"on all {len(seeds)} seeds ({whole})"
    )


def _at(run: dict[str, Any], round_: int | None) -> float:
    test = run["test"]
    return test[max(test) if round_ is None else round_]


def effect(study: dict[str, dict[int, dict[str, Any]]], row: Row) -> dict[str, Any] | None:
    """The paired difference of ``row`` in one study; None where it cannot be formed."""
    if row.first not in study or row.second not in study:
        return None
    a, b = study[row.first], study[row.second]
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [_at(a[s], row.round) - _at(b[s], row.round) for s in seeds]
    n, mean, std = len(diffs), statistics.fmean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return {
        "seeds": seeds,
        "diffs": diffs,
        "mean": mean,
        "std": std,
        "t": mean / (std / math.sqrt(n)) if std > 0 else math.copysign(math.inf, mean),
        "low": mean - half,
        "high": mean + half,
    }


def cell(e: dict[str, Any] | None) -> str:
    if e is None:
        return "-"
    per_seed = ", ".join(f"{d:+.2f}" for d in e["diffs"])
    return (
        f"{e['mean']:+.2f} +- {e['std']:.2f} ({per_seed}); "
        f"t {e['t']:+.2f}, [{e['low']:+.2f}, {e['high']:+.2f}]"
    )


def table(studies: dict[str, dict[str, dict[int, dict[str, Any]]]]) -> str:
    """The markdown table: a row per claim, a column per study."""
    labels = list(studies)
    lines = [
        "| claim | difference (test ppl) | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for row in ROWS:
        cells = [cell(effect(study, row)) for study in studies.values()]
        if all(c == "-" for c in cells):
            continue
        at = f" at round {row.round}" if row.round is not None else ""
        lines.append(
            f"| {row.claim} | {row.first} minus {row.second}{at} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(studies: dict[str, dict[str, dict[int, dict[str, Any]]]], path: Path) -> Path:
    """A forest plot of the table: per claim, each study's mean difference with its 95%
    interval (a yardstick) and its per-seed values; the line at 0 is "no difference"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if any(effect(st, r) for st in studies.values())]
    fig, axes = plt.subplots(
        1, len(studies), figsize=(4.2 * len(studies) + 2.2, 0.45 * len(rows) + 1.4), sharey=True
    )
    axes = [axes] if len(studies) == 1 else list(axes)
    for ax, (label, study) in zip(axes, studies.items(), strict=True):
        for y, row in enumerate(rows):
            e = effect(study, row)
            if e is None:
                continue
            ax.plot([e["low"], e["high"]], [y, y], color="tab:blue", linewidth=2)
            ax.plot([e["mean"]], [y], "o", color="tab:blue")
            ax.plot(e["diffs"], [y] * len(e["diffs"]), "|", color="black", markersize=8)
        ax.axvline(0, color="grey", linewidth=1, linestyle="--")
        ax.set_title(label)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels([f"{r.claim}: {r.first} - {r.second}" for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(
        "Paired differences: mean (dot), 95% interval over the seeds (bar), each seed (tick)"
    )
    fig.supxlabel("test perplexity, first minus second (each data set on its own scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", type=Path)
    parser.add_argument("--label", action="append", default=[], help="a column's name, in order")
    parser.add_argument("--out", type=Path, help="write the table here (default: stdout)")
    parser.add_argument("--plot", type=Path, help="also draw the table as a forest plot (PNG)")
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.studies):
        parser.error("give one --label per study, or none")
    labels = args.label or [p.name for p in args.studies]
    pairs = list(zip(labels, args.studies, strict=True))
    studies = {label: chosen(p) for label, p in pairs}
    text = (
        "Each cell: mean +- sample std of the per-seed differences (per seed); the paired t and "
        "the 95% interval over the seeds, a yardstick only (`tools/verdicts.py`).\n\n"
        + "".join(f"- {label}: {status(p, studies[label])}\n" for label, p in pairs)
        + "\n"
        + table(studies)
    )
    if args.plot:
        plot(studies, args.plot)
        text += f"\n![the table as a forest plot]({args.plot.name})\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The privacy-utility table and plot of a privacy study (configs/privacy.toml).

    python tools/privacy_report.py STUDY_DIR      # e.g. docs/privacy (after `hetlora report`)
    python tools/privacy_report.py --norms DIR    # update norms of the DP runs under DIR

Reads the study's ``summary.csv`` (one row per method and epsilon: the grid point chosen on
validation and its test perplexity over the seeds) and the chosen runs' ``summary.json``
(epsilon spent, delta, noise multiplier, clip norm, base perplexity). Writes
``privacy_utility.md`` (the table, with the commit and host the runs record, and each DP group's
grid of C with its validation perplexity, the chosen C marked and flagged where it sits on the
grid's edge) and
``privacy_utility.png`` (test perplexity against epsilon, mean and each seed, the base model's
perplexity as a line). Groups are named ``<method>, no DP`` or ``<method>, eps <target>``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

NAME = re.compile(r"^(?P<method>.+?), (?:no DP|eps (?P<eps>[0-9.]+))$")


def slug(name: str) -> str:
    """The run folder of a comparison entry (``hetlora.study.compare``'s naming)."""
    from hetlora.study.compare import _slug

    return _slug(name)


def rows(study: Path) -> list[dict]:
    """One dict per (method, epsilon) of the study's ``summary.csv`` with its runs' facts."""
    out = []
    with (study / "summary.csv").open() as f:
        for row in csv.DictReader(f):
            found = NAME.match(row["method"])
            if not found:
                continue
            runs = sorted((study / slug(row["entry"])).glob("seed-*/summary.json"))
            if not runs:
                raise SystemExit(f"error: no runs of {row['entry']!r} in {study}")
            facts = [json.loads(p.read_text()) for p in runs]
            first = facts[0]
            per_seed = [float(x.split(": ")[1]) for x in row["test_per_seed"].split("; ")]
            out.append(
                {
                    "method": found["method"],
                    "target": float(found["eps"]) if found["eps"] else math.inf,
                    "entry": row["entry"],
                    "epsilon": first.get("epsilon", math.inf),
                    "delta": first.get("delta"),
                    "sigma": first.get("dp_noise_multiplier"),
                    "clip": first.get("dp_clip_norm"),
                    "seeds": int(row["seeds"]),
                    "test_mean": float(row["test_mean"]),
                    "test_std": float(row["test_std"]) if row["test_std"] else math.nan,
                    "per_seed": per_seed,
                    "base_ppl": first["base_ppl"],
                    "commit": first.get("provenance", {}).get("commit", "?")[:7],
                    "host": first.get("provenance", {}).get("host", {}).get("cpu", "?"),
                }
            )
    return sorted(out, key=lambda r: (r["method"], -r["target"]))


def grids(study: Path, found: list[dict]) -> str:
    """Each DP group's C grid on its tune seeds (the seeds every C point of the group has run,
    as the study's choice takes them): the mean validation perplexity at every C, the chosen
    one in bold, and whether it is an edge."""
    listed = json.loads((study / "comparison.json").read_text())["runs"]
    chosen = {
        r["method"] + (f", eps {r['target']:g}" if not math.isinf(r["target"]) else ""): r["entry"]
        for r in found
    }
    runs: dict[str, dict[tuple[float, str], dict[int, float]]] = {}  # group -> (C, name) -> seeds
    for run in listed:
        group = run.get("group") or ""
        summary = study / run["dir"] / "summary.json"
        if not NAME.match(group) or not summary.is_file():
            continue
        facts = json.loads(summary.read_text())
        if facts.get("dp_clip_norm"):
            point = runs.setdefault(group, {}).setdefault((facts["dp_clip_norm"], run["name"]), {})
            point[run.get("seed", 0)] = facts.get("final_val_ppl", math.nan)
    lines = [
        "| group | C: validation ppl on the tune seeds (chosen in bold) | tune seeds "
        "| chosen C at the grid's edge |",
        "|---|---|---|---|",
    ]
    for group, by_point in sorted(runs.items()):
        common = sorted(set.intersection(*(set(seeds) for seeds in by_point.values())))
        grid = sorted(  # NaN where the points share no seed yet (a study under way)
            (c, sum(seeds[s] for s in common) / len(common) if common else math.nan, name)
            for (c, name), seeds in by_point.items()
        )
        cells = [
            f"**{c:g}: {v:.2f}**" if name == chosen.get(group) else f"{c:g}: {v:.2f}"
            for c, v, name in grid
        ]
        picked = [i for i, (_, _, name) in enumerate(grid) if name == chosen.get(group)]
        edge = "-" if not picked else ("yes" if picked[0] in (0, len(grid) - 1) else "no")
        lines.append(f"| {group} | {' · '.join(cells)} | {', '.join(map(str, common))} | {edge} |")
    return "\n".join(lines) + "\n"


def _num(x, fmt: str) -> str:
    if x is None:
        return "-"
    return "inf" if isinstance(x, float) and math.isinf(x) else format(x, fmt)


def table(found: list[dict]) -> str:
    lines = [
        "| method | target epsilon | epsilon spent (delta) | sigma | C (chosen on val) "
        "| seeds | test ppl mean ± std | per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in found:
        spent = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f} ({r['delta']:g})"
        lines.append(
            f"| {r['method']} | {_num(r['target'], 'g')} | {spent} | {_num(r['sigma'], '.3f')} "
            f"| {_num(r['clip'], 'g')} | {r['seeds']} | {r['test_mean']:.2f} ± "
            f"{r['test_std']:.2f} | {', '.join(f'{p:.2f}' for p in r['per_seed'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(found: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({r["target"] for r in found if not math.isinf(r["target"])})
    inf_x = (max(finite) * 2.5) if finite else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, method in enumerate(sorted({r["method"] for r in found})):
        mine = sorted(
            (r for r in found if r["method"] == method),
            key=lambda r: inf_x if math.isinf(r["target"]) else r["target"],
        )
        xs = [inf_x if math.isinf(r["target"]) else r["target"] for r in mine]
        shift = 1 + 0.04 * (i - 1)  # side by side
        ax.errorbar(
            [x * shift for x in xs],
            [r["test_mean"] for r in mine],
            yerr=[0 if math.isnan(r["test_std"]) else r["test_std"] for r in mine],
            marker="o",
            capsize=3,
            label=method,
        )
        for x, r in zip(xs, mine, strict=True):
            ax.scatter([x * shift] * len(r["per_seed"]), r["per_seed"], s=10, alpha=0.4)
    ax.axhline(found[0]["base_ppl"], color="grey", ls="--", lw=1, label="base model")
    ax.set_xscale("log")
    ax.set_xticks([*finite, inf_x], [*(f"{x:g}" for x in finite), "∞ (no DP)"])
    ax.set_xlabel("epsilon (delta 1e-5)")
    ax.set_ylabel("test perplexity")
    ax.set_title("Privacy-utility: mean ± std over seeds (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def norms(root: Path) -> str:
    """The clients' update norms before clipping (``update_norm`` of every client entry) of
    each run under ``root``: min, median and max over all rounds, as a markdown table."""
    import numpy as np

    lines = ["| run | replies | min | median | max |", "|---|---|---|---|---|"]
    for metrics in sorted(root.glob("**/metrics.jsonl")):
        values = [
            c["update_norm"]
            for line in metrics.read_text().splitlines()
            for c in json.loads(line).get("clients", {}).values()
            if "update_norm" in c
        ]
        if values:
            lo, mid, hi = np.percentile(values, [0, 50, 100])
            name = metrics.parent.relative_to(root)
            lines.append(f"| {name} | {len(values)} | {lo:.3f} | {mid:.3f} | {hi:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--norms":
        print(norms(Path(argv[1])), end="")
        return 0
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    study = Path(argv[0])
    if not (study / "summary.csv").is_file():
        print(
            f"error: {study / 'summary.csv'} not found (run hetlora report first)", file=sys.stderr
        )
        return 2
    found = rows(study)
    if not found:
        print(f"error: no '<method>, no DP' or '<method>, eps N' rows in {study}", file=sys.stderr)
        return 2
    provenance = sorted({(r["commit"], r["host"]) for r in found})
    made = "; ".join(f"commit {c} on {h}" for c, h in provenance)
    base = found[0]["base_ppl"]
    text = f"Runs made by {made}. The base model's test perplexity: {base:.2f}.\n\n"
    text += table(found)
    if (study / "comparison.json").is_file():
        text += "\nThe grid of C of each DP group on its tune seeds:\n\n" + grids(study, found)
    (study / "privacy_utility.md").write_text(text)
    plot(found, study / "privacy_utility.png")
    print(text, end="")
    print(f"plot: {study / 'privacy_utility.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Tables and plots from finished runs and comparisons (rerunnable: ``hetlora report DIR``).

A run directory holds ``summary.json`` and ``metrics.jsonl``; a comparison directory holds
``comparison.json`` (the run names in order) and one run directory per method, or per (method,
seed) when the comparison has ``seeds``.

A seeded comparison is reported as a study: ``results.csv``/``.md`` have one row per (entry,
seed); each ``group`` (one method over a grid of lr, lambda) keeps the grid point with the
lowest final validation perplexity *averaged over the seeds* (the test perplexity only where a
run has no validation split; ``selected_on`` says which: `choose`); ``summary.csv``/``.md``
give each method's chosen point with the mean, sample std (ddof 1) and per-seed values of its
final test and validation perplexity; ``paired.csv``/``.md`` give each method's chosen runs
minus the reference method's (`REFERENCE`), seed by seed (`paired`);
``curves.csv``/``.md`` give the chosen points' test and validation perplexity at every
evaluated round over the seeds (`curve_rows`). Curves show the mean over seeds with a
min-max band.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hetlora import provenance
from hetlora.errors import HetLoRAError
from hetlora.runtime.rounds import read_metrics

#: Metrics by method: name -> the ``metrics.jsonl`` rows of each of its seeds.
Runs = dict[str, list[list[dict[str, Any]]]]

COLUMNS = [
    ("name", "method"),
    ("final_ppl", "final ppl"),
    ("best_ppl", "best ppl"),
    ("best_round", "best round"),
    ("rouge_l", "ROUGE-L"),
    ("total_bytes", "total bytes"),
    ("client_flops", "client FLOPs"),
    ("mean_final_rank", "mean final rank"),
    ("global_rank", "global adapter rank"),
]


#: Columns of a seeded comparison's ``results.csv``: one row per (entry, seed).
SEED_COLUMNS = [
    ("name", "entry"),
    ("method", "method"),
    ("seed", "seed"),
    ("lr", "lr"),
    ("lambda_", "lambda"),
    ("val_ppl", "val ppl"),
    ("test_ppl", "test ppl"),
    ("best_val_ppl", "best val ppl"),
    ("best_ppl", "best test ppl"),
    ("best_round", "best test round"),
    ("total_bytes", "total bytes"),
    ("client_flops", "client FLOPs"),
    ("mean_final_rank", "mean final rank"),
    ("global_rank", "global adapter rank"),
    ("selected", "chosen"),
]

#: Columns of a seeded comparison's ``summary.csv``: one row per method (its chosen grid point).
SUMMARY_COLUMNS = [
    ("method", "method"),
    ("entry", "chosen entry"),
    ("lr", "lr"),
    ("lambda_", "lambda"),
    ("seeds", "seeds"),
    ("test_mean", "test ppl mean"),
    ("test_std", "test ppl std"),
    ("test_per_seed", "test ppl per seed"),
    ("val_mean", "val ppl mean"),
    ("val_std", "val ppl std"),
    ("val_per_seed", "val ppl per seed"),
    ("global_rank_mean", "global adapter rank (mean)"),
    ("total_bytes", "total bytes (mean)"),
    ("selected_on", "chosen on"),
]

#: The others are compared, seed by seed, with the first method whose name starts with this
#: (the paper study's "HetLoRA [5, 50]"; the first method where none does).
REFERENCE = "HetLoRA"

#: Columns of a seeded comparison's ``paired.csv`` (`paired`).
PAIRED_COLUMNS = [
    ("method", "method"),
    ("reference", "against"),
    ("seeds", "seeds"),
    ("diff_mean", "test ppl diff mean"),
    ("diff_std", "test ppl diff std"),
    ("diff_per_seed", "test ppl diff per seed"),
    ("val_diff_mean", "val ppl diff mean"),
    ("val_diff_std", "val ppl diff std"),
]

PPL_KEYS = (
    "diff_mean",
    "diff_std",
    "val_diff_mean",
    "val_diff_std",
    "final_ppl",
    "best_ppl",
    "val_ppl",
    "test_ppl",
    "best_val_ppl",
    "test_mean",
    "test_std",
    "test_min",
    "test_max",
    "val_mean",
    "val_std",
)


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``summary.json`` and the rows of ``metrics.jsonl`` of a finished run."""
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    if not summary_path.is_file() or not metrics_path.is_file():
        raise HetLoRAError(
            f"{run_dir} is not a finished run (summary.json or metrics.jsonl missing)"
        )
    try:
        summary = json.loads(summary_path.read_text())
        rows = read_metrics(metrics_path)
    except json.JSONDecodeError as exc:
        raise HetLoRAError(f"{run_dir}: unreadable run files ({exc})") from None
    return summary, rows


def adapter_rank(run_dir: Path) -> float:
    """The rank the saved global adapter really has: the number of rank positions j where some
    module's B[:, j] and A[j, :] are both non-zero (the positions that add to B A), the largest
    over modules. Below r_max when aggregation left positions at zero. A run kept without its
    adapter (the study's committed small files) gives the same count from its last metrics
    row (``global_rank_final`` in ``summary.json``); NaN for a method without an adapter."""
    path = run_dir / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        summary = run_dir / "summary.json"
        final = (
            json.loads(summary.read_text()).get("global_rank_final") if summary.is_file() else None
        )
        return math.nan if final is None else float(final)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    rank = 0
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            continue
        live = (a != 0).any(dim=1) & (b != 0).any(dim=0)
        rank = max(rank, int(live.sum()))
    return float(rank)


def result_row(name: str, summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One line of the results table (``run_dir`` for the saved adapter's rank)."""
    has_ranks = summary.get("mean_rank_final", 0) > 0
    return {
        "name": name,
        "final_ppl": summary["final_ppl"],
        "best_ppl": summary["best_ppl"],
        "best_round": summary["best_round"],
        "rouge_l": summary.get("rouge_l", math.nan),
        "total_bytes": summary.get("bytes_up", 0) + summary.get("bytes_down", 0),
        "client_flops": summary.get("flops", 0.0),
        "mean_final_rank": summary["mean_rank_final"] if has_ranks else math.nan,
        "global_rank": adapter_rank(run_dir),
        "val_ppl": summary.get("final_val_ppl", math.nan),
        "best_val_ppl": summary.get("best_val_ppl", math.nan),
    }


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if key in PPL_KEYS:
        return f"{value:.2f}"
    if key == "rouge_l":
        return f"{value:.3f}"
    if key == "total_bytes":
        return f"{value / 2**20:.1f} MiB"
    if key == "client_flops":
        return f"{value:.3g}"
    if key in ("mean_final_rank", "global_rank_mean", "client_rank_mean"):
        return f"{value:.1f}"
    if key in ("lr", "lambda_"):
        return f"{value:g}"
    if key == "global_rank":
        return f"{value:.0f}"
    return str(value)


def write_tables(
    rows: list[dict[str, Any]],
    out_dir: Path,
    stem: str = "results",
    columns: list[tuple[str, str]] = COLUMNS,
) -> list[Path]:
    """``<stem>.csv`` (raw numbers) and ``<stem>.md`` (formatted); returns the two paths."""
    paths = [out_dir / f"{stem}.csv", out_dir / f"{stem}.md"]
    with paths[0].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k, _ in columns], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(k, row[k]) for k, _ in columns) + " |")
    paths[1].write_text("\n".join(lines) + "\n")
    return paths


def _curve(rows: list[dict[str, Any]], x: str, y: str = "test_ppl") -> tuple[list, list]:
    xs, ys, total = [], [], 0.0
    for row in rows:
        if x == "round":
            value = float(row["round"])
        else:
            total += float(
                row.get(x, 0) if x != "bytes" else row.get("bytes_up", 0) + row.get("bytes_down", 0)
            )
            value = total
        if y in row:
            xs.append(value)
            ys.append(row[y])
    return xs, ys


def _spread(seeds: list[list[dict[str, Any]]], x: str, y: str = "test_ppl"):
    """Mean x, mean y, min y and max y over seeds, point by point (the seeds of one entry share
    their evaluation rounds; a seed with fewer points cuts the others)."""
    curves = [_curve(rows, x, y) for rows in seeds]
    n = min(len(xs) for xs, _ in curves)
    xs = [sum(c[0][i] for c in curves) / len(curves) for i in range(n)]
    ys = [[c[1][i] for c in curves] for i in range(n)]
    return xs, *([f(v) for v in ys] for f in (_mean, min, max))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line(ax, xs, mean, low, high, label: str, band: bool, alpha: float = 0.15) -> None:
    """The mean as a line with markers, and (``band``) the min-max band in its colour."""
    (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=label)
    if band:
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=alpha, linewidth=0)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_data(facts: dict[str, Any], path: Path) -> Path:
    """``hetlora data``'s plot (`hetlora.runtime.splits.data_overview`'s facts): every
    client's examples, most first (log scale), and the sampled examples' lengths in tokens with
    the ``max_seq_len`` cut."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    sizes = facts["per_client"]
    left.bar(range(1, len(sizes) + 1), sizes, width=1.0)
    left.set_yscale("log")
    left.set_xlabel("client (most examples first)")
    left.set_ylabel("examples")
    left.set_title(f"{facts['clients']} clients")
    right.hist(facts["token_lengths"], bins=40)
    right.axvline(facts["max_seq_len"], color="black", linestyle="--", linewidth=1)
    right.set_xlabel("tokens per example (whole)")
    right.set_ylabel("examples")
    right.set_title(
        f"max_seq_len {facts['max_seq_len']} cuts {100 * facts['truncated']:.1f} % "
        f"(of {facts['tokens_sampled']} sampled)"
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"data: {facts['data']}", parse_math=False)  # a path may hold "$"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")  # at this path, whatever its suffix
    finally:
        plt.close(fig)
    return path


def plot_curves(runs: Runs, out_dir: Path, title: str = "") -> list[Path]:
    """Perplexity against round, cumulative bytes and cumulative client FLOPs, one line per
    method; with several seeds, the mean over seeds with a min-max band. Test perplexity
    (``test_ppl``); where the runs have a validation split, also ``val_vs_round.png``."""
    plt = _pyplot()
    seeded = any(len(seeds) > 1 for seeds in runs.values())
    has_val = all("val_ppl" in seeds[0][0] for seeds in runs.values())
    plots = [
        ("round", "test_ppl", "round", "ppl_vs_round.png", False),
        ("bytes", "test_ppl", "cumulative bytes sent and received", "ppl_vs_bytes.png", True),
        ("flops", "test_ppl", "cumulative client training FLOPs", "ppl_vs_flops.png", True),
    ]
    if has_val:
        plots.append(("round", "val_ppl", "round", "val_vs_round.png", False))
    written = []
    for x, y, label, fname, log in plots:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, seeds in runs.items():
            xs, mean, low, high = _spread(seeds, x, y)
            if log:  # round 0 sits at x = 0, off a log axis
                keep = [i for i, a in enumerate(xs) if a > 0]
                xs, mean, low, high = ([v[i] for i in keep] for v in (xs, mean, low, high))
            label_n = f"{name} ({len(seeds)} seeds)" if seeded else name
            _line(ax, xs, mean, low, high, label_n, band=len(seeds) > 1)
        ax.set_xlabel(label)
        if x == "round":
            _integer_ticks(ax)
        which = "validation" if y == "val_ppl" else "held-out test"
        ax.set_ylabel(f"{which} perplexity" + (" (mean, min-max band)" if seeded else ""))
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title or f"{which} perplexity")
        written.append(_save(fig, out_dir / fname))
    return written


def _integer_ticks(ax: Any) -> None:
    """Whole numbers only on the x axis (rounds are counted, never fractional)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_rank_dynamics(runs: Runs, out_dir: Path) -> Path | None:
    """``rank_dynamics.png``: per method, the live global rank against round (positions where
    both global factors are non-zero, the largest over modules; mean over seeds, min-max band),
    and the distribution of every client's current rank (mean, and the min-max over clients
    and seeds). Methods whose rows lack these fields (runs made before they were recorded,
    methods without a global adapter or ranks) are left out of the panel concerned."""
    global_rank = {n: s for n, s in runs.items() if all("global_rank" in r[-1] for r in s)}
    client = {n: s for n, s in runs.items() if all("ranks" in r[-1] for r in s)}
    if not global_rank and not client:
        return None
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(12, 4.5))
    for name, seeds in global_rank.items():
        _line(left, *_spread(seeds, "round", "global_rank"), name, band=len(seeds) > 1)
    for name, seeds in client.items():
        n = min(len(rows) for rows in seeds)
        rounds = [seeds[0][i]["round"] for i in range(n)]
        pooled = [[v for rows in seeds for v in rows[i]["ranks"].values()] for i in range(n)]
        mean, low, high = ([f(p) for p in pooled] for f in (_mean, min, max))
        _line(right, rounds, mean, low, high, name, band=True, alpha=0.12)
    left.set_title("live global rank (both factors non-zero; max over modules)", fontsize=10)
    right.set_title("every client's current rank (mean; band: min-max)", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("round")
        _integer_ticks(ax)
        ax.set_ylabel("rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_dir / "rank_dynamics.png")


#: Columns of ``rank_dynamics.csv``: the numbers behind ``rank_dynamics.png``.
RANK_COLUMNS = [
    ("method", "method"),
    ("round", "round"),
    ("seeds", "seeds"),
    ("global_rank_mean", "live global rank (mean)"),
    ("global_rank_min", "min"),
    ("global_rank_max", "max"),
    ("client_rank_mean", "client rank (mean)"),
    ("client_rank_min", "min"),
    ("client_rank_max", "max"),
]


def rank_rows(runs: Runs) -> list[dict[str, Any]]:
    """Per method and round: the live global rank over seeds (mean, min, max) and every
    client's current rank pooled over clients and seeds (mean, min, max); NaN where a run's
    rows lack the field. Empty when no run has either."""
    out = []
    for name, seeds in runs.items():
        n = min(len(rows) for rows in seeds)
        for i in range(n):
            rows = [run[i] for run in seeds]
            glob = [r["global_rank"] for r in rows if "global_rank" in r]
            ranks = [v for r in rows for v in r.get("ranks", {}).values()]
            if not glob and not ranks:
                continue
            out.append(
                {
                    "method": name,
                    "round": rows[0]["round"],
                    "seeds": len(rows),
                    "global_rank_mean": _mean(glob),
                    "global_rank_min": min(glob, default=math.nan),
                    "global_rank_max": max(glob, default=math.nan),
                    "client_rank_mean": _mean(ranks),
                    "client_rank_min": min(ranks, default=math.nan),
                    "client_rank_max": max(ranks, default=math.nan),
                }
            )
    return out


#: Columns of a seeded comparison's ``curves.csv``: the numbers behind ``ppl_vs_round.png`` and
#: ``val_vs_round.png``, per method (its chosen grid point) and evaluated round, over seeds.
CURVE_COLUMNS = [
    ("method", "method"),
    ("round", "round"),
    ("seeds", "seeds"),
    ("test_mean", "test ppl mean"),
    ("test_std", "std"),
    ("test_min", "min"),
    ("test_max", "max"),
    ("val_mean", "val ppl mean"),
    ("val_std", "val std"),
]


def curve_rows(runs: Runs) -> list[dict[str, Any]]:
    """Per method and evaluated round: test (``test_ppl``) and validation perplexity over the
    seeds (mean, sample std; test min and max); the validation columns are NaN without a
    validation split. Rounds are those every seed of the method evaluated."""
    out = []
    for name, seeds in runs.items():
        by_round = [{r["round"]: r for r in rows if "test_ppl" in r} for rows in seeds]
        for rnd in sorted(set.intersection(*(set(b) for b in by_round))):
            tests = [b[rnd]["test_ppl"] for b in by_round]
            vals = [b[rnd]["val_ppl"] for b in by_round if "val_ppl" in b[rnd]]
            out.append(
                {
                    "method": name,
                    "round": rnd,
                    "seeds": len(tests),
                    "test_mean": _mean(tests),
                    "test_std": _std(tests),
                    "test_min": min(tests),
                    "test_max": max(tests),
                    "val_mean": _mean(vals),
                    "val_std": _std(vals),
                }
            )
    return out


def plot_ranks(runs: Runs, out_dir: Path) -> Path | None:
    """Client ranks over rounds under self-pruning, for runs where some rank changed (the
    first seed of each method).

    Each round shows the current ranks of every client that has taken part so far (a box per
    round), so pruning is visible however small the share of clients sampled.
    """
    series = {}
    for name, seeds in runs.items():
        rows = seeds[0]
        current: dict[str, int] = {}
        rounds, boxes, changed = [], [], 0
        for row in rows[1:]:
            for client, rank in (row.get("client_ranks") or {}).items():
                received = (row.get("ranks_received") or {}).get(client, rank)
                changed += int(rank != received)
                current[client] = rank
            if current and any(current.values()):
                rounds.append(row["round"])
                boxes.append(sorted(current.values()))
        if changed:
            series[name] = (rounds, boxes, changed, len(current))
    if not series:
        return None
    fig, axes = _pyplot().subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (name, (rounds, boxes, changed, seen)) in zip(axes[0], series.items(), strict=True):
        ax.boxplot(boxes, positions=rounds, widths=0.6)
        ax.plot(rounds, [sum(b) / len(b) for b in boxes], marker="o", markersize=3, label="mean")
        ax.set_title(f"{name}\n{changed} prunings among {seen} clients that took part", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("rank of clients that took part")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_dir / "ranks.png")


def best_of_groups(
    entries: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> list[tuple[str, dict[str, Any]]]:
    """The best entry of each ``group`` (a hyperparameter grid of one method), as (entry name,
    row labelled "group (entry name)"); untagged entries stand alone. Best is `choose`'s rule,
    the one rule of every grid: the lowest final validation perplexity where every run of the
    group has a validation split, else the lowest final test perplexity."""
    grids: dict[str, dict[str, list[dict[str, Any]]]] = {}
    by_name: dict[str, dict[str, Any]] = {}
    for entry, row in zip(entries, rows, strict=True):
        key = entry.get("group") or entry["name"]
        point = {
            "seed": row.get("seed", 0),
            "val_ppl": row["val_ppl"],
            "test_ppl": row["final_ppl"],
        }
        grids.setdefault(key, {})[row["name"]] = [point]
        by_name[row["name"]] = row
    best = [(key, by_name[choose(grid)[0]]) for key, grid in grids.items()]
    return [
        (row["name"], {**row, "name": key if key == row["name"] else f"{key} ({row['name']})"})
        for key, row in best
    ]


def _run_settings(run_dir: Path) -> dict[str, Any]:
    """``lr`` and ``lambda_`` of a run, from its ``config.toml`` (``lambda_`` NaN unless
    ``hetlora`` with pruning, the only method it acts on)."""
    import tomllib

    try:
        cfg = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise HetLoRAError(f"{run_dir}: unreadable config.toml ({exc})") from None
    acts = cfg.get("method") == "hetlora" and cfg.get("pruning", True)
    return {"lr": cfg.get("lr", math.nan), "lambda_": cfg.get("lambda_") if acts else math.nan}


def _std(values: list[float]) -> float:
    """Sample standard deviation (ddof 1); NaN for a single value."""
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def seeded_report(
    directory: Path, entries: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Runs, list[dict[str, Any]]]:
    """The per-(entry, seed) rows, the per-method summary rows, the chosen entries' metrics by
    method, and the paired rows (`paired`; empty with one method). See the module
    docstring for the selection rule."""
    rows, metrics = [], {}
    for entry in entries:
        run_dir = directory / entry["dir"]
        summary, run_metrics = load_run(run_dir)
        row = result_row(entry["name"], summary, run_dir) | _run_settings(run_dir)
        row.update(
            method=entry.get("group") or entry["name"],
            seed=entry.get("seed", ""),
            test_ppl=row["final_ppl"],
            selected=False,
        )
        rows.append(row)
        metrics[(entry["name"], entry.get("seed"))] = run_metrics
    by_method: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {}).setdefault(row["name"], []).append(row)
    chosen = {method: choose(grid) for method, grid in by_method.items()}
    summary_rows, runs, chosen_runs = [], {}, {}
    for method, (name, selected_on) in chosen.items():
        picked = chosen_runs[method] = by_method[method][name]
        for r in picked:
            r["selected"] = True
        tests = [r["test_ppl"] for r in picked]
        vals = [r["val_ppl"] for r in picked]
        summary_rows.append(
            {
                "method": method,
                "entry": name,
                "lr": picked[0]["lr"],
                "lambda_": picked[0]["lambda_"],
                "seeds": len(picked),
                "test_mean": _mean(tests),
                "test_std": _std(tests),
                "test_per_seed": _per_seed(picked, "test_ppl"),
                "val_mean": _mean(vals),
                "val_std": _std(vals),
                "val_per_seed": _per_seed(picked, "val_ppl"),
                "global_rank_mean": _mean([r["global_rank"] for r in picked]),
                "total_bytes": _mean([r["total_bytes"] for r in picked]),
                "selected_on": selected_on,
            }
        )
        runs[method] = [metrics[(name, r["seed"])] for r in picked]
    pairs = paired(chosen_runs, reference_method(list(chosen_runs))) if len(chosen_runs) > 1 else []
    return rows, summary_rows, runs, pairs


def reference_method(methods: list[str]) -> str:
    """The method the others are paired with: the first named ``REFERENCE...``, else the first."""
    return next((m for m in methods if m.startswith(REFERENCE)), methods[0])


def paired(picked: dict[str, list[dict[str, Any]]], reference: str) -> list[dict[str, Any]]:
    """Each method's chosen runs minus ``reference``'s, seed by seed, over their common seeds.

    A seed fixes the clients, their train/validation/test splits and each round's sample for
    every method, so the per-seed difference removes what the seeds' different held-out sets
    add to each method's own spread. Negative: lower perplexity than the reference."""
    ref = {r["seed"]: r for r in picked[reference]}
    out = []
    for method, runs in picked.items():
        if method == reference:
            continue
        common = [r for r in runs if r["seed"] in ref]
        diffs = [r["test_ppl"] - ref[r["seed"]]["test_ppl"] for r in common]
        val_diffs = [r["val_ppl"] - ref[r["seed"]]["val_ppl"] for r in common]
        out.append(
            {
                "method": method,
                "reference": reference,
                "seeds": len(common),
                "diff_mean": _mean(diffs),
                "diff_std": _std(diffs),
                "diff_per_seed": "; ".join(
                    f"s{r['seed']}: {d:+.2f}" for r, d in zip(common, diffs, strict=True)
                ),
                "val_diff_mean": _mean(val_diffs),
                "val_diff_std": _std(val_diffs),
            }
        )
    return out


def choose(grid: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    """The chosen grid point of one method, and what it was chosen on.

    ``grid`` maps each entry name to its runs' rows (``seed``, ``val_ppl``, ``test_ppl``). The
    choice is the lowest mean final validation perplexity over the seeds that every grid point
    has run (all of them, or the ``tune_seeds`` of a two-stage study, whose winner alone has
    run the others); the test perplexity only where some run has no validation split."""
    rows = [r for runs in grid.values() for r in runs]
    on_val = all(not math.isnan(r["val_ppl"]) for r in rows)
    key = "val_ppl" if on_val else "test_ppl"
    common = set.intersection(*({r["seed"] for r in runs} for runs in grid.values()))
    name = min(grid, key=lambda n: _mean([r[key] for r in grid[n] if r["seed"] in common]))
    if not on_val:
        return name, "test (no validation split)"
    if len(grid) == 1:
        return name, "val (no grid)"
    if len(common) < max(len(runs) for runs in grid.values()):
        seeds = ", ".join(str(s) for s in sorted(common, key=str))
        return name, f"val (mean over tune seeds {seeds})"
    return name, "val (mean over seeds)"


def _per_seed(rows: list[dict[str, Any]], key: str) -> str:
    return "; ".join(f"s{r['seed']}: {r[key]:.2f}" for r in rows)


def report(directory: Path | str) -> dict[str, Any]:
    """Redraw the tables and plots of a finished run or comparison; returns what was written.

    A comparison whose entries carry a ``group`` (the same method over a hyperparameter grid)
    also gets ``best.csv``/``best.md`` (the best entry of each group, on validation where the
    runs have it), and its plots show one line per group, the best one. A comparison with
    ``seeds`` gets the study's tables instead (module docstring). A comparison that has not
    finished is reported on its finished runs; ``missing`` names the others.
    ``provenance.csv``/``.md`` (and ``provenance`` in the result) list each run's commit, host,
    versions, precision and date (`hetlora.provenance`).
    """
    directory = Path(directory)
    manifest = directory / "comparison.json"
    summary_rows: list[dict[str, Any]] = []
    missing: list[str] = []
    if manifest.is_file():
        entries = json.loads(manifest.read_text())["runs"]
        missing = [
            e["dir"] for e in entries if not (directory / e["dir"] / "summary.json").is_file()
        ]
        entries = [e for e in entries if e["dir"] not in missing]
        if not entries:
            raise HetLoRAError(f"{directory}: no run of the comparison has finished yet")
    elif (directory / "summary.json").is_file():  # a single run: a comparison of itself
        entries = [{"name": load_run(directory)[0].get("method", "run"), "dir": "."}]
    else:
        raise HetLoRAError(f"{directory} is neither a run nor a comparison directory")
    if any("seed" in e for e in entries):
        rows, summary_rows, runs, pairs = seeded_report(directory, entries)
        tables = write_tables(rows, directory, columns=SEED_COLUMNS)
        tables += write_tables(summary_rows, directory, "summary", SUMMARY_COLUMNS)
        if pairs:
            tables += write_tables(pairs, directory, "paired", PAIRED_COLUMNS)
        tables += write_tables(curve_rows(runs), directory, "curves", CURVE_COLUMNS)
    else:
        metrics_by_name, rows = {}, []
        for entry in entries:
            summary, metrics = load_run(directory / entry["dir"])
            metrics_by_name[entry["name"]] = [metrics]
            rows.append(result_row(entry["name"], summary, directory / entry["dir"]))
        tables = write_tables(rows, directory)
        if any(e.get("group") for e in entries):
            best = best_of_groups(entries, rows)
            tables += write_tables([row for _, row in best], directory, "best")
            runs = {row["name"]: metrics_by_name[entry] for entry, row in best}
        else:
            runs = metrics_by_name
    prov = [provenance.row(_label(e), load_run(directory / e["dir"])[0]) for e in entries]
    tables += write_tables(prov, directory, "provenance", provenance.COLUMNS)
    plots = plot_curves(runs, directory)
    if ranks := rank_rows(runs):
        tables += write_tables(ranks, directory, "rank_dynamics", RANK_COLUMNS)
    plots += [p for p in (plot_ranks(runs, directory), plot_rank_dynamics(runs, directory)) if p]
    return {
        "rows": rows,
        "summary": summary_rows,
        "plots": plots,
        "tables": tables,
        "missing": missing,
        "provenance": prov,
    }


def _label(entry: dict[str, Any]) -> str:
    """A run's name in the provenance table: the entry, and its seed in a seeded comparison."""
    return f"{entry['name']} (seed {entry['seed']})" if "seed" in entry else entry["name"]

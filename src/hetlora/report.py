"""Tables and plots from finished runs and comparisons (rerunnable: ``hetlora report DIR``).

A run directory holds ``summary.json`` and ``metrics.jsonl``; a comparison directory holds
``comparison.json`` (the run names in order) and one run directory per method.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hetlora.errors import HetLoRAError

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


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``summary.json`` and the rows of ``metrics.jsonl`` of a finished run."""
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    if not summary_path.is_file() or not metrics_path.is_file():
        raise HetLoRAError(
            f"{run_dir} is not a finished run (summary.json or metrics.jsonl missing)"
        )
    try:
        summary = json.loads(summary_path.read_text())
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise HetLoRAError(f"{run_dir}: unreadable run files ({exc})") from None
    return summary, rows


def adapter_rank(run_dir: Path) -> float:
    """The rank the saved global adapter really has: the number of rank positions j where some
    module's B[:, j] and A[j, :] are both non-zero (the positions that add to B A), the largest
    over modules. Below r_max when aggregation left positions at zero; NaN without an adapter."""
    path = run_dir / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        return math.nan
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


def result_row(name: str, summary: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
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
        "global_rank": adapter_rank(run_dir) if run_dir is not None else math.nan,
    }


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if key in ("final_ppl", "best_ppl"):
        return f"{value:.2f}"
    if key == "rouge_l":
        return f"{value:.3f}"
    if key == "total_bytes":
        return f"{value / 2**20:.1f} MiB"
    if key == "client_flops":
        return f"{value:.3g}"
    if key == "mean_final_rank":
        return f"{value:.1f}"
    if key == "global_rank":
        return f"{value:.0f}"
    return str(value)


def write_tables(rows: list[dict[str, Any]], out_dir: Path, stem: str = "results") -> None:
    """``<stem>.csv`` (raw numbers) and ``<stem>.md`` (formatted)."""
    with (out_dir / f"{stem}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(k, row[k]) for k, _ in COLUMNS) + " |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def _curve(rows: list[dict[str, Any]], x: str) -> tuple[list[float], list[float]]:
    xs, ys, total = [], [], 0.0
    for row in rows:
        if x == "round":
            value = float(row["round"])
        else:
            total += float(
                row.get(x, 0) if x != "bytes" else row.get("bytes_up", 0) + row.get("bytes_down", 0)
            )
            value = total
        if "eval_ppl" in row:
            xs.append(value)
            ys.append(row["eval_ppl"])
    return xs, ys


def plot_curves(
    runs: dict[str, list[dict[str, Any]]], out_dir: Path, title: str = ""
) -> list[Path]:
    """Eval perplexity against round, cumulative bytes and cumulative client FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x, label, fname, log in (
        ("round", "round", "ppl_vs_round.png", False),
        ("bytes", "cumulative bytes sent and received", "ppl_vs_bytes.png", True),
        ("flops", "cumulative client training FLOPs", "ppl_vs_flops.png", True),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rows in runs.items():
            xs, ys = _curve(rows, x)
            if log:  # round 0 sits at x = 0, off a log axis
                kept = [(a, b) for a, b in zip(xs, ys, strict=True) if a > 0]
                xs, ys = [a for a, _ in kept], [b for _, b in kept]
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title or "eval perplexity")
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_ranks(runs: dict[str, list[dict[str, Any]]], out_dir: Path) -> Path | None:
    """Client ranks over rounds under self-pruning, for runs where some rank changed.

    Each round shows the current ranks of every client that has taken part so far (a box per
    round), so pruning is visible however small the share of clients sampled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, rows in runs.items():
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
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (name, (rounds, boxes, changed, seen)) in zip(axes[0], series.items(), strict=True):
        ax.boxplot(boxes, positions=rounds, widths=0.6)
        ax.plot(rounds, [sum(b) / len(b) for b in boxes], marker="o", markersize=3, label="mean")
        ax.set_title(f"{name}\n{changed} prunings among {seen} clients that took part", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("rank of clients that took part")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "ranks.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def best_of_groups(
    entries: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> list[tuple[str, dict[str, Any]]]:
    """The best entry (lowest final perplexity) of each ``group`` (a hyperparameter grid of one
    method), as (entry name, row labelled "group (entry name)"); untagged entries stand alone."""
    best: dict[str, dict[str, Any]] = {}
    for entry, row in zip(entries, rows, strict=True):
        key = entry.get("group") or entry["name"]
        if key not in best or row["final_ppl"] < best[key]["final_ppl"]:
            best[key] = row
    return [
        (row["name"], {**row, "name": key if key == row["name"] else f"{key} ({row['name']})"})
        for key, row in best.items()
    ]


def report(directory: Path | str) -> dict[str, Any]:
    """Redraw the tables and plots of a finished run or comparison; returns what was written.

    A comparison whose entries carry a ``group`` (the same method over a hyperparameter grid)
    also gets ``best.csv``/``best.md`` (the best entry of each group by final perplexity), and
    its plots show one line per group, the best one.
    """
    directory = Path(directory)
    manifest = directory / "comparison.json"
    tables = [directory / "results.csv", directory / "results.md"]
    if manifest.is_file():
        entries = json.loads(manifest.read_text())["runs"]
        metrics_by_name, rows = {}, []
        for entry in entries:
            summary, metrics = load_run(directory / entry["dir"])
            metrics_by_name[entry["name"]] = metrics
            rows.append(result_row(entry["name"], summary, directory / entry["dir"]))
        write_tables(rows, directory)
        if any(e.get("group") for e in entries):
            best = best_of_groups(entries, rows)
            write_tables([row for _, row in best], directory, stem="best")
            tables += [directory / "best.csv", directory / "best.md"]
            runs = {row["name"]: metrics_by_name[entry] for entry, row in best}
        else:
            runs = metrics_by_name
    elif (directory / "summary.json").is_file():
        summary, metrics = load_run(directory)
        name = summary.get("method", "run")
        runs = {name: metrics}
        rows = [result_row(name, summary, directory)]
        write_tables(rows, directory)
    else:
        raise HetLoRAError(f"{directory} is neither a run nor a comparison directory")
    plots = plot_curves(runs, directory)
    ranks = plot_ranks(runs, directory)
    if ranks:
        plots.append(ranks)
    return {"rows": rows, "plots": plots, "tables": tables}

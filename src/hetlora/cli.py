"""The ``hetlora`` command line: federated fine-tuning runs with live progress and a summary table.

Only this module prints. Expected failures (`hetlora.errors.HetLoRAError`) become one
line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hetlora.errors import HetLoRAError
from hetlora.runtime.flower.cli import flower_app

app = typer.Typer(
    help="HetLoRA: federated fine-tuning with heterogeneous LoRA ranks (arXiv 2401.06432).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(flower_app, name="flower")  # hetlora flower app (local processes: scripts/localfed)
# Piped output (logs, CI) gets a width that fits the tables instead of rich's default of 80.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log library messages.")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace the run files in a non-empty --out.")
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory (must be empty or new).")]


def _error_line(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """An expected failure (`HetLoRAError`) inside: one ``error:`` line, exit code 2."""
    try:
        yield
    except HetLoRAError as exc:
        _error_line(str(exc))
        raise typer.Exit(code=2) from None


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class LiveProgress:
    """Turns the engine's progress events into a rich display: rounds, client steps, loss, rank."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.rounds = progress.add_task("rounds", total=None, status="setting up")
        self.steps = progress.add_task("client", total=None, status="", visible=False)

    def reset(self) -> None:
        """A new run in the same display (the next method of a comparison): rounds from 0."""
        self.progress.reset(self.rounds, total=None, status="setting up")
        self.progress.update(self.steps, visible=False)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        p = self.progress
        if kind == "setup":
            p.update(self.rounds, status=f"loading {event['stage']}")
        elif kind == "eval":
            p.update(self.rounds, status=f"evaluating round {event['round']}")
        elif kind == "resume":
            p.update(
                self.rounds,
                completed=event["round"],
                status=f"resumed after round {event['round']}",
            )
            p.console.print(f"resuming after round {event['round']}", highlight=False)
        elif kind == "generate":
            p.update(self.rounds, status=f"generating ({event['which']} model) for ROUGE-L")
        elif kind == "round_start":
            p.update(self.rounds, total=event["rounds"], status=f"round {event['round']}")
        elif kind == "client_start":
            p.update(
                self.steps,
                description=f"client {event['index'] + 1}/{event['of']}",
                completed=0,
                total=None,
                visible=True,
                status=escape(f"{event['client']}  rank {event['rank']}"),
            )
        elif kind == "step":
            p.update(
                self.steps,
                completed=event["step"],
                total=event["of"],
                status=escape(f"{event['client']}  loss {event['loss']:.3f}"),
            )
        elif kind == "client_end":
            p.update(
                self.steps,
                status=f"{event['client']}  loss {event['loss']:.3f}  rank {event['rank_received']}->{event['rank']}",
            )
        elif kind == "round_end":
            from hetlora.runtime.rounds import round_line

            row = event["row"]
            if row["round"] > 0:
                p.advance(self.rounds)
            p.console.print(escape(round_line(row)), highlight=False)
        elif kind == "done":
            p.update(self.steps, visible=False)
            p.update(self.rounds, status="done")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_ranks(ranks: list[int]) -> str:
    if not ranks or not any(ranks):
        return "-"
    return f"{sum(ranks) / len(ranks):.1f} [{min(ranks)}-{max(ranks)}]"


def _final_table(metrics: list[dict[str, Any]], summary: dict[str, Any]) -> Table:
    rounds, clients = summary["rounds"], summary["clients"]
    table = Table(
        title=f"{summary.get('method', 'hetlora')} run: {clients} client{'s' * (clients != 1)}, "
        f"{rounds} round{'s' * (rounds != 1)}"
    )
    for col in ("round", "train loss", "test ppl", "ranks", "up", "down", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for m in metrics:
        ranks = m.get("client_ranks") or {}
        table.add_row(
            str(m["round"]),
            f"{m['train_loss']:.3f}" if m.get("train_loss") is not None else "-",
            f"{m['test_ppl']:.2f}" if "test_ppl" in m else "-",
            _fmt_ranks(list(ranks.values())),
            _fmt_bytes(m.get("bytes_up", 0)),
            _fmt_bytes(m.get("bytes_down", 0)),
            f"{m['wall_s']:.0f}",
        )
    table.caption = (
        "ranks: mean \\[min-max] of the round's clients after pruning; up/down: bytes sent"
    )
    return table


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML file of config keys (`hetlora defaults` prints them all)."
        ),
    ] = None,
    out: Out = Path("runs/latest"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: --set rounds=5 (repeatable)."),
    ] = None,
    overwrite: Overwrite = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run in this directory from its last complete round "
            "(its config.toml, unless --config/--set are given; they must match, except a "
            "larger rounds, which extends a finished run).",
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Run federated fine-tuning (HetLoRA by default) in-process and write the run directory.

    Writes config.toml (resolved), metrics.jsonl (one JSON object per round), adapter/ (the
    global LoRA adapter in PEFT format), samples.jsonl (generations), summary.json and
    checkpoint.pt (rewritten atomically after every round, for --resume).
    """
    _quiet_libraries(verbose)
    with _one_line_errors():
        from hetlora.config import load_config
        from hetlora.runtime.local import LocalRun
        from hetlora.runtime.loop import check_out_dir
        from hetlora.study.report import load_run

        if resume is not None:
            out = resume
            if not (out / "config.toml").is_file():
                raise HetLoRAError(f"--resume {out}: not a run directory (config.toml missing)")
            if not (out / "checkpoint.pt").is_file():
                raise HetLoRAError(f"--resume {out}: no checkpoint.pt, nothing to resume")
            cfg = load_config(config or out / "config.toml", set_ or [], stored=config is None)
        else:
            cfg = load_config(config, set_ or [])
            hint = f"--resume {out}" if (out / "checkpoint.pt").is_file() else ""
            check_out_dir(out, overwrite, resume_hint=hint)
        with _progress_display() as progress:
            live = LiveProgress(progress)
            sim = LocalRun(cfg, progress=live)
            summary = sim.run(out, overwrite=overwrite, resume=resume is not None)
        metrics = load_run(out)[1]
    console.print(_final_table(metrics, summary))
    console.print(
        f"perplexity {summary['base_ppl']:.2f} (base) -> {summary['final_ppl']:.2f} (final), "
        f"best {summary['best_ppl']:.2f} at round {summary['best_round']}"
    )
    if "rouge_l" in summary:
        console.print(
            f"ROUGE-L {summary['rouge_l_base']:.3f} (base) -> {summary['rouge_l']:.3f} (final)"
        )
    if "server_rouge_l" in summary:
        console.print(
            f"server set: perplexity {summary['server_base_ppl']:.2f} -> "
            f"{summary['server_final_ppl']:.2f}, ROUGE-L {summary['server_rouge_l_base']:.3f} -> "
            f"{summary['server_rouge_l']:.3f}"
        )
    if "epsilon" in summary:
        console.print(
            f"differential privacy: epsilon {summary['epsilon']:.3g} at delta "
            f"{summary['delta']:.3g} (clip {summary['dp_clip_norm']:g}, noise multiplier "
            f"{summary['dp_noise_multiplier']:.4g})"
        )
    console.print(
        f"mean client rank {summary['mean_rank_initial']:.1f} -> {summary['mean_rank_final']:.1f} "
        f"({summary['clients_pruned']} of {summary['clients']} clients pruned)"
    )
    console.print(f"run directory: {out}  (global adapter: {out / 'adapter'})")


@contextmanager
def _progress_display() -> Iterator[Progress]:
    """The live display of a run or comparison; on a failure its bars are hidden first, so the
    one-line error is all that stays on the screen."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
    with progress:
        try:
            yield progress
        except BaseException:
            progress.live.transient = True  # erased, not left above the error
            for task in list(progress.tasks):
                progress.remove_task(task.id)
            progress.live.stop()
            progress.disable = True  # no closing blank line from Progress.stop either
            raise


@app.command()
def compare(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            # rich reads "[...]" as markup: escaped, the TOML table name shows as written
            help=escape("TOML: shared keys plus [[compare]] entries."),
        ),
    ],
    out: Out,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key for every method (repeatable)."),
    ] = None,
    overwrite: Overwrite = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Go on with an interrupted comparison in --out: keep finished methods, "
            "continue checkpointed ones, run the rest.",
        ),
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Run only the entries of this group (or of this name); repeatable. The "
            "tables cover these runs.",
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Run several methods on the same clients, sampling and seeds; write tables and plots.

    Writes one run directory per method, results.csv, results.md and PNG plots: eval
    perplexity against round, cumulative bytes and cumulative client FLOPs, and client ranks
    over rounds under self-pruning.
    """
    _quiet_libraries(verbose)
    with _one_line_errors():
        from hetlora.runtime.loop import check_out_dir
        from hetlora.study.compare import load_comparison, run_comparison

        entries = load_comparison(config, set_ or [])
        if only:
            kept = [e for e in entries if e.group in only or e.name in only]
            if not kept:
                groups = sorted({e.group or e.name for e in entries})
                raise HetLoRAError(
                    f"--only {', '.join(only)} matches no entry of {config}; its groups: "
                    + ", ".join(groups)
                )
            entries = kept
        if not resume:  # refused before any work (run_comparison checks the rest)
            check_out_dir(out, overwrite, resume_hint="--resume")
        with _progress_display() as progress:
            live = LiveProgress(progress)
            methods = progress.add_task("methods", total=len(entries), status="")

            def on_event(event: dict[str, Any]) -> None:
                if event["event"] == "method_start":
                    if event["index"]:
                        progress.advance(methods)
                    progress.update(methods, status=event["name"])
                    live.reset()
                    done = " (finished earlier, kept)" if event.get("state") == "done" else ""
                    progress.console.print(f"[bold]== {event['name']}[/]{done}")
                else:
                    live(event)

            result = run_comparison(
                entries, out, overwrite=overwrite, progress=on_event, resume=resume
            )
            progress.advance(methods)
    _print_results(result, out)


def _print_results(result: dict[str, Any], out: Path) -> None:
    from hetlora.study.report import COLUMNS, _fmt

    if result.get("summary"):  # a seeded comparison: one line per method, over its seeds
        table = Table(title=f"summary over seeds ({out / 'summary.md'})")
        keys = headings = ("method", "lr", "lambda_", "seeds", "test_mean", "test_std", "val_mean")
        rows = result["summary"]
    else:
        table = Table(title=f"results ({out / 'results.md'})")
        short = {
            "name": "method",
            "final_ppl": "final ppl",
            "best_ppl": "best",
            "best_round": "at",
            "rouge_l": "ROUGE-L",
            "total_bytes": "bytes",
            "client_flops": "FLOPs",
            "mean_final_rank": "rank",
            "global_rank": "global r",
        }
        keys = [key for key, _ in COLUMNS]
        headings = [short[key] for key in keys]
        rows = result["rows"]
    for key, heading in zip(keys, headings, strict=True):
        justify = "left" if key in ("name", "method") else "right"
        table.add_column(heading, justify=justify, no_wrap=True)
    for row in rows:
        table.add_row(*[_fmt(k, row[k]) for k in keys])
    console.print(table)
    if result.get("provenance"):
        _print_provenance(result["provenance"], out)
    for path in result["plots"]:
        console.print(f"plot: {path}")
    if result.get("missing"):
        n = len(result["missing"])
        console.print(
            f"{n} run{'s' if n > 1 else ''} not finished, left out of the tables: "
            + ", ".join(result["missing"])
        )


def _print_provenance(rows: list[dict[str, Any]], out: Path) -> None:
    """The report's provenance table, compacted to fit a terminal (every column is in
    provenance.md)."""
    table = Table(title=f"provenance ({out / 'provenance.md'})")
    for heading in ("run", "commit", "date (UTC)", "precision", "host", "versions"):
        table.add_column(heading, overflow="fold")
    for r in rows:
        dirty = " (dirty)" if r["dirty"] == "true" else ""
        host = f"{r['cpu']}, {r['cores']} cores, CPU bf16 {r['cpu_bf16']}, GPU {r['gpu']}"
        versions = f"torch {r['torch']}, transformers {r['transformers']}, peft {r['peft']}"
        date = r["date"][:16].replace("T", " ")
        table.add_row(r["name"], r["commit"] + dirty, date, r["precision"], host, versions)
    console.print(table)


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="A run or comparison directory.")],
) -> None:
    """Redraw the tables (results.csv, results.md) and plots of a run or comparison.

    A comparison still running, or stopped, is reported on its finished runs (the others are
    listed).
    """
    with _one_line_errors():
        from hetlora.study.report import report as redraw

        result = redraw(directory)
    _print_results(result, directory)


@app.command()
def evaluate(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A finished run directory, or an adapter folder from `hetlora export`."
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option("--data", help="Measure on this data's held-out split instead of the run's."),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Reload an adapter with PeftModel.from_pretrained and re-measure its perplexity.

    Rebuilds the run's held-out set from its config (config.toml, or the copy an export keeps
    in hetlora.json); prints the perplexity it measures next to the one the run reported: the
    last evaluated round for a run, tier_ppl at the adapter's rank for an export.
    """
    _quiet_libraries(verbose)
    with _one_line_errors(), console.status("loading the base model and the adapter, evaluating"):
        from hetlora.runtime.local import evaluate_run

        result = evaluate_run(run_dir, data=data)
    reported = (
        f"{result['reported_as']} reports {result['reported_ppl']:.4f}"
        if result["reported_ppl"] is not None
        else f"(another held-out set than the run's: {data})"
    )
    console.print(
        f"perplexity {result['test_ppl']:.4f} measured from {run_dir} "
        f"({result['eval_examples']} held-out examples, bf16={result['bf16']}); {reported}"
    )


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="The device tier's LoRA rank.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write (new or empty).")],
    merge: Annotated[
        bool, typer.Option("--merge", help="Write the base model with the adapter merged in.")
    ] = False,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            help="The base_model_name_or_path the adapter records (default: the hub id of the "
            "packaged model, else the run's model as its config names it).",
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="With --merge: fp32, bf16 or fp16 (default: the base's own)."),
    ] = None,
    gguf: Annotated[
        bool,
        typer.Option(
            "--gguf",
            help="Write the adapter for llama.cpp (OUT/adapter.gguf; Llama-family models).",
        ),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Export the global adapter cut to one device tier's rank (PEFT format), or merged.

    A device of rank R runs the first R columns of B and rows of A at the same scale. The
    adapter folder holds PEFT's files, the tokenizer and hetlora.json (the run's config and the
    tier's perplexity); it loads with AutoPeftModelForCausalLM, `hetlora evaluate` and
    `hetlora chat`. The merged folder loads with from_pretrained. With --gguf the folder holds
    adapter.gguf, which llama.cpp loads onto the base's GGUF (`llama-cli -m BASE.gguf --lora
    OUT/adapter.gguf`), and hetlora.json.
    """
    _quiet_libraries(verbose)
    with _one_line_errors():
        from hetlora.export import export_run, read_export_meta

        path = export_run(
            run_dir, rank, out, merge=merge, base_model=base_model, dtype=dtype, gguf=gguf
        )
    kind = "merged model" if merge else "llama.cpp adapter" if gguf else "adapter"
    console.print(f"wrote the rank-{rank} {kind} to {path}")
    if gguf and (base := read_export_meta(path).get("base_gguf")):
        console.print(f"its base for llama.cpp: {base}", highlight=False)


@app.command()
def chat(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A finished run directory (any method), or an adapter folder from `hetlora export`."
        ),
    ],
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank", "-r", help="Cut the global adapter to this device tier's rank (default: all)."
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="Answer this one message and exit."),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", help="Reply length (default: the run's max_new_tokens)."),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Talk to a run's global model, with the chat template, as a device of rank R runs it.

    With --prompt: one answer. Without: a conversation read from stdin line by line, each line
    a user turn answered in turn, until end of input or a line `exit`.
    """
    _quiet_libraries(verbose)
    with _one_line_errors():
        from hetlora.chat import load_chat_model

        bot = load_chat_model(run_dir, rank, max_new_tokens)
        if prompt is not None:
            if not prompt.strip():
                raise HetLoRAError("--prompt is empty")
            console.print(bot.reply([("user", prompt)]), highlight=False, markup=False)
            return
        interactive = sys.stdin.isatty()
        if interactive:
            console.print(f"chatting with {run_dir} (empty line skipped, `exit` or Ctrl-D ends)")
        turns: list[tuple[str, str]] = []
        while True:
            if interactive:
                console.print("> ", end="")
            line = sys.stdin.readline()
            if not line or line.strip() == "exit":
                break
            if not line.strip():
                continue
            turns.append(("user", line.strip()))
            answer = bot.reply(turns)
            turns.append(("assistant", answer))
            console.print(answer, highlight=False, markup=False)


@app.command()
def data(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML file of config keys (those of a run)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: --set data=my.jsonl (repeatable)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the facts as one JSON object.")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Also write a PNG: examples per client, tokens per example."),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Show a run's data before training: clients, splits, tokens per example, how many
    max_seq_len cuts, and one example with the tokens the loss is on (in bold)."""
    _quiet_libraries(verbose)
    with _one_line_errors():
        from hetlora.config import load_config
        from hetlora.runtime.splits import data_overview

        facts = data_overview(load_config(config, set_ or []))
        if plot is not None:
            from hetlora.study.report import plot_data

            try:
                plot_data(facts, plot)
            except OSError as exc:
                raise HetLoRAError(f"cannot write --plot {plot}: {exc.strerror or exc}") from None
    if as_json:
        import json

        sys.stdout.write(json.dumps(facts) + "\n")
        return
    q = facts["examples_per_client"]
    table = Table(title=f"data: {facts['data']}", show_header=False)
    rows = [
        ("clients", f"{facts['clients']}"),
        ("examples (train / val / test)", f"{facts['train']} / {facts['val']} / {facts['test']}"),
        (
            "examples per client",
            f"min {q['min']}, 10% {q['p10']}, median {q['median']}, 90% {q['p90']}, max {q['max']}",
        ),
        ("rounds a client takes part in", f"{facts['rounds_per_client']:.2f} on average"),
        ("bad rows skipped", f"{facts['bad_rows_skipped']}"),
        ("chat template", "yes" if facts["chat_template"] else "no (raw text)"),
        (
            f"tokens per example ({facts['tokens_sampled']} sampled)",
            f"mean {facts['tokens_mean']:.1f}, 90% {facts['tokens_p90']}, max {facts['tokens_max']}",
        ),
        (
            f"cut at max_seq_len = {facts['max_seq_len']}",
            f"{100 * facts['truncated']:.1f} % of examples; {facts['kept_mean']:.1f} tokens kept, "
            f"{facts['loss_mean']:.1f} with loss, on average",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    example = facts["example"]
    console.print(f"first training example of client {escape(example['client'])} (loss in bold):")
    console.print(
        "".join(
            f"[bold]{escape(t)}[/bold]" if loss else escape(t) for t, loss in example["segments"]
        )
    )
    if plot is not None:
        console.print(f"plot: {plot}")


@app.command()
def defaults() -> None:
    """Print every config key with its default value as TOML, each under its description."""
    from hetlora.config import defaults_toml

    sys.stdout.write(defaults_toml())


def main() -> None:
    """Console entry point: like ``app()``, but a usage error (unknown flag, missing or bad
    value) is one ``error:`` line on stderr with exit code 2, like every other bad input."""
    import click

    try:
        code = app(standalone_mode=False, prog_name="hetlora")
    except click.exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "hetlora"
        _error_line(f"{exc.format_message()} (see: {command} --help)")
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()

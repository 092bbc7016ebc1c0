"""``python scripts/flower_local.py ...``: Flower federations on this machine, for trials and demos.

* ``certificates DIR [--node NAME ...] [--host HOST ...]`` -- a CA, the SuperLink's TLS
  certificate and one SuperNode key pair per name, for a trial;
* ``deploy --out RUN_DIR [--node 'partition-id=0 rank=4' ...]`` -- a SuperLink and SuperNodes on
  127.0.0.1 with TLS and SuperNode authentication, run, stop them all;
* ``simulate --out RUN_DIR --supernodes N`` -- the same on Flower's simulation runtime (Ray).

The installed library has the Flower apps, the strategy and the records (``hetlora flower app``
writes a run's Flower App folder for any SuperLink); this package only starts and stops local
processes. Expected failures print one ``error: ...`` line and exit with code 2; Ctrl-C (or
SIGTERM) stops every process the command started before it exits (code 130).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from hetlora.errors import HetLoRAError
from hetlora.runtime.flower.cli import ConfigOpt, Out, Overwrite, SetOpt

app = typer.Typer(
    help="Flower on this machine: trial certificates, local deployments and simulations.",
    no_args_is_help=True,
)
Stream = Annotated[bool, typer.Option("--stream", help="Show the ServerApp's log stream.")]


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _guarded(command: Callable[[], None]) -> None:
    """Run a command: one ``error:`` line and exit 2 on HetLoRAError, 130 on Ctrl-C/SIGTERM."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        command()
    except HetLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        print("interrupted: every process started was stopped", file=sys.stderr)
        raise typer.Exit(code=130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_row(row: dict[str, Any]) -> None:
    from hetlora.runtime.rounds import round_line

    print(round_line(row), flush=True)


def _print_summary(summary: dict[str, Any], out: Path, seconds: float) -> None:
    print(
        f"perplexity {summary['base_ppl']:.2f} (base) -> {summary['final_ppl']:.2f} (final), "
        f"best {summary['best_ppl']:.2f} at round {summary['best_round']}"
    )
    if "rouge_l" in summary:
        print(f"ROUGE-L {summary['rouge_l_base']:.3f} (base) -> {summary['rouge_l']:.3f} (final)")
    if "server_rouge_l" in summary:
        print(
            f"server set: perplexity {summary['server_base_ppl']:.2f} -> "
            f"{summary['server_final_ppl']:.2f}, ROUGE-L {summary['server_rouge_l_base']:.3f} -> "
            f"{summary['server_rouge_l']:.3f}"
        )
    print(
        f"mean client rank {summary['mean_rank_initial']:.1f} -> {summary['mean_rank_final']:.1f}"
        f"; nodes: {len(summary.get('nodes', {}))}; wall time {seconds:.0f}s"
    )
    print(f"run directory: {out}  (global adapter: {out / 'adapter'})")


def node_config(text: str) -> dict[str, Any]:
    """``'partition-id=0 rank=4'`` -> ``{"partition-id": 0, "rank": 4}`` (TOML values)."""
    out: dict[str, Any] = {}
    for item in text.split():
        key, eq, raw = item.partition("=")
        if not eq:
            raise HetLoRAError(f"node config items are key=value, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def _echo(stream: bool) -> Callable[[str], None] | None:
    return (lambda line: print(f"  | {line}", flush=True)) if stream else None


@app.command()
def certificates(
    folder: Annotated[Path, typer.Argument(help="Where to write the CA, certificate and keys.")],
    node: Annotated[
        list[str] | None, typer.Option("--node", help="A SuperNode key pair (repeatable).")
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(help="Another SuperLink host name or IP besides localhost, 127.0.0.1."),
    ] = None,
) -> None:
    """TLS certificates and SuperNode keys for a trial."""

    def command() -> None:
        from localfed import certificates as certs

        hosts = list(dict.fromkeys(["localhost", "127.0.0.1", *(host or [])]))
        written = certs.make_trial_credentials(folder, node or [], hosts)
        print(f"wrote CA, SuperLink certificate ({', '.join(hosts)}) and keys to {written}:")
        for path in sorted(written.iterdir()):
            print(f"  {path.name}")

    _guarded(command)


@app.command()
def deploy(
    out: Out,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: Overwrite = False,
    node: Annotated[
        list[str] | None,
        typer.Option("--node", help="One SuperNode's node config, 'KEY=VALUE ...' (repeatable)."),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Keep certificates, keys and logs here.")
    ] = None,
    round_timeout: Annotated[
        float | None, typer.Option(help="Seconds a round waits for replies.")
    ] = None,
    stream: Stream = False,
) -> None:
    """A SuperLink and SuperNodes on 127.0.0.1 with TLS and SuperNode authentication."""

    def command() -> None:
        from hetlora.config import load_config
        from hetlora.runtime.loop import check_out_dir
        from localfed.launch import deploy_locally

        cfg = load_config(config, set_ or [])
        check_out_dir(out, overwrite)
        nodes = [node_config(text) for text in (node or [])] or [
            {"partition-id": i} for i in range(3)
        ]
        print(
            f"starting a SuperLink and {len(nodes)} SuperNodes on 127.0.0.1 (TLS, SuperNode "
            "authentication):"
        )
        for i, spec in enumerate(nodes):
            print(f"  node-{i}: {' '.join(f'{k}={v}' for k, v in spec.items())}")
        start = time.perf_counter()
        result = deploy_locally(
            cfg,
            out,
            nodes,
            workdir=workdir,
            overwrite=overwrite,
            round_timeout_s=round_timeout,
            on_row=_print_row,
            on_output=_echo(stream),
            on_started=lambda fed: print(f"SuperLink on 127.0.0.1:{fed.port}; logs in {fed.logs}"),
        )
        _print_summary(result.summary, out, time.perf_counter() - start)

    _guarded(command)


@app.command()
def simulate(
    out: Out,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: Overwrite = False,
    supernodes: Annotated[int, typer.Option(help="Virtual SuperNodes.")] = 3,
    workdir: Annotated[Path | None, typer.Option(help="Keep logs and Flower state here.")] = None,
    stream: Stream = False,
) -> None:
    """Flower's simulation runtime (Ray, CPU) with N virtual SuperNodes."""

    def command() -> None:
        from hetlora.config import load_config
        from hetlora.runtime.loop import check_out_dir
        from localfed.launch import simulate_locally

        cfg = load_config(config, set_ or [])
        check_out_dir(out, overwrite)
        print(f"Flower simulation runtime: {supernodes} virtual SuperNodes (Ray, CPU)")
        start = time.perf_counter()
        result = simulate_locally(
            cfg,
            out,
            supernodes,
            workdir=workdir,
            overwrite=overwrite,
            on_row=_print_row,
            on_output=_echo(stream),
        )
        _print_summary(result.summary, out, time.perf_counter() - start)

    _guarded(command)

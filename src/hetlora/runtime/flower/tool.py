"""``python -m hetlora.runtime.flower``: the Flower runtime's command line.

Commands:

* ``app APP_DIR --out RUN_DIR [--config X.toml] [--set k=v ...]`` -- write the Flower App folder
  for a run (then ``flwr run APP_DIR <connection> --stream`` on any SuperLink);
* ``certificates DIR [--node NAME ...] [--host HOST ...]`` -- a CA, the SuperLink's TLS
  certificate and one SuperNode key pair per name, for a trial;
* ``deploy --out RUN_DIR [--node 'partition-id=0 rank=4' ...]`` -- a SuperLink and SuperNodes
  on 127.0.0.1 with TLS and SuperNode authentication, run, stop them all;
* ``simulate --out RUN_DIR --supernodes N`` -- the same on Flower's simulation runtime (Ray).

Expected failures print one ``error: ...`` line and exit with code 2; Ctrl-C (or SIGTERM) stops
every process the command started before it exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from hetlora.errors import HetLoRAError


def _print_row(row: dict[str, Any]) -> None:
    parts = [f"round {row['round']:>3}"]
    loss = row.get("train_loss")
    if loss is not None and not math.isnan(loss):
        parts.append(f"train loss {loss:.3f}")
    if "eval_ppl" in row:
        parts.append(f"eval ppl {row['eval_ppl']:.2f}")
    if row.get("client_ranks"):
        parts.append(f"ranks {sorted(row['client_ranks'].values())}")
    if row.get("left_out"):
        parts.append("left out: " + "; ".join(f"{c} ({r})" for c, r in row["left_out"].items()))
    if row.get("skipped"):
        parts.append("SKIPPED")
    parts.append(f"({row.get('wall_s', 0.0):.1f}s)")
    print("  ".join(parts), flush=True)


def _print_summary(summary: dict[str, Any], out: Path, seconds: float) -> None:
    print(
        f"perplexity {summary['base_ppl']:.2f} (base) -> {summary['final_ppl']:.2f} (final), "
        f"best {summary['best_ppl']:.2f} at round {summary['best_round']}"
    )
    if "rouge_l" in summary:
        print(f"ROUGE-L {summary['rouge_l_base']:.3f} (base) -> {summary['rouge_l']:.3f} (final)")
    print(
        f"mean client rank {summary['mean_rank_initial']:.1f} -> {summary['mean_rank_final']:.1f}"
        f"; nodes: {len(summary.get('nodes', {}))}; wall time {seconds:.0f}s"
    )
    print(f"run directory: {out}  (global adapter: {out / 'adapter'})")


def _node_config(text: str) -> dict[str, Any]:
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


def _config(args: argparse.Namespace):
    from hetlora.config import load_config

    return load_config(args.config, args.set or [])


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", type=Path, required=True, help="run directory (new or empty)")
    p.add_argument("--config", "-c", type=Path, help="TOML file of hetlora config keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--overwrite", action="store_true", help="replace the run files in --out")


def _cmd_app(args: argparse.Namespace) -> None:
    from hetlora.runtime.flower.project import RunOptions, write_app

    cfg = _config(args)
    options = RunOptions(
        out_dir=str(args.out.resolve()),
        overwrite=args.overwrite,
        min_nodes=args.min_nodes,
        node_wait_s=args.node_wait,
        round_timeout_s=args.round_timeout,
        min_clients=args.min_clients,
    )
    path = write_app(args.app_dir, cfg, options)
    print(f"wrote {path}")
    print(f"run it with: flwr run {args.app_dir} <superlink connection> --stream")


def _cmd_certificates(args: argparse.Namespace) -> None:
    from hetlora.runtime.flower import certificates

    hosts = list(dict.fromkeys(["localhost", "127.0.0.1", *(args.host or [])]))
    folder = certificates.make_trial_credentials(args.folder, args.node or [], hosts)
    print(f"wrote CA, SuperLink certificate ({', '.join(hosts)}) and keys to {folder}:")
    for path in sorted(folder.iterdir()):
        print(f"  {path.name}")


def _cmd_deploy(args: argparse.Namespace) -> None:
    from hetlora.runtime.flower.launch import deploy_locally
    from hetlora.runtime.local import check_out_dir

    cfg = _config(args)
    check_out_dir(args.out, args.overwrite)
    nodes = [_node_config(text) for text in (args.node or [])]
    if not nodes:
        nodes = [{"partition-id": i} for i in range(3)]
    print(
        f"starting a SuperLink and {len(nodes)} SuperNodes on 127.0.0.1 (TLS, SuperNode "
        "authentication):"
    )
    for i, node in enumerate(nodes):
        print(f"  node-{i}: {' '.join(f'{k}={v}' for k, v in node.items())}")
    start = time.perf_counter()
    result = deploy_locally(
        cfg,
        args.out,
        nodes,
        workdir=args.workdir,
        overwrite=args.overwrite,
        round_timeout_s=args.round_timeout,
        on_row=_print_row,
        on_output=(lambda line: print(f"  | {line}", flush=True)) if args.stream else None,
        on_started=lambda fed: print(f"SuperLink on 127.0.0.1:{fed.port}; logs in {fed.logs}"),
    )
    _print_summary(result.summary, args.out, time.perf_counter() - start)


def _cmd_simulate(args: argparse.Namespace) -> None:
    from hetlora.runtime.flower.launch import simulate_locally
    from hetlora.runtime.local import check_out_dir

    cfg = _config(args)
    check_out_dir(args.out, args.overwrite)
    print(f"Flower simulation runtime: {args.supernodes} virtual SuperNodes (Ray, CPU)")
    start = time.perf_counter()
    result = simulate_locally(
        cfg,
        args.out,
        args.supernodes,
        workdir=args.workdir,
        overwrite=args.overwrite,
        on_row=_print_row,
        on_output=(lambda line: print(f"  | {line}", flush=True)) if args.stream else None,
    )
    _print_summary(result.summary, args.out, time.perf_counter() - start)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hetlora.runtime.flower",
        description="HetLoRA on Flower: app folders, certificates, local deployments and simulations.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    app = sub.add_parser("app", help="write the Flower App folder of a run")
    app.add_argument("app_dir", type=Path)
    _add_run_args(app)
    app.add_argument(
        "--min-nodes", type=int, default=0, help="SuperNodes to wait for (0: clients_per_round)"
    )
    app.add_argument("--node-wait", type=float, default=300.0, help="seconds to wait for them")
    app.add_argument(
        "--round-timeout", type=float, default=3600.0, help="seconds a round waits for replies"
    )
    app.add_argument(
        "--min-clients", type=int, default=0, help="valid replies a round needs (0: the config's)"
    )
    app.set_defaults(func=_cmd_app)

    certs = sub.add_parser("certificates", help="TLS certificates and SuperNode keys for a trial")
    certs.add_argument("folder", type=Path)
    certs.add_argument(
        "--node", action="append", metavar="NAME", help="a SuperNode key pair (repeatable)"
    )
    certs.add_argument(
        "--host",
        action="append",
        help="another SuperLink host name or IP besides localhost, 127.0.0.1 (repeatable)",
    )
    certs.set_defaults(func=_cmd_certificates)

    deploy = sub.add_parser("deploy", help="SuperLink + SuperNodes on 127.0.0.1 with TLS and auth")
    _add_run_args(deploy)
    deploy.add_argument(
        "--node",
        action="append",
        metavar="'KEY=VALUE ...'",
        help="one SuperNode's node config (repeatable)",
    )
    deploy.add_argument("--workdir", type=Path, help="keep certificates, keys and logs here")
    deploy.add_argument(
        "--round-timeout", type=float, default=None, help="seconds a round waits for replies"
    )
    deploy.add_argument("--stream", action="store_true", help="show the ServerApp's log stream")
    deploy.set_defaults(func=_cmd_deploy)

    sim = sub.add_parser("simulate", help="Flower's simulation runtime with N virtual SuperNodes")
    _add_run_args(sim)
    sim.add_argument("--supernodes", type=int, default=3)
    sim.add_argument("--workdir", type=Path, help="keep logs and Flower state here")
    sim.add_argument("--stream", action="store_true", help="show the ServerApp's log stream")
    sim.set_defaults(func=_cmd_simulate)
    return p


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except HetLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every process started was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0

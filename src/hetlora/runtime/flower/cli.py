"""``hetlora flower ...``: the Flower runtime's command (a typer sub-app of `hetlora.cli`).

``hetlora flower app APP_DIR --out RUN_DIR [--config X.toml] [--set k=v ...]`` writes the Flower
App folder of a run; ``flwr run APP_DIR <connection> --stream`` then runs it on any SuperLink
(docs/flower.md, "Deploying on real devices").

Starting and stopping a SuperLink and SuperNodes on this machine, for demos and tests, is not
part of the library: ``scripts/flower_local.py`` (package ``scripts/localfed``).

Expected failures print one ``error: ...`` line and exit with code 2. Flower is imported only
when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from hetlora.errors import HetLoRAError

flower_app = typer.Typer(help="HetLoRA on Flower: the Flower App folder of a run.")
# a group with one command, so that more can join it without changing the command line
flower_app.callback()(lambda: None)

Out = Annotated[Path, typer.Option("--out", "-o", help="Run directory (new or empty).")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file of hetlora config keys.")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the run files in --out.")]


@flower_app.command()
def app(
    app_dir: Annotated[Path, typer.Argument(help="The Flower App folder to write.")],
    out: Out,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: Overwrite = False,
    min_nodes: Annotated[
        int, typer.Option(help="SuperNodes to wait for (0: clients_per_round).")
    ] = 0,
    node_wait: Annotated[float, typer.Option(help="Seconds to wait for them.")] = 300.0,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds a round waits for replies.")
    ] = 3600.0,
    min_clients: Annotated[
        int, typer.Option(help="Valid replies a round needs (0: the config's).")
    ] = 0,
) -> None:
    """Write the Flower App folder of a run."""
    try:
        from hetlora.config import load_config
        from hetlora.runtime.flower.project import RunOptions, write_app

        cfg = load_config(config, set_ or [])
        options = RunOptions(
            out_dir=str(out.resolve()),
            overwrite=overwrite,
            min_nodes=min_nodes,
            node_wait_s=node_wait,
            round_timeout_s=round_timeout,
            min_clients=min_clients,
        )
        path = write_app(app_dir, cfg, options)
        print(f"wrote {path}")
        print(f"run it with: flwr run {app_dir} <superlink connection> --stream")
    except HetLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(code=2) from None

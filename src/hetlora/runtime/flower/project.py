"""The Flower App folder (``pyproject.toml``) and the run configuration it carries.

``flwr run APP_DIR`` needs a folder with a ``pyproject.toml`` naming the ServerApp and
ClientApp. Both live in this package, so the folder holds that one file (the Flower App Bundle is
a few hundred bytes); `write_app` writes it with the run configuration:

* ``hetlora-config``: the resolved `hetlora.config.Config` as TOML (every key), read by
  the ServerApp and by every ClientApp, so all of them agree on model, data, seed and ranks;
* ``out-dir``: the run directory on the machine that runs the ServerApp (the SuperLink's);
* ``overwrite``: replace the run files of a non-empty ``out-dir``;
* ``min-nodes``: SuperNodes to wait for before round 1 (0: ``clients_per_round``);
* ``node-wait-s``: how long to wait for them (then go on with those connected);
* ``round-timeout-s``: how long a round waits for replies; late replies are left out;
* ``min-clients``: a round with fewer valid replies is skipped (the global adapter stays);
  0 takes the config's ``min_clients``.

Each key can be overridden at launch: ``flwr run APP_DIR <connection> --run-config
"round-timeout-s=600"``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from hetlora.config import Config, make_config
from hetlora.errors import HetLoRAError

APP_NAME = "hetlora-flower"
SERVER_APP = "hetlora.runtime.flower.server_app:app"
CLIENT_APP = "hetlora.runtime.flower.client_app:app"
FLWR_REQUIREMENT = "flwr[simulation]==1.41.*"


@dataclass(frozen=True)
class RunOptions:
    """The Flower-specific settings of a run (see the module docstring)."""

    out_dir: str
    overwrite: bool = False
    min_nodes: int = 0
    node_wait_s: float = 300.0
    round_timeout_s: float = 3600.0
    min_clients: int = 0

    def run_config(self) -> dict[str, Any]:
        return {
            "out-dir": self.out_dir,
            "overwrite": self.overwrite,
            "min-nodes": self.min_nodes,
            "node-wait-s": float(self.node_wait_s),
            "round-timeout-s": float(self.round_timeout_s),
            "min-clients": self.min_clients,
        }


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The hetlora `Config` carried in a Flower run configuration."""
    text = run_config.get("hetlora-config")
    if not isinstance(text, str):
        raise HetLoRAError(
            "the Flower run config has no 'hetlora-config' (write it with write_app)"
        )
    try:
        return make_config(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise HetLoRAError(f"'hetlora-config' is not valid TOML: {exc}") from None


def options_from_run_config(run_config: dict[str, Any]) -> RunOptions:
    """The `RunOptions` of a Flower run configuration (checked)."""
    try:
        options = RunOptions(
            out_dir=str(run_config["out-dir"]),
            overwrite=bool(run_config.get("overwrite", False)),
            min_nodes=int(run_config.get("min-nodes", 0)),
            node_wait_s=float(run_config.get("node-wait-s", 300.0)),
            round_timeout_s=float(run_config.get("round-timeout-s", 3600.0)),
            min_clients=int(run_config.get("min-clients", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HetLoRAError(f"bad Flower run config: {exc}") from None
    if not options.out_dir:
        raise HetLoRAError("the Flower run config needs 'out-dir' (the run directory)")
    if options.min_clients < 0 or options.min_nodes < 0:
        raise HetLoRAError("'min-clients' and 'min-nodes' must be >= 0")
    if options.round_timeout_s <= 0 or options.node_wait_s < 0:
        raise HetLoRAError("'round-timeout-s' must be > 0 and 'node-wait-s' >= 0")
    return options


def check_supported(cfg: Config) -> None:
    """The Flower runtime runs the LoRA methods whose base model stays frozen."""
    from hetlora.methods import SERVERS

    if not SERVERS[cfg.method].frozen_base:
        frozen = [name for name, cls in SERVERS.items() if cls.frozen_base]
        raise HetLoRAError(
            f"method {cfg.method!r} changes the base model every round and is not supported on "
            f"Flower; use {', '.join(frozen[:-1])} or {frozen[-1]} "
            "(or `hetlora run` in-process)"
        )
    if cfg.compile == "on":
        raise HetLoRAError(
            "compile = 'on' applies to the in-process runtime (`hetlora run`); the Flower "
            "ClientApp trains each client's own-rank adapter eagerly: use 'auto' or 'off'"
        )


def app_run_config(cfg: Config, options: RunOptions) -> dict[str, Any]:
    """The run configuration of a run's Flower App: the hetlora config and the run options."""
    return {"hetlora-config": cfg.to_toml(), **options.run_config()}


def write_app(folder: Path | str, cfg: Config, options: RunOptions) -> Path:
    """Write the Flower App folder for one run; returns its ``pyproject.toml``."""
    check_supported(cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": APP_NAME,
            "version": "0.1.0",
            "description": "HetLoRA: federated LoRA with per-client ranks, on Flower",
            "license": "Apache-2.0",
            "dependencies": [FLWR_REQUIREMENT, "hetlora"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "hetlora",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": app_run_config(cfg, options),
                }
            }
        },
    }
    path = folder / "pyproject.toml"
    path.write_text(
        "# A Flower App for one hetlora run, written by hetlora.runtime.flower.project.\n"
        + tomli_w.dumps(project, multiline_strings=True)
    )
    return path

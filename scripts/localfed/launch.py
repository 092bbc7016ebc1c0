"""One call for a whole local Flower run: start the federation, run the app, stop everything.

* :func:`deploy_locally` -- SuperLink and SuperNodes over TLS with SuperNode authentication
  (:class:`~.deploy.LocalDeployment`), one SuperNode per node config;
* :func:`simulate_locally` -- Flower's simulation runtime with N virtual SuperNodes
  (:class:`~.deploy.LocalSimulation`).

Both write the run directory of ``hetlora run`` and return a :class:`~.deploy.RunResult`; every
process they started is stopped before they return or raise (also on Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hetlora.config import Config
from hetlora.errors import HetLoRAError
from hetlora.runtime.flower.project import RunOptions, write_app
from hetlora.runtime.loop import check_out_dir
from localfed.deploy import LocalDeployment, LocalSimulation, NodeSpec, RunResult

log = logging.getLogger(__name__)


def _options(out_dir: Path, overwrite: bool, nodes: int, **extra: Any) -> RunOptions:
    values = {
        "out_dir": str(out_dir.resolve()),
        "overwrite": overwrite,
        "min_nodes": nodes,
    }
    values.update({k: v for k, v in extra.items() if v is not None})
    return RunOptions(**values)


def _finish(result: RunResult, federation) -> RunResult:
    if not result.ok:
        tail = "\n".join(result.log_path.read_text(errors="replace").splitlines()[-30:])
        raise HetLoRAError(
            f"the Flower run ended without a summary (flwr exit code {result.returncode}); "
            f"logs in {federation.logs}. Last lines of {result.log_path.name}:\n{tail}"
        )
    return result


def deploy_locally(
    cfg: Config,
    out_dir: Path | str,
    node_configs: Sequence[Mapping[str, Any]],
    workdir: Path | str | None = None,
    overwrite: bool = False,
    env: Mapping[str, str] | None = None,
    round_timeout_s: float | None = None,
    node_wait_s: float | None = None,
    timeout: float = 7200.0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_output: Callable[[str], None] | None = None,
    on_started: Callable[[LocalDeployment], None] | None = None,
    on_poll: Callable[[], None] | None = None,
) -> RunResult:
    """Run ``cfg`` on a SuperLink and one SuperNode per node config, all on 127.0.0.1.

    ``node_configs`` are the SuperNodes' ``--node-config`` tables (``partition-id`` or
    ``client-id``, ``rank`` or ``tier``). ``workdir`` keeps certificates, keys and logs (a
    temporary folder when None). ``on_started`` is called with the running deployment before
    the app is launched, ``on_poll`` twice a second while it runs.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    with tempfile.TemporaryDirectory(prefix="hetlora-flower-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        with LocalDeployment(work, env) as federation:
            federation.start_superlink()
            threads = max(1, (os.cpu_count() or 1) // max(1, len(node_configs)))
            for i, node in enumerate(node_configs):
                federation.start_supernode(NodeSpec(f"node-{i}", dict(node)), threads=threads)
            app_dir = federation.workdir / "app"
            options = _options(
                out_dir,
                overwrite,
                len(node_configs),
                round_timeout_s=round_timeout_s,
                node_wait_s=node_wait_s,
            )
            write_app(app_dir, cfg, options)
            if on_started is not None:
                on_started(federation)
            result = federation.run(
                app_dir,
                out_dir,
                timeout=timeout,
                on_row=on_row,
                on_output=on_output,
                on_poll=on_poll,
            )
            return _finish(result, federation)


def simulate_locally(
    cfg: Config,
    out_dir: Path | str,
    num_supernodes: int,
    workdir: Path | str | None = None,
    overwrite: bool = False,
    env: Mapping[str, str] | None = None,
    cpus_per_client: int = 1,
    timeout: float = 7200.0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_output: Callable[[str], None] | None = None,
) -> RunResult:
    """Run ``cfg`` with ``flwr run`` on Flower's simulation runtime, N virtual SuperNodes.

    Virtual SuperNode i holds partition i (the i-th client of the run); ranks are assigned as
    in-process. Ray runs on this machine, CPU only.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    with tempfile.TemporaryDirectory(prefix="hetlora-flower-sim-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        with LocalSimulation(work, env) as federation:
            federation.start_superlink()
            app_dir = federation.workdir / "app"
            write_app(app_dir, cfg, _options(out_dir, overwrite, num_supernodes))
            result = federation.run(
                app_dir,
                out_dir,
                federation_config={
                    "num-supernodes": num_supernodes,
                    "client-resources-num-cpus": cpus_per_client,
                    "client-resources-num-gpus": 0.0,
                },
                timeout=timeout,
                on_row=on_row,
                on_output=on_output,
            )
            return _finish(result, federation)

"""Launch Flower federations on this machine: a deployment with TLS and SuperNode
authentication, or Flower's simulation runtime; run a hetlora Flower App on it; stop everything.

:class:`LocalDeployment` starts, all bound to 127.0.0.1,

* ``flower-superlink`` with TLS (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``) and
  ``--enable-supernode-auth``;
* one ``flower-supernode`` per :class:`NodeSpec`, each with ``--root-certificates``, its own
  ``--auth-supernode-private-key`` and its ``--node-config``, after registering its public key
  with ``flwr supernode register``;

:class:`LocalSimulation` starts ``flower-superlink --simulation`` (Ray, CPU only, on 127.0.0.1)
for ``flwr run`` with N virtual SuperNodes. Both run an app with :meth:`Federation.run`
(``flwr run APP_DIR <connection> --stream``) and stop every process they started, with its
descendants, by process id (:class:`~.processes.ProcessSet`), also when the caller fails or is
interrupted (use them as context managers).

Each process gets its own ``FLWR_HOME`` under the work folder, so nothing is written to
``~/.flwr``, and runtime installation of app dependencies is off (the apps' dependencies are
this environment's).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetlora.errors import HetLoRAError
from localfed import certificates
from localfed.processes import ProcessSet

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONNECTION = "hetlora"

#: Environment of every Flower process: no telemetry, no update check, no dependency
#: installation (it would pull packages, CUDA torch among them), Ray kept on this machine.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def executable(name: str) -> str:
    """A console script of this environment (``flwr``, ``flower-superlink``, ...)."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise HetLoRAError(
            f"{name} not found: install flwr[simulation]==1.41.* in this environment"
        )
    return found


def _wait_for_port(
    port: int, proc: subprocess.Popen, timeout: float, what: str, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise HetLoRAError(f"{what} exited with code {proc.returncode}; its log ends:\n{tail}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise HetLoRAError(
        f"{what} did not listen on {HOST}:{port} within {timeout:.0f}s; see {log_path}"
    )


@dataclass
class RunResult:
    """The outcome of :meth:`Federation.run`."""

    run_id: int | None
    returncode: int
    out_dir: Path
    log_path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.out_dir / "summary.json").is_file()

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.out_dir / "summary.json").read_text())


class Federation:
    """What both local federations share: a work folder, processes, the ``flwr`` CLI."""

    def __init__(self, workdir: Path | str, env: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.processes = ProcessSet()
        self.port = free_port()
        self.base_env = {**os.environ, **FLOWER_ENV, **(env or {})}
        # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name: this
        # environment's scripts come first on PATH even when it is not activated.
        bin_dir = str(Path(executable("flower-superlink")).parent)
        self.base_env["PATH"] = os.pathsep.join([bin_dir, self.base_env.get("PATH", "")])
        self.cli_home = self.workdir / "flwr-cli"

    # -- environment ------------------------------------------------------------------------

    def env_for(self, name: str) -> dict[str, str]:
        """The environment of one process: its own FLWR_HOME."""
        home = self.workdir / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return {**self.base_env, "FLWR_HOME": str(home)}

    def _write_cli_config(self, connection: Mapping[str, Any]) -> None:
        import tomli_w

        self.cli_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: dict(connection)}}
        (self.cli_home / "config.toml").write_text(tomli_w.dumps(config))

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation (output captured)."""
        env = {**self.base_env, "FLWR_HOME": str(self.cli_home)}
        return subprocess.run(
            [executable("flwr"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    # -- running an app ---------------------------------------------------------------------

    def run(
        self,
        app_dir: Path | str,
        out_dir: Path | str,
        run_config: Mapping[str, Any] | None = None,
        federation_config: Mapping[str, Any] | None = None,
        timeout: float = 3600.0,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        on_output: Callable[[str], None] | None = None,
        on_poll: Callable[[], None] | None = None,
    ) -> RunResult:
        """``flwr run APP_DIR --stream`` until the run ends.

        Rows of metrics.jsonl go to ``on_row`` as they are written, each line of the run's log
        stream to ``on_output``; ``on_poll`` is called twice a second meanwhile.
        """
        out_dir = Path(out_dir)
        args = ["run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        for key, value in (run_config or {}).items():
            args += ["--run-config", f"{key}={_toml_value(value)}"]
        for key, value in (federation_config or {}).items():
            args += ["--federation-config", f"{key}={_toml_value(value)}"]
        name = f"flwr-run-{len([n for n in self.processes.started if n.startswith('flwr-run')])}"
        log_path = self.logs / f"{name}.log"
        env = {**self.base_env, "FLWR_HOME": str(self.cli_home)}
        proc = self.processes.start(name, [executable("flwr"), *args], env, log_path)
        rows: list[dict[str, Any]] = []
        seen_lines = 0
        started = time.time()  # metrics.jsonl older than this is a previous run's
        deadline = time.monotonic() + timeout
        try:
            while True:
                done = proc.poll() is not None
                self.processes.track()
                seen_lines = _follow(log_path, seen_lines, on_output)
                _read_rows(out_dir / "metrics.jsonl", rows, on_row, started)
                if on_poll is not None and not done:
                    on_poll()
                if done:
                    break
                if time.monotonic() > deadline:
                    raise HetLoRAError(
                        f"the run did not finish within {timeout:.0f}s; see {log_path}"
                    )
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                self.processes.stop(name)
        match = re.search(r"started run (\d+)", log_path.read_text(errors="replace"))
        return RunResult(
            run_id=int(match.group(1)) if match else None,
            returncode=proc.returncode,
            out_dir=out_dir,
            log_path=log_path,
            rows=rows,
        )

    def stop(self) -> None:
        """Stop every process this federation started (and their descendants)."""
        self.processes.stop_all()

    def alive(self) -> list[tuple[int, str]]:
        return self.processes.alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def _json_output(text: str) -> Any:
    """The JSON document a ``flwr ... --format json`` command printed (after any notes)."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON in the output")
    return json.loads(text[start:])


def _follow(path: Path, seen: int, on_output: Callable[[str], None] | None) -> int:
    if not path.is_file():
        return seen
    lines = path.read_text(errors="replace").splitlines()
    if on_output is not None:
        for line in lines[seen:]:
            on_output(line)
    return len(lines)


def _read_rows(
    path: Path,
    rows: list[dict[str, Any]],
    on_row: Callable[[dict[str, Any]], None] | None,
    since: float,
) -> None:
    try:
        if path.stat().st_mtime < since - 1.0:
            return
    except OSError:
        return
    lines = path.read_text().splitlines()
    for line in lines[len(rows) :]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return  # a line being written
        rows.append(row)
        if on_row is not None:
            on_row(row)


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode: its name (key file), node config and whether its key is registered."""

    name: str
    node_config: Mapping[str, Any]
    register: bool = True


class LocalDeployment(Federation):
    """A SuperLink and SuperNodes on 127.0.0.1 with TLS and SuperNode authentication.

    Args:
        workdir: where certificates, keys, logs and Flower state go.
        env: extra environment for every process (caches, offline flags).
    """

    def __init__(self, workdir: Path | str, env: Mapping[str, str] | None = None) -> None:
        super().__init__(workdir, env)
        self.certs = self.workdir / "certs"
        certificates.make_tls_certificates(self.certs)
        self.node_ids: dict[str, int] = {}

    def start_superlink(self, timeout: float = 60.0) -> None:
        c = self.certs
        argv = [
            executable("flower-superlink"),
            "--ssl-ca-certfile", str(c / certificates.CA_CERT),
            "--ssl-certfile", str(c / certificates.SERVER_CERT),
            "--ssl-keyfile", str(c / certificates.SERVER_KEY),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", HOST,
            "--port", str(self.port),
        ]  # fmt: skip
        log_path = self.logs / "superlink.log"
        proc = self.processes.start("superlink", argv, self.env_for("superlink"), log_path)
        _wait_for_port(self.port, proc, timeout, "flower-superlink", log_path)
        self._write_cli_config(
            {"address": f"{HOST}:{self.port}", "root-certificates": str(c / certificates.CA_CERT)}
        )

    def register(self, name: str) -> int:
        """Make a key pair for ``name`` if needed and register its public key; returns the node id."""
        private = self.certs / name
        if not private.is_file():
            certificates.make_node_key(self.certs, name)
        result = self.flwr(
            "supernode", "register", str(self.certs / f"{name}.pub"), CONNECTION, "--format", "json"
        )
        try:
            node_id = int(_json_output(result.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            raise HetLoRAError(
                f"flwr supernode register failed: {result.stdout}{result.stderr}"
            ) from None
        self.node_ids[name] = node_id
        return node_id

    def start_supernode(
        self, spec: NodeSpec, max_retries: int | None = None, threads: int | None = None
    ) -> subprocess.Popen:
        """Start one SuperNode (registering its key first unless ``spec.register`` is false).

        ``threads`` caps the CPU threads of its training (``OMP_NUM_THREADS``): SuperNodes that
        share one machine should share its cores, or their spinning threads slow them all.
        """
        if spec.register:
            self.register(spec.name)
        elif not (self.certs / spec.name).is_file():
            certificates.make_node_key(self.certs, spec.name)
        argv = [
            executable("flower-supernode"),
            "--superlink", f"{HOST}:{self.port}",
            "--root-certificates", str(self.certs / certificates.CA_CERT),
            "--auth-supernode-private-key", str(self.certs / spec.name),
            "--node-config", node_config_arg(spec.node_config),
            "--host", HOST,
            "--port", str(free_port()),
        ]  # fmt: skip
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        env = self.env_for(spec.name)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(max(1, threads))
        return self.processes.start(spec.name, argv, env, self.logs / f"{spec.name}.log")

    def online_nodes(self) -> dict[int, str]:
        """node id -> status of the registered SuperNodes, as the SuperLink reports them."""
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            payload = _json_output(result.stdout)
        except ValueError:
            raise HetLoRAError(
                f"flwr supernode list failed: {result.stdout}{result.stderr}"
            ) from None
        nodes = payload.get("nodes", payload) if isinstance(payload, dict) else payload
        out: dict[int, str] = {}
        for node in nodes if isinstance(nodes, list) else []:
            out[int(node.get("node-id", node.get("node_id", 0)))] = str(node.get("status", ""))
        return out


class LocalSimulation(Federation):
    """Flower's simulation runtime (Ray, CPU only) behind a SuperLink on 127.0.0.1."""

    def start_superlink(self, timeout: float = 60.0) -> None:
        argv = [
            executable("flower-superlink"),
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--host", HOST,
            "--port", str(self.port),
        ]  # fmt: skip
        log_path = self.logs / "superlink.log"
        proc = self.processes.start("superlink", argv, self.env_for("superlink"), log_path)
        _wait_for_port(self.port, proc, timeout, "flower-superlink --simulation", log_path)
        self._write_cli_config({"address": f"{HOST}:{self.port}", "insecure": True})


def node_config_arg(node_config: Mapping[str, Any]) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML values."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())

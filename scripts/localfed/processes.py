"""Processes a launcher starts, and stopping every one of them by process id.

Flower's ``flower-superlink`` and ``flower-supernode`` start helper processes of their own
(SuperExec, then one ServerApp/ClientApp process per run or message, Ray workers in
simulation), some in new sessions, so stopping a process group is not enough. A
:class:`ProcessSet` remembers every process it started and, while they run, every descendant it
has seen (by parent id, from ``/proc`` or ``ps``); :meth:`ProcessSet.stop_all` sends SIGTERM to
all of them, waits, then SIGKILL to what is left. Process ids are paired with their start times,
so a recycled id is never signalled.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

Key = tuple[int, str]  # (pid, start time): a process, not just a number that may be reused


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, state) of every process on the machine."""
    table: dict[int, tuple[int, str, str]] = {}
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
            table[int(entry.name)] = (int(fields[1]), fields[19], fields[0])
        return table
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid=,stat=,lstart="], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4:
            table[int(parts[0])] = (int(parts[1]), parts[3].strip(), parts[2][:1])
    return table


def _alive(key: Key, table: Mapping[int, tuple[int, str, str]]) -> bool:
    entry = table.get(key[0])
    return entry is not None and entry[1] == key[1] and entry[2] not in ("Z", "X")


class ProcessSet:
    """Start processes with logs, track their descendants, stop them all by process id."""

    def __init__(self) -> None:
        self.started: dict[str, subprocess.Popen] = {}
        self.keys: dict[Key, str] = {}  # every process seen: key -> name of its root

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> subprocess.Popen:
        """Start ``argv`` with stdout and stderr to ``log_path``; ``name`` must be new."""
        if name in self.started:
            raise ValueError(f"a process named {name!r} was started already")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as fh:
            proc = subprocess.Popen(
                list(argv),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,  # Ctrl-C in a terminal reaches only the launcher
            )
        self.started[name] = proc
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        self.track()
        return proc

    def track(self) -> list[Key]:
        """Record every live descendant of the started processes; returns all live keys."""
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        live: list[Key] = []
        for name, proc in self.started.items():
            if proc.pid not in table:
                continue
            stack = [proc.pid]
            while stack:
                pid = stack.pop()
                key = (pid, table[pid][1])
                if table[pid][2] not in ("Z", "X"):
                    self.keys.setdefault(key, name)
                    live.append(key)
                stack.extend(children.get(pid, []))
        return live

    def alive(self) -> list[tuple[int, str]]:
        """(pid, name of its root) of every tracked process still running."""
        self.track()
        table = _proc_table()
        return sorted((key[0], name) for key, name in self.keys.items() if _alive(key, table))

    def _signal(self, keys: Sequence[Key], sig: signal.Signals) -> None:
        table = _proc_table()
        for key in keys:
            if _alive(key, table):
                try:
                    os.kill(key[0], sig)
                except ProcessLookupError:
                    pass

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """Stop one started process and its descendants (SIGTERM, then SIGKILL)."""
        self._stop([name], timeout)

    def kill(self, name: str) -> None:
        """SIGKILL one started process and its descendants at once (a crash, for tests)."""
        self.track()
        self._signal([k for k, n in self.keys.items() if n == name], signal.SIGKILL)
        self._reap()

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every started process and every descendant seen, newest first."""
        self._stop(list(reversed(list(self.started))), timeout)

    def _stop(self, names: Sequence[str], timeout: float) -> None:
        """SIGTERM the roots; after half the timeout, every descendant; then SIGKILL."""
        self.track()
        keys = [k for k, n in self.keys.items() if n in names]
        roots = {self.started[n].pid for n in names}
        self._signal([k for k in keys if k[0] in roots], signal.SIGTERM)
        start = time.monotonic()
        descendants_told = False
        while time.monotonic() - start < timeout:
            self.track()
            keys = [k for k, n in self.keys.items() if n in names]
            table = _proc_table()
            left = [k for k in keys if _alive(k, table)]
            if not left:
                break
            if not descendants_told and time.monotonic() - start > timeout / 2:
                self._signal(left, signal.SIGTERM)
                descendants_told = True
            self._reap()
            time.sleep(0.2)
        else:
            table = _proc_table()
            left = [k for k in keys if _alive(k, table)]
            log.warning(
                "killing %d processes that did not stop: %s", len(left), [k[0] for k in left]
            )
            self._signal(left, signal.SIGKILL)
            time.sleep(0.5)
        self._reap()

    def _reap(self) -> None:
        for proc in self.started.values():
            proc.poll()

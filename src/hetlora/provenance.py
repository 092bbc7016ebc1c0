"""Where and with what a run was made, recorded in its ``summary.json`` as ``provenance``.

``commit``: the git commit of the checkout the ``hetlora`` package runs from, and ``dirty``:
whether tracked files differ from it, both taken when the process starts its first run
(`code_state`: Python reads the code once, so a commit made while a long study runs is not the
code that study runs); both ``null`` where git is absent or the package is not a tracked file
of a checkout (installed from a wheel). ``host``: CPU model, logical cores, native
bf16 on the CPU (`hetlora.hardware.cpu_has_bf16`) and the GPU's name (``null`` without
one) of the process that writes the summary (the server under Flower). ``versions``: Python,
hetlora, torch, transformers and peft. ``precision``: the one training resolved to (``bf16`` or
``fp32``). ``date``: when the summary was written, UTC, ISO 8601.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from hetlora.hardware import cpu_has_bf16

__all__ = ["COLUMNS", "code_state", "collect", "git_state", "host", "row", "versions"]

logger = logging.getLogger(__name__)

#: Packages whose versions are recorded.
PACKAGES = ("hetlora", "torch", "transformers", "peft")

#: Columns of the report's ``provenance.csv``/``.md``: one row per run (`row`).
COLUMNS = [
    ("name", "run"),
    ("commit", "commit"),
    ("dirty", "dirty"),
    ("date", "date (UTC)"),
    ("precision", "precision"),
    ("cpu", "CPU"),
    ("cores", "cores"),
    ("cpu_bf16", "CPU bf16"),
    ("gpu", "GPU"),
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("peft", "peft"),
]


def _git(folder: Path, *args: str) -> str | None:
    """``git -C folder args`` stdout stripped, or ``None`` if git is absent or fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("git %s failed: %s", " ".join(args), exc)
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(package_dir: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout ``package_dir`` (default: this package's folder) is a
    tracked part of; ``(None, None)`` when it is not one, or git is absent."""
    folder = package_dir or Path(__file__).resolve().parent
    if _git(folder, "ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return None, None
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return None, None
    return commit, bool(status)


@functools.cache
def code_state() -> tuple[str | None, bool | None]:
    """`git_state` of this package as the process first asked for it (a run calls it before
    its first round), kept for the life of the process: the code Python has loaded."""
    return git_state()


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def host(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model, logical cores, CPU bf16 support and GPU name (of ``device`` when it is a CUDA
    device, else of the first visible GPU; ``None`` without one)."""
    gpu = None
    if torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" else None
        gpu = torch.cuda.get_device_name(index or 0)
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "cpu_bf16": cpu_has_bf16(), "gpu": gpu}


def versions() -> dict[str, str | None]:
    """Python's version and those of `PACKAGES` (``None`` if one is not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def collect(bf16: bool, device: torch.device | None = None) -> dict[str, Any]:
    """The ``provenance`` entry of ``summary.json`` (module docstring); ``bf16``: whether
    training ran under bf16 autocast."""
    commit, dirty = code_state()
    return {
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "precision": "bf16" if bf16 else "fp32",
        "host": host(device),
        "versions": versions(),
    }


def row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """One line of the report's provenance table (`COLUMNS`); ``-`` for what a run did
    not record (runs written before provenance was)."""
    prov = summary.get("provenance") or {}
    flat = {
        "commit": (prov.get("commit") or "")[:12] or None,
        "dirty": prov.get("dirty"),
        "date": prov.get("date"),
        "precision": prov.get("precision"),
        **{k: (prov.get("host") or {}).get(k) for k in ("cpu", "cores", "cpu_bf16", "gpu")},
        **{k: (prov.get("versions") or {}).get(k) for k in ("torch", "transformers", "peft")},
    }
    return {"name": name, **{k: "-" if v is None else _shown(v) for k, v in flat.items()}}


def _shown(value: Any) -> Any:
    return str(value).lower() if isinstance(value, bool) else value

"""Checkpoints after every round, written atomically, and their checks on resume.

A checkpoint holds everything the next round depends on: the method's server state (global
factors or weights, every client's current rank, FLoRA's merged total), the round counter, the
metrics so far, the base model's generations for ROUGE-L, and fingerprints of the config, the
base model and the client data. The base model's fingerprint is taken as loaded (fp32, before
any dtype cast, PEFT wrapping or compiling), so a run made where ``precision = "auto"`` meant
fp32 resumes where it means bf16 and the other way round; a checkpoint of format 1 holds the
fingerprint of the base as prepared on its host, compared with the same here. Client sampling and batches are seeded by (seed, round, client),
and local optimisers start fresh each round, so no other RNG or optimizer state exists.

The file is written to a temporary name in the same folder, fsynced, renamed over the old one
and the folder fsynced: a kill at any moment leaves the previous checkpoint or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hetlora.errors import HetLoRAError
from hetlora.fsutil import umask

FILE = "checkpoint.pt"
#: Format written; ``load`` also reads format 1 (model fingerprint of the prepared base).
VERSION = 2
VERSIONS = (1, 2)


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the base model's config and a checksum of its first weights (in name order)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    sums = [
        round(float(p.detach().double().sum()), 6)
        for n, p in sorted(base.named_parameters())
        if "lora_" not in n
    ][:8]
    return fingerprint({"config": config, "sums": sums})


def save(out_dir: Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` as ``out_dir/checkpoint.pt``."""
    target = out_dir / FILE
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~umask())  # mkstemp's 0600: readable as others are
            torch.save({"version": VERSION, **payload}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(out_dir: Path) -> dict[str, Any]:
    """Read ``out_dir/checkpoint.pt``; a missing or unreadable file is a clear error."""
    path = out_dir / FILE
    if not path.is_file():
        raise HetLoRAError(f"no checkpoint in {out_dir}: nothing to resume")
    try:
        # our own file, written by save(); it pickles the method's server object
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a corrupt file
        raise HetLoRAError(f"checkpoint {path} is corrupt: {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("version") not in VERSIONS:
        raise HetLoRAError(f"checkpoint {path} is corrupt or from another hetlora version")
    for key in ("config", "model", "data", "round", "server", "metrics"):
        if key not in payload:
            raise HetLoRAError(f"checkpoint {path} is corrupt: '{key}' is missing")
    return payload


def check_matches(
    payload: dict[str, Any],
    config: dict[str, Any],
    model: str,
    data: str,
    prepared_model: Callable[[], str] | None = None,
) -> None:
    """Refuse a checkpoint made with another config, base model or client data.

    ``rounds`` alone may differ: a run (finished or not) continues to a larger number of rounds
    (at least the rounds done), as the same run made straight to that number would, except
    where ``dp_target_epsilon`` calibrated the noise for the planned rounds.

    ``model`` is the fingerprint of the base as loaded; ``prepared_model`` gives that of the
    base as prepared in this process, which a format-1 checkpoint holds. A checkpoint of an
    older version is compared with its old keys translated, and a key it predates taken at its
    default (a new key's default is the behaviour from before it existed).
    """
    from hetlora.config import Config, stored_model, translate_old_keys

    saved = {**Config().to_dict(), **translate_old_keys(payload["config"], warn=False)}
    saved["model"] = stored_model(saved["model"])  # a relative path of an older run
    if config.get("rounds") != saved.get("rounds"):  # more rounds extend a run, as a straight one
        done = int(payload["round"])
        if int(config["rounds"]) < done:
            raise HetLoRAError(
                f"the checkpoint has {done} rounds done: rounds must be at least {done} to "
                f"resume it, got {config['rounds']}"
            )
        if saved.get("dp_target_epsilon"):
            raise HetLoRAError(
                f"rounds cannot change on resume with dp_target_epsilon set: the noise was "
                f"calibrated for {saved['rounds']} rounds"
            )
        saved["rounds"] = config["rounds"]
    if saved != config:
        changed = sorted(k for k in set(config) | set(saved) if saved.get(k) != config.get(k))
        raise HetLoRAError(
            f"checkpoint was made with another config (differs in: {', '.join(changed)})"
        )
    if payload.get("version") == 1 and prepared_model is not None:
        model = prepared_model()
    if payload["model"] != model:
        raise HetLoRAError("checkpoint was made with another base model")
    if payload["data"] != data:
        raise HetLoRAError("checkpoint was made with other client data")

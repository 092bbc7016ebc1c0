"""Export the global adapter cut to one device tier's rank, in PEFT format or merged.

A HetLoRA global adapter has rank r_max; a device of tier r runs its first r columns of B and
rows of A (the same truncation the server uses for distribution) with the same scale s, so the
exported adapter has ``r = R`` and ``lora_alpha = s * R``.

Everything goes through PEFT's own API: the adapter is built with ``get_peft_model`` and a
``LoraConfig`` on the base model, written with ``save_pretrained`` and read back with
``PeftModel.from_pretrained``, so the file layout and key names are PEFT's, whatever its version.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hetlora import adapters
from hetlora.errors import HetLoRAError, first_line
from hetlora.lora import Factors, rank_of, truncate


def _base_model(path: str) -> torch.nn.Module:
    """The adapter's base model, fresh from its folder or hub id (fp32, CPU, frozen)."""
    from hetlora.models import load_base_model

    if not path:
        raise HetLoRAError("the adapter names no base model (base_model_name_or_path)")
    try:
        return load_base_model(path).model
    except HetLoRAError as exc:
        raise HetLoRAError(f"the adapter's base model {path!r} cannot be loaded: {exc}") from None


def export_adapter(
    factors: Factors,
    rank: int,
    scale: float,
    target_modules: list[str],
    base_model: str,
    out_dir: Path,
) -> Path:
    """Write ``factors`` cut to ``rank`` as a PEFT LoRA adapter folder of ``base_model`` (built
    and saved by PEFT, see the module docstring)."""
    cut = truncate(factors, rank)
    model = adapters.wrap(_base_model(base_model), rank, scale, target_modules)
    adapters.write_factors(model, cut)
    model.peft_config[adapters.GLOBAL].base_model_name_or_path = base_model
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    return out_dir


def read_adapter(folder: Path) -> tuple[Factors, dict[str, Any]]:
    """The factors and config of a saved PEFT LoRA adapter folder (loaded by PEFT onto its base
    model)."""
    from peft import PeftConfig, PeftModel

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise HetLoRAError(f"{folder} is not a PEFT adapter folder: {exc}") from None
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise HetLoRAError(f"{folder} holds a {config.peft_type} adapter, not LoRA")
    base = _base_model(config.base_model_name_or_path or "")
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except (OSError, ValueError, RuntimeError) as exc:
        raise HetLoRAError(f"PEFT cannot load the adapter in {folder}: {first_line(exc)}") from None
    factors = adapters.read_factors(model)
    return factors, config.to_dict()


def tier_settings(
    factors: Factors, config: dict[str, Any], rank: int | None = None
) -> tuple[int, float, list[str]]:
    """The rank (default: the adapter's full rank, checked to lie in [1, it]), scale and target
    modules of ``factors`` cut for a device tier, from the adapter's PEFT ``config``."""
    r_max = rank_of(factors)
    rank = r_max if rank is None else rank
    if not 1 <= rank <= r_max:
        raise HetLoRAError(f"--rank must lie in [1, {r_max}] (the run's global rank), got {rank}")
    targets = config["target_modules"]
    targets = sorted(targets) if isinstance(targets, list | set | tuple) else [targets]
    return rank, float(config["lora_alpha"]) / float(config["r"]), targets


def export_run(run_dir: Path | str, rank: int, out_dir: Path | str, merge: bool = False) -> Path:
    """Export a finished run's global adapter at ``rank`` (or the base merged with it)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HetLoRAError(f"--out {out_dir} exists and is not an empty directory")
    if (run_dir / "model" / "config.json").is_file():
        raise HetLoRAError(
            f"{run_dir} holds a merged model (FLoRA, FedEx-LoRA or full fine-tuning), not an adapter: "
            f"use {run_dir / 'model'} directly"
        )
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise HetLoRAError(f"{run_dir / 'adapter'} is not a PEFT adapter folder")
    factors, config = read_adapter(run_dir / "adapter")
    rank, scale, targets = tier_settings(factors, config, rank)
    base_path = config.get("base_model_name_or_path") or ""
    staging = Path(
        tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent if out_dir.parent.exists() else None)
    )
    try:
        if not merge:
            export_adapter(factors, rank, scale, targets, base_path, staging)
        else:
            from peft import PeftModel
            from transformers import AutoTokenizer

            with tempfile.TemporaryDirectory() as tmp:
                adapter_dir = export_adapter(
                    factors, rank, scale, targets, base_path, Path(tmp) / "a"
                )
                loaded = PeftModel.from_pretrained(_base_model(base_path), str(adapter_dir))
                loaded.merge_and_unload().save_pretrained(str(staging))
            AutoTokenizer.from_pretrained(base_path).save_pretrained(str(staging))
        if out_dir.exists():
            out_dir.rmdir()
        shutil.move(str(staging), str(out_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir

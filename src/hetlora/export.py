"""Export the global adapter cut to one device tier's rank, in PEFT format or merged.

A HetLoRA global adapter has rank r_max; a device of tier r runs its first r columns of B and
rows of A (the same truncation the server uses for distribution) with the same scale s, so the
exported adapter has ``r = R`` and ``lora_alpha = s * R``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from hetlora.adapters import lora_config
from hetlora.errors import HetLoRAError
from hetlora.lora import Factors, rank_of, truncate

_PREFIX = "base_model.model."


def export_adapter(
    factors: Factors,
    rank: int,
    scale: float,
    target_modules: list[str],
    base_model: str,
    out_dir: Path,
) -> Path:
    """Write ``factors`` cut to ``rank`` as a PEFT LoRA adapter folder (loadable with
    ``PeftModel.from_pretrained``)."""
    cut = truncate(factors, rank)
    config = lora_config(rank, scale, target_modules)
    config.base_model_name_or_path = base_model
    tensors = {}
    for name, (b, a) in cut.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def read_adapter(folder: Path) -> tuple[Factors, dict]:
    """The factors and config of a saved PEFT LoRA adapter folder."""
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise HetLoRAError(f"{folder} is not a PEFT adapter folder")
    config = json.loads(cfg_path.read_text())
    state = load_file(str(weights))
    factors: Factors = {}
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[len(_PREFIX) : -len(".lora_A.weight")]
            factors[name] = (state[key.replace(".lora_A.", ".lora_B.")], value)
    if not factors:
        raise HetLoRAError(f"{weights} holds no LoRA factors")
    return factors, config


def export_run(run_dir: Path | str, rank: int, out_dir: Path | str, merge: bool = False) -> Path:
    """Export a finished run's global adapter at ``rank`` (or the base merged with it)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HetLoRAError(f"--out {out_dir} exists and is not an empty directory")
    if (run_dir / "model" / "config.json").is_file():
        raise HetLoRAError(
            f"{run_dir} holds a merged model (FLoRA or full fine-tuning), not an adapter: "
            f"use {run_dir / 'model'} directly"
        )
    factors, config = read_adapter(run_dir / "adapter")
    r_max = rank_of(factors)
    if not 1 <= rank <= r_max:
        raise HetLoRAError(f"--rank must lie in [1, {r_max}] (the run's global rank), got {rank}")
    scale = float(config["lora_alpha"]) / float(config["r"])
    targets = (
        sorted(config["target_modules"])
        if isinstance(config["target_modules"], list)
        else [config["target_modules"]]
    )
    base_path = config.get("base_model_name_or_path") or ""
    if not merge:
        return export_adapter(factors, rank, scale, targets, base_path, out_dir)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(base_path) / "config.json").is_file():
        raise HetLoRAError(f"the adapter's base model folder {base_path!r} is missing")
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = export_adapter(factors, rank, scale, targets, base_path, Path(tmp) / "a")
        base = AutoModelForCausalLM.from_pretrained(base_path)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        staging = Path(
            tempfile.mkdtemp(
                prefix=".export-", dir=out_dir.parent if out_dir.parent.exists() else None
            )
        )
        try:
            merged.save_pretrained(str(staging))
            AutoTokenizer.from_pretrained(base_path).save_pretrained(str(staging))
            if out_dir.exists():
                out_dir.rmdir()
            shutil.move(str(staging), str(out_dir))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir

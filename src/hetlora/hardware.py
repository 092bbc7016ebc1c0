"""Device and precision choices: bf16 autocast where the hardware runs it natively."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from hetlora.errors import HetLoRAError


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise HetLoRAError("device = 'cuda' but no CUDA GPU is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_bf16(choice: str, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast (``auto``: where the hardware supports it)."""
    if choice == "fp32":
        return False
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if choice == "bf16":
        return True
    return supported


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``bf16``, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def store_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keep the weights of the model's ``nn.Linear`` layers in ``dtype`` once, for good.

    Under bf16 autocast every matmul casts its fp32 weight to bf16 on every call (autocast
    caches casts only of weights that train): for a frozen base that is ~3x its size in memory
    traffic per step, spent producing the same bf16 values each time. Storing them in bf16
    gives bit-identical matmuls without the casts, and halves the base's memory. The output
    head (tied to the embeddings in many small models), the embeddings and the norms stay
    fp32. Only for a base that never trains or absorbs updates: the model must then only be
    run under autocast. Returns the number of layers cast.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module is not head:
            module.to(dtype)
            count += 1
    return count


def use_cpu_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """On CPU, switch a transformers model to its eager (matmul-softmax-matmul) attention.

    PyTorch's SDPA kernel for CPU is slower than the plain matmuls at this scale: the eager
    path trains SmolLM2-135M about 15% faster here (``make bench``, ablation table in
    docs/performance.md), with the same results within float tolerance. On CUDA, SDPA stays.
    Returns whether the switch was made (models without ``set_attn_implementation`` keep theirs).
    """
    if device.type != "cpu" or not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation("eager")
    return True

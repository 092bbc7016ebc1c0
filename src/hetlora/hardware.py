"""Device and precision choices: bf16 autocast where the hardware runs it natively."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import shutil
import sys
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
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    return False


#: The values of the config keys ``precision``, ``device`` and ``compile``.
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("auto", "on", "off")


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise HetLoRAError("device = 'cuda' but no CUDA GPU is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_bf16(choice: str, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast (``auto``: where the hardware supports it)."""
    if choice in ("fp32", "bf16"):
        return choice == "bf16"
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


#: ``compile = "auto"`` compiles when a run has at least this many local training steps: below
#: it, compiling (a cold compile of the layer graphs, measured in docs/performance.md) costs
#: more than the faster steps save.
AUTO_COMPILE_MIN_STEPS = 400


def can_compile(device: torch.device) -> bool:
    """Whether inductor can build kernels here: a C++ compiler on CPU, Triton on CUDA."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return device.type == "cpu" and any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def resolve_compile(choice: str, device: torch.device, steps: int) -> bool:
    """Whether local training compiles (``compile`` config key).

    ``on``: yes (an error where inductor cannot run); ``off``: no; ``auto``: when the run has at
    least `AUTO_COMPILE_MIN_STEPS` local steps (all rounds, all sampled clients) and
    inductor can run here.
    """
    if choice == "off":
        return False
    if choice == "on":
        if not can_compile(device):
            raise HetLoRAError(
                f"compile = 'on' but torch.compile cannot build kernels on {device.type} here "
                "(a C++ compiler on CPU, Triton on CUDA); use compile = 'off'"
            )
        return True
    return steps >= AUTO_COMPILE_MIN_STEPS and can_compile(device)


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


def compile_seconds() -> float:
    """Seconds this process has spent in ``torch.compile`` so far (Dynamo and the backend's
    compilation, forward and backward graphs), so that callers can count it apart from step
    time. 0.0 before anything was compiled (Dynamo not even imported: nothing to ask)."""
    if "torch._dynamo" not in sys.modules:
        return 0.0
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process: the first compile of each layer
    graph and every recompile (a new shape, grad mode or adapter) count one each."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every decoder layer of ``model`` in place; returns how many.

    The decoder layers are the longest ``nn.ModuleList`` in the model's decoder
    (``get_decoder()``: ``model.layers`` of Llama/Qwen/Gemma, ``transformer.h`` of GPT-2, the
    language model of a multimodal Gemma 3, not its vision tower).
    All layers share one compiled graph: parameters are graph inputs (Dynamo inlines
    ``nn.Module``s), so the compile cost is one layer's whatever the depth, provided every
    layer sees inputs of the same kind. Two things would split them: the layers' shapes changing
    from client to client (avoided by the fixed-shape step,
    `hetlora.adapters.attach_fixed`), and the first layer's input not requiring grad (the
    frozen embeddings' output), which ``enable_input_require_grads`` makes it do (the cost: the
    input gradient of one layer, discarded). Sequence length and batch size are symbolic
    (``dynamic=True``), so every batch runs the same graph instead of one per length.
    What is outside the layers (embeddings, the fused cross-entropy, AdamW) stays eager.
    ``backend`` is torch.compile's (the tests use ``aot_eager``: Dynamo's graph capture and
    AOTAutograd without inductor's kernel build).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    scope = decoder if isinstance(decoder, torch.nn.Module) else model  # not a vision tower's
    lists = [m for m in scope.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    layers = list(max(lists, key=len)) if lists else []
    if layers and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def no_compile() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly inside this block (generation: its cache of past keys and
    one new token per call would recompile the layers for every length). A no-op context
    where nothing can have been compiled (Dynamo not imported)."""
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")

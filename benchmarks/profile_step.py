"""Where a local training step's time goes: ``torch.profiler`` over the engine's client loop.

    .venv/bin/python benchmarks/profile_step.py                 # the compiled engine
    .venv/bin/python benchmarks/profile_step.py --compile off   # the eager engine

The step is ``make bench``'s (``benchmarks/bench.py``): SmolLM2-135M, LoRA r = 16 on q and v,
batch 8 x 128 of full-length Shakespeare examples, every speed-up on. A first call of
``train_client`` warms up (and compiles); a second one of ``--steps`` steps runs under the
profiler. Prints the share of the profiled time per kind of work and the ops that take the
most, and the matmuls' throughput inside the step next to ``--gflops`` (the bench's isolated
``matmul_gflops``) when given. ``--out`` writes the figures as JSON. ``--smoke``: toy sizes and
the ``aot_eager`` backend (no C++ kernel build), that it runs (the tests use it on a tiny model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))

from bench import matmul_params, real_batches  # noqa: E402

from hetlora import adapters  # noqa: E402
from hetlora.client import TrainSettings, train_client  # noqa: E402
from hetlora.hardware import (  # noqa: E402
    compile_layers,
    resolve_device,
    store_frozen_linears,
    use_cpu_attention,
)
from hetlora.models import default_target_modules, load_base_model  # noqa: E402

#: Kinds of work, by op name (the first that matches).
KINDS = (
    ("matmul (linear layers)", ("aten::mm", "aten::addmm", "aten::matmul", "mkldnn", "onednn")),
    ("attention matmuls (bmm)", ("aten::bmm", "aten::baddbmm")),
    ("compiled kernels (fused elementwise, norms, softmax)", ("compiledfxgraph", "cpp_fused",
                                                             "triton_")),
    ("casts and copies", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone")),
    ("optimizer", ("_foreach", "adamw", "aten::lerp", "aten::addcdiv", "aten::addcmul")),
    ("elementwise and reductions (eager)", ("aten::mul", "aten::add", "aten::sub", "aten::div",
                                            "aten::pow", "aten::silu", "aten::exp", "aten::fill_",
                                            "aten::zero_", "aten::sum", "aten::rsqrt", "aten::neg",
                                            "aten::where", "softmax", "logsumexp")),
)  # fmt: skip


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--compile", choices=("on", "off"), default="on")
    parser.add_argument("--steps", type=int, default=3, help="profiled training steps")
    parser.add_argument("--gflops", type=float, default=0.0, help="isolated bf16 matmul speed")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default="")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: that it runs")
    args = parser.parse_args(argv)

    device = resolve_device("auto")
    rank, batch, seq = (4, 2, 32) if args.smoke else (16, 8, 128)
    base = load_base_model(args.model, device)
    batches = real_batches(base.tokenizer, seq, batch, args.steps + 2)
    store_frozen_linears(base.model, torch.bfloat16)
    use_cpu_attention(base.model, device)
    targets = default_target_modules(base.model)
    weights = matmul_params(base.model)  # before LoRA adds its own small layers
    peft_model = adapters.wrap(base.model, rank, 2.0, targets)
    compiled = args.compile == "on"
    if compiled:
        compile_layers(base.model, backend="aot_eager" if args.smoke else "inductor")
    settings = TrainSettings(
        local_steps=2, lr=1e-3, lambda_=0.01, gamma=0.99, r_min=4, bf16=True,
        fixed_rank=rank if compiled else 0,
    )  # fmt: skip

    def steps(items: list, count: int) -> None:
        factors = adapters.read_factors(peft_model)
        each = dataclasses.replace(settings, local_steps=count)
        train_client(peft_model, factors, iter(items), each, targets, device)

    start = time.perf_counter()
    steps(batches[:2], 2)  # warm-up: compiles the layer graph (forward and backward)
    print(f"warm-up (compile included): {time.perf_counter() - start:.1f} s", flush=True)
    timed = batches[2:]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        steps(timed, len(timed))
        wall = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)

    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        shares[kind_of(e.key)] = shares.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    matmul_s = shares.get("matmul (linear layers)", 0.0) / 1e6
    # LoRA training multiplies each frozen weight twice forward and twice backward (bench.py);
    # LoRA's own small matmuls are not counted, so this slightly understates the speed
    flops = 4 * weights * tokens
    result = {
        "compile": args.compile,
        "steps": len(timed),
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "profiled_s": total_us / 1e6,
        "shares": {k: v / total_us for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
        "matmul_gflops_in_step": flops / matmul_s / 1e9 if matmul_s else 0.0,
        "top": [
            {"op": e.key, "share": e.self_cpu_time_total / total_us, "calls": e.count}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
        ],
    }
    print(f"\n{len(timed)} steps, {tokens} tokens, {wall:.1f} s: {tokens / wall:.0f} tokens/s")
    print("\n| kind of work | share of profiled time |\n|---|---|")
    for kind, share in result["shares"].items():
        print(f"| {kind} | {100 * share:.1f}% |")
    line = f"\nlinear-layer matmuls inside the step: {result['matmul_gflops_in_step']:.0f} GFLOP/s"
    if args.gflops:
        line += f" ({result['matmul_gflops_in_step'] / args.gflops:.2f} of {args.gflops:.0f})"
    print(line)
    print("\n| op | share | calls |\n|---|---|---|")
    for row in result["top"]:
        print(f"| `{row['op'][:70]}` | {100 * row['share']:.1f}% | {row['calls']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

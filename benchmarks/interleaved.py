"""Step-interleaved comparison of the local training step, for a machine shared with other jobs.

``make bench`` times each variant in its own pass (model load, warm-up, five steps), so on a
machine whose load swings from minute to minute its ratios carry that swing. This script keeps
every variant's model loaded and alternates single steps between them (the order rotating each
round), with a bf16 matmul timing in the same rotation, so each ratio compares steps taken
under the same load. It measures the figures of issue 12:

* the engine's compiled fixed-shape step (:func:`hetlora.hardware.compile_layers`, adapter at
  r_max = rank) against the same engine eager with an adapter of the client's rank;
* both against PEFT + bf16 autocast (SDPA and eager attention; the faster counts);
* ``train_vs_roofline`` with the matmul throughput measured in the same rotation.

``python benchmarks/interleaved.py --rounds 4 --out interleaved.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

from hetlora import adapters  # noqa: E402
from hetlora.client import TrainSettings, _local_steps  # noqa: E402
from hetlora.hardware import (  # noqa: E402
    compile_layers,
    compile_seconds,
    compiled_graphs,
    cpu_has_bf16,
    resolve_device,
    store_frozen_linears,
    use_cpu_attention,
)
from hetlora.lora import masked_tail_norm, tail_norm  # noqa: E402
from hetlora.models import default_target_modules, load_base_model  # noqa: E402


def peft_step(model_name, device, rank, eager, bf16):
    """One step of the PEFT loop under bf16 autocast where the CPU has bf16 (the model's own
    loss, AdamW)."""
    from peft import LoraConfig, get_peft_model

    base = load_base_model(model_name, device)
    if eager:
        use_cpu_attention(base.model, device)
    targets = default_target_modules(base.model)
    model = get_peft_model(
        base.model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(b):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)

    return step


def engine_step(model_name, device, rank, compiled, bf16, backend="inductor"):
    """One step of the engine's loop (``hetlora.client._local_steps``), the client adapter
    attached once: eager at the client's rank, or the fixed-shape adapter with compiled layers."""
    base = load_base_model(model_name, device)
    if bf16:
        store_frozen_linears(base.model, torch.bfloat16)
    use_cpu_attention(base.model, device)
    targets = default_target_modules(base.model)
    peft_model = adapters.wrap(base.model, rank, 2.0, targets)
    if compiled:
        compile_layers(base.model, backend=backend)
    factors = adapters.read_factors(peft_model)
    settings = TrainSettings(local_steps=1, lr=1e-3, lambda_=0.01, gamma=0.99, r_min=4, bf16=bf16)
    if compiled:
        live = adapters.attach_fixed(peft_model, factors, rank, 2.0, targets)

        def regulariser():
            return masked_tail_norm(live, rank, 0.99)

        def mask_grads():
            for b, a in live.values():
                b.grad[:, rank:] = 0
                a.grad[rank:] = 0

    else:
        live = adapters.attach(peft_model, factors, rank, 2.0, targets)

        def regulariser():
            return tail_norm(live, 0.99)

        mask_grads = None
    params = [p for pair in live.values() for p in pair]

    def step(b):
        _local_steps(peft_model, params, iter([b]), settings, device, regulariser, None, mask_grads)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--out", default="interleaved.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, aot_eager backend")
    args = parser.parse_args(argv)
    device = resolve_device("cpu")
    bf16 = cpu_has_bf16()  # as make bench: bf16 where the CPU has it, else every variant fp32
    dtype = torch.bfloat16 if bf16 else torch.float32
    seq, batch, rank = (32, 2, 4) if args.smoke else (128, 8, 16)
    base = load_base_model(args.model, device)
    params = bench.matmul_params(base.model)
    batches = bench.real_batches(base.tokenizer, seq, batch, args.rounds + 1)
    del base
    backend = "aot_eager" if args.smoke else "inductor"
    variants = {
        "peft_bf16_sdpa": peft_step(args.model, device, rank, False, bf16),
        "peft_bf16_eager": peft_step(args.model, device, rank, True, bf16),
        "engine_eager": engine_step(args.model, device, rank, False, bf16),
        "engine_compiled": engine_step(args.model, device, rank, True, bf16, backend),
    }
    load = [open("/proc/loadavg").read().split()[:3]]
    bench.say("warm-up step of every variant (the compiled one compiles here)")
    warm = {}
    for name, step in variants.items():
        c0, t0 = compile_seconds(), time.perf_counter()
        step(batches[0])
        warm[name] = {"seconds": time.perf_counter() - t0, "compile_s": compile_seconds() - c0}
        bench.say(
            f"  {name}: {warm[name]['seconds']:.1f} s ({warm[name]['compile_s']:.1f} compiling)"
        )
    graphs = compiled_graphs()
    names = [*variants, "matmul"]
    times: dict[str, list[float]] = {n: [] for n in names}
    tokens = {i: int(b["attention_mask"].sum()) for i, b in enumerate(batches)}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name == "matmul":
                times[name].append(
                    bench.matmul_gflops(device, dtype, 256 if args.smoke else 2048, reps=3)
                )
                continue
            c0, t0 = compile_seconds(), time.perf_counter()
            variants[name](batches[r + 1])
            times[name].append(
                tokens[r + 1] / (time.perf_counter() - t0 - (compile_seconds() - c0))
            )
        bench.say(f"  round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.0f}" for n in names))
    load.append(open("/proc/loadavg").read().split()[:3])
    med = {n: float(np.median(v)) for n, v in times.items()}
    roofline = med["matmul"] * 1e9 / (4 * params)
    peft_bf16 = max(med["peft_bf16_sdpa"], med["peft_bf16_eager"])
    result = {
        "bf16": bf16,
        "tok_s": {n: med[n] for n in variants},
        "samples": times,
        "matmul_gflops": med["matmul"],
        "roofline_tok_s": roofline,
        "train_vs_roofline": med["engine_compiled"] / roofline,
        "eager_vs_roofline": med["engine_eager"] / roofline,
        "train_vs_peft_bf16": med["engine_compiled"] / peft_bf16,
        "compiled_vs_eager": med["engine_compiled"] / med["engine_eager"],
        "compile_s": warm["engine_compiled"]["compile_s"],
        "warm_up": warm,
        "compiled_graphs": graphs,
        "recompiles_after_warm_up": compiled_graphs() - graphs,
        "loadavg_before_after": load,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("samples", "warm_up")}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

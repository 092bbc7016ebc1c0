"""The benchmark suite of issue 5: ``make bench`` (or ``python benchmarks/bench.py``).

Measures, in one run on one machine, and writes ``bench.json`` plus a printed table:

* ``roofline_tok_s``   matmul throughput measured here (bf16 where the hardware has it, else
                       fp32) / (4 x the base model's matmul parameters per token);
* ``train_tok_s``      the engine's local training (``hetlora.client.train_client``: rank 16,
                       sequences of 128 real tokens, batch 8; the fixed-shape step with the
                       decoder layers compiled), and ``train_vs_roofline``;
* ``compile_s``        seconds the compiled variant spent compiling (its first pass; apart from
                       the step times), and ``compiled_graphs`` (graphs built: recompiles count);
* ``peft_fp32_tok_s``  the same step as a plain PEFT fp32 loop (peer repos), ``train_vs_peft``;
* ``peft_bf16_tok_s``  the PEFT loop under bf16 autocast, the faster of SDPA and eager
                       attention, and ``train_vs_peft_bf16``;
* ``ablation``         tokens/s as each speed-up is switched on, one at a time;
* ``round_overhead``   wall time of a federated round (8 clients: distribution, training,
                       pruning, aggregation; no evaluation) / the sum of its training steps;
* ``rss_ratio``        peak RSS of a 500-client simulation / a 10-client one (own processes);
* ``aggregate_s``      server validation + aggregation of 100 replies at r_max = 64 on every
                       attention and MLP projection;
* ``ppl_gap``          eval perplexity of a short bf16 run vs the same run in fp32.

``--smoke`` runs every section at toy sizes (the tests use it on a tiny model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peak_rss import peak_rss_mib  # benchmarks/peak_rss.py, next to this file

from hetlora import adapters
from hetlora.client import TrainSettings, train_client
from hetlora.config import make_config
from hetlora.data import load_clients
from hetlora.data.batching import collate, tokenize_all
from hetlora.hardware import (
    compile_layers,
    compile_seconds,
    compiled_graphs,
    cpu_has_bf16,
    resolve_device,
    store_frozen_linears,
    use_cpu_attention,
)
from hetlora.methods import make_server
from hetlora.methods.base import Reply
from hetlora.models import default_target_modules, load_base_model

TARGETS = {  # key: (comparison, bound), issue 12's targets
    "train_vs_roofline": (">=", 0.85),
    "train_vs_peft_bf16": (">=", 1.5),
    "round_overhead": ("<=", 1.05),
    "rss_ratio": ("<=", 1.1),
    "ppl_gap": ("<=", 0.01),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the machine and its roofline ------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_bf16": cpu_has_bf16(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Best of three timings of ``reps`` n x n x n matmuls."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best / 1e9


def matmul_params(model: torch.nn.Module) -> int:
    """Weights multiplied per token: every linear layer, and the output head once."""
    head = model.get_output_embeddings()
    total = head.weight.numel()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            total += module.weight.numel()
    return total


# -- local training ----------------------------------------------------------------------------------


def real_batches(tokenizer, seq: int, batch: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of Shakespeare examples that fill all ``seq`` tokens (no padding),
    labelled as the engine labels them (the response only)."""
    clients = load_clients("shakespeare", min_examples=1)
    full = []
    for client in sorted(clients):
        for item in tokenize_all(tokenizer, clients[client], seq):
            if len(item.ids) == seq:
                full.append(item)
        if len(full) >= batch * count:
            break
    if len(full) < batch * count:
        raise RuntimeError(f"only {len(full)} examples of {seq} tokens")
    return [
        collate(full[i * batch : (i + 1) * batch], tokenizer.pad_token_id) for i in range(count)
    ]


def time_steps(step, batches, device) -> tuple[float, int]:
    """Run ``step`` on every batch; the first is a warm-up. Returns (seconds, real tokens)."""
    step(batches[0])
    sync(device)
    start, tokens = time.perf_counter(), 0
    for b in batches[1:]:
        step(b)
        tokens += int(b["attention_mask"].sum())
    sync(device)
    return time.perf_counter() - start, tokens


def peft_tok_s(model_name: str, device, batches, rank: int, *, bf16: bool, eager: bool) -> float:
    """The peer baseline: PEFT LoRA, the model's own loss over full logits, AdamW; in fp32, or
    under bf16 autocast (``bf16``), with SDPA or (``eager``) transformers' eager attention."""
    from peft import LoraConfig, get_peft_model

    base = load_base_model(model_name, device)
    if eager:
        use_cpu_attention(base.model, device)
    targets = default_target_modules(base.model)
    model = get_peft_model(
        base.model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step(b):
        b = {k: v.to(device) for k, v in b.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)

    seconds, tokens = time_steps(step, batches, device)
    return tokens / seconds


def engine_tok_s(
    model_name: str,
    device,
    batches,
    rank: int,
    *,
    bf16,
    fused,
    bf16_base,
    eager,
    compiled=False,
    backend="inductor",
    info=None,
):
    """The engine's client loop (``train_client``, with the self-pruning regulariser), with the
    speed-ups switched on or off. ``compiled``: the fixed-shape step (adapter at r_max = rank)
    with the decoder layers compiled; its compile time and graph count go into ``info``."""
    base = load_base_model(model_name, device)
    if bf16_base:
        store_frozen_linears(base.model, torch.bfloat16)
    if eager:  # transformers' matmul-softmax-matmul attention in place of PyTorch's SDPA (CPU)
        use_cpu_attention(base.model, device)
    targets = default_target_modules(base.model)
    peft_model = adapters.wrap(base.model, rank, 2.0, targets)
    if compiled:
        compile_layers(base.model, backend=backend)
    factors = adapters.read_factors(peft_model)
    settings = TrainSettings(
        local_steps=len(batches),
        lr=1e-3,
        lambda_=0.01,
        gamma=0.99,
        r_min=4,
        bf16=bf16,
        fixed_rank=rank if compiled else 0,
        fused_ce=fused,
    )
    stamps: list[tuple[float, float]] = []  # (time, compile seconds so far) after each step
    graphs = compiled_graphs()
    result = train_client(
        peft_model,
        factors,
        iter(batches),
        settings,
        targets,
        device,
        on_step=lambda step, loss: stamps.append((time.perf_counter(), compile_seconds())),
    )
    if info is not None:
        info["compile_s"] = result.stats.compile_seconds
        info["compiled_graphs"] = compiled_graphs() - graphs
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    # from the end of the warm-up step (where compiling happens); a recompile later is not
    # counted as step time either
    (t0, c0), (t1, c1) = stamps[0], stamps[-1]
    return tokens / (t1 - t0 - (c1 - c0))


# -- federated round, memory, aggregation, precision -------------------------------------------------


def run_config(model: str, smoke: bool, **extra):
    values = {
        "model": model,
        "data": "shakespeare",
        "max_seq_len": 128,
        "batch_size": 8,
        "seed": 0,
        "eval_examples": 8 if smoke else 64,
        "rouge_examples": 0,
    }
    values.update(extra)
    return make_config(values)


def round_overhead(model: str, smoke: bool, compile_mode: str) -> dict:
    """One round on the engine's path; compiling (if any) is reported apart, not as overhead."""
    from hetlora.runtime.local import LocalRun

    cfg = run_config(
        model,
        smoke,
        rounds=2,  # round 1 is measured; evaluation comes only every 100 rounds and at the end
        eval_every=100,
        clients_per_round=3 if smoke else 8,
        local_steps=1 if smoke else 4,
        r_min=4,
        r_max=16,
        min_examples=60 if smoke else 40,
        compile=compile_mode,
    )
    sim = LocalRun(cfg)
    start = time.perf_counter()
    row = sim.run_round()
    wall = time.perf_counter() - start - row["compile_s"]
    assert "test_ppl" not in row
    train = sum(c["step_s"] for c in row["clients"].values())
    return {
        "round_s": wall,
        "round_train_s": train,
        "round_compile_s": row["compile_s"],
        "round_overhead": wall / train,
    }


def rss_child(model: str, clients: int, smoke: bool) -> None:
    """One simulation of ``clients`` clients, one round; prints its peak RSS in MiB."""
    from hetlora.runtime.local import LocalRun

    cfg = run_config(
        model,
        smoke,
        rounds=2,
        eval_every=100,
        clients_per_round=2,
        local_steps=1,
        min_examples=5,
        max_clients=clients,
    )
    sim = LocalRun(cfg)
    if len(sim.client_ids) != clients:
        raise SystemExit(f"wanted {clients} clients, the data has {len(sim.client_ids)}")
    sim.run_round()
    print(
        json.dumps(
            {
                "clients": clients,
                "rss_mib": peak_rss_mib(),
            }
        )
    )


def rss_ratio(model: str, smoke: bool) -> dict:
    few, many = (4, 40) if smoke else (10, 500)
    out = {}
    for n in (few, many):
        argv = [sys.executable, __file__, "--model", model, "--rss-child", str(n)]
        if smoke:
            argv.append("--smoke")
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rss run of {n} clients failed:\n{done.stderr[-2000:]}")
        out[n] = json.loads(done.stdout.strip().splitlines()[-1])["rss_mib"]
    return {"rss_mib": {str(k): v for k, v in out.items()}, "rss_ratio": out[many] / out[few]}


def aggregate_s(model: str, smoke: bool) -> dict:
    """Validation + HetLoRA aggregation of ``n`` replies on every projection at r_max."""
    n, r_max = (5, 8) if smoke else (100, 64)
    base = load_base_model(model).model
    shapes = {
        name: (m.out_features, m.in_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
    }
    del base
    rng = np.random.default_rng(0)
    clients = [f"c{i}" for i in range(n)]
    ranks = {c: int(rng.integers(4, r_max + 1)) for c in clients}
    initial = {k: (torch.zeros(o, r_max), torch.randn(r_max, i)) for k, (o, i) in shapes.items()}
    cfg = make_config({"method": "hetlora", "r_min": 4, "r_max": r_max})
    server = make_server(cfg, initial, ranks, clients)
    busy, g = 0.0, torch.Generator().manual_seed(0)
    for c in clients:
        r = ranks[c]
        factors = {
            k: (0.01 * torch.randn(o, r, generator=g), torch.randn(r, i, generator=g))
            for k, (o, i) in shapes.items()
        }
        update = Reply(c, 50, factors=factors, rank=r)
        start = time.perf_counter()
        server.check(update)
        server.add(update)
        busy += time.perf_counter() - start
    start = time.perf_counter()
    server.finish()
    busy += time.perf_counter() - start
    params = sum(o * r_max + r_max * i for o, i in shapes.values())
    return {"aggregate_s": busy, "aggregate_replies": n, "aggregate_params_at_r_max": params}


def ppl_gap(model: str, smoke: bool, compile_mode: str) -> dict:
    """The same short run in fp32 (eager, an adapter of each client's rank) and on the fast path
    (bf16 where the hardware has it, the fixed-shape step compiled with ``compile_mode``)."""
    from hetlora.runtime.local import LocalRun

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision, compile_ in (("fp32", "off"), ("auto", compile_mode)):
            cfg = run_config(
                model,
                smoke,
                precision=precision,
                compile=compile_,
                rounds=1 if smoke else 2,
                clients_per_round=2,
                local_steps=1 if smoke else 3,
                min_examples=60 if smoke else 100,
            )
            summary = LocalRun(cfg).run(Path(tmp) / precision)
            out[precision] = summary["final_ppl"]
    return {
        "ppl_fp32": out["fp32"],
        "ppl_fast": out["auto"],
        "ppl_gap": abs(out["auto"] - out["fp32"]) / out["fp32"],
    }


# -- the report -------------------------------------------------------------------------------------


def verdicts(result: dict) -> dict:
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = result.get(key)
        if value is None:
            continue
        ok = value >= bound if op == ">=" else value <= bound
        out[key] = {"value": value, "target": f"{op} {bound}", "met": bool(ok)}
    return out


def table(result: dict) -> str:
    lines = [
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['device']}, torch {result['machine']['torch']}",
        "",
        "| metric | value | target |",
        "|---|---|---|",
    ]
    rows = [
        ("matmul_gflops", f"{result['matmul_gflops']:.0f} GFLOP/s ({result['matmul_dtype']})"),
        ("roofline_tok_s", f"{result['roofline_tok_s']:.0f}"),
        ("train_tok_s", f"{result['train_tok_s']:.0f}"),
        ("peft_fp32_tok_s", f"{result['peft_fp32_tok_s']:.0f}"),
        ("peft_bf16_tok_s", f"{result['peft_bf16_tok_s']:.0f} ({result['peft_bf16_variant']})"),
        ("train_vs_roofline", f"{result['train_vs_roofline']:.2f}"),
        ("train_vs_peft", f"{result['train_vs_peft']:.2f}"),
        ("train_vs_peft_bf16", f"{result['train_vs_peft_bf16']:.2f}"),
        (
            "compile_s",
            f"{result['compile_s']:.1f} ({result['compiled_graphs']} graphs; "
            f"{result['compiled_graphs_later']} more in later passes)",
        ),
        (
            "round_overhead",
            f"{result['round_overhead']:.3f} ({result['round_s']:.1f} s / "
            f"{result['round_train_s']:.1f} s; compiling {result['round_compile_s']:.1f} s apart)",
        ),
        (
            "rss_ratio",
            f"{result['rss_ratio']:.3f} ("
            + " / ".join(f"{v:.0f} MiB at {k}" for k, v in reversed(result["rss_mib"].items()))
            + ")",
        ),
        ("aggregate_s", f"{result['aggregate_s']:.2f} ({result['aggregate_replies']} replies)"),
        (
            "ppl_gap",
            f"{100 * result['ppl_gap']:.2f}% ({result['ppl_fast']:.3f} vs fp32 "
            f"{result['ppl_fp32']:.3f})",
        ),
    ]
    checks = result["targets"]
    for key, text in rows:
        target = checks.get(key)
        mark = (
            ""
            if target is None
            else f"{target['target']} ({'met' if target['met'] else 'NOT met'})"
        )
        lines.append(f"| {key} | {text} | {mark} |")
    lines += ["", "| local training, speed-ups switched on one by one | tokens/s |", "|---|---|"]
    lines += [f"| {row['name']} | {row['tok_s']:.0f} |" for row in result["ablation"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per pass")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes per variant")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: that it runs")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.model, args.rss_child, args.smoke)
        return 0

    device = resolve_device(args.device)
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    steps = 1 if args.smoke else args.steps
    seq, batch, rank = (32, 2, 4) if args.smoke else (128, 8, 16)
    started = time.perf_counter()
    result: dict = {"machine": machine(device), "command": " ".join(sys.argv)}

    say("[1/6] roofline: matmul throughput")
    dtype = torch.bfloat16 if bf16 else torch.float32
    gflops = matmul_gflops(device, dtype, 256 if args.smoke else 2048)
    base = load_base_model(args.model, device)
    params = matmul_params(base.model)
    batches = real_batches(base.tokenizer, seq, batch, steps + 1)
    del base
    result.update(
        matmul_dtype=str(dtype).removeprefix("torch."),
        matmul_gflops=gflops,
        matmul_params=params,
        roofline_tok_s=gflops * 1e9 / (4 * params),
    )

    say("[2/6] local training: PEFT baselines and the engine, speed-ups one by one")
    # smoke: Dynamo's capture only (tests/test_fixed_step.py covers aot_eager), no kernel build
    backend = "eager" if args.smoke else "inductor"
    peft_rows = [
        ("plain PEFT fp32 loop (peers)", dict(bf16=False, eager=False)),
        ("PEFT + bf16 autocast, SDPA attention", dict(bf16=bf16, eager=False)),
        ("PEFT + bf16 autocast, eager attention", dict(bf16=bf16, eager=True)),
    ]
    variants = [
        *[(name, None) for name, _ in peft_rows],
        ("engine, fp32", dict(bf16=False, fused=False, bf16_base=False, eager=False)),
        ("+ bf16 autocast", dict(bf16=bf16, fused=False, bf16_base=False, eager=False)),
        (
            "+ fused chunked cross-entropy",
            dict(bf16=bf16, fused=True, bf16_base=False, eager=False),
        ),
        (
            "+ frozen linears stored in bf16",
            dict(bf16=bf16, fused=True, bf16_base=bf16, eager=False),
        ),
        ("+ eager attention on CPU", dict(bf16=bf16, fused=True, bf16_base=bf16, eager=True)),
        (
            "+ fixed-shape adapter, compiled decoder layers (= the engine)",
            dict(bf16=bf16, fused=True, bf16_base=bf16, eager=True, compiled=True),
        ),
    ]
    engine = len(variants) - 1
    peft_flags = dict(peft_rows)
    # Interleaved repeats, median per variant: this machine's speed drifts by several percent
    # from minute to minute, which one pass per variant would attribute to the variants.
    samples: dict[str, list[float]] = {name: [] for name, _ in variants}
    compile_info: list[dict] = []
    for rep in range(1 if args.smoke else args.repeats):
        for name, flags in variants:
            if flags is None:
                tok_s = peft_tok_s(args.model, device, batches, rank, **peft_flags[name])
            elif flags.get("compiled"):
                info: dict = {}
                tok_s = engine_tok_s(
                    args.model, device, batches, rank, **flags, backend=backend, info=info
                )
                compile_info.append(info)
                say(
                    f"      pass {rep + 1}: compiling {info['compile_s']:.1f} s, "
                    f"{info['compiled_graphs']} graphs"
                )
            else:
                tok_s = engine_tok_s(args.model, device, batches, rank, **flags)
            samples[name].append(tok_s)
            say(f"      pass {rep + 1}: {name}: {tok_s:.0f} tokens/s")
    result["ablation"] = [
        {"name": name, "tok_s": float(np.median(v)), "samples": v} for name, v in samples.items()
    ]
    result["peft_fp32_tok_s"] = result["ablation"][0]["tok_s"]
    best = max(result["ablation"][1:3], key=lambda row: row["tok_s"])
    result["peft_bf16_tok_s"] = best["tok_s"]
    result["peft_bf16_variant"] = best["name"].rsplit(", ", 1)[1]
    result["train_tok_s"] = result["ablation"][engine]["tok_s"]
    result["train_vs_roofline"] = result["train_tok_s"] / result["roofline_tok_s"]
    result["train_vs_peft"] = result["train_tok_s"] / result["peft_fp32_tok_s"]
    result["train_vs_peft_bf16"] = result["train_tok_s"] / result["peft_bf16_tok_s"]
    # the first compiled pass compiles (cold in a fresh process, unless inductor's on-disk cache
    # is warm); later passes reuse the graphs (new model objects, same shapes)
    result["compile_s"] = compile_info[0]["compile_s"]
    result["compiled_graphs"] = compile_info[0]["compiled_graphs"]
    result["compiled_graphs_later"] = sum(i["compiled_graphs"] for i in compile_info[1:])
    result["compile_s_later"] = sum(i["compile_s"] for i in compile_info[1:])

    say("[3/6] a federated round: overhead over its training steps")
    compile_mode = "off" if args.smoke else "on"  # smoke: inductor's first build takes minutes
    result.update(round_overhead(args.model, args.smoke, compile_mode))
    say("[4/6] peak memory: many clients vs few")
    result.update(rss_ratio(args.model, args.smoke))
    say("[5/6] server aggregation")
    result.update(aggregate_s(args.model, args.smoke))
    say("[6/6] precision: a short run in fp32 and on the fast path")
    result.update(ppl_gap(args.model, args.smoke, compile_mode))

    result["targets"] = verdicts(result)
    result["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

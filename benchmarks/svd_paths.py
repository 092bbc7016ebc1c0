"""The two SVD paths of ``recon_svd``/``hlora``/``rblora`` at real module shapes (issue 26).

``python benchmarks/svd_paths.py [--out svd_paths.json] [--repeats 3]`` times one server join of
K client adapters per module shape, both ways, and checks they agree:

* ``dense``: ``dW = sum_k p_k B_k A_k`` formed (fp64, d_out x d_in), then its SVD
  (:func:`hetlora.methods.recon_svd.svd_factors`);
* ``qr``: QR of the stacked weighted factors and an R x R SVD, R = sum_k r_k
  (:func:`hetlora.methods.recon_svd.qr_svd_factors`), never the dense matrix.

``memory`` is the fp64 working set each path needs beyond the replies (dense: the d_out x d_in
sum and its SVD's U, S, V^T; qr: the stacked factors, their Q and R, the core and its SVD),
counted from the shapes. Shapes: SmolLM2-135M's q_proj (576 x 576) and v_proj (192 x 576),
Llama-3-8B's q_proj (4096 x 4096) and down_proj (4096 x 14336); clients: 10 at ranks spread
over [4, 32] and r_max 32 (the short-budget study's), or 5 at [5, 50] (the chat study's).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from hetlora.methods.recon_svd import qr_svd_factors, svd_factors

SHAPES = {
    "SmolLM2-135M q_proj": (576, 576),
    "SmolLM2-135M v_proj": (192, 576),
    "Llama-3-8B q_proj": (4096, 4096),
    "Llama-3-8B down_proj": (4096, 14336),
}
CLIENTS = {
    "10 clients, ranks 4..32": [4, 7, 10, 13, 16, 20, 23, 26, 29, 32],
    "5 clients, ranks 5..50": [5, 16, 27, 38, 50],
}


def working_set(d_out: int, d_in: int, ranks: list[int], path: str) -> int:
    m = min(d_out, d_in)
    big_r = sum(ranks)
    if path == "dense":
        return 8 * (d_out * d_in + d_out * m + m + m * d_in)
    k = min(big_r, d_out)
    j = min(big_r, d_in)
    return 8 * (2 * big_r * (d_out + d_in) + d_out * k + d_in * j + 3 * big_r * big_r)


def one(d_out: int, d_in: int, ranks: list[int], repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    factors = [
        (torch.randn(d_out, r, generator=g) * 0.01, torch.randn(r, d_in, generator=g))
        for r in ranks
    ]
    p = [1.0 / len(ranks)] * len(ranks)
    r_max = max(ranks)
    times: dict[str, float] = {}
    results = {}
    for path in ("dense", "qr"):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            if path == "dense":
                total = torch.zeros(d_out, d_in, dtype=torch.float64)
                for w, (b, a) in zip(p, factors, strict=True):
                    total.add_(b.double() @ a.double(), alpha=w)
                results[path] = svd_factors(total, r_max)
            else:
                left = torch.cat(
                    [w**0.5 * b.double() for w, (b, _) in zip(p, factors, strict=True)], 1
                )
                right = torch.cat(
                    [w**0.5 * a.double() for w, (_, a) in zip(p, factors, strict=True)]
                )
                results[path] = qr_svd_factors(left, right, r_max)
            best = min(best, time.perf_counter() - t0)
        times[path] = best
    prod = {k: b.double() @ a.double() for k, (b, a) in results.items()}
    rel = float((prod["qr"] - prod["dense"]).norm() / prod["dense"].norm())
    return {
        "dense_s": times["dense"],
        "qr_s": times["qr"],
        "speedup": times["dense"] / times["qr"],
        "dense_mib": working_set(d_out, d_in, ranks, "dense") / 2**20,
        "qr_mib": working_set(d_out, d_in, ranks, "qr") / 2**20,
        "rel_diff": rel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("svd_paths.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="small shapes only (tests)")
    args = parser.parse_args()
    shapes = {"toy": (24, 20)} if args.smoke else SHAPES
    clients = {"3 clients": [2, 3, 4]} if args.smoke else CLIENTS
    rows = []
    for sname, (d_out, d_in) in shapes.items():
        for cname, ranks in clients.items():
            row = {"shape": sname, "d_out": d_out, "d_in": d_in, "clients": cname}
            row.update(one(d_out, d_in, ranks, args.repeats))
            rows.append(row)
            print(
                f"| {sname} ({d_out} x {d_in}) | {cname} | {row['dense_s'] * 1e3:.1f} ms | "
                f"{row['qr_s'] * 1e3:.1f} ms | {row['speedup']:.1f}x | {row['dense_mib']:.1f} MiB | "
                f"{row['qr_mib']:.1f} MiB | {row['rel_diff']:.1e} |",
                flush=True,
            )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "commit": commit,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

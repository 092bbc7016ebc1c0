"""Does the code at HEAD compute the same numbers as an earlier commit, for every method?

    python tools/numbers_check.py BASE_COMMIT [WORK_DIR]

Checks BASE_COMMIT out into WORK_DIR/base-src (a git worktree), builds the tiny random Llama of
``tools/tiny.py``, and runs each entry of ``RUNS`` twice with ``hetlora run``, once with the
base commit's code and once with this checkout's, on one thread (3 rounds of 3 clients, 4 local
steps, r in [2, 8], fp32, eager). Then ``tools/compare_metrics.py`` compares each pair's
``metrics.jsonl`` and ``summary.json``. Prints one line per run and exits 1 if any number
differs. About 8 minutes on 2 cores. ``ONLY=hetlora,ffa-dp`` runs only those entries.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Every method, and the options that take another code path.
RUNS: dict[str, list[str]] = {
    "hetlora": ["method=hetlora"],
    "hetlora-val": ["method=hetlora", "val_fraction=0.2"],
    "hetlora-keep": ["method=hetlora", "padding='keep'"],
    "hetlora-rankwise": ["method=hetlora", "padding='rankwise'"],
    "hetlora-uniform": ["method=hetlora", "aggregation='uniform'"],
    "hetlora-per-module": ["method=hetlora", "per_module_weights=true"],
    "homlora": ["method=homlora"],
    "recon_svd": ["method=recon_svd"],
    "hlora": ["method=hlora"],
    "rblora": ["method=rblora"],
    "fedex": ["method=fedex"],
    "flora": ["method=flora"],
    "ffa": ["method=ffa"],
    "full_ft": ["method=full_ft", "lr=1e-4"],
    "hetlora-dp": [
        "method=hetlora",
        "pruning=false",
        "aggregation='uniform'",
        "dp_clip_norm=0.5",
        "dp_noise_multiplier=1.0",
        "dp_noise_seed=1",
    ],
    "ffa-dp": ["method=ffa", "dp_clip_norm=0.5", "dp_noise_multiplier=1.0", "dp_noise_seed=1"],
}

COMMON = [
    "rounds=3",
    "clients_per_round=3",
    "max_clients=6",
    "local_steps=4",
    "batch_size=4",
    "max_seq_len=48",
    "eval_every=1",
    "eval_examples=16",
    "rouge_examples=0",
    "precision='fp32'",
    "compile='off'",
]


#: The ranks, for every method but full fine-tuning.
RANKS = ["r_min=2", "r_max=8"]


def run(src: Path, model: Path, out: Path, keys: list[str]) -> int:
    ranks = [] if "method=full_ft" in keys else RANKS
    sets = [f"--set={k}" for k in [f"model='{model}'", *COMMON, *ranks, *keys]]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "hetlora.cli", "run", "--out", str(out), "--overwrite", *sets]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {out}: exit {done.returncode}\n{done.stderr[-1500:]}")
    return done.returncode


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    base, work = argv[0], Path(argv[1] if len(argv) == 2 else "runs/numbers-check").resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_tree = work / "base-src"
    if not base_tree.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base_tree), base],
            check=True,
        )
    sys.path.insert(0, str(ROOT / "tools"))
    from tiny import make_tiny_model

    model = work / "tiny-llama"
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    failed = 0
    only = os.environ.get("ONLY", "").split(",") if os.environ.get("ONLY") else list(RUNS)
    for name, keys in ((n, RUNS[n]) for n in only):
        codes = [
            run(src, model, work / side / name, keys)
            for side, src in (("base", base_tree / "src"), ("head", ROOT / "src"))
        ]
        if any(codes):
            failed += 1
            continue
        cmp = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "compare_metrics.py"),
             str(work / "base" / name), str(work / "head" / name)],
            capture_output=True, text=True,
        )  # fmt: skip
        lines = [line for line in cmp.stdout.splitlines() if line.strip()]
        print(f"{name}: " + "; ".join(lines[-2:]), flush=True)
        failed += cmp.returncode != 0
    print(f"{len(only) - failed} of {len(only)} runs give the same numbers at {base} and HEAD")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``make bench`` at toy sizes on the tiny model: it runs and writes every key (not its speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "roofline_tok_s",
    "train_tok_s",
    "train_vs_roofline",
    "peft_fp32_tok_s",
    "train_vs_peft",
    "peft_bf16_tok_s",
    "train_vs_peft_bf16",
    "round_overhead",
    "rss_ratio",
    "aggregate_s",
    "ppl_gap",
}


def test_bench_smoke_writes_every_key(tiny_model, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench.py"),
            "--smoke",
            "--model",
            str(tiny_model),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert KEYS <= set(result)
    for key in KEYS:
        assert isinstance(result[key], float) and result[key] > 0 or key == "ppl_gap", key
    assert 0 <= result["ppl_gap"] < 1
    assert set(result["targets"]) == {
        "train_vs_roofline",
        "train_vs_peft_bf16",
        "round_overhead",
        "rss_ratio",
        "ppl_gap",
    }
    assert len(result["ablation"]) == 9 and "| train_tok_s |" in done.stdout
    # the compiled variant compiled once (its first pass) and reported it apart from its steps
    assert result["compiled_graphs"] >= 1 and result["compile_s"] > 0
    assert result["compiled_graphs_later"] == 0


def test_profile_step_smoke_splits_the_step_into_kinds_of_work(tiny_model, tmp_path):
    """benchmarks/profile_step.py (docs/performance.md's profile) at toy sizes: every profiled
    microsecond lands in one kind of work, the linear layers' matmuls among them."""
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "profile_step.py"),
            "--smoke",
            "--model",
            str(tiny_model),
            "--steps",
            "2",
            "--gflops",
            "100",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["compile"] == "on" and result["steps"] == 2 and result["tokens"] > 0
    assert abs(sum(result["shares"].values()) - 1.0) < 1e-9
    assert result["shares"]["matmul (linear layers)"] > 0
    assert result["matmul_gflops_in_step"] > 0 and result["top"]
    assert "| kind of work |" in done.stdout and "of 100)" in done.stdout

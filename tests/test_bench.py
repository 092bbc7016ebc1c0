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


def _smoke(script: str, model: Path, out: Path, *extra: str, timeout: int = 900):
    """Run ``benchmarks/<script> --smoke --model MODEL --out OUT EXTRA...``; it must succeed."""
    argv = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--model", str(model)]
    done = subprocess.run(
        [*argv, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_bench_smoke_writes_every_key(tiny_model, tmp_path):
    out = tmp_path / "bench.json"
    done = _smoke("bench.py", tiny_model, out)
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
    # eager: the compiled path's own smoke test is the bench's, above
    args = ("--steps", "2", "--compile", "off", "--gflops", "100")
    done = _smoke("profile_step.py", tiny_model, out, *args, timeout=600)
    result = json.loads(out.read_text())
    assert result["compile"] == "off" and result["steps"] == 2 and result["tokens"] > 0
    assert abs(sum(result["shares"].values()) - 1.0) < 1e-9
    assert result["shares"]["matmul (linear layers)"] > 0
    assert result["matmul_gflops_in_step"] > 0 and result["top"]
    assert "| kind of work |" in done.stdout and "of 100)" in done.stdout


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """The bench's rss_ratio compares two child processes' peaks. A child started by a parent
    holding 512 MiB must not report those 512 MiB (getrusage's ru_maxrss does on Linux)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import peak_rss; "
        "big = bytearray(512 * 2**20); big[::4096] = b'x' * len(big[::4096]); "
        "import subprocess; child = subprocess.run([sys.executable, '-c', "
        "'import sys; sys.path.insert(0, sys.argv[1]); import peak_rss; print(peak_rss.peak_rss_mib())',"
        " sys.argv[1]], capture_output=True, text=True, check=True); "
        "print(peak_rss.peak_rss_mib(), child.stdout.strip())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    parent, child = map(float, done.stdout.split()[-2:])
    assert parent > 512  # the parent's own peak holds the buffer
    assert child < parent - 400  # the child does not

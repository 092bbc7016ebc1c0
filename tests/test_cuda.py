"""Training on CUDA gives the results of training on CPU.

These run only where a CUDA GPU is present (never in this project's CPU CI); on a GPU machine,
``python -m pytest tests/test_cuda.py`` checks that:

* a HetLoRA run trains, evaluates and saves on the GPU under bf16 autocast (with its frozen
  linears stored in bf16 and SDPA attention), and its saved adapter reloads there to the
  perplexity it reported;
* in fp32 (TF32 off), 2 rounds on the GPU give the global adapter and perplexities of the same
  2 rounds on the CPU, up to float reordering;
* the fused chunked cross-entropy equals the full logits' cross-entropy on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetlora.config import make_config
from hetlora.evaluate import linear_cross_entropy
from hetlora.runtime.local import LocalRun, evaluate_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _config(model, device: str, precision: str):
    return make_config(
        {
            "model": str(model),
            "device": device,
            "precision": precision,
            "min_examples": 60,
            "max_clients": 4,
            "rounds": 2,
            "clients_per_round": 3,
            "local_steps": 3,
            "batch_size": 4,
            "lr": 0.01,
            "r_min": 2,
            "r_max": 8,
            "eval_examples": 16,
            "rouge_examples": 2,
            "max_new_tokens": 4,
        }
    )


def test_bf16_run_on_cuda_reloads_to_its_reported_perplexity(tiny_model, tmp_path):
    sim = LocalRun(_config(tiny_model, "cuda", "auto"))
    assert sim.ws.device.type == "cuda" and sim.ws.bf16
    assert sim.ws.peft_model.get_base_model().config._attn_implementation != "eager"
    summary = sim.run(tmp_path / "run")
    assert summary["rounds"] == 2 and summary["bf16"]
    check = evaluate_run(tmp_path / "run")
    assert check["test_ppl"] == pytest.approx(check["reported_ppl"], rel=1e-3)


def test_fp32_rounds_on_cuda_equal_those_on_cpu(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    results = {}
    for device in ("cpu", "cuda"):
        sim = LocalRun(_config(tiny_model, device, "fp32"))
        metrics = [sim.run_round() for _ in range(2)]
        results[device] = (sim.server.global_factors(), metrics, sim.evaluate())
    cpu_factors, cpu_rounds, cpu_eval = results["cpu"]
    gpu_factors, gpu_rounds, gpu_eval = results["cuda"]
    assert cpu_factors.keys() == gpu_factors.keys()
    for name in cpu_factors:
        for a, b in zip(cpu_factors[name], gpu_factors[name], strict=True):
            torch.testing.assert_close(b.cpu(), a.cpu(), rtol=1e-3, atol=1e-5)
    assert [m["client_ranks"] for m in gpu_rounds] == [m["client_ranks"] for m in cpu_rounds]
    assert gpu_eval[1] == pytest.approx(cpu_eval[1], rel=1e-4)  # perplexity


def test_fused_cross_entropy_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(600, 64, device="cuda", generator=g, requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", generator=g, requires_grad=True)
    targets = torch.randint(0, 1000, (600,), device="cuda", generator=g)
    got = linear_cross_entropy(hidden, weight, targets)
    want = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    wh, ww = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(gh, wh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, ww, rtol=1e-4, atol=1e-5)

"""The speed-ups of local training give the results of the plain path.

* the fused, chunked cross-entropy equals ``F.cross_entropy`` of the full logits, in value and
  in both gradients (and under bf16 autocast within bf16 tolerance);
* a bf16 run keeps the frozen base's linear layers in bf16 (LoRA factors stay fp32), trains,
  evaluates and generates under autocast, and its saved adapter reloads to the perplexity it
  reported;
* on CPU the model runs transformers' eager attention, with the logits (with padding) and
  gradients of SDPA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetlora import evaluate
from hetlora.config import make_config
from hetlora.evaluate import linear_cross_entropy
from hetlora.hardware import store_frozen_linears, use_cpu_attention
from hetlora.models import load_base_model
from hetlora.runtime.local import LocalRun, evaluate_run


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(evaluate, "CE_CHUNK", 7)  # several chunks and a ragged last one


def test_linear_cross_entropy_equals_the_full_logits(small_chunks):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (30,), generator=g)
    got = linear_cross_entropy(hidden, weight, targets)
    want = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    torch.testing.assert_close(got, want)
    gh, gw = torch.autograd.grad(3.0 * got, (hidden, weight))
    wh, ww = torch.autograd.grad(3.0 * want, (hidden, weight))
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, targets), (hidden, weight)
    )


def test_linear_cross_entropy_frozen_weight_and_bf16(small_chunks):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 32, generator=g, requires_grad=True)
    weight = torch.randn(64, 32, generator=g)  # frozen: no gradient asked for it
    targets = torch.randint(0, 64, (20,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets)
        logits = F.linear(hidden, weight)  # bf16 under autocast, like the fused projection
    assert got.dtype == torch.float32
    want = F.cross_entropy(logits.float(), targets, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    (gh,) = torch.autograd.grad(got, hidden)
    (wh,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(gh, wh, rtol=2e-2, atol=2e-2)
    with torch.no_grad():  # evaluation: no gradients computed or stored
        assert torch.isfinite(linear_cross_entropy(hidden, weight, targets))


def test_store_frozen_linears_leaves_head_and_norms_fp32(tiny_model):
    model = load_base_model(str(tiny_model)).model
    cast = store_frozen_linears(model, torch.bfloat16)
    assert cast == sum(type(m) is torch.nn.Linear for m in model.modules()) - 1  # not the head
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32


def test_bf16_run_trains_with_a_bf16_base_and_reloads(tiny_model, tmp_path):
    cfg = make_config(
        {
            "model": str(tiny_model),
            "precision": "bf16",
            "min_examples": 60,
            "max_clients": 3,
            "rounds": 2,
            "clients_per_round": 2,
            "local_steps": 2,
            "batch_size": 4,
            "lr": 0.01,
            "eval_examples": 16,
            "rouge_examples": 2,
            "max_new_tokens": 4,
        }
    )
    sim = LocalRun(cfg)
    assert sim.ws.bf16
    base = sim.ws.peft_model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16
    assert all(
        p.dtype == torch.float32 for n, p in sim.ws.peft_model.named_parameters() if "lora_" in n
    )
    summary = sim.run(tmp_path / "run")
    assert summary["bf16"] and summary["rounds"] == 2
    check = evaluate_run(tmp_path / "run")  # a fresh fp32 base under autocast: the same numbers
    assert check["test_ppl"] == pytest.approx(check["reported_ppl"], rel=1e-3)


def test_cpu_attention_gives_the_results_of_sdpa(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    outputs = []
    for eager in (False, True):
        model = load_base_model(str(tiny_model)).model
        if eager:
            assert use_cpu_attention(model, torch.device("cpu"))
            assert model.config._attn_implementation == "eager"
        weight = model.model.layers[0].self_attn.q_proj.weight
        weight.requires_grad_(True)
        out = model(input_ids=ids, attention_mask=mask)
        logits = out.logits * mask[..., None]
        grad = torch.autograd.grad(logits.sum(), weight)[0]
        outputs.append((logits.detach(), grad))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-4, atol=1e-5)
    model = load_base_model(str(tiny_model)).model
    assert not use_cpu_attention(model, torch.device("meta"))  # only CPU switches

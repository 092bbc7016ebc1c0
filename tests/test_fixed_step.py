"""The fixed-shape (and compiled) local step gives the results of today's per-rank adapter step.

One client adapter at r_max, the client's factors in its first r_k positions, positions above
r_k held at exactly zero, the regulariser through a mask (issue 12). Compared with the step that
attaches an adapter of the client's own rank, for several ranks in one round on the same model:
the same per-step losses, tail norms, pruning decisions and uploaded factors, within fp32
round-off (the matmuls differ only in how many zero terms they sum). The compiled path is
checked with torch.compile's ``aot_eager`` backend (Dynamo's capture and AOTAutograd's joint
graph, as inductor gets them, without inductor's C++ kernel build, which takes minutes on a
busy 2-core machine); inductor itself runs in ``make bench``, which reports its speed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hetlora import adapters
from hetlora.client import TrainSettings, train_client
from hetlora.config import make_config
from hetlora.data import load_clients
from hetlora.data.batching import batch_stream, tokenize_all
from hetlora.errors import HetLoRAError
from hetlora.hardware import (
    AUTO_COMPILE_MIN_STEPS,
    compile_layers,
    compiled_graphs,
    resolve_compile,
    use_cpu_attention,
)
from hetlora.lora import masked_tail_norm, pad, tail_norm
from hetlora.models import load_base_model

TARGETS = ["q_proj", "v_proj"]
R_MAX = 8
# (rank, B of the global adapter random or zero): two clients whose tails shrink (pruned) and one
# whose B is zero as received, so its tail can only grow (kept): both pruning decisions occur.
CLIENTS = [(8, "random"), (5, "random"), (3, "zero")]
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def examples(tiny_model):
    clients = load_clients("shakespeare", min_examples=100)
    return clients["hamlet/HAMLET"][:40]


def _model(tiny_model):
    base = load_base_model(str(tiny_model))
    use_cpu_attention(base.model, torch.device("cpu"))  # as runs on CPU do
    torch.manual_seed(0)
    return adapters.wrap(base.model, R_MAX, 2.0, TARGETS), base.tokenizer


def _round(peft_model, tokenizer, examples, fixed: bool):
    """Train the three clients one after another on one model; returns what each produced."""
    g = torch.Generator().manual_seed(1)
    global_factors = {
        k: (0.1 * torch.randn(b.shape, generator=g), a)
        for k, (b, a) in adapters.read_factors(peft_model).items()
    }
    items = tokenize_all(tokenizer, examples, 48)
    settings = TrainSettings(
        local_steps=3, lr=0.01, lambda_=0.5, gamma=0.9, r_min=2, fixed_rank=R_MAX if fixed else 0
    )
    out = []
    for i, (rank, b_init) in enumerate(CLIENTS):
        factors = {
            k: (
                b[:, :rank].clone() if b_init == "random" else torch.zeros(b.shape[0], rank),
                a[:rank],
            )
            for k, (b, a) in global_factors.items()
        }
        losses, above = [], []

        def on_step(step, loss, losses=losses, above=above, rank=rank):
            losses.append(loss)
            if fixed:  # the fixed adapter's positions above r_k, after every optimizer step
                live = adapters.live_factors(peft_model, adapters.FIXED)
                above.append(
                    sum(
                        float(b[:, rank:].detach().abs().sum() + a[rank:].detach().abs().sum())
                        for b, a in live.values()
                    )
                )

        batches = batch_stream(items, 4, np.random.default_rng(i), tokenizer.pad_token_id)
        result = train_client(
            peft_model, factors, batches, settings, TARGETS, torch.device("cpu"), on_step
        )
        out.append((result, losses, above))
    return out


def _assert_same(today, other):
    decisions = []
    for (want, want_losses, _), (got, got_losses, _) in zip(today, other, strict=True):
        assert got.rank == want.rank and got.stats.rank_received == want.stats.rank_received
        decisions.append(want.rank < want.stats.rank_received)
        np.testing.assert_allclose(got_losses, want_losses, **TOL)
        assert got.stats.tail_before == pytest.approx(want.stats.tail_before, rel=1e-6)
        assert got.stats.tail_after == pytest.approx(want.stats.tail_after, rel=1e-4, abs=1e-6)
        assert set(got.factors) == set(want.factors)
        for name, (b, a) in want.factors.items():
            assert got.factors[name][0].shape == b.shape and got.factors[name][1].shape == a.shape
            torch.testing.assert_close(got.factors[name][0], b, **TOL)
            torch.testing.assert_close(got.factors[name][1], a, **TOL)
    assert decisions == [True, True, False]  # both outcomes of the pruning rule were compared


def test_masked_tail_norm_equals_the_sliced_one_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    for rank, gamma in [(8, 0.9), (5, 0.7), (3, 0.99), (1, 0.5)]:
        pairs = [(torch.randn(6, rank, generator=g), torch.randn(rank, 4, generator=g))]
        pairs.append((torch.randn(3, rank, generator=g), torch.randn(rank, 7, generator=g)))
        small = [(b.clone().requires_grad_(), a.clone().requires_grad_()) for b, a in pairs]
        big = [tuple(t.requires_grad_() for t in pad(b, a, R_MAX)) for b, a in pairs]
        want, got = tail_norm(small, gamma), masked_tail_norm(big, rank, gamma)
        torch.testing.assert_close(got, want)
        want.backward()
        got.backward()
        for (sb, sa), (bb, ba) in zip(small, big, strict=True):
            torch.testing.assert_close(bb.grad[:, :rank], sb.grad)
            torch.testing.assert_close(ba.grad[:rank], sa.grad)
            assert not bb.grad[:, rank:].any() and not ba.grad[rank:].any()
    with pytest.raises(HetLoRAError, match="rank 9"):
        masked_tail_norm(big, 9, 0.9)


def test_fixed_shape_step_matches_the_per_rank_adapter(tiny_model, examples):
    today = _round(*_model(tiny_model), examples, fixed=False)
    peft_model, tokenizer = _model(tiny_model)
    fixed = _round(peft_model, tokenizer, examples, fixed=True)
    _assert_same(today, fixed)
    for _, _, above in fixed:  # positions above r_k stayed exactly zero through every step
        assert above == [0.0, 0.0, 0.0]
    # the fixed adapter stays (no per-client add/delete), frozen, with the global one active
    assert (
        adapters.FIXED in peft_model.peft_config and adapters.CLIENT not in peft_model.peft_config
    )
    assert peft_model.active_adapter == adapters.GLOBAL
    assert not any(p.requires_grad for p in peft_model.parameters())


def test_compiled_fixed_shape_step_matches_without_recompiling_per_rank(tiny_model, examples):
    torch._dynamo.reset()
    today = _round(*_model(tiny_model), examples, fixed=False)
    peft_model, tokenizer = _model(tiny_model)
    assert compile_layers(peft_model.get_base_model(), backend="aot_eager") == 2
    before = compiled_graphs()
    compiled = _round(peft_model, tokenizer, examples, fixed=True)
    _assert_same(today, compiled)
    # Three ranks, varying lengths, the first layer and the others: one graph, built for the
    # first client (the per-rank adapter would need one per rank).
    assert compiled_graphs() - before == 1
    again = compiled_graphs()
    _round(peft_model, tokenizer, examples, fixed=True)
    assert compiled_graphs() == again  # a second round of the same ranks compiles nothing
    torch._dynamo.reset()


def test_compile_key_and_auto_rule():
    cpu = torch.device("cpu")
    assert make_config({}).compile == "auto"
    with pytest.raises(HetLoRAError, match="compile"):
        make_config({"compile": "yes"})
    with pytest.raises(HetLoRAError, match="full_ft"):
        make_config({"compile": "on", "method": "full_ft"})
    assert make_config({"compile": "off", "method": "full_ft"}).compile == "off"
    assert resolve_compile("off", cpu, 10**6) is False
    assert resolve_compile("on", cpu, 1) is True
    assert resolve_compile("auto", cpu, AUTO_COMPILE_MIN_STEPS - 1) is False
    assert resolve_compile("auto", cpu, AUTO_COMPILE_MIN_STEPS) is True


def test_a_run_with_compile_on_matches_compile_off(tiny_model, tmp_path, monkeypatch):
    """The in-process runtime's wiring: the same round on both paths, compile time apart."""
    import functools

    from hetlora.runtime import local, workspace

    monkeypatch.setattr(
        workspace, "compile_layers", functools.partial(compile_layers, backend="aot_eager")
    )
    torch._dynamo.reset()
    base = {
        "model": str(tiny_model),
        "rounds": 1,
        "clients_per_round": 3,
        "local_steps": 2,
        "batch_size": 4,
        "lr": 0.01,
        "lambda_": 0.5,
        "r_min": 2,
        "r_max": 8,
        "eval_examples": 16,
        "rouge_examples": 2,
        "max_new_tokens": 4,
        "precision": "fp32",
        "min_examples": 60,
    }
    rows, summaries = {}, {}
    for mode in ("off", "on"):
        sim = local.LocalRun(make_config({**base, "compile": mode}))
        assert sim.ws.compiled is (mode == "on")
        assert sim.ws.settings.fixed_rank == (8 if mode == "on" else 0)
        summaries[mode] = sim.run(tmp_path / mode)
        rows[mode] = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").open()][-1]
    off, on = rows["off"], rows["on"]
    assert (
        on["client_ranks"] == off["client_ranks"] and on["weights"].keys() == off["weights"].keys()
    )
    assert len(set(off["ranks_received"].values())) > 1  # several ranks in the round
    assert on["train_loss"] == pytest.approx(off["train_loss"], rel=1e-4)
    assert on["test_ppl"] == pytest.approx(off["test_ppl"], rel=1e-4)
    assert off["compile_s"] == 0 and on["compile_s"] > 0
    assert summaries["on"]["compiled"] and summaries["on"]["compiled_graphs"] >= 1
    assert summaries["on"]["compile_s"] > 0 and not summaries["off"]["compiled"]
    torch._dynamo.reset()


def test_flower_refuses_compile_on():
    from hetlora.runtime.flower.project import check_supported

    with pytest.raises(HetLoRAError, match="compile"):
        check_supported(make_config({"compile": "on"}))
    check_supported(make_config({"compile": "auto"}))

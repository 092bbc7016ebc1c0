"""Each of the method's formulas pinned with non-degenerate values, so a wrong formula fails.

Rank-1 or constant matrices make several wrong formulas agree with the right one (for a rank-1
pair ||B A||_F = ||B||_F ||A||_F); every case here uses values where they differ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetlora import adapters
from hetlora.client import TrainSettings, train_client
from hetlora.lora import tail_norm, truncate
from hetlora.methods import hetlora
from hetlora.methods.base import Reply

TARGETS = ["q_proj", "v_proj"]


def test_tail_regulariser_is_the_product_of_the_tail_norms():
    """sum_m ||B_m[:, g:r]||_F * ||A_m[g:r, :]||_F, not ||B_tail A_tail||_F (Cho et al. Sec. 3.2)."""
    # r = 4, gamma = 0.5 -> g = 2; the head columns/rows carry values the tail must ignore
    b = torch.tensor([[9.0, 9.0, 3.0, 0.0], [9.0, 9.0, 0.0, 4.0], [9.0, 9.0, 0.0, 0.0]])
    a = torch.tensor([[7.0, 7.0, 7.0], [7.0, 7.0, 7.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    # ||B_tail|| = 5, ||A_tail|| = sqrt(5); ||B_tail A_tail|| = ||[[3,0,0],[0,0,8],[0,0,0]]|| = sqrt(73)
    assert float(tail_norm({"m": (b, a)}, 0.5)) == pytest.approx(5 * math.sqrt(5), rel=1e-6)
    # a second module of another rank (r = 3 -> g = 1) adds its own term
    b2 = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 2.0]])
    a2 = torch.tensor([[5.0, 5.0], [1.0, 1.0], [0.0, 3.0]])
    pairs = {"m": (b, a), "n": (b2, a2)}
    expected = 5 * math.sqrt(5) + math.sqrt(8) * math.sqrt(11)
    assert float(tail_norm(pairs, 0.5)) == pytest.approx(expected, rel=1e-6)


def _scores(factors_by_client, sizes, **options):
    ranks = {c: 4 for c in factors_by_client}
    g = torch.Generator().manual_seed(9)
    start = {
        n: (torch.randn(b.shape[0], 4, generator=g), torch.randn(4, a.shape[1], generator=g))
        for n, (b, a) in next(iter(factors_by_client.values())).items()
    }
    server = hetlora.HetLoRAServer(start, ranks, **options)
    for c, f in factors_by_client.items():
        server.add(Reply(c, sizes[c], factors=f, rank=4))
    return server.finish(), server.state


def _client_factors(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "q": (torch.randn(12, 4, generator=g), torch.randn(4, 10, generator=g)),
        "v": (torch.randn(6, 4, generator=g) * (1 + seed), torch.randn(4, 10, generator=g)),
    }


def _dense_norm(b, a):
    return float(torch.linalg.matrix_norm(b.double() @ a.double(), ord="fro"))


def test_per_module_sparsity_weights_use_the_product_norm():
    """Per module m: w_{k,m} = ||B_k A_k||_F / sum_j ||B_j A_j||_F (not ||B_k|| ||A_k||)."""
    clients = {"a": _client_factors(1), "b": _client_factors(2)}
    _, new = _scores(clients, {"a": 10, "b": 10}, per_module=True)
    for name in ("q", "v"):
        s = {c: _dense_norm(*f[name]) for c, f in clients.items()}
        w = {c: s[c] / sum(s.values()) for c in s}
        loose = {c: float(f[name][0].norm() * f[name][1].norm()) for c, f in clients.items()}
        assert loose["a"] / sum(loose.values()) != pytest.approx(w["a"], rel=1e-3)
        exp_b = sum(w[c] * clients[c][name][0] for c in clients)
        exp_a = sum(w[c] * clients[c][name][1] for c in clients)
        torch.testing.assert_close(new.factors[name][0], exp_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new.factors[name][1], exp_a, rtol=1e-5, atol=1e-6)


def test_per_client_sparsity_weights_use_the_norm_of_the_whole_update():
    """w_k = ||dW_k||_F / sum_j ||dW_j||_F, ||dW_k||_F^2 = sum_m ||B_k A_k||_F^2 (dense here)."""
    clients = {"a": _client_factors(1), "b": _client_factors(2), "c": _client_factors(5)}
    agg, new = _scores(clients, {"a": 10, "b": 10, "c": 10})
    s = {c: math.sqrt(sum(_dense_norm(*p) ** 2 for p in f.values())) for c, f in clients.items()}
    w = {c: s[c] / sum(s.values()) for c in s}
    assert agg == pytest.approx(w, rel=1e-6)
    for name in ("q", "v"):
        exp_b = sum(w[c] * clients[c][name][0] for c in clients)
        torch.testing.assert_close(new.factors[name][0], exp_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_module", [False, True])
def test_data_size_factor_multiplies_the_sparsity_weights(per_module):
    """aggregation = "sparsity_data_size": w_k ∝ n_k ||dW_k||_F (per client or per module)."""
    clients = {"a": _client_factors(1), "b": _client_factors(2)}
    sizes = {"a": 30, "b": 5}
    plain_agg, plain = _scores(clients, sizes, per_module=per_module)
    agg, new = _scores(clients, sizes, per_module=per_module, aggregation="sparsity_data_size")
    for name in ("q", "v"):
        if per_module:
            s = {c: sizes[c] * _dense_norm(*f[name]) for c, f in clients.items()}
        else:
            s = {
                c: sizes[c] * math.sqrt(sum(_dense_norm(*p) ** 2 for p in f.values()))
                for c, f in clients.items()
            }
        w = {c: s[c] / sum(s.values()) for c in s}
        exp_a = sum(w[c] * clients[c][name][1] for c in clients)
        torch.testing.assert_close(new.factors[name][1], exp_a, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(new.factors[name][1], plain.factors[name][1], atol=1e-3)
    if not per_module:
        assert agg["a"] > plain_agg["a"]


# --- the client objective: loss + lambda * regulariser ----------------------------------------


@pytest.fixture()
def peft_model(tiny_model):
    from hetlora.models import load_base_model

    base = load_base_model(str(tiny_model))
    torch.manual_seed(0)
    return adapters.wrap(base.model, 8, 2.0, TARGETS), base.tokenizer


def _batches(tokenizer):
    from hetlora.data import Example
    from hetlora.data.batching import batch_stream, tokenize_all

    examples = [
        Example(prompt=f"Line {i} of the play:", response=f" the king said {i} words to {i + 3}")
        for i in range(16)
    ]
    items = tokenize_all(tokenizer, examples, 32)
    return batch_stream(items, 4, np.random.default_rng(0), tokenizer.pad_token_id)


def _train(model, tok, received, lambda_):
    settings = TrainSettings(
        local_steps=3,
        lr=0.01,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lambda_=lambda_,
        gamma=0.5,
        pruning=False,
        lora_scale=2.0,
    )
    result = train_client(model, received, _batches(tok), settings, TARGETS, torch.device("cpu"))
    return result.factors


def test_lambda_scales_the_regulariser_in_the_client_objective(peft_model):
    """loss + lambda * tail: a tiny lambda trains like no regulariser, lambda = 1 does not.

    Were lambda dropped (``loss + tail``), lambda = 1e-6 would train exactly like lambda = 1.
    """
    model, tok = peft_model
    received = truncate(adapters.read_factors(model), 6)
    g = torch.Generator().manual_seed(4)
    received = {n: (torch.randn(b.shape, generator=g) * 0.5, a) for n, (b, a) in received.items()}
    none = _train(model, tok, received, 0.0)
    tiny = _train(model, tok, received, 1e-6)
    one = _train(model, tok, received, 1.0)

    def distance(x, y):
        return math.sqrt(sum(float((x[n][i] - y[n][i]).norm()) ** 2 for n in x for i in (0, 1)))

    assert distance(one, none) > 1e-2
    assert distance(tiny, none) < 1e-2 * distance(one, none)
    # and lambda = 1 pulls the tail harder than no regulariser does
    assert float(tail_norm(one, 0.5)) < float(tail_norm(none, 0.5))


def test_client_adapter_is_fp32_under_a_bf16_base(peft_model):
    """With the frozen linears stored in bf16 (precision = "bf16"), the client's adapter trains
    in fp32 under autocast: its factors, their gradients and the upload are fp32."""
    from hetlora.hardware import store_frozen_linears

    model, tok = peft_model
    assert store_frozen_linears(model, torch.bfloat16) > 0
    received = truncate(adapters.read_factors(model), 4)
    live = adapters.attach(model, received, 4, 2.0, TARGETS)
    try:
        for b, a in live.values():
            assert b.dtype == torch.float32 and a.dtype == torch.float32
            assert b.requires_grad and a.requires_grad
        base_dtypes = {
            m.get_base_layer().weight.dtype
            for m in model.modules()
            if isinstance(m, adapters.LoraLayer)
        }
        assert base_dtypes == {torch.bfloat16}
    finally:
        adapters.detach(model)
    settings = TrainSettings(local_steps=2, lr=0.01, lambda_=0.1, gamma=0.5, bf16=True)
    result = train_client(model, received, _batches(tok), settings, TARGETS, torch.device("cpu"))
    assert all(b.dtype == a.dtype == torch.float32 for b, a in result.factors.values())
    assert all(
        torch.isfinite(b).all() and torch.isfinite(a).all() for b, a in result.factors.values()
    )
    assert any(torch.count_nonzero(b) > 0 for b, _ in result.factors.values())  # it trained

"""Property-based tests (hypothesis) of padding, truncation, weights and every aggregation rule."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hetlora import aggregate, init
from test_lora import applied_weights

from hetlora.lora import (
    WeightedFactorSum,
    pad,
    product_fro_norm,
    truncate,
    update_norm,
)
from hetlora.methods.base import Reply
from hetlora.methods.flora import stack
from hetlora.methods.recon_svd import ReconSVDServer

dims = st.integers(1, 9)
FAST = settings(max_examples=40, deadline=None)


def rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@FAST
@given(
    d_out=dims, d_in=dims, r=st.integers(1, 6), extra=st.integers(0, 6), seed=st.integers(0, 999)
)
def test_pad_then_truncate_roundtrip(d_out, d_in, r, extra, seed):
    b, a = rand((d_out, r), seed), rand((r, d_in), seed + 1)
    bp, ap = pad(b, a, r + extra)
    assert bp.shape == (d_out, r + extra) and ap.shape == (r + extra, d_in)
    back = truncate({"m": (bp, ap)}, r)["m"]
    assert torch.equal(back[0], b) and torch.equal(back[1], a)
    assert torch.allclose(bp @ ap, b @ a)  # zero padding never changes the product


@FAST
@given(d_out=dims, d_in=dims, r=st.integers(1, 8), seed=st.integers(0, 999))
def test_gram_norm_equals_dense(d_out, d_in, r, seed):
    b, a = rand((d_out, r), seed), rand((r, d_in), seed + 7)
    assert math.isclose(
        float(product_fro_norm(b, a)), float(torch.linalg.norm(b @ a)), rel_tol=1e-9, abs_tol=1e-12
    )


@FAST
@given(st.lists(st.just(0.0) | st.floats(1e-3, 1e6), min_size=1, max_size=12))
def test_weights_are_a_distribution(scores):
    w = applied_weights(scores)  # what WeightedFactorSum applies (float32)
    assert math.isclose(sum(w), 1.0, rel_tol=1e-5) and all(x >= 0 for x in w)
    if sum(scores) > 0:
        top = max(range(len(scores)), key=scores.__getitem__)
        assert w[top] == max(w)


client_ranks = st.lists(st.integers(1, 6), min_size=1, max_size=5)


@FAST
@given(ranks=client_ranks, seed=st.integers(0, 999))
def test_hetlora_aggregation_is_the_sparsity_weighted_padded_mean(ranks, seed):
    r_max = 6
    glob = {"m": (rand((5, r_max), seed).float(), rand((r_max, 4), seed + 1).float())}
    state = init(glob, {f"c{i}": r for i, r in enumerate(ranks)})
    updates = [
        Reply(
            f"c{i}",
            1,
            factors={
                "m": (rand((5, r), seed + 10 * i).float(), rand((r, 4), seed + 10 * i + 1).float())
            },
            rank=r,
        )
        for i, r in enumerate(ranks)
    ]
    new = aggregate(state, updates)
    norms = [update_norm(u.factors) for u in updates]
    w = [n / sum(norms) for n in norms]
    exp_b = sum(wk * pad(*u.factors["m"], r_max)[0] for wk, u in zip(w, updates, strict=True))
    exp_a = sum(wk * pad(*u.factors["m"], r_max)[1] for wk, u in zip(w, updates, strict=True))
    torch.testing.assert_close(new.factors["m"][0], exp_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.factors["m"][1], exp_a, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(new.factors["m"][1][max(ranks) :]) == 0  # nobody trained those rows
    # the result is a convex combination: each entry lies within the clients' padded range
    stacked = torch.stack([pad(*u.factors["m"], r_max)[0] for u in updates])
    assert (new.factors["m"][0] <= stacked.max(0).values + 1e-5).all()
    assert (new.factors["m"][0] >= stacked.min(0).values - 1e-5).all()


@FAST
@given(
    ranks=client_ranks,
    sizes=st.lists(st.integers(1, 50), min_size=5, max_size=5),
    seed=st.integers(0, 999),
)
def test_weighted_sum_streaming_equals_batch(ranks, sizes, seed):
    acc = WeightedFactorSum(6)
    clients = []
    for i, r in enumerate(ranks):
        f = {"m": (rand((3, r), seed + i).float(), rand((r, 2), seed + 50 + i).float())}
        clients.append((float(sizes[i]), f))
        acc.add(f, float(sizes[i]))
    total = sum(s for s, _ in clients)
    out = acc.result()["m"]
    torch.testing.assert_close(
        out[0], sum(s / total * pad(*f["m"], 6)[0] for s, f in clients), rtol=1e-5, atol=1e-6
    )


@FAST
@given(ranks=client_ranks, seed=st.integers(0, 999))
def test_flora_stack_product_is_weighted_sum(ranks, seed):
    ps = [(i + 1) / sum(range(1, len(ranks) + 1)) for i in range(len(ranks))]
    fs = [{"m": (rand((4, r), seed + i), rand((r, 3), seed + 20 + i))} for i, r in enumerate(ranks)]
    b, a = stack(list(zip(ps, fs, strict=True)))["m"]
    assert b.shape[1] == sum(ranks)
    torch.testing.assert_close(
        b @ a, sum(p * f["m"][0] @ f["m"][1] for p, f in zip(ps, fs, strict=True))
    )


@FAST
@given(ranks=client_ranks, seed=st.integers(0, 999))
def test_recon_svd_gives_each_rank_its_best_approximation(ranks, seed):
    r_max = 6
    server = ReconSVDServer(
        {"m": (torch.zeros(7, r_max), torch.zeros(r_max, 5))},
        {f"c{i}": r for i, r in enumerate(ranks)},
    )
    target = torch.zeros(7, 5, dtype=torch.float64)
    for i, r in enumerate(ranks):
        b, a = rand((7, r), seed + i), rand((r, 5), seed + 30 + i)
        server.add(Reply(f"c{i}", 2 + i, factors={"m": (b.float(), a.float())}, rank=r))
        target += (2 + i) * (b.float().double() @ a.float().double())
    target /= sum(2 + i for i in range(len(ranks)))
    server.finish()
    s = torch.linalg.svdvals(target)
    for k in range(1, r_max + 1):
        bk, ak = truncate(server.global_factors(), k)["m"]
        err = torch.linalg.norm(bk.double() @ ak.double() - target)
        best = s[k:].pow(2).sum().sqrt()  # Eckart-Young
        assert float(err) <= float(best) * (1 + 1e-4) + 1e-4

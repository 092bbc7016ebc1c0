"""The method's math on plain tensors: truncation, padding, norms, regulariser, pruning, weights."""

from __future__ import annotations

import math

import pytest
import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import (
    WeightedFactorSum,
    pad,
    product_fro_norm,
    product_fro_norm_sq,
    pruned_rank,
    rank_of,
    tail_norm,
    tail_start,
    truncate,
    update_norm,
)


def rand_factors(rank: int, seed: int, shapes=((12, 10), (8, 6))) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        f"m{i}": (torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g))
        for i, (d_out, d_in) in enumerate(shapes)
    }


def test_truncate_then_pad_is_identity_on_kept_slice():
    full = rand_factors(16, 0)
    for r in (1, 5, 16):
        cut = truncate(full, r)
        assert rank_of(cut) == r
        for name, (b, a) in cut.items():
            bp, ap = pad(b, a, 16)
            assert torch.equal(bp[:, :r], full[name][0][:, :r])
            assert torch.equal(ap[:r], full[name][1][:r])
            assert torch.count_nonzero(bp[:, r:]) == 0 and torch.count_nonzero(ap[r:]) == 0


def test_truncate_copies_and_rejects_bad_ranks():
    full = rand_factors(4, 0)
    cut = truncate(full, 2)
    cut["m0"][0].zero_()
    assert torch.count_nonzero(full["m0"][0]) > 0
    with pytest.raises(HetLoRAError):
        truncate(full, 0)
    with pytest.raises(HetLoRAError):
        truncate(full, 5)
    with pytest.raises(HetLoRAError):
        pad(*full["m0"], 3)


@pytest.mark.parametrize("rank,d_out,d_in", [(1, 7, 5), (6, 9, 11), (20, 4, 3)])
def test_gram_trick_equals_dense_norm(rank, d_out, d_in):
    g = torch.Generator().manual_seed(rank)
    b, a = torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g)
    dense = torch.linalg.matrix_norm((b.double() @ a.double()), ord="fro")
    assert float(product_fro_norm(b, a)) == pytest.approx(float(dense), rel=1e-12)  # fp64 Grams
    exact = product_fro_norm(b.double(), a.double())
    assert float(exact) == pytest.approx(float(dense), rel=1e-12)


def test_gram_norm_is_exact_when_the_product_nearly_cancels():
    """B A = x y - x (y - d) = x d: the Grams hold terms ~||x||^2 ||y||^2 that cancel down to
    ||x||^2 ||d||^2. fp32 Grams lose the answer (the issue saw 0.0324 for an exact 0.0115);
    fp64 Grams of the same fp32 factors give the dense fp64 ||B A||_F."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g)
    y = 100 * torch.randn(1, 48, generator=g)
    d = 1e-2 * torch.randn(1, 48, generator=g)
    b = torch.cat([x, x], dim=1)  # fp32 factors, as a client sends them
    a = torch.cat([y, -(y - d)], dim=0)
    exact = float(torch.linalg.matrix_norm(b.double() @ a.double(), ord="fro"))
    assert exact == pytest.approx(float(x.norm() * (a[0] + a[1]).norm()), rel=1e-6)
    fp32_grams = float(((b.T @ b).double() * (a @ a.T).double()).sum().clamp_min(0).sqrt())
    assert abs(fp32_grams - exact) > 0.5 * exact  # the case really defeats fp32 Grams
    assert float(product_fro_norm(b, a)) == pytest.approx(exact, rel=1e-6)
    assert float(product_fro_norm_sq(b, a)) == pytest.approx(exact**2, rel=1e-6)
    assert update_norm({"m": (b, a)}) == pytest.approx(exact, rel=1e-6)


def test_update_norm_sums_squares_over_modules():
    f = rand_factors(3, 1)
    expected = math.sqrt(sum(float((b.double() @ a.double()).norm() ** 2) for b, a in f.values()))
    assert update_norm(f) == pytest.approx(expected, rel=1e-12)  # fp64 Grams


def test_regulariser_gradient_is_on_the_tail_only():
    r, gamma = 10, 0.8
    b = torch.randn(6, r, requires_grad=True)
    a = torch.randn(r, 5, requires_grad=True)
    g = tail_start(r, gamma)
    assert g == 8
    tail_norm({"m": (b, a)}, gamma).backward()
    assert torch.count_nonzero(b.grad[:, g:]) > 0 and torch.count_nonzero(a.grad[g:]) > 0
    assert torch.count_nonzero(b.grad[:, :g]) == 0 and torch.count_nonzero(a.grad[:g]) == 0


def test_regulariser_value():
    b = torch.ones(2, 4)
    a = 2 * torch.ones(4, 3)
    # gamma 0.5 -> g = 2: ||B[:, 2:]|| = 2, ||A[2:, :]|| = 2 * sqrt(6)
    value = tail_norm([(b, a), (b, a)], 0.5)
    assert float(value) == pytest.approx(2 * 2 * 2 * math.sqrt(6))


def test_pruning_rule():
    # the tail shrank: rank drops to floor(gamma * r), never below r_min
    assert pruned_rank(10, 2, 0.99, tail_before=1.0, tail_after=0.5) == 9
    assert pruned_rank(100, 2, 0.95, tail_before=1.0, tail_after=0.5) == 95
    assert pruned_rank(3, 3, 0.5, tail_before=1.0, tail_after=0.5) == 3
    assert pruned_rank(4, 1, 0.5, tail_before=1.0, tail_after=0.5) == 2
    # the tail did not shrink: rank stays
    assert pruned_rank(10, 2, 0.99, tail_before=0.5, tail_after=0.5) == 10
    assert pruned_rank(10, 2, 0.99, tail_before=0.0, tail_after=0.7) == 10


def applied_weights(scores):
    """The weights WeightedFactorSum gives rank-1 clients with these scores (client k's B is the
    unit vector e_k, so the aggregate's B is the weight vector)."""
    acc = WeightedFactorSum(1)
    for k, s in enumerate(scores):
        b = torch.zeros(len(scores), 1)
        b[k, 0] = 1.0
        acc.add({"m": (b, torch.ones(1, 1))}, s)
    return acc.result()["m"][0][:, 0].tolist()


def test_weights_sum_to_one():
    w = applied_weights([3.0, 1.0, 0.5, 0.0])
    assert sum(w) == pytest.approx(1.0)
    assert w[0] == pytest.approx(3.0 / 4.5)
    assert w[3] == 0.0
    assert applied_weights([0.0, 0.0]) == [0.5, 0.5]
    with pytest.raises(HetLoRAError):
        applied_weights([1.0, -1.0])
    with pytest.raises(HetLoRAError):
        applied_weights([])


def test_weighted_sum_matches_the_formula():
    clients = [truncate(rand_factors(8, s), r) for s, r in [(0, 8), (1, 3), (2, 5)]]
    scores = [update_norm(f) for f in clients]
    w = [s / sum(scores) for s in scores]
    acc = WeightedFactorSum(8)
    for f, s in zip(clients, scores, strict=True):
        acc.add(f, s)
    out = acc.result()
    for name in clients[0]:
        exp_b = sum(wk * pad(*f[name], 8)[0] for wk, f in zip(w, clients, strict=True))
        exp_a = sum(wk * pad(*f[name], 8)[1] for wk, f in zip(w, clients, strict=True))
        torch.testing.assert_close(out[name][0], exp_b)
        torch.testing.assert_close(out[name][1], exp_a)
    # rows of A beyond every client's rank stay zero only where no client reached
    assert torch.count_nonzero(out["m0"][1][5:]) > 0  # client 0 had rank 8


def test_equal_ranks_and_norms_reduce_to_fedavg():
    base = rand_factors(4, 0)
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))[0]
    # B Q and Q^T A have the same product, hence the same norm, but different factors
    clients = [base, {n: (b @ q, q.T @ a) for n, (b, a) in base.items()}]
    assert update_norm(clients[0]) == pytest.approx(update_norm(clients[1]), rel=1e-6)
    acc = WeightedFactorSum(4)
    for f in clients:
        acc.add(f, update_norm(f))
    out = acc.result()
    for name in base:
        torch.testing.assert_close(out[name][0], (clients[0][name][0] + clients[1][name][0]) / 2)
        torch.testing.assert_close(out[name][1], (clients[0][name][1] + clients[1][name][1]) / 2)


def test_per_module_scores_and_zero_scores():
    f1, f2 = rand_factors(2, 0), rand_factors(2, 1)
    acc = WeightedFactorSum(2)
    acc.add(f1, {"m0": 1.0, "m1": 0.0})
    acc.add(f2, {"m0": 3.0, "m1": 0.0})
    out = acc.result()
    torch.testing.assert_close(out["m0"][0], 0.25 * f1["m0"][0] + 0.75 * f2["m0"][0])
    # all scores zero for m1: uniform average
    torch.testing.assert_close(out["m1"][1], (f1["m1"][1] + f2["m1"][1]) / 2)
    with pytest.raises(HetLoRAError):
        WeightedFactorSum(2).result()
    with pytest.raises(HetLoRAError):
        acc.add(f1, float("nan"))

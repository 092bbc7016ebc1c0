"""Aggregation math of every baseline, each pinned down so a wrong formula fails."""

from __future__ import annotations

import pytest
import torch

from hetlora.config import make_config
from hetlora.errors import HetLoRAError
from hetlora.lora import truncate
from hetlora.methods import make_server
from hetlora.methods.base import Reply
from hetlora.methods.flora import FLoRAServer, stack
from hetlora.methods.full_ft import FullFTServer
from hetlora.methods.hetlora import HetLoRAServer
from hetlora.methods.homlora import HomLoRAServer
from hetlora.methods.recon_svd import ReconSVDServer, svd_factors

SHAPES = {"l0.q": (12, 10), "l0.v": (6, 10)}


def factors(rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(o, rank, generator=g), torch.randn(rank, i, generator=g))
        for n, (o, i) in SHAPES.items()
    }


def reply(client, f, n=10, rank=None):
    return Reply(client, n, factors=f, rank=rank or next(iter(f.values()))[0].shape[1])


def test_homlora_one_client_returns_that_client():
    server = HomLoRAServer(factors(8, 0), ["a", "b"], rank=4)
    assert server.ranks == {"a": 4, "b": 4}
    task = server.task("a")
    assert task.rank == 4 and not task.pruning and not task.regularise
    mine = factors(4, 1)
    server.add(reply("a", mine))
    server.finish()
    for n in SHAPES:
        torch.testing.assert_close(server.global_factors()[n][0], mine[n][0])
        torch.testing.assert_close(server.global_factors()[n][1], mine[n][1])


def test_homlora_is_example_weighted_fedavg_of_factors():
    server = HomLoRAServer(factors(4, 0), ["a", "b"], rank=4)
    fa, fb = factors(4, 1), factors(4, 2)
    server.add(reply("a", fa, n=30))
    server.add(reply("b", fb, n=10))
    weights = server.finish()
    assert weights == pytest.approx({"a": 0.75, "b": 0.25})
    for n in SHAPES:
        torch.testing.assert_close(server.global_factors()[n][0], 0.75 * fa[n][0] + 0.25 * fb[n][0])
        torch.testing.assert_close(server.global_factors()[n][1], 0.75 * fa[n][1] + 0.25 * fb[n][1])


def test_homlora_uniform_weights_from_the_config():
    cfg = make_config({"method": "homlora", "rank": 4, "aggregation": "uniform"})
    server = make_server(cfg, factors(4, 0), {"a": 4, "b": 4}, ["a", "b"])
    fa, fb = factors(4, 1), factors(4, 2)
    server.add(reply("a", fa, n=30))
    server.add(reply("b", fb, n=10))
    assert server.finish() == pytest.approx({"a": 0.5, "b": 0.5})
    for n in SHAPES:
        torch.testing.assert_close(server.global_factors()[n][0], (fa[n][0] + fb[n][0]) / 2)
        torch.testing.assert_close(server.global_factors()[n][1], (fa[n][1] + fb[n][1]) / 2)
    with pytest.raises(HetLoRAError, match="method 'homlora' weights clients 'uniform' or by"):
        make_config({"method": "homlora", "aggregation": "sparsity_data_size"})


def test_recon_svd_one_client_at_full_rank_returns_its_product():
    server = ReconSVDServer(factors(6, 0), {"a": 6})
    mine = factors(6, 3)
    server.add(reply("a", mine))
    server.finish()
    for n in SHAPES:
        b, a = server.global_factors()[n]
        torch.testing.assert_close(b @ a, mine[n][0] @ mine[n][1], rtol=1e-4, atol=1e-4)


def test_recon_svd_averages_products_and_truncates_optimally():
    server = ReconSVDServer(factors(8, 0), {"a": 2, "b": 3})
    fa, fb = factors(2, 1), factors(3, 2)
    server.add(reply("a", fa, n=10))
    server.add(reply("b", fb, n=30))
    server.finish()
    for n in SHAPES:
        target = 0.25 * fa[n][0] @ fa[n][1] + 0.75 * fb[n][0] @ fb[n][1]  # rank <= 5 <= r_max
        b, a = server.global_factors()[n]
        torch.testing.assert_close(b @ a, target, rtol=1e-4, atol=1e-4)
        # what a rank-2 client receives is the best rank-2 approximation (Eckart-Young)
        b2, a2 = truncate(server.global_factors(), 2)[n]
        u, s, vh = torch.linalg.svd(target)
        torch.testing.assert_close(b2 @ a2, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-4)
        # FlexLoRA's split: the singular values live in B (||B e_i|| = s_i), A's rows are
        # orthonormal, and positions 5..7, beyond the rank of the average, are B = 0 exactly
        # with a unit-norm row of A (LoRA's own init: B = 0, A live)
        torch.testing.assert_close(b.norm(dim=0)[:5], s[:5], rtol=1e-4, atol=1e-5)
        m = min(8, *target.shape)  # l0.v is 6 x 10: positions 6, 7 lie beyond any rank: zero
        torch.testing.assert_close(a[:m] @ a[:m].T, torch.eye(m), rtol=0, atol=1e-5)
        assert torch.count_nonzero(b[:, 5:]) == 0 and torch.count_nonzero(a[m:]) == 0
        torch.testing.assert_close(a[5:m].norm(dim=1), torch.ones(m - 5), rtol=0, atol=1e-5)
    b, a = svd_factors(torch.zeros(4, 3), 5)  # rank above the matrix size pads with zeros
    assert b.shape == (4, 5) and a.shape == (5, 3)
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a[3:]) == 0


def test_recon_svd_positions_beyond_the_rank_can_learn():
    """A rank-6 client after a round of rank-2 replies: its tail columns get a gradient.

    With B = 0 and A live (as FlexLoRA splits), d(loss)/dB = G A^T is nonzero wherever A's row
    is live; the symmetric split sqrt(S) leaves A at ~1e-8 there, so B could barely move.
    """
    server = ReconSVDServer(factors(6, 0), {"a": 2, "b": 6})
    server.add(reply("a", factors(2, 4)))
    server.finish()
    b, a = truncate(server.global_factors(), 6)["l0.q"]
    assert torch.count_nonzero(b[:, 2:]) == 0
    assert float(a[2:].norm(dim=1).min()) == pytest.approx(1.0, abs=1e-5)
    grad_out = torch.randn(b.shape[0], a.shape[1], generator=torch.Generator().manual_seed(3))
    grad_b = grad_out @ a.T  # d<G, B A>/dB
    assert float(grad_b[:, 2:].norm()) > 0.1 * float(grad_out.norm())


def test_flora_stacking_equals_weighted_sum_of_products():
    fa, fb = factors(2, 1), factors(5, 2)
    stacked = stack([(0.25, fa), (0.75, fb)])
    for n in SHAPES:
        b, a = stacked[n]
        assert b.shape[1] == 7 and a.shape[0] == 7
        torch.testing.assert_close(b @ a, 0.25 * fa[n][0] @ fa[n][1] + 0.75 * fb[n][0] @ fb[n][1])


def test_flora_server_merges_scaled_weighted_products_and_sends_fresh_adapters():
    server = FLoRAServer(SHAPES, {"a": 2, "b": 5}, scale=2.0, seed=0)
    task = server.task("a")
    assert task.rank == 2 and task.nbytes == 0  # round 1: nothing stacked yet
    assert all(torch.count_nonzero(b) == 0 for b, _ in task.factors.values())  # B = 0
    assert all(a.abs().max() <= 1 / 10**0.5 for _, a in task.factors.values())  # U(+-1/sqrt(d_in))
    fa, fb = factors(2, 1), factors(5, 2)
    server.add(reply("a", fa, n=10))
    server.add(reply("b", fb, n=30))
    server.finish()
    deltas = server.base_state().deltas
    for n in SHAPES:
        expected = 2.0 * (0.25 * fa[n][0] @ fa[n][1] + 0.75 * fb[n][0] @ fb[n][1])
        torch.testing.assert_close(deltas[n], expected, rtol=1e-5, atol=1e-5)
    assert server.task("a").nbytes == sum(4 * (o * 7 + 7 * i) for o, i in SHAPES.values())
    assert not torch.equal(server.task("a").factors["l0.q"][1], task.factors["l0.q"][1])  # fresh


def test_full_ft_is_example_weighted_fedavg():
    w0 = {"w": torch.zeros(3, 3), "b": torch.zeros(3)}
    server = FullFTServer(w0, ["a", "b"])
    assert server.task("a").kind == "full" and server.task("a").nbytes == 4 * 12
    server.add(Reply("a", 10, weights={"w": torch.ones(3, 3), "b": torch.ones(3)}))
    server.add(Reply("b", 30, weights={"w": 5 * torch.ones(3, 3), "b": torch.zeros(3)}))
    server.finish()
    new = server.base_state().weights
    torch.testing.assert_close(new["w"], 4 * torch.ones(3, 3))
    torch.testing.assert_close(new["b"], 0.25 * torch.ones(3))
    with pytest.raises(HetLoRAError, match="has shape"):
        server.check(Reply("a", 1, weights={"w": torch.ones(2, 2), "b": torch.ones(3)}))


def test_make_server_maps_methods_and_ablations():
    init = factors(8, 0)
    ranks = {"a": 3, "b": 8}
    built = {}
    for method in ("hetlora", "homlora", "recon_svd", "flora", "full_ft"):
        ranks_of = {} if method == "full_ft" else {"r_min": 2, "r_max": 8}
        cfg = make_config({"method": method, **ranks_of})
        built[method] = make_server(
            cfg, init, ranks, ["a", "b"], base_weights={"w": torch.zeros(2)}
        )
    assert isinstance(built["hetlora"], HetLoRAServer) and built["hetlora"].task("a").regularise
    assert type(built["homlora"]) is HomLoRAServer and built["homlora"].ranks == {"a": 8, "b": 8}
    assert (
        built["flora"].has_global_adapter is False and built["full_ft"].has_global_adapter is False
    )
    noprune = make_server(make_config({"pruning": False}), init, ranks, ["a", "b"])
    assert not noprune.task("a").pruning and not noprune.task("a").regularise
    uniform = make_server(make_config({"aggregation": "uniform"}), init, ranks, ["a", "b"])
    uniform.add(reply("a", truncate(factors(8, 1), 3)))
    uniform.add(reply("b", factors(8, 2)))
    assert uniform.finish() == pytest.approx({"a": 0.5, "b": 0.5})


def test_full_ft_rounds_weights_and_fresh_state_each_round():
    w0 = {"w": torch.zeros(2, 2)}
    server = FullFTServer(w0, ["a", "b"])
    assert server.ranks == {"a": 0, "b": 0} and server.base_state() is None  # nothing yet
    assert server.task("b").client_id == "b"
    with pytest.raises(HetLoRAError, match="no client updates"):
        server.finish()
    with pytest.raises(HetLoRAError, match="carries no weights"):
        server.check(Reply("a", 1, weights=None))
    with pytest.raises(HetLoRAError, match="wrong set of weights"):
        server.check(Reply("a", 1, weights={"w": torch.ones(2, 2), "x": torch.ones(1)}))
    with pytest.raises(HetLoRAError, match="has shape"):
        server.check(Reply("a", 1, weights={"w": torch.ones(2, 3)}))
    server.add(Reply("a", 1, weights={"w": torch.ones(2, 2)}))  # fewer examples than 1
    server.add(Reply("b", 3, weights={"w": 5 * torch.ones(2, 2)}))
    assert server.finish() == pytest.approx({"a": 0.25, "b": 0.75}) and server.round == 1
    torch.testing.assert_close(server.base_state().weights["w"], 4 * torch.ones(2, 2))
    # round 2 starts from nothing folded in: one reply is the new model
    server.add(Reply("a", 2, weights={"w": 7 * torch.ones(2, 2)}))
    assert server.finish() == {"a": 1.0} and server.round == 2
    torch.testing.assert_close(server.base_state().weights["w"], 7 * torch.ones(2, 2))
    server.add(Reply("a", 2, weights={"w": torch.ones(2, 2)}))
    server.reset_round()
    with pytest.raises(HetLoRAError, match="no client updates"):
        server.finish()


def test_flora_rounds_accumulate_merges_and_seed_the_fresh_adapters():
    server = FLoRAServer(SHAPES, {"a": 2, "b": 3}, scale=0.5, seed=7)
    assert server.base_state() is None
    again = FLoRAServer(SHAPES, {"a": 2, "b": 3}, scale=0.5, seed=7)
    for n in SHAPES:  # the fresh adapter depends on (seed, round, client) only
        torch.testing.assert_close(server.task("b").factors[n][1], again.task("b").factors[n][1])
        assert not torch.equal(
            server.task("a").factors[n][1][:2], server.task("b").factors[n][1][:2]
        )
        assert server.task("b").factors[n][1].shape == (3, SHAPES[n][1])
    assert server.task("b").client_id == "b" and server.task("b").kind == "lora"
    with pytest.raises(HetLoRAError, match="no client updates"):
        server.finish()
    with pytest.raises(HetLoRAError, match="no LoRA factors"):
        server.check(Reply("a", 1, factors=None))
    total = {n: torch.zeros(o, i) for n, (o, i) in SHAPES.items()}
    for round_ in range(2):
        fa, fb = factors(2, 10 + round_), factors(3, 20 + round_)
        server.add(reply("a", fa, n=1))
        server.add(reply("b", fb, n=3))
        assert server.finish() == pytest.approx({"a": 0.25, "b": 0.75})
        assert server.round == round_ + 1
        for n in SHAPES:  # what the base gains over the pristine one: every merge so far
            total[n] += 0.5 * (0.25 * fa[n][0] @ fa[n][1] + 0.75 * fb[n][0] @ fb[n][1])
            torch.testing.assert_close(
                server.base_state().deltas[n], total[n], rtol=1e-5, atol=1e-5
            )
    fresh = server.task("a").factors  # round 3 draws again
    assert all(torch.count_nonzero(b) == 0 for b, _ in fresh.values())
    server.add(reply("a", factors(2, 5), n=1))
    server.reset_round()
    with pytest.raises(HetLoRAError, match="no client updates"):
        server.finish()


def test_recon_svd_rounds_and_errors():
    server = ReconSVDServer(factors(6, 0), {"a": 2, "b": 3})
    with pytest.raises(HetLoRAError, match="no client updates"):
        server.finish()
    with pytest.raises(HetLoRAError, match="no LoRA factors"):
        server.check(Reply("a", 1, factors=None, rank=2))
    with pytest.raises(HetLoRAError, match=r"rank 3 outside \[1, 2\]"):
        server.check(reply("a", factors(3, 1)))
    fa, fb = factors(2, 1), factors(3, 2)
    server.add(reply("a", fa, n=1))  # fewer than 1 example-weight units in total is fine too
    server.add(reply("b", fb, n=3))
    assert server.finish() == pytest.approx({"a": 0.25, "b": 0.75}) and server.round == 1
    before = {n: (b.clone(), a.clone()) for n, (b, a) in server.global_factors().items()}
    server.add(reply("a", factors(2, 3), n=1))
    server.reset_round()
    with pytest.raises(HetLoRAError, match="no client updates"):
        server.finish()
    only = factors(2, 4)
    server.add(reply("a", only, n=5))  # the next round sees this reply alone
    server.finish()
    for n in SHAPES:
        b, a = server.global_factors()[n]
        torch.testing.assert_close(b @ a, only[n][0] @ only[n][1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(b @ a, before[n][0] @ before[n][1])
    assert server.task("b").rank == 3 and server.task("b").client_id == "b"


def test_svd_factors_of_a_known_matrix():
    # diag(3, 2, 0) in a rotated basis: rank 2; B = U S, A = V^T, B = 0 at position 2 (the
    # server hands svd_factors an fp64 average of products, as here)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    p, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    delta = 3 * torch.outer(q[:, 0], p[:, 0]) + 2 * torch.outer(q[:, 1], p[:, 1])
    b, a = svd_factors(delta, 4)
    assert b.dtype == a.dtype == torch.float32 and b.shape == (5, 4) and a.shape == (4, 4)
    torch.testing.assert_close(b.norm(dim=0), torch.tensor([3.0, 2.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert torch.count_nonzero(b[:, 2:]) == 0
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(b @ a, delta.float(), atol=1e-5, rtol=0)
    b1, a1 = svd_factors(delta, 1)
    top = (3 * torch.outer(q[:, 0], p[:, 0])).float()
    torch.testing.assert_close(b1 @ a1, top, atol=1e-5, rtol=0)

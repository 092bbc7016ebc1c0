"""The heterogeneous-rank aggregators after HetLoRA (HLoRA, RB-LoRA, FedEx-LoRA), each pinned to
its published rule with non-degenerate values: a changed weight, split or padding fails here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hetlora.config import make_config
from hetlora.errors import HetLoRAError
from hetlora.methods import make_server
from hetlora.methods.base import Reply
from hetlora.methods.fedex import FedExServer
from hetlora.methods.hlora import HLoRAServer
from hetlora.methods.rblora import RBLoRAServer
from hetlora.methods.recon_svd import ReconSVDServer, qr_svd_factors, svd_factors

SHAPES = {"l0.q": (12, 10), "l0.v": (6, 10)}
R_MAX = 4
RANKS = {"a": 1, "b": 2, "c": 3}
SIZES = {"a": 5, "b": 20, "c": 11}  # unequal: uniform weights would give other numbers


def factors(rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(o, rank, generator=g), torch.randn(rank, i, generator=g))
        for n, (o, i) in SHAPES.items()
    }


def replies() -> dict[str, Reply]:
    return {
        c: Reply(c, SIZES[c], factors=factors(r, 10 + i), rank=r)
        for i, (c, r) in enumerate(RANKS.items())
    }


def run_round(server, ups):
    for u in ups.values():
        server.check(u)
        server.add(u)
    return server.finish()


def np64(t):
    return t.detach().double().numpy()


def best_rank(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def weighted_product(ups, name, weights):
    return sum(
        weights[c] * np64(u.factors[name][0]) @ np64(u.factors[name][1]) for c, u in ups.items()
    )


def shares():
    total = sum(SIZES.values())
    return {c: n / total for c, n in SIZES.items()}


def test_qr_path_equals_the_dense_svd_of_the_product():
    g = torch.Generator().manual_seed(3)
    left, right = torch.randn(12, 6, generator=g), torch.randn(6, 10, generator=g)
    for split in ("b", "a"):
        bq, aq = qr_svd_factors(left, right, 4, split)
        bd, ad = svd_factors(left.double() @ right.double(), 4, split)
        np.testing.assert_allclose(np64(bq) @ np64(aq), np64(bd) @ np64(ad), atol=1e-5)
        np.testing.assert_allclose(
            np64(bq) @ np64(aq), best_rank(np64(left) @ np64(right), 4), atol=1e-5
        )
    # the split: "b" keeps A's rows orthonormal, "a" keeps B's columns orthonormal
    b, a = qr_svd_factors(left, right, 4, "b")
    np.testing.assert_allclose(np64(a) @ np64(a).T, np.eye(4), atol=1e-5)
    b, a = qr_svd_factors(left, right, 4, "a")
    np.testing.assert_allclose(np64(b).T @ np64(b), np.eye(4), atol=1e-5)
    s = np.linalg.svd(np64(left) @ np64(right), compute_uv=False)[:4]
    np.testing.assert_allclose(np.linalg.norm(np64(a), axis=1), s, rtol=1e-5)


def test_hlora_is_the_best_rank_r_max_factoring_of_the_example_weighted_products():
    init = factors(R_MAX, 0)
    ups = replies()
    server = HLoRAServer(init, RANKS)
    weights = run_round(server, ups)
    assert weights == pytest.approx(shares())
    for name in SHAPES:
        b, a = server.factors[name]
        target = weighted_product(ups, name, shares())  # rank <= 1 + 2 + 3, above R_MAX
        np.testing.assert_allclose(np64(b) @ np64(a), best_rank(target, R_MAX), atol=1e-5)
        # HLoRA's split: B = U (orthonormal columns), A = S V^T
        np.testing.assert_allclose(np64(b).T @ np64(b), np.eye(R_MAX), atol=1e-5)
        s = np.linalg.svd(target, compute_uv=False)[:R_MAX]
        np.testing.assert_allclose(np.linalg.norm(np64(a), axis=1), s, rtol=1e-5)
        # a client of rank 2 receives the best rank-2 approximation
        b2, a2 = server.task("b").factors[name]
        np.testing.assert_allclose(np64(b2) @ np64(a2), best_rank(target, 2), atol=1e-5)


def test_hlora_and_recon_svd_agree_on_the_product_and_differ_in_the_split():
    init = factors(R_MAX, 0)
    ups = replies()
    servers = {
        "hlora-qr": HLoRAServer(init, RANKS),
        "hlora-dense": HLoRAServer(init, RANKS, path="dense"),
        "flex-dense": ReconSVDServer(init, RANKS),
        "flex-qr": ReconSVDServer(init, RANKS, path="qr"),
    }
    for s in servers.values():
        run_round(s, ups)
    for name in SHAPES:
        prods = {k: np64(s.factors[name][0]) @ np64(s.factors[name][1]) for k, s in servers.items()}
        for k in prods:
            np.testing.assert_allclose(prods[k], prods["flex-dense"], atol=1e-5)
        np.testing.assert_allclose(
            np64(servers["hlora-qr"].factors[name][0]).__abs__(),
            np64(servers["hlora-dense"].factors[name][0]).__abs__(),
            atol=1e-5,
        )  # same factors up to the sign of each singular pair
        b_h = servers["hlora-qr"].factors[name][0]
        b_f = servers["flex-dense"].factors[name][0]
        assert not torch.allclose(b_h.abs(), b_f.abs(), atol=1e-3)  # S sits in A, not in B


def test_rblora_weights_each_position_by_data_share_times_rarity_then_projects():
    init = factors(R_MAX, 0)
    ups = replies()
    server = RBLoRAServer(init, RANKS)
    assert run_round(server, ups) == pytest.approx(shares())
    for name in SHAPES:
        d_out, d_in = SHAPES[name]
        b_rb, a_rb = np.zeros((d_out, R_MAX)), np.zeros((R_MAX, d_in))
        for j in range(R_MAX):
            holders = [c for c in RANKS if RANKS[c] > j]
            if not holders:  # position 3: no client reached it, the global factors keep it
                b_rb[:, j], a_rb[j] = np64(init[name][0])[:, j], np64(init[name][1])[j]
                continue
            n_j = sum(SIZES[c] for c in holders)  # p_k * N / N_j = n_k / N_j
            b_rb[:, j] = sum(SIZES[c] / n_j * np64(ups[c].factors[name][0])[:, j] for c in holders)
            a_rb[j] = sum(SIZES[c] / n_j * np64(ups[c].factors[name][1])[j] for c in holders)
        target = b_rb @ a_rb
        b, a = server.factors[name]
        np.testing.assert_allclose(np64(b) @ np64(a), target, atol=1e-4)  # rank 4 = r_max: exact
        np.testing.assert_allclose(np64(a) @ np64(a).T, np.eye(R_MAX), atol=1e-5)  # B = U S
        b1, a1 = server.task("a").factors[name]
        np.testing.assert_allclose(np64(b1) @ np64(a1), best_rank(target, 1), atol=1e-4)
    dense = RBLoRAServer(init, RANKS, path="dense")
    run_round(dense, ups)
    for name in SHAPES:
        np.testing.assert_allclose(
            np64(dense.factors[name][0]) @ np64(dense.factors[name][1]),
            np64(server.factors[name][0]) @ np64(server.factors[name][1]),
            atol=1e-4,
        )


def test_fedex_global_model_equals_the_average_of_the_client_models():
    init = factors(R_MAX, 0)
    ups = replies()
    scale = 2.0
    server = FedExServer(init, RANKS, scale)
    run_round(server, ups)
    p = shares()
    for name in SHAPES:
        b, a = server.factors[name]
        # the factors: zero-padded example-weighted averages
        b_zp, a_zp = np.zeros_like(np64(b)), np.zeros_like(np64(a))
        for c, u in ups.items():
            r = RANKS[c]
            b_zp[:, :r] += p[c] * np64(u.factors[name][0])
            a_zp[:r] += p[c] * np64(u.factors[name][1])
        np.testing.assert_allclose(np64(b), b_zp, atol=1e-5)
        np.testing.assert_allclose(np64(a), a_zp, atol=1e-5)
        # W0 + residual + s B A = sum_k p_k (W0 + s B_k A_k)
        residual = np64(server.base_state().deltas[name])
        model = residual + scale * np64(b) @ np64(a)
        np.testing.assert_allclose(model, scale * weighted_product(ups, name, p), atol=1e-4)
        assert np.abs(residual).max() > 1e-2  # zero-padding alone is far from exact here
    # bytes: next round's download is the truncated factors plus the factored residual
    per_module = sum((o + i) * (sum(RANKS.values()) + R_MAX) * 4 for o, i in SHAPES.values())
    task = server.task("b")
    own = sum((b.numel() + a.numel()) * 4 for b, a in task.factors.values())
    assert server.last_residual_nbytes == per_module and task.nbytes == own + per_module


def test_fedex_residuals_accumulate_and_uniform_weights():
    init = factors(R_MAX, 0)
    server = FedExServer(init, RANKS, 1.0, weighting="uniform")
    first = replies()
    assert run_round(server, first) == pytest.approx({c: 1 / 3 for c in RANKS})
    after_one = {n: d.clone() for n, d in server.base_state().deltas.items()}
    second = {
        c: Reply(c, SIZES[c], factors=factors(r, 40 + i), rank=r)
        for i, (c, r) in enumerate(RANKS.items())
    }
    run_round(server, second)
    for name in SHAPES:
        b, a = server.factors[name]
        avg = weighted_product(second, name, {c: 1 / 3 for c in RANKS})
        step = np64(server.base_state().deltas[name]) - np64(after_one[name])
        np.testing.assert_allclose(step + np64(b) @ np64(a), avg, atol=1e-4)
    with pytest.raises(HetLoRAError, match="data_size"):
        FedExServer(init, RANKS, 1.0, weighting="sparsity")
    server.reset_round()
    with pytest.raises(HetLoRAError, match="no client updates"):
        server.finish()


def test_make_server_builds_the_new_methods_with_their_options():
    init = factors(R_MAX, 0)
    ids = list(RANKS)
    base = {"r_min": 1, "r_max": R_MAX}
    hl = make_server(make_config({"method": "hlora", **base}), init, RANKS, ids)
    assert type(hl) is HLoRAServer and (hl.path, hl.split) == ("qr", "a")
    hd = make_server(
        make_config({"method": "hlora", "svd_path": "dense", **base}), init, RANKS, ids
    )
    assert hd.path == "dense"
    rs = make_server(make_config({"method": "recon_svd", **base}), init, RANKS, ids)
    assert (rs.path, rs.split) == ("dense", "b")  # the study's numbers stay as they were
    rb = make_server(make_config({"method": "rblora", **base}), init, RANKS, ids)
    assert type(rb) is RBLoRAServer and rb.path == "qr"
    fx = make_server(make_config({"method": "fedex", "lora_scale": 3.0, **base}), init, RANKS, ids)
    assert type(fx) is FedExServer and fx.weighting == "data_size" and fx.scale == 3.0
    fu = make_server(
        make_config({"method": "fedex", "aggregation": "uniform", **base}), init, RANKS, ids
    )
    assert fu.weighting == "uniform"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"method": "hetlora", "svd_path": "qr"}, "svd_path"),
        ({"method": "hlora", "svd_path": "fast"}, "svd_path"),
        ({"method": "fedex", "aggregation": "sparsity_data_size"}, "aggregation"),
        ({"method": "rblora", "aggregation": "uniform"}, "aggregation"),
        ({"method": "hlora", "padding": "keep"}, "padding"),
        ({"method": "fedex", "dp_clip_norm": 0.1, "dp_noise_multiplier": 1.0}, "dp_clip_norm"),
    ],
)
def test_new_methods_refuse_options_that_do_not_apply(values, message):
    with pytest.raises(HetLoRAError, match=message):
        make_config(values)


def test_a_recon_svd_checkpoint_from_before_the_svd_options_resumes_on_the_dense_path():
    server = ReconSVDServer(factors(R_MAX, 0), RANKS)
    state = copy.deepcopy(server.__dict__)
    for key in ("path", "split", "_replies"):
        del state[key]  # what an older checkpoint pickled
    old = ReconSVDServer.__new__(ReconSVDServer)
    old.__setstate__(state)
    assert (old.path, old.split, old._replies) == ("dense", "b", [])
    ups = replies()
    run_round(old, ups)
    run_round(server, ups)
    for name in SHAPES:
        torch.testing.assert_close(old.factors[name][0], server.factors[name][0])

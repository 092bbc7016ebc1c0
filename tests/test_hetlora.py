"""HetLoRA's server steps: rank assignment, distribution, aggregation, rank persistence."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import pad, truncate, update_norm
from hetlora.methods import hetlora


def global_factors(r_max: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.q": (torch.randn(12, r_max, generator=g), torch.randn(r_max, 10, generator=g)),
        "layers.0.v": (torch.randn(6, r_max, generator=g), torch.randn(r_max, 10, generator=g)),
    }


def update(state, client, rank, seed, n=10):
    f = truncate(global_factors(state.r_max, seed), rank)
    return hetlora.Reply(client_id=client, factors=f, rank=rank, num_examples=n)


def init(factors, ranks):
    """The round-0 state of a server over ``ranks``."""
    return hetlora.HetLoRAServer(factors, ranks).state


def server_at(state, **options):
    """A server resumed at ``state`` (``options``: its aggregation, per_module, padding)."""
    server = hetlora.HetLoRAServer(state.factors, state.ranks, **options)
    server.state = state
    return server


def aggregate(state, updates, **options):
    """One round through the server's add and finish, from ``state``."""
    server = server_at(state, **options)
    for u in updates:
        server.add(u)
    server.finish()
    return server.state


def test_assign_ranks_uniform_is_seeded_and_in_range():
    ids = [f"c{i}" for i in range(200)]
    r1 = hetlora.assign_ranks(ids, 5, 50, seed=1)
    assert r1 == hetlora.assign_ranks(ids, 5, 50, seed=1)
    assert r1 != hetlora.assign_ranks(ids, 5, 50, seed=2)
    assert set(r1) == set(ids)
    assert min(r1.values()) >= 5 and max(r1.values()) <= 50
    assert len(set(r1.values())) > 20


def test_assign_ranks_tiers_follow_shares():
    ids = [f"c{i}" for i in range(10)]
    tiers = [
        {"name": "phone", "rank": 4, "share": 0.7},
        {"name": "laptop", "rank": 16, "share": 0.3},
    ]
    ranks = hetlora.assign_ranks(ids, 4, 16, seed=0, tiers=tiers)
    assert Counter(ranks.values()) == {4: 7, 16: 3}


def test_task_truncates_to_current_rank():
    state = init(global_factors(8), {"a": 3, "b": 8})
    msg = server_at(state).task("a").factors
    torch.testing.assert_close(msg["layers.0.q"][0], state.factors["layers.0.q"][0][:, :3])
    torch.testing.assert_close(msg["layers.0.q"][1], state.factors["layers.0.q"][1][:3])
    with pytest.raises(HetLoRAError):
        init(global_factors(8), {"a": 9})


def test_sparsity_weighted_aggregation_and_rank_persistence():
    state = init(global_factors(8), {"a": 3, "b": 8, "c": 5})
    ua, ub = update(state, "a", 2, seed=1), update(state, "b", 8, seed=2)  # a pruned 3 -> 2
    new = aggregate(state, [ua, ub])
    na, nb = update_norm(ua.factors), update_norm(ub.factors)
    wa, wb = na / (na + nb), nb / (na + nb)
    for name in state.factors:
        exp_b = wa * pad(*ua.factors[name], 8)[0] + wb * pad(*ub.factors[name], 8)[0]
        exp_a = wa * pad(*ua.factors[name], 8)[1] + wb * pad(*ub.factors[name], 8)[1]
        torch.testing.assert_close(new.factors[name][0], exp_b)
        torch.testing.assert_close(new.factors[name][1], exp_a)
    assert new.ranks == {"a": 2, "b": 8, "c": 5}  # pruned rank kept, unsampled client untouched
    assert new.round == 1
    assert server_at(new).task("a").factors["layers.0.q"][0].shape[1] == 2
    # a pruned client can't grow back: an update above its current rank is refused
    server = hetlora.HetLoRAServer(global_factors(8), new.ranks)  # the validator of replies
    with pytest.raises(HetLoRAError, match=r"rank 3 outside \[1, 2\]"):
        server.check(update(new, "a", 3, seed=3))


def test_uniform_and_data_size_weights():
    state = init(global_factors(4), {"a": 4, "b": 4})
    ua, ub = update(state, "a", 4, 1, n=30), update(state, "b", 4, 2, n=10)
    uni = aggregate(state, [ua, ub], aggregation="uniform")
    size = aggregate(state, [ua, ub], aggregation="data_size")
    name = "layers.0.v"
    torch.testing.assert_close(
        uni.factors[name][0], (ua.factors[name][0] + ub.factors[name][0]) / 2
    )
    torch.testing.assert_close(
        size.factors[name][1], 0.75 * ua.factors[name][1] + 0.25 * ub.factors[name][1]
    )


def test_per_module_weights_differ_from_per_client():
    state = init(global_factors(4), {"a": 4, "b": 4})
    ua, ub = update(state, "a", 4, 1), update(state, "b", 4, 2)
    # scale one module of client b so per-module and per-client weights disagree
    b_q = ub.factors["layers.0.q"]
    ub.factors["layers.0.q"] = (b_q[0] * 10, b_q[1])
    per_client = aggregate(state, [ua, ub])
    per_module = aggregate(state, [ua, ub], per_module=True)
    assert not torch.allclose(
        per_client.factors["layers.0.v"][0], per_module.factors["layers.0.v"][0]
    )


def test_aggregator_weights_sum_to_one_and_rejects_bad_updates():
    state = init(global_factors(4), {"a": 4, "b": 2})
    agg = server_at(state)
    agg.add(update(state, "a", 4, 1))
    agg.add(update(state, "b", 2, 2))
    assert sum(agg.finish().values()) == pytest.approx(1.0)
    server = hetlora.HetLoRAServer(global_factors(4), {"a": 4, "b": 2})
    with pytest.raises(HetLoRAError, match="unknown client"):
        server.check(update(state, "zzz", 2, 3))
    bad = update(state, "a", 4, 4)
    bad.factors.pop("layers.0.v")
    with pytest.raises(HetLoRAError, match="modules"):
        server.check(bad)
    with pytest.raises(HetLoRAError):
        server_at(state).finish()


def test_one_client_at_full_rank_returns_its_factors():
    state = init(global_factors(4), {"a": 4})
    ua = update(state, "a", 4, 7)
    new = aggregate(state, [ua])
    for name in state.factors:
        torch.testing.assert_close(new.factors[name][0], ua.factors[name][0])
        torch.testing.assert_close(new.factors[name][1], ua.factors[name][1])


def test_zero_padding_kills_positions_above_the_rounds_largest_rank():
    # The paper's aggregation: with every reply at rank <= 3, positions 3..7 of both factors
    # become zero, and B = A = 0 there is a fixed point: those positions stay dead.
    state = init(global_factors(8), {"a": 3, "b": 2})
    new = aggregate(state, [update(state, "a", 3, seed=1), update(state, "b", 2, seed=2)])
    for b, a in new.factors.values():
        assert torch.count_nonzero(b[:, 3:]) == 0 and torch.count_nonzero(a[3:]) == 0


def test_rankwise_average_renormalises_per_position_and_keeps_unreached_ones():
    state = init(global_factors(8), {"a": 2, "b": 5, "c": 8})
    ua, ub = update(state, "a", 2, seed=1), update(state, "b", 5, seed=2)
    new = aggregate(state, [ua, ub], padding="rankwise")
    na, nb = update_norm(ua.factors), update_norm(ub.factors)
    wa, wb = na / (na + nb), nb / (na + nb)
    for name, (old_b, old_a) in state.factors.items():
        (ba, aa), (bb, ab) = ua.factors[name], ub.factors[name]
        b, a = new.factors[name]
        torch.testing.assert_close(b[:, :2], wa * ba + wb * bb[:, :2])  # both clients reach 0, 1
        torch.testing.assert_close(a[:2], wa * aa + wb * ab[:2])
        torch.testing.assert_close(b[:, 2:5], bb[:, 2:5])  # only b reaches 2..4: weight 1
        torch.testing.assert_close(a[2:5], ab[2:5])
        torch.testing.assert_close(b[:, 5:], old_b[:, 5:])  # nobody reached 5..7: kept
        torch.testing.assert_close(a[5:], old_a[5:])
    # with every client at r_max, rank-wise equals the paper's average
    state = init(global_factors(4), {"a": 4, "b": 4})
    ups = [update(state, "a", 4, 1), update(state, "b", 4, 2)]
    plain = aggregate(state, ups)
    ranked = aggregate(state, ups, padding="rankwise")
    for name in plain.factors:
        torch.testing.assert_close(ranked.factors[name][0], plain.factors[name][0])
        torch.testing.assert_close(ranked.factors[name][1], plain.factors[name][1])


def test_rankwise_with_zero_scores_falls_back_to_uniform_per_position():
    state = init(global_factors(6), {"a": 2, "b": 4})
    ua, ub = update(state, "a", 2, seed=1), update(state, "b", 4, seed=2)
    for u in (ua, ub):  # B = 0 everywhere: every sparsity score is 0
        u.factors = {n: (torch.zeros_like(b), a) for n, (b, a) in u.factors.items()}
    new = aggregate(state, [ua, ub], padding="rankwise")
    for name, (_, old_a) in state.factors.items():
        a = new.factors[name][1]
        torch.testing.assert_close(a[:2], (ua.factors[name][1] + ub.factors[name][1][:2]) / 2)
        torch.testing.assert_close(a[2:4], ub.factors[name][1][2:4])
        torch.testing.assert_close(a[4:], old_a[4:])


def test_rankwise_zero_scores_with_live_b_average_b_uniformly():
    # A = 0 gives B A = 0 (score 0) with B non-zero: B's positions are averaged uniformly
    state = init(global_factors(6), {"a": 2, "b": 4, "c": 4})
    ups = [update(state, c, r, seed=s) for c, r, s in (("a", 2, 1), ("b", 4, 2), ("c", 4, 3))]
    for u in ups:
        u.factors = {n: (b, torch.zeros_like(a)) for n, (b, a) in u.factors.items()}
    new = aggregate(state, ups, padding="rankwise")
    for name, (old_b, _) in state.factors.items():
        fa, fb, fc = (u.factors[name][0] for u in ups)
        b = new.factors[name][0]
        torch.testing.assert_close(b[:, :2], (fa + fb[:, :2] + fc[:, :2]) / 3)
        torch.testing.assert_close(b[:, 2:4], (fb[:, 2:4] + fc[:, 2:4]) / 2)
        torch.testing.assert_close(b[:, 4:], old_b[:, 4:])


def test_rankwise_with_scores_below_one_and_a_wrong_previous_shape():
    # sparsity scores ||dW_k|| < 1 still count as reaching a position
    state = init(global_factors(6), {"a": 2, "b": 4})
    ua, ub = update(state, "a", 2, seed=1), update(state, "b", 4, seed=2)
    for u in (ua, ub):
        u.factors = {n: (b * 1e-2, a * 1e-2) for n, (b, a) in u.factors.items()}
    assert update_norm(ua.factors) < 1 and update_norm(ub.factors) < 1
    new = aggregate(state, [ua, ub], padding="rankwise")
    for name in state.factors:
        torch.testing.assert_close(new.factors[name][1][2:4], ub.factors[name][1][2:4])
    agg = server_at(state, padding="rankwise")
    agg.add(ua)
    bad = dict(state.factors)
    name = next(iter(bad))
    bad[name] = (bad[name][0], bad[name][1][:3])  # only A at the wrong rank
    with pytest.raises(HetLoRAError, match="previous global factors are not at rank 6"):
        agg._sum.result("rankwise", bad)


def test_assign_ranks_reach_both_ends_and_tiers_deal_remainders():
    ids = [f"c{i}" for i in range(300)]
    ranks = hetlora.assign_ranks(ids, 3, 7, seed=0)
    assert set(ranks.values()) == {3, 4, 5, 6, 7}  # r_max itself is drawn
    # 7 clients, shares 5:3:2 -> exact 3.5, 2.1, 1.4 -> floors 3, 2, 1, the leftover client to
    # the largest remainder (3.5)
    tiers = [{"rank": 2, "share": 5}, {"rank": 4, "share": 3}, {"rank": 8, "share": 2}]
    dealt = hetlora.assign_ranks([f"c{i}" for i in range(7)], 2, 8, seed=1, tiers=tiers)
    assert Counter(dealt.values()) == {2: 4, 4: 2, 8: 1}
    # a missing share means 1: equal tiers
    equal = hetlora.assign_ranks(ids[:9], 2, 8, 0, tiers=[{"rank": 2}, {"rank": 4}, {"rank": 8}])
    assert Counter(equal.values()) == {2: 3, 4: 3, 8: 3}
    # 10 clients, shares 1:1:1 -> 3.33 each: one leftover, the others get 3
    ten = hetlora.assign_ranks(ids[:10], 2, 8, 0, tiers=[{"rank": 2}, {"rank": 4}, {"rank": 8}])
    assert sorted(Counter(ten.values()).values()) == [3, 3, 4]


def test_aggregator_weights_small_and_zero_scores():
    state = init(global_factors(4), {"a": 4, "b": 4})
    ua, ub = update(state, "a", 4, seed=1), update(state, "b", 4, seed=2)
    for u in (ua, ub):
        u.factors = {n: (b * 1e-2, a * 1e-2) for n, (b, a) in u.factors.items()}
    agg = server_at(state)
    agg.add(ua)
    agg.add(ub)
    na, nb = update_norm(ua.factors), update_norm(ub.factors)
    assert na + nb < 1
    assert agg.finish() == pytest.approx({"a": na / (na + nb), "b": nb / (na + nb)})
    zero = server_at(state)
    for u in (ua, ub):
        u.factors = {n: (torch.zeros_like(b), a) for n, (b, a) in u.factors.items()}
        zero.add(u)
    assert zero.finish() == {"a": 0.5, "b": 0.5}


def test_zero_padding_formula_divides_every_position_by_the_total_score():
    # The paper: B[:, p] = sum_{k: r_k > p} s_k B_k[:, p] / sum_k s_k, over all the round's
    # clients, so position p shrinks by the weight of the clients below it.
    state = init(global_factors(8), {"a": 2, "b": 5, "c": 8})
    ua, ub = update(state, "a", 2, seed=1), update(state, "b", 5, seed=2)
    new = aggregate(state, [ua, ub], padding="zero")
    na, nb = update_norm(ua.factors), update_norm(ub.factors)
    wa, wb = na / (na + nb), nb / (na + nb)
    assert 0.05 < wa < 0.95  # non-degenerate weights
    for name in state.factors:
        (ba, aa), (bb, ab) = ua.factors[name], ub.factors[name]
        b, a = new.factors[name]
        torch.testing.assert_close(b[:, :2], wa * ba + wb * bb[:, :2])
        torch.testing.assert_close(a[:2], wa * aa + wb * ab[:2])
        torch.testing.assert_close(b[:, 2:5], wb * bb[:, 2:5])  # a's zero padding shrinks them
        torch.testing.assert_close(a[2:5], wb * ab[2:5])
        assert torch.count_nonzero(b[:, 5:]) == 0 and torch.count_nonzero(a[5:]) == 0


def test_keep_padding_is_zero_padding_where_reached_and_the_previous_value_elsewhere():
    # FSLoRA's HetLoRA baseline (not in the paper): positions no client of the round reached
    # keep the previous global value; the others are exactly the paper's zero-padded average.
    state = init(global_factors(8), {"a": 2, "b": 5, "c": 8})
    ua, ub = update(state, "a", 2, seed=1), update(state, "b", 5, seed=2)
    kept = aggregate(state, [ua, ub], padding="keep")
    zero = aggregate(state, [ua, ub], padding="zero")
    ranked = aggregate(state, [ua, ub], padding="rankwise")
    na, nb = update_norm(ua.factors), update_norm(ub.factors)
    wb = nb / (na + nb)
    for name, (old_b, old_a) in state.factors.items():
        b, a = kept.factors[name]
        _, ab = ub.factors[name]
        torch.testing.assert_close(b[:, :5], zero.factors[name][0][:, :5])
        torch.testing.assert_close(a[:5], zero.factors[name][1][:5])
        torch.testing.assert_close(a[2:5], wb * ab[2:5])  # shrunk, unlike rank-wise
        assert not torch.allclose(a[2:5], ranked.factors[name][1][2:5])
        torch.testing.assert_close(b[:, 5:], old_b[:, 5:])
        torch.testing.assert_close(a[5:], old_a[5:])
        assert torch.count_nonzero(old_a[5:]) > 0  # the kept values are not zeros
    # the previous global factors are not modified in place
    again = aggregate(state, [ua, ub], padding="keep")
    for name in state.factors:
        torch.testing.assert_close(again.factors[name][1], kept.factors[name][1])


def test_live_rank_counts_positions_where_both_factors_are_non_zero():
    from hetlora.lora import live_rank

    b = torch.ones(3, 5)
    a = torch.ones(5, 4)
    b[:, 1] = 0  # position 1: B dead
    a[3] = 0  # position 3: A dead
    b2, a2 = torch.ones(3, 5), torch.ones(5, 4)
    b2[:, 4] = 0
    assert live_rank({"m1": (b, a), "m2": (b2, a2)}) == (3, 4)


def test_padding_is_an_error_for_unknown_rules_and_other_methods():
    from hetlora.config import make_config

    state = init(global_factors(4), {"a": 4})
    with pytest.raises(HetLoRAError, match="padding"):
        aggregate(state, [update(state, "a", 4, 1)], padding="mirror")
    with pytest.raises(HetLoRAError, match="padding"):
        make_config({"method": "homlora", "padding": "keep"})
    with pytest.raises(HetLoRAError, match="padding"):
        make_config({"padding": "replicate"})
    assert make_config({"padding": "keep"}).padding == "keep"

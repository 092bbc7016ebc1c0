"""Client-level differential privacy (hetlora.dp) and FFA-LoRA: clipping, noise, accountant,
config rules, and real runs in both runtimes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from hetlora import dp
from hetlora.cli import app
from hetlora.config import make_config
from hetlora.errors import HetLoRAError
from hetlora.lora import truncate
from hetlora.methods import make_server
from hetlora.methods.base import Reply
from hetlora.methods.ffa import FFAServer
from hetlora.methods.hetlora import HetLoRAServer
from hetlora.methods.homlora import HomLoRAServer

SHAPES = {"l0.q": (24, 16), "l0.v": (12, 16), "l1.q": (24, 16)}


def factors(rank: int, seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (scale * torch.randn(o, rank, generator=g), scale * torch.randn(rank, i, generator=g))
        for n, (o, i) in SHAPES.items()
    }


def plan(**kw) -> dp.DPPlan:
    values = dict(
        clip_norm=0.5,
        noise_multiplier=1.0,
        delta=1e-5,
        num_clients=240,
        per_round=4,
        rounds=100,
        noise_seed=11,
    )
    values.update(kw)
    return dp.DPPlan(**values)


# -- clipping on the device, checked again on the server ----------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rank=st.integers(1, 8),
    clip=st.floats(1e-2, 10.0),
    scale=st.floats(1e-4, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_clipped_reply_has_update_norm_at_most_c(rank, clip, scale, seed):
    received = factors(rank, seed)
    noise = factors(rank, seed + 1, scale)
    trained = {n: (b + noise[n][0], a + noise[n][1]) for n, (b, a) in received.items()}
    reply = dp.clip_reply(received, trained, clip)
    norm = dp.update_norm(received, reply)
    assert norm <= clip * (1 + dp.CLIP_SLACK)  # float32 round-off of B0 + s D on the device
    before = dp.update_norm(received, trained)
    if before <= clip:  # not clipped: the reply is what was trained
        for n in received:
            torch.testing.assert_close(reply[n][0], trained[n][0])
    else:  # clipped: the direction is kept, the norm is C
        assert norm == pytest.approx(clip, rel=1e-4)
    # and the server accepts it at the client's rank (a round-off above C is scaled back)
    g = factors(8, seed + 2)
    g = {
        n: (
            torch.cat([received[n][0], g[n][0][:, rank:]], 1),
            torch.cat([received[n][1], g[n][1][rank:]]),
        )
        for n in g
    }
    checked = dp.check_reply(g, reply, rank, clip)
    assert dp.update_norm(received, checked) <= clip * (1 + 1e-9)  # float64 on the server


def test_the_server_refuses_a_reply_above_c():
    g = factors(8, 0)
    server = HetLoRAServer(g, {"a": 4, "b": 6}, aggregation="uniform", pruning=False, dp=plan())
    received = server.task("a").factors
    step = factors(4, 1)
    norm = dp.update_norm(
        received, {n: (b + step[n][0], a + step[n][1]) for n, (b, a) in received.items()}
    )
    over = {
        n: (b + step[n][0] * 0.75 / norm, a + step[n][1] * 0.75 / norm)
        for n, (b, a) in received.items()
    }
    with pytest.raises(HetLoRAError, match="client a: update norm .* exceeds dp_clip_norm 0.5"):
        server.check(Reply("a", 10, factors=over, rank=4))
    # a reply at another rank than assigned (a pruned one) is refused under DP too
    with pytest.raises(HetLoRAError, match="rank 3, assigned 4"):
        server.check(Reply("a", 10, factors=truncate(received, 3), rank=3))
    # a round-off above C is scaled back to C, not refused
    just = {
        n: (b + step[n][0] * 0.5002 / norm, a + step[n][1] * 0.5002 / norm)
        for n, (b, a) in received.items()
    }
    update = Reply("a", 10, factors=just, rank=4)
    server.check(update)
    assert dp.update_norm(received, update.factors) == pytest.approx(0.5, rel=1e-9)


# -- noise on the server ------------------------------------------------------------------------


def test_noise_std_is_sigma_c_over_m_on_every_position():
    """Clients that send back exactly what they received: the aggregate minus the global factors
    is the noise over m, on every rank position (not only below the round's largest rank: the
    release must not show which ranks were sampled). 40 rounds x 3 modules x 8 positions."""
    g = factors(8, 0)
    p = plan(clip_norm=0.5, noise_multiplier=1.3)
    m = p.per_round
    draws = []
    for round_idx in range(1, 41):
        agg = dp.NoisyUpdateSum(g, p)
        for r in (2, 6, 4):  # one of the m sampled clients never replied
            agg.add(truncate(g, r))
        out = agg.result(round_idx, m)
        for n in g:
            draws.append((out[n][0] - g[n][0]).flatten() * m)
            draws.append((out[n][1] - g[n][1]).flatten() * m)
    noise = torch.cat(draws).double()
    expected = p.noise_multiplier * p.clip_norm
    # the std of a std estimate over n normals is std / sqrt(2n)
    n = noise.numel()
    assert abs(float(noise.std()) / expected - 1) < 4 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(n)


def test_dead_positions_get_no_noise_and_the_global_keeps_rank_r_max():
    """A position zero in both global factors gets no gradient, so no noise either (the mask
    depends on released state only); every other position is averaged with noise, so the global
    adapter keeps its live rank whatever ranks a round sampled (no zero-padding collapse)."""
    from hetlora.lora import live_rank

    g = factors(8, 0)
    g = {n: (b.clone(), a.clone()) for n, (b, a) in g.items()}
    for b, a in g.values():
        b[:, 7] = 0
        a[7] = 0  # position 7 dead
    server = HetLoRAServer(
        g, {"a": 8, "b": 6, "c": 4}, aggregation="uniform", pruning=False, dp=plan(per_round=1)
    )
    live = []
    for client in ("b", "a", "c", "a"):
        task = server.task(client)
        step = factors(task.rank, len(live) + 1, 1e-3)
        reply = {n: (b + step[n][0], a + step[n][1]) for n, (b, a) in task.factors.items()}
        update = Reply(client, 10, factors=reply, rank=task.rank)
        server.check(update)
        server.add(update)
        server.finish()
        live.append(live_rank(server.global_factors())[1])
    assert live == [7, 7, 7, 7]
    for b, a in server.global_factors().values():
        assert float(b[:, 7].abs().sum()) == 0 and float(a[7].abs().sum()) == 0


def test_noise_is_seeded_by_the_plan_and_the_round_with_all_128_bits():
    g = factors(8, 0)
    high = 5 + (1 << 100)  # differs from 5 only above bit 64
    results = {}
    for seed in (5, 5, 6, high):
        agg = dp.NoisyUpdateSum(g, plan(noise_seed=seed))
        agg.add(truncate(g, 8))
        results.setdefault(seed, []).append(agg.result(3, 4)["l0.q"][0])
    torch.testing.assert_close(results[5][0], results[5][1])
    assert not torch.equal(results[5][0], results[6][0])
    assert not torch.equal(results[5][0], results[high][0])
    again = dp.NoisyUpdateSum(g, plan(noise_seed=5))
    again.add(truncate(g, 8))
    assert not torch.equal(results[5][0], again.result(4, 4)["l0.q"][0])


def test_the_dp_aggregate_is_the_mean_of_the_padded_updates_over_m():
    """With sigma -> 0 the DP aggregate is G plus the sum of the zero-padded updates over all m
    sampled clients; a missing reply adds nothing (the divisor stays m)."""
    g = factors(8, 0)
    p = plan(noise_multiplier=1e-12, clip_norm=1e6, per_round=3)
    server = HetLoRAServer(g, {"a": 4, "b": 8, "c": 2}, aggregation="uniform", pruning=False, dp=p)
    replies = {c: factors(r, i + 1) for i, (c, r) in enumerate({"a": 4, "b": 8}.items())}
    for c in "abc":
        server.task(c)
    for c, f in replies.items():
        update = Reply(c, 10, factors=f, rank=f["l0.q"][0].shape[1])
        server.check(update)
        server.add(update)
    weights = server.finish()  # c never replied
    assert weights == pytest.approx({"a": 1 / 3, "b": 1 / 3})
    for n in SHAPES:
        for i in (0, 1):  # B, then A
            pad = torch.zeros_like(g[n][i])
            own = replies["a"][n][i]
            if i == 0:
                pad[:, :4] = own - g[n][0][:, :4]
            else:
                pad[:4] = own - g[n][1][:4]
            expected = g[n][i] + (pad + (replies["b"][n][i] - g[n][i])) / 3
            torch.testing.assert_close(
                server.global_factors()[n][i], expected, rtol=1e-5, atol=1e-5
            )


def test_a_refused_or_missing_reply_is_a_zero_update_and_no_round_is_skipped():
    """The sensitivity holds whatever arrives: the release with a client's reply refused (or
    missing) is the release with that client sending back what it received, and a DP round with
    no valid reply at all still releases ``G + Z / m`` (skipping it would show that)."""
    from hetlora.accounting import ModelSize
    from hetlora.runtime.rounds import Exchange, RoundOutcome, fold

    g = factors(8, 0)
    ranks = {"a": 4, "b": 8, "c": 2}
    releases = []
    for c_sends in ("received", "refused", "missing"):
        server = HetLoRAServer(g, ranks, aggregation="uniform", pruning=False, dp=plan(per_round=3))
        exchanges = []
        for c in ranks:
            task = server.task(c)
            step = factors(task.rank, 9, 1e-3)
            sent = {n: (b + step[n][0], a + step[n][1]) for n, (b, a) in task.factors.items()}
            if c == "c":
                if c_sends == "received":
                    sent = task.factors
                elif c_sends == "refused":
                    sent = {n: (b * math.nan, a) for n, (b, a) in task.factors.items()}
            reply = (
                None
                if c == "c" and c_sends == "missing"
                else Reply(c, 10, factors=sent, rank=task.rank)
            )
            exchanges.append(Exchange(c, task, reply, "no reply" if reply is None else ""))
        outcome = fold(server, exchanges, 3, 0.0, RoundOutcome(1, list(ranks)), ModelSize(1, 1, 1))
        assert not outcome.skipped
        releases.append(server.global_factors())
    for n in SHAPES:
        for other in releases[1:]:
            torch.testing.assert_close(other[n][0], releases[0][n][0], rtol=0, atol=1e-12)
    server = HetLoRAServer(g, ranks, aggregation="uniform", pruning=False, dp=plan(per_round=3))
    outcome = fold(server, [], 1, 0.0, RoundOutcome(1, []), ModelSize(1, 1, 1))
    assert not outcome.skipped and server.round == 1
    assert not torch.equal(server.global_factors()["l0.q"][0], g["l0.q"][0])


def test_a_secret_noise_seed_also_draws_the_client_sample():
    """With ``dp_noise_seed = 0`` the seed is a 128-bit secret and the round's clients come from
    it, not from the config's public ``seed``; a fixed noise seed samples as without DP."""
    from hetlora.runtime.rounds import round_clients, sample_clients

    cfg = make_config(
        {"pruning": False, "aggregation": "uniform", "dp_clip_norm": 1.0,
         "dp_noise_multiplier": 1.0, "clients_per_round": 8}
    )  # fmt: skip
    ids = [f"c{i:03d}" for i in range(240)]
    secret = dp.plan(cfg, len(ids))
    assert secret.secret and 0 <= secret.noise_seed < 2**128
    server = HetLoRAServer(
        factors(8, 0), dict.fromkeys(ids, 4), "uniform", pruning=False, dp=secret
    )
    public = [sample_clients(cfg.seed, ids, 8, r) for r in range(1, 6)]
    drawn = [round_clients(cfg, server, ids, r) for r in range(1, 6)]
    assert drawn == [round_clients(cfg, server, ids, r) for r in range(1, 6)]  # reproducible
    assert drawn != public and all(len(d) == 8 == len(set(d)) for d in drawn)
    assert dp.plan(cfg, len(ids)).noise_seed != secret.noise_seed  # a new secret each run
    fixed = make_config({**cfg.to_dict(), "dp_noise_seed": 3})
    server.dp = dp.plan(fixed, len(ids))
    assert not server.dp.secret
    assert [round_clients(fixed, server, ids, r) for r in range(1, 6)] == public


def test_without_dp_the_servers_are_unchanged():
    cfg = make_config({})
    assert dp.plan(cfg, 240) is None
    server = make_server(cfg, factors(16, 0), {"a": 4}, ["a"])
    assert server.dp is None and server.train_a
    assert server.task("a").dp_clip_norm == 0.0


# -- the accountant -----------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m", "sigma", "rounds"), [(240, 4, 1.0, 100), (50, 5, 2.0, 30)])
def test_epsilon_is_dp_accountings_for_the_sampling_the_run_does(n, m, sigma, rounds):
    """Composed here in increments of rounds on one accountant (the module composes one
    SelfComposedDpEvent): after round 1, half the rounds and all of them."""
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        n, m, dp_accounting.GaussianDpEvent(sigma / 2)
    )
    done = 0
    for k in (1, rounds // 2, rounds):
        accountant.compose(event, count=k - done)
        done = k
        assert dp.epsilon(n, m, sigma, k, 1e-5) == pytest.approx(
            accountant.get_epsilon(1e-5), rel=1e-9
        )
    assert dp.epsilon(n, m, sigma, 0, 1e-5) == 0.0


def test_the_sensitivity_is_2c_under_replace_one():
    """The issue's figure (about 2.2 at sigma 1, 4 of 240, 100 rounds) is this sampling's with the
    noise taken over sensitivity C; replacing one client's data moves its clipped update by up to
    2C, so the noise over the sensitivity is sigma / 2 and epsilon is larger (13.1)."""
    same_event_over_c = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        240, 4, dp_accounting.GaussianDpEvent(1.0)
    )
    same_event_over_c.compose(dp_accounting.SelfComposedDpEvent(event, 100))
    assert same_event_over_c.get_epsilon(1e-5) == pytest.approx(2.2, abs=0.1)
    assert dp.epsilon(240, 4, 1.0, 100, 1e-5) == pytest.approx(13.1, abs=0.1)
    assert dp.epsilon(240, 4, 2.0, 100, 1e-5) == pytest.approx(same_event_over_c.get_epsilon(1e-5))


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_calibration_lands_within_one_percent(target):
    sigma = dp.calibrate(target, 240, 4, 100, 1e-5)
    eps = dp.epsilon(240, 4, sigma, 100, 1e-5)
    assert eps <= target and eps == pytest.approx(target, rel=0.01)


def test_default_delta_is_below_one_over_n():
    assert dp.default_delta(240) == 1e-5
    assert dp.default_delta(50_000) == pytest.approx(2e-6) and dp.default_delta(50_000) < 1 / 50_000


def test_a_delta_not_below_one_over_n_is_an_error():
    cfg = make_config(
        {"method": "homlora", "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 0.1}
    )
    with pytest.raises(HetLoRAError, match="dp_delta 0.1 must be below 1/N"):
        dp.plan(cfg, 20)


# -- config rules -------------------------------------------------------------------------------

ON = ["dp_clip_norm=1.0", "dp_noise_multiplier=1.0"]


@pytest.mark.parametrize(
    ("sets", "says"),
    [
        (ON, "method 'hetlora' needs pruning = false"),
        ([*ON, "pruning=false"], "aggregation = 'uniform' ('sparsity' weights depend on the data)"),
        (
            [*ON, "pruning=false", "aggregation='uniform'", "padding='keep'"],
            "padding left at 'zero'",
        ),
        (
            ["dp_clip_norm=1.0", "method='homlora'"],
            "exactly one of dp_noise_multiplier > 0 or dp_target_epsilon > 0",
        ),
        ([*ON, "dp_target_epsilon=8", "method='homlora'"], "not both"),
        (
            [*ON, "method='recon_svd'"],
            "'dp_clip_norm' = 1.0 applies to methods 'hetlora', 'homlora', 'ffa' only",
        ),
        ([*ON, "method='ffa'", "aggregation='data_size'"], "example counts depend on the data"),
        ([*ON, "method='homlora'", "aggregation='data_size'"], "example counts depend on the data"),
        (
            ["dp_noise_multiplier=1.0"],
            "'dp_noise_multiplier' = 1.0 applies to dp_clip_norm > 0 only",
        ),
        (
            ["method='ffa'", "aggregation='sparsity_data_size'"],
            "method 'ffa' weights clients 'uniform' or by 'data_size'",
        ),
        (["method='homlora'", "dp_clip_norm=-1"], "'dp_clip_norm' must be a finite number >= 0"),
    ],
)
def test_forbidden_combinations_exit_2_with_one_line(sets, says, tmp_path):
    args = ["run", "--out", str(tmp_path / "o")]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], result.output
    assert not (tmp_path / "o").exists()


# -- FFA-LoRA -----------------------------------------------------------------------------------


def test_ffa_keeps_a_frozen_and_averages_products_exactly():
    g = factors(8, 0)
    g = {n: (torch.zeros_like(b), a) for n, (b, a) in g.items()}  # PEFT's init: B = 0
    server = FFAServer(g, {"a": 3, "b": 8})
    assert not server.task("a").train_a and not server.task("a").pruning
    replies = {}
    for c, r, n_ex in (("a", 3, 30), ("b", 8, 10)):
        f = truncate(g, r)
        fb = factors(r, 7 + r)
        replies[c] = ({n: (fb[n][0], f[n][1]) for n in f}, n_ex)
        server.add(Reply(c, n_ex, factors=replies[c][0], rank=r))
    weights = server.finish()
    assert weights == pytest.approx({"a": 0.75, "b": 0.25})
    for n in SHAPES:
        b, a = server.global_factors()[n]
        torch.testing.assert_close(a, g[n][1])  # A is the init, whatever was averaged
        product = sum(
            w * rep[n][0] @ rep[n][1]
            for (rep, _), w in zip(replies.values(), (0.75, 0.25), strict=True)
        )
        torch.testing.assert_close(b @ a, product, rtol=1e-5, atol=1e-5)


def test_homlora_under_dp_weights_uniformly():
    server = HomLoRAServer(
        factors(4, 0),
        ["a", "b"],
        rank=4,
        dp=plan(noise_multiplier=1e-12, clip_norm=1e6, per_round=2),
    )
    for c, n_ex in (("a", 30), ("b", 10)):
        server.task(c)
        server.add(Reply(c, n_ex, factors=factors(4, 3), rank=4))
    assert server.finish() == pytest.approx({"a": 0.5, "b": 0.5})


# -- real runs ----------------------------------------------------------------------------------

RUN = [
    "rounds=3",
    "clients_per_round=3",
    "local_steps=3",
    "batch_size=4",
    "lr=0.01",
    "eval_examples=8",
    "rouge_examples=0",
    "precision='fp32'",
    "min_examples=120",
    "r_min=2",
    "r_max=8",
]


def _cli_run(model: Path, out: Path, *extra: str):
    args = ["run", "--out", str(out), "--set", f"model='{model}'"]
    for item in [*RUN, *extra]:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def test_a_dp_run_prints_epsilon_every_round_and_keeps_it_in_summary(tiny_model, tmp_path):
    out = tmp_path / "dp"
    extra = ("pruning=false", "aggregation='uniform'", "dp_clip_norm=0.05", "dp_target_epsilon=8.0")
    result = _cli_run(tiny_model, out, *extra)
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["epsilon"] for r in rows][0] == 0.0
    eps = [r["epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(summary["epsilon"])
    assert summary["epsilon"] == pytest.approx(8.0, rel=0.01) and summary["epsilon"] <= 8.0
    assert summary["delta"] == 1e-5  # min(1e-5, 1/(10 N))
    n = summary["clients"]
    assert summary["epsilon"] == pytest.approx(
        dp.epsilon(n, 3, summary["dp_noise_multiplier"], 3, 1e-5)
    )
    for r in rows[1:]:
        assert f"epsilon {r['epsilon']:.3g}" in result.output
        assert all(c["update_norm"] > 0 for c in r["clients"].values())
        assert 0 <= r["clipped"] <= 1
    assert "differential privacy: epsilon" in result.output
    assert summary["clients_pruned"] == 0  # no self-pruning under DP


def test_ffa_runs_with_and_without_dp_and_its_a_stays_the_init(tiny_model, tmp_path):
    results = {}
    for name, extra in (
        ("plain", ()),
        ("dp", ("dp_clip_norm=0.05", "dp_noise_multiplier=1.0", "dp_noise_seed=3")),
    ):
        out = tmp_path / name
        result = _cli_run(tiny_model, out, "method='ffa'", *extra)
        assert result.exit_code == 0, result.output
        results[name] = load_file(out / "adapter" / "adapter_model.safetensors")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == "ffa" and ("epsilon" in summary) == (name == "dp")
        assert np.isfinite(summary["final_ppl"])
    a_keys = [k for k in results["plain"] if "lora_A" in k]
    b_keys = [k for k in results["plain"] if "lora_B" in k]
    assert a_keys and b_keys
    for k in a_keys:  # the same seeded init, untouched by training, with and without DP
        torch.testing.assert_close(results["dp"][k], results["plain"][k], rtol=0, atol=0)
    assert any(not torch.equal(results["dp"][k], results["plain"][k]) for k in b_keys)
    assert all(float(results["plain"][k].abs().sum()) > 0 for k in b_keys)

"""Untrusted replies: every method's server refuses malformed updates, naming the reason."""

from __future__ import annotations

import pytest
import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import truncate
from hetlora.methods.base import Reply
from hetlora.methods.flora import FLoRAServer
from hetlora.methods.full_ft import FullFTServer
from hetlora.methods.hetlora import HetLoRAServer
from hetlora.methods.homlora import HomLoRAServer
from hetlora.methods.recon_svd import ReconSVDServer

SHAPES = {"l0.q": (12, 10), "l0.v": (6, 10)}


def factors(rank: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(o, rank, generator=g), torch.randn(rank, i, generator=g))
        for n, (o, i) in SHAPES.items()
    }


def lora_servers():
    ranks = {"a": 4, "b": 8}
    return {
        "hetlora": HetLoRAServer(factors(8), ranks),
        "homlora": HomLoRAServer(factors(8), ["a", "b"], rank=4),
        "recon_svd": ReconSVDServer(factors(8), ranks),
        "flora": FLoRAServer(SHAPES, ranks, 2.0, 0),
    }


def with_value(f, name, which, value):
    out = {k: (b.clone(), a.clone()) for k, (b, a) in f.items()}
    out[name][which].view(-1)[0] = value
    return out


@pytest.mark.parametrize("method", ["hetlora", "homlora", "recon_svd", "flora"])
def test_lora_servers_refuse_bad_replies(method):
    server = lora_servers()[method]
    good = Reply("a", 10, factors=factors(4, 1), rank=4)
    server.check(good)
    server.check(Reply("a", 10, factors=factors(3, 1), rank=3))  # pruned below: fine
    cases = {
        "non-finite": Reply(
            "a", 10, factors=with_value(good.factors, "l0.q", 0, float("nan")), rank=4
        ),
        "non-finite values": Reply(
            "a", 10, factors=with_value(good.factors, "l0.v", 1, float("inf")), rank=4
        ),
        "outside": Reply("a", 10, factors=factors(5, 1), rank=5),  # above the assigned 4
        "shapes": Reply(
            "a", 10, factors={**good.factors, "l0.v": (torch.ones(7, 4), torch.ones(4, 10))}, rank=4
        ),
        "wrong modules": Reply("a", 10, factors={"l0.q": good.factors["l0.q"]}, rank=4),
        "no LoRA factors": Reply("a", 10, weights={"w": torch.ones(2)}),
        "unknown client": Reply("zed", 10, factors=factors(4, 1), rank=4),
    }
    for reason, update in cases.items():
        with pytest.raises(HetLoRAError, match=reason):
            server.check(update)
    lie = Reply("a", 10, factors=factors(4, 1), rank=3)  # declared rank != actual
    with pytest.raises(HetLoRAError, match="shapes"):
        server.check(lie)


def test_norm_bound():
    server = lora_servers()["hetlora"]
    update = Reply("b", 10, factors=factors(8, 2), rank=8)
    norm = (
        sum(float((b.double() @ a.double()).norm() ** 2) for b, a in update.factors.values()) ** 0.5
    )
    server.check(update, max_norm=norm * 1.01)
    with pytest.raises(HetLoRAError, match="exceeds the bound"):
        server.check(update, max_norm=norm * 0.99)
    huge = Reply("b", 10, factors={n: (b * 1e6, a) for n, (b, a) in update.factors.items()}, rank=8)
    with pytest.raises(HetLoRAError, match="exceeds the bound"):
        server.check(huge, max_norm=1e3)


def test_full_ft_refuses_bad_replies():
    server = FullFTServer({"w": torch.zeros(3, 3)}, ["a"])
    server.check(Reply("a", 1, weights={"w": torch.ones(3, 3)}))
    with pytest.raises(HetLoRAError, match="non-finite"):
        server.check(Reply("a", 1, weights={"w": torch.full((3, 3), float("nan"))}))
    with pytest.raises(HetLoRAError, match="shape"):
        server.check(Reply("a", 1, weights={"w": torch.ones(2, 3)}))
    with pytest.raises(HetLoRAError, match="wrong set"):
        server.check(Reply("a", 1, weights={"v": torch.ones(3, 3)}))
    with pytest.raises(HetLoRAError, match="exceeds the bound"):
        server.check(Reply("a", 1, weights={"w": torch.ones(3, 3)}), max_norm=2.0)


@pytest.mark.parametrize("method", ["hetlora", "homlora", "recon_svd", "flora"])
def test_reset_round_leaves_the_state_unchanged(method):
    server = lora_servers()[method]
    before = {n: (b.clone(), a.clone()) for n, (b, a) in (server.global_factors() or {}).items()}
    server.add(Reply("a", 10, factors=factors(4, 1), rank=4))
    server.reset_round()
    with pytest.raises(HetLoRAError, match="no client updates"):
        server.finish()
    for n, (b, a) in (server.global_factors() or {}).items():
        assert torch.equal(b, before[n][0]) and torch.equal(a, before[n][1])
    assert server.round == 0
    # the next round works as usual
    server.add(
        Reply("b", 10, factors=truncate(factors(8, 2), server.ranks["b"]), rank=server.ranks["b"])
    )
    server.finish()
    assert server.round == 1


def test_lora_check_boundaries():
    """Rank 1 is a valid rank; a norm exactly at the bound passes; 0 disables the bound; a bound
    below 1 is enforced; the norm is sqrt(sum_m ||B_m A_m||_F^2)."""
    from hetlora.lora import update_norm
    from hetlora.methods.validate import check_lora_update

    one = Reply("a", 1, factors=factors(1, 2), rank=1)
    check_lora_update(one, SHAPES, 4)
    with pytest.raises(HetLoRAError, match="rank 0 outside"):
        check_lora_update(Reply("a", 1, factors=factors(1, 2), rank=0), SHAPES, 4)
    check_lora_update(Reply("a", 1, factors=factors(4, 2), rank=4), SHAPES, 4, 0.0)
    small = {n: (b * 0.01, a * 0.01) for n, (b, a) in factors(2, 3).items()}
    norm = update_norm(small)
    assert 0 < norm < 1
    check_lora_update(Reply("a", 1, factors=small, rank=2), SHAPES, 4, norm * (1 + 1e-9))
    with pytest.raises(HetLoRAError, match="exceeds the bound"):
        check_lora_update(Reply("a", 1, factors=small, rank=2), SHAPES, 4, norm * 0.999)
    with pytest.raises(HetLoRAError, match="not a \\(B, A\\) pair"):
        bad = {**factors(2, 1), "l0.v": (torch.ones(6, 2),)}
        check_lora_update(Reply("a", 1, factors=bad, rank=2), SHAPES, 4)


def test_full_check_bounds_the_norm_of_the_change():
    from hetlora.methods.validate import check_full_update

    reference = {"w": 10 * torch.ones(2, 2), "b": torch.ones(3)}
    moved = {"w": 10 * torch.ones(2, 2) + 0.125, "b": torch.ones(3) + 0.125}  # exact in fp32
    change = 0.125 * 7**0.5  # ||W_k - W||_F
    check_full_update(Reply("a", 1, weights=moved), reference, change * (1 + 1e-6))
    check_full_update(Reply("a", 1, weights=moved), reference, 0.0)  # 0: no bound
    with pytest.raises(HetLoRAError, match="exceeds the bound"):
        check_full_update(Reply("a", 1, weights=moved), reference, change * 0.999)
    far = {"w": 10 * torch.ones(2, 2) - 0.5, "b": torch.ones(3)}  # ||change|| = 1.0
    check_full_update(Reply("a", 1, weights=far), reference, 1.0 + 1e-9)
    with pytest.raises(HetLoRAError, match="exceeds the bound"):
        check_full_update(Reply("a", 1, weights=far), reference, 0.99)

"""client.py pinned step by step against a plain reference loop written here (issue 14).

Written for the mutation-testing pass over client.py (docs/testing.md): every quantity the
client computes or reports is compared with an independent restatement of the method, on the
tiny random Llama and hand-made batches, so that a changed operator, constant or argument in
client.py changes a compared number. The reference is HetLoRA's local step as the paper states
it (Cho et al. 2024, Sec. 3.2): AdamW on loss + lambda * sum_m ||B_m tail||_F ||A_m tail||_F,
the loss being the mean NLL over labelled tokens, gradients clipped to ``max_grad_norm``, then
the pruning rule once.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest
import torch

from hetlora import adapters
from hetlora.client import TrainSettings, run_task, train_client, train_full
from hetlora.data.batching import IGNORE
from hetlora.errors import HetLoRAError
from hetlora.evaluate import response_nll
from hetlora.hardware import compile_layers, compile_seconds, use_cpu_attention
from hetlora.lora import rank_of, tail_norm, tail_start, truncate
from hetlora.methods.base import ClientTask
from hetlora.models import load_base_model

TARGETS = ["q_proj", "v_proj"]
CPU = torch.device("cpu")
EXACT = dict(rtol=1e-6, atol=1e-7)  # the same ops in the same order: equal up to round-off


def _batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of 3 rows with response labels; batch 1 has exactly one labelled
    token, batch 2 none at all (a fully truncated response), the others several."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        lengths = [9, 7, 5] if i % 2 == 0 else [8, 8, 6]
        ids = torch.randint(1, 512, (3, 9), generator=g)
        mask = torch.zeros(3, 9, dtype=torch.long)
        labels = torch.full((3, 9), IGNORE)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
            ids[row, n:] = 0
            if i == 1:
                labels[row, n - 1 :] = ids[row, n - 1 :] if row == 0 else IGNORE
            elif i != 2:
                labels[row, n - 3 : n] = ids[row, n - 3 : n]
        labels[mask == 0] = IGNORE
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert [int((b["labels"][:, 1:] != IGNORE).sum()) for b in out[:3]] == [9, 1, 0][: len(out)]
    return out


@pytest.fixture()
def model(tiny_model):
    base = load_base_model(str(tiny_model))
    torch.manual_seed(0)
    return adapters.wrap(base.model, 8, 2.0, TARGETS)


def _received(model, rank: int, seed: int = 3, b_scale: float = 0.3):
    """The global factors cut to ``rank``, with a random (non-zero) B so the tail is non-zero."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: (b_scale * torch.randn(b.shape, generator=g), a.clone())
        for n, (b, a) in truncate(adapters.read_factors(model), rank).items()
    }


def _reference(model, params, batches, s: TrainSettings, regulariser=None):
    """The local loop as the method states it; returns per-step losses, tokens, targets."""
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    losses, tokens, targets = [], 0, 0
    for batch in batches[: s.local_steps]:
        nll, n = response_nll(model, batch)
        loss = nll / n if n else nll  # no labelled token: a zero loss, not 0 / 0
        objective = loss if regulariser is None else loss + s.lambda_ * regulariser()
        optimizer.zero_grad()
        objective.backward()
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        targets += n
    return losses, tokens, targets


def _reference_client(model, received, batches, s: TrainSettings):
    """Train a fresh client adapter at the received rank; returns (factors, losses, tokens,
    targets), the adapter removed again."""
    rank = rank_of(received)
    live = adapters.attach(model, received, rank, s.lora_scale, TARGETS)
    params = [p for pair in live.values() for p in pair]
    reg = (lambda: tail_norm(live, s.gamma)) if s.lambda_ > 0 else None
    model.train()
    losses, tokens, targets = _reference(model, params, batches, s, reg)
    trained = adapters.read_factors(model, adapters.CLIENT)
    adapters.detach(model)
    return trained, losses, tokens, targets


def _assert_factors(got, want, **tol):
    assert set(got) == set(want)
    for name, (b, a) in want.items():
        assert got[name][0].shape == b.shape and got[name][1].shape == a.shape
        torch.testing.assert_close(got[name][0], b, **(tol or EXACT))
        torch.testing.assert_close(got[name][1], a, **(tol or EXACT))


SETTINGS = TrainSettings(
    local_steps=5,
    lr=0.02,
    weight_decay=0.3,
    max_grad_norm=0.05,  # below the gradients' norm: every step is clipped
    lambda_=2.0,
    gamma=0.5,
    r_min=2,
    pruning=True,
    lora_scale=2.0,
)


def test_client_step_equals_the_reference_loop_and_reports_what_it_did(model):
    received = _received(model, 6)
    global_before = adapters.read_factors(model)
    batches = _batches(5)
    want, want_losses, want_tokens, want_targets = _reference_client(
        model, received, batches, SETTINGS
    )
    steps, start = [], time.perf_counter()
    result = train_client(
        model,
        received,
        iter(batches),
        SETTINGS,
        TARGETS,
        CPU,
        on_step=lambda step, loss: steps.append((step, loss, time.perf_counter())),
    )
    wall = time.perf_counter() - start
    assert [s for s, _, _ in steps] == [1, 2, 3, 4, 5]
    torch.testing.assert_close([loss for _, loss, _ in steps], want_losses, **EXACT)
    assert want_losses[2] == 0.0  # the batch without labelled tokens: loss 0, not nan
    assert result.train_loss == pytest.approx(sum(want_losses) / 5, rel=1e-6)
    assert result.stats.steps == 5
    assert result.stats.tokens == want_tokens == 3 * (9 + 7 + 5) + 2 * (8 + 8 + 6)
    assert result.stats.target_tokens == want_targets == 9 + 1 + 0 + 9 + 9
    # the tail as received and as trained, and the pruning rule on them: 6 -> floor(0.5 * 6)
    assert result.stats.tail_before == pytest.approx(float(tail_norm(received, 0.5)), rel=1e-6)
    assert result.stats.tail_after == pytest.approx(
        float(tail_norm(truncate(want, 6), 0.5)), rel=1e-5
    )
    assert result.stats.tail_after < result.stats.tail_before
    assert result.stats.rank_received == 6 and result.rank == 3
    _assert_factors(result.factors, truncate(want, 3))
    assert all(b.dtype == a.dtype == torch.float32 for b, a in result.factors.values())
    # the steps' own time: inside the wall time up to the last step; all inside the call's
    assert 0.0 < result.stats.step_seconds <= steps[-1][2] - start
    assert result.stats.step_seconds <= result.stats.seconds <= wall
    assert result.stats.compile_seconds == 0.0
    # the client adapter is gone, the global one active, unchanged and frozen
    assert set(model.peft_config) == {adapters.GLOBAL}
    assert model.active_adapter == adapters.GLOBAL
    _assert_factors(adapters.read_factors(model), global_before, rtol=0.0, atol=0.0)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "change",
    [
        dict(max_grad_norm=0.0, weight_decay=0.0),  # no clipping at all
        dict(max_grad_norm=1.0, lambda_=0.0, lr=0.05),  # no regulariser
        dict(lambda_=0.5, gamma=0.7, lora_scale=3.0, local_steps=2),
    ],
)
def test_client_step_follows_each_setting(model, change):
    settings = replace(SETTINGS, pruning=False, **change)
    received = _received(model, 5)
    batches = _batches(settings.local_steps, seed=1)
    want, losses, _, _ = _reference_client(model, received, batches, settings)
    result = train_client(model, received, iter(batches), settings, TARGETS, CPU)
    assert result.rank == 5 and result.stats.steps == settings.local_steps
    assert result.train_loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    _assert_factors(result.factors, want)


def test_pruning_rule_keeps_r_min_and_never_prunes_a_tail_that_grew(model):
    batches = _batches(3)
    # r_min above floor(gamma r): the rank stops at r_min
    settings = replace(SETTINGS, local_steps=3, r_min=4)
    result = train_client(model, _received(model, 6), iter(batches), settings, TARGETS, CPU)
    assert result.stats.tail_after < result.stats.tail_before and result.rank == 4
    assert {rank_of({n: f}) for n, f in result.factors.items()} == {4}
    # B received as zero: the tail can only grow, so the rank is kept
    zero_b = {n: (torch.zeros_like(b), a) for n, (b, a) in _received(model, 6).items()}
    result = train_client(model, zero_b, iter(batches), settings, TARGETS, CPU)
    assert result.stats.tail_before == 0.0 and result.stats.tail_after > 0.0 and result.rank == 6
    # pruning off: the tail shrinks but the rank stays
    settings = replace(SETTINGS, local_steps=3, pruning=False)
    result = train_client(model, _received(model, 6), iter(batches), settings, TARGETS, CPU)
    assert result.stats.tail_after < result.stats.tail_before and result.rank == 6
    assert result.stats.tail_before == pytest.approx(float(tail_norm(_received(model, 6), 0.5)))


def test_no_steps_returns_the_received_factors(model):
    received = _received(model, 4)
    settings = replace(SETTINGS, local_steps=0)
    result = train_client(model, received, iter(()), settings, TARGETS, CPU)
    assert result.stats.steps == 0 and result.stats.tokens == 0 and result.stats.target_tokens == 0
    assert math.isnan(result.train_loss)
    assert (
        result.stats.tail_after == result.stats.tail_before and result.rank == 4
    )  # nothing shrank
    _assert_factors(result.factors, received, rtol=0.0, atol=0.0)


def test_fixed_shape_step_equals_the_reference_and_keeps_positions_above_r_k_zero(model):
    settings = replace(SETTINGS, fixed_rank=8)
    received = _received(model, 5)
    batches = _batches(5)
    want, want_losses, _, _ = _reference_client(model, received, batches, settings)
    above, losses = [], []

    def on_step(step, loss):
        losses.append(loss)
        live = adapters.live_factors(model, adapters.FIXED)
        above.append(sum(float(b[:, 5:].abs().sum() + a[5:].abs().sum()) for b, a in live.values()))

    result = train_client(model, received, iter(batches), settings, TARGETS, CPU, on_step)
    tol = dict(rtol=1e-4, atol=1e-5)  # sums over more (zero) terms: fp32 round-off only
    torch.testing.assert_close(losses, want_losses, **tol)
    assert above == [0.0] * 5
    assert result.stats.rank_received == 5 and result.rank == tail_start(5, 0.5) == 2
    _assert_factors(result.factors, truncate(want, 2), **tol)
    assert result.stats.tail_after == pytest.approx(
        float(tail_norm(truncate(want, 5), 0.5)), rel=1e-4
    )
    # the fixed adapter stays, frozen, with the global one active again
    assert adapters.FIXED in model.peft_config and adapters.CLIENT not in model.peft_config
    assert model.active_adapter == adapters.GLOBAL
    assert not any(p.requires_grad for p in model.parameters())
    # a client at exactly the fixed rank fits; one above it does not
    at_max = train_client(model, _received(model, 8), iter(batches), settings, TARGETS, CPU)
    assert at_max.stats.rank_received == 8
    with pytest.raises(HetLoRAError, match="a client of rank 9 does not fit the fixed rank 8"):
        big = {
            n: (torch.ones(b.shape[0], 9), torch.ones(9, a.shape[1])) for n, (b, a) in want.items()
        }
        train_client(model, big, iter(batches), settings, TARGETS, CPU)


def test_full_fine_tuning_equals_the_reference_loop(model):
    settings = replace(SETTINGS, lambda_=0.0, local_steps=3)
    params = adapters.base_parameters(model)
    g = torch.Generator().manual_seed(5)
    weights = {n: p.detach() + 0.01 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    batches = _batches(3)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
        p_list = list(params.values())
        for p in p_list:
            p.requires_grad_(True)
    model.train()
    with model.disable_adapter():
        want_losses, want_tokens, want_targets = _reference(model, p_list, batches, settings)
    want = {n: p.detach().clone() for n, p in params.items()}
    for p in p_list:
        p.requires_grad_(False)
    with torch.no_grad():  # scramble the model's weights: train_full must load ``weights``
        for p in p_list:
            p.mul_(0.5)
    losses = []
    task = ClientTask("c7", "full", weights=weights)
    start = time.perf_counter()
    update = result = run_task(
        model, task, iter(batches), settings, TARGETS, CPU, 11, lambda s, loss: losses.append(loss)
    )
    wall = time.perf_counter() - start
    torch.testing.assert_close(losses, want_losses, **EXACT)
    assert set(update.weights) == set(want)
    for n, w in want.items():
        got = update.weights[n]
        assert got.dtype == torch.float32 and got.device.type == "cpu" and not got.requires_grad
        torch.testing.assert_close(got, w, **EXACT)
        assert got.data_ptr() != params[n].data_ptr()  # a copy, not the live weight
    assert update.client_id == "c7" and update.num_examples == 11 and update.factors is None
    assert update.train_loss == result.train_loss == pytest.approx(sum(want_losses) / 3, rel=1e-6)
    assert (result.rank, result.stats.rank_received, result.factors) == (0, 0, None)
    assert (result.stats.tail_before, result.stats.tail_after) == (0.0, 0.0)
    stats = result.stats
    assert (stats.steps, stats.tokens, stats.target_tokens) == (3, want_tokens, want_targets)
    assert 0.0 < stats.step_seconds <= stats.seconds <= wall and stats.compile_seconds == 0.0
    assert not any(p.requires_grad for p in params.values())  # the base is frozen again
    # the LoRA adapter stayed on and untouched (B = 0), and no step: nan loss
    assert all(torch.count_nonzero(b) == 0 for b, _ in adapters.read_factors(model).values())
    none = train_full(model, weights, iter(()), replace(settings, local_steps=0), CPU)
    assert none.stats.steps == 0 and math.isnan(none.train_loss)


def replace_steps(settings: TrainSettings, steps: int) -> TrainSettings:
    return replace(settings, local_steps=steps)


def test_run_task_passes_the_task_options_and_builds_the_reply(model):
    received = _received(model, 6)
    batches = _batches(3)
    settings = replace(SETTINGS, local_steps=3)
    # a task that neither regularises nor prunes trains like lambda = 0, pruning off
    plain = replace(settings, lambda_=0.0)
    want, losses, _, _ = _reference_client(model, received, batches, plain)
    task = ClientTask("c3", "lora", rank=6, factors=received, pruning=False, regularise=False)
    update = result = run_task(model, task, iter(batches), settings, TARGETS, CPU, 17)
    assert result.rank == update.rank == 6 and result.stats.tail_after > 0
    _assert_factors(update.factors, want)
    assert update.factors is result.factors
    assert update.client_id == "c3" and update.num_examples == 17 and update.weights is None
    assert update.train_loss == result.train_loss == pytest.approx(sum(losses) / 3, rel=1e-6)
    # a task that does both: the settings' lambda and the pruning rule apply
    want, _, _, _ = _reference_client(model, received, batches, settings)
    task = ClientTask("c4", "lora", rank=6, factors=received, pruning=True, regularise=True)
    update = result = run_task(model, task, iter(batches), settings, TARGETS, CPU, 5)
    assert update.rank == result.rank == 3
    _assert_factors(update.factors, truncate(want, 3))
    # the task regularises but may not prune: the tail shrinks, the rank stays
    task = ClientTask("c6", "lora", rank=6, factors=received, pruning=False, regularise=True)
    update = result = run_task(model, task, iter(batches), settings, TARGETS, CPU, 5)
    assert result.stats.tail_after < result.stats.tail_before and update.rank == result.rank == 6
    _assert_factors(update.factors, want)
    # the server may allow pruning, the settings not: no pruning
    off = replace(settings, pruning=False)
    task = ClientTask("c5", "lora", rank=6, factors=received, pruning=True, regularise=True)
    update = run_task(model, task, iter(batches), off, TARGETS, CPU, 5)
    assert update.rank == 6


def test_run_task_refuses_a_task_without_its_payload(model):
    with pytest.raises(HetLoRAError, match="^task for c1 has no weights$"):
        run_task(model, ClientTask("c1", "full"), iter(()), SETTINGS, TARGETS, CPU, 1)
    with pytest.raises(HetLoRAError, match="^task for c2 has no factors$"):
        run_task(model, ClientTask("c2", "lora", rank=4), iter(()), SETTINGS, TARGETS, CPU, 1)


def test_step_and_compile_seconds_are_counted_apart(model):
    """The reported times: compiling (torch.compile with Dynamo's eager backend here) counted in
    ``compile_seconds`` only, every step's own time summed in ``step_seconds``, both inside
    ``seconds``; a decoder hook that sleeps makes each step measurably long."""
    torch._dynamo.reset()
    pause = 0.15
    use_cpu_attention(model.get_base_model(), CPU)
    # Dynamo's capture is what is timed apart; tests/test_fixed_step.py covers aot_eager
    assert compile_layers(model.get_base_model(), backend="eager") == 2
    hook = (
        model.get_base_model().get_decoder().register_forward_pre_hook(lambda *_: time.sleep(pause))
    )
    marks = []
    settings = replace(SETTINGS, fixed_rank=8, local_steps=4)
    received, batches = _received(model, 6), iter(_batches(4))
    try:
        before = compile_seconds()
        start = time.perf_counter()
        result = train_client(
            model,
            received,
            batches,
            settings,
            TARGETS,
            CPU,
            lambda *_: marks.append(time.perf_counter()),
        )
        compiled = compile_seconds() - before
        assert result.stats.compile_seconds == pytest.approx(compiled, rel=1e-9, abs=1e-9)
        assert compiled > 0.0
        # four steps of at least ``pause`` each, and no more than the wall time up to the last
        # step minus the compiling
        assert 4 * pause <= result.stats.step_seconds
        assert result.stats.step_seconds + result.stats.compile_seconds <= marks[-1] - start
        assert result.stats.step_seconds + result.stats.compile_seconds <= result.stats.seconds
        # full fine-tuning on the compiled layers (a new graph: the base weights train)
        before = compile_seconds()
        weights = {n: p.detach().clone() for n, p in adapters.base_parameters(model).items()}
        full = train_full(
            model, weights, iter(_batches(2)), replace(settings, local_steps=2), CPU
        ).stats
        assert full.compile_seconds == pytest.approx(compile_seconds() - before, rel=1e-9, abs=1e-9)
        assert full.compile_seconds > 0.0 and 2 * pause <= full.step_seconds
        assert full.step_seconds + full.compile_seconds <= full.seconds
    finally:
        hook.remove()
        torch._dynamo.reset()


def _first_loss(model, batch, bf16: bool) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        nll, n = response_nll(model, batch)
    return float(nll / n)


def test_run_task_trains_under_bf16_autocast_on_its_device(model):
    """precision = "bf16": both kinds of task run their steps under bf16 autocast on the device
    they are given (the first step's loss is the received model's loss under autocast)."""
    batch = _batches(1)[0]
    settings = replace(SETTINGS, local_steps=1, bf16=True)
    received = _received(model, 4)
    adapters.attach(model, received, 4, 2.0, TARGETS)
    want, fp32 = _first_loss(model, batch, True), _first_loss(model, batch, False)
    adapters.detach(model)
    assert abs(want - fp32) > 1e-4  # autocast changes the value: it is visible
    losses = []
    task = ClientTask("c1", "lora", rank=4, factors=received, pruning=True, regularise=True)
    run_task(model, task, iter([batch]), settings, TARGETS, CPU, 1, lambda s, x: losses.append(x))
    assert losses == [pytest.approx(want, rel=1e-6)]
    weights = {n: p.detach().clone() for n, p in adapters.base_parameters(model).items()}
    with model.disable_adapter():
        want = _first_loss(model, batch, True)
    losses.clear()
    task = ClientTask("c2", "full", weights=weights)
    run_task(model, task, iter([batch]), settings, TARGETS, CPU, 1, lambda s, x: losses.append(x))
    assert losses == [pytest.approx(want, rel=1e-6)]

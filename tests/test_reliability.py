"""Checkpoints and exact resume after SIGKILL; untrusted replies inside real rounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hetlora.cli import app
from hetlora.config import make_config
from hetlora.errors import HetLoRAError
from hetlora.runtime import checkpoint, local, workspace

SETTINGS = [
    "rounds=5",
    "clients_per_round=3",
    "local_steps=6",
    "batch_size=4",
    "lr=0.01",
    "eval_examples=16",
    "rouge_examples=1",
    "max_new_tokens=4",
    "precision='fp32'",
    "min_examples=120",
    "r_min=2",
    "r_max=8",
    "lambda_=1.0",
    "gamma=0.8",
]
VOLATILE = {"wall_s", "elapsed_s"}


def cli_args(model: Path, out: Path, *extra: str) -> list[str]:
    args = ["run", "--out", str(out)]
    for item in [f"model='{model}'", *SETTINGS, *extra]:
        args += ["--set", item]
    return args


def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HETLORA_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def rows(out: Path) -> list[dict]:
    found = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in found]


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    """The run's global model: the adapter, or the merged model (FLoRA, full fine-tuning)."""
    adapter = out / "adapter" / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else out / "model" / "model.safetensors")


def assert_same_runs(a: Path, b: Path) -> None:
    ra, rb = rows(a), rows(b)
    assert [r["round"] for r in ra] == [r["round"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x.get("client_ranks") == y.get("client_ranks")
        if "weights" in x:
            assert y["weights"] == pytest.approx(x["weights"], rel=1e-5)
        for key in ("train_loss", "test_ppl"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5)
    ta, tb = final_tensors(a), final_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["tier_ppl"] == pytest.approx(sa["tier_ppl"], rel=1e-5)
    assert sb["final_ppl"] == pytest.approx(sa["final_ppl"], rel=1e-5)


# Every method, 4 short rounds, stopped once round 2 is checkpointed, then resumed. FLoRA, FedEx-LoRA
# and full fine-tuning change the base itself, so their resume rebuilds it from the checkpointed server
# state (and the checkpoint's model fingerprint must be the pristine base's, not the changed
# one's). One real SIGKILL of a `hetlora run` process (hetlora) and a resume in a fresh process;
# every method stopped and resumed in-process, each resume in a fresh LocalRun.
RESUME_METHODS = {
    "hetlora": [],
    "homlora": ["rank=4"],
    "recon_svd": [],
    "hlora": [],
    "rblora": [],
    "fedex": [],
    "flora": [],
    "full_ft": ["lr=0.001"],
    "ffa": [],
}
# Under differential privacy too: the accountant and the server's seeded noise go on exactly.
DP = ["dp_clip_norm=0.05", "dp_noise_multiplier=1.0", "dp_noise_seed=9"]
RESUME_CASES = {
    **{m: (m, extra) for m, extra in RESUME_METHODS.items()},
    "hetlora-dp": ("hetlora", ["pruning=false", "aggregation='uniform'", *DP]),
    "ffa-dp": ("ffa", DP),
}
HETLORA_ONLY = ("lambda_", "gamma")  # the self-pruning keys: an error under another method
LORA_ONLY = ("r_min", "r_max")  # an error under full_ft


def resume_args(case: str) -> list[str]:
    method, extra = RESUME_CASES[case]
    pruning = method == "hetlora" and "pruning=false" not in extra
    unused = (() if pruning else HETLORA_ONLY) + (LORA_ONLY if method == "full_ft" else ())
    shared = [s for s in SETTINGS if not s.startswith(unused)]
    short = ["rounds=4", "local_steps=3", "eval_examples=8", "rouge_examples=0"]
    return [*shared, *short, f"method='{method}'", *extra]


class Stop(BaseException):
    """Ends a run as a crash would: not an Exception, so nothing on the way catches it."""


@pytest.mark.parametrize("method", list(RESUME_CASES))
def test_stop_then_resume_matches_an_uninterrupted_run(method, tiny_model, tmp_path):
    cfg = make_config({"model": str(tiny_model), **_values(resume_args(method))})
    straight, out = tmp_path / "straight", tmp_path / "stopped"
    local.LocalRun(cfg).run(straight)

    def stop_after_round_2(event: dict) -> None:
        if event["event"] == "round_start" and event["round"] == 3:
            raise Stop  # round 2 is recorded and checkpointed

    with pytest.raises(Stop):
        local.LocalRun(cfg, progress=stop_after_round_2).run(out)
    assert not (out / "summary.json").exists() and len(rows(out)) == 3
    local.LocalRun(cfg).run(out, resume=True)
    assert_same_runs(straight, out)
    if method.endswith("-dp"):
        ra, rb = rows(straight), rows(out)
        assert [r["epsilon"] for r in rb] == [r["epsilon"] for r in ra]
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, out))
        assert sb["epsilon"] == sa["epsilon"] > 0 and sb["delta"] == sa["delta"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model, tmp_path):
    args = resume_args("hetlora")
    straight = tmp_path / "straight"
    local.LocalRun(make_config({"model": str(tiny_model), **_values(args)})).run(straight)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hetlora.cli", "run", "--out", str(out)]
    for item in [f"model='{tiny_model}'", *args]:
        cmd += ["--set", item]
    proc = subprocess.Popen(
        cmd, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        # wait until round 2 is recorded, then kill during a later round
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "summary.json").exists()
    done = len(rows(out)) - 1
    assert 2 <= done < 4

    result = subprocess.run(
        [sys.executable, "-m", "hetlora.cli", "run", "--resume", str(out)],
        env=env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "resuming after round" in result.stdout
    assert_same_runs(straight, out)


def test_resume_refuses_mismatches_and_corruption(tiny_model, tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(app, cli_args(tiny_model, out, "rounds=2")).exit_code == 0

    def resume(*extra):
        args = ["run", "--resume", str(out), *extra]
        return CliRunner().invoke(app, args)

    other_cfg = resume("--set", "lr=0.5")
    assert other_cfg.exit_code == 2 and "another config (differs in: lr" in other_cfg.stderr
    from tiny import make_tiny_model

    other_model = make_tiny_model(tmp_path / "other", seed=7)
    moved = resume("--config", str(out / "config.toml"), "--set", f"model='{other_model}'")
    assert moved.exit_code == 2 and "differs in: model" in moved.stderr
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    corrupt = resume()
    assert corrupt.exit_code == 2 and "corrupt" in corrupt.stderr
    assert len(corrupt.stderr.strip().splitlines()) == 1
    missing = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not a run directory" in missing.stderr


def test_resume_refuses_other_model_weights(tiny_model, tmp_path):
    from tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "m", seed=1)
    out = tmp_path / "run"
    assert CliRunner().invoke(app, cli_args(model, out, "rounds=2")).exit_code == 0
    make_tiny_model(model, seed=2)  # same path and config, other weights
    result = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 2 and "another base model" in result.stderr


CORRUPTIONS = {
    "non-finite": lambda f: {n: (b * float("nan"), a) for n, (b, a) in f.items()},
    "shapes": lambda f: {n: (b[:-1], a) for n, (b, a) in f.items()},
    "outside": lambda f: {
        n: (torch.cat([b, b[:, :1]], 1), torch.cat([a, a[:1]], 0)) for n, (b, a) in f.items()
    },
    "exceeds the bound": lambda f: {n: (b * 1e4, a * 1e4) for n, (b, a) in f.items()},
}


@pytest.mark.parametrize("reason", sorted(CORRUPTIONS))
def test_bad_reply_is_left_out_and_the_round_goes_on(reason, tiny_model, tmp_path, monkeypatch):
    real = workspace.run_task
    victims: list[str] = []

    def faulty(*args, **kwargs):
        update = real(*args, **kwargs)
        if not victims:  # the first client of the run misbehaves
            victims.append(update.client_id)
            update.factors = CORRUPTIONS[reason](update.factors)
            update.rank = next(iter(update.factors.values()))[0].shape[1]
        return update

    monkeypatch.setattr(workspace, "run_task", faulty)
    cfg = make_config(
        {"model": str(tiny_model), **_values(SETTINGS), "rounds": 1, "max_update_norm": 1e3}
    )
    sim = local.LocalRun(cfg)
    before = {n: (b.clone(), a.clone()) for n, (b, a) in sim.server.global_factors().items()}
    row = sim.run_round()
    assert list(row["rejected"]) == victims and reason in row["rejected"][victims[0]]
    assert not row["skipped"] and set(row["weights"]) == set(row["client_ranks"]) - set(victims)
    assert row["client_ranks"][victims[0]] == row["ranks_received"][victims[0]]  # rank untouched
    after = sim.server.global_factors()
    assert any(not torch.equal(after[n][1], before[n][1]) for n in before)  # the others counted
    assert all(torch.isfinite(b).all() and torch.isfinite(a).all() for b, a in after.values())


def test_round_below_min_clients_is_skipped_and_state_unchanged(tiny_model, monkeypatch):
    real = workspace.run_task

    def faulty(*args, **kwargs):
        update = real(*args, **kwargs)
        update.factors = {n: (b * float("nan"), a) for n, (b, a) in update.factors.items()}
        return update

    monkeypatch.setattr(workspace, "run_task", faulty)
    cfg = make_config(
        {"model": str(tiny_model), **_values(SETTINGS), "rounds": 2, "min_clients": 2}
    )
    sim = local.LocalRun(cfg)
    before = {n: (b.clone(), a.clone()) for n, (b, a) in sim.server.global_factors().items()}
    ranks = dict(sim.server.ranks)
    row = sim.run_round()
    assert row["skipped"] and len(row["rejected"]) == 3 and row["weights"] == {}
    for n, (b, a) in sim.server.global_factors().items():
        assert torch.equal(b, before[n][0]) and torch.equal(a, before[n][1])
    assert sim.server.ranks == ranks and sim.server.round == 0 and sim.round == 1
    assert sim.sample_clients(2) != sim.sample_clients(1)  # the next round moves on


def _values(items: list[str]) -> dict:
    import tomllib

    return {k: tomllib.loads(f"v = {v}")["v"] for k, v in (i.split("=", 1) for i in items)}


def _stop_after_round_2(event: dict) -> None:
    if event["event"] == "round_start" and event["round"] == 3:
        raise Stop  # round 2 is recorded and checkpointed


@pytest.mark.parametrize(("before", "after"), [(False, True), (True, False)])
def test_resume_where_auto_precision_resolves_otherwise(
    before, after, tiny_model, tmp_path, monkeypatch
):
    # precision = "auto" on a host without bf16, continued on one with it (and the other way
    # round): the base is fingerprinted as loaded, before the bf16 cast of its linears.
    args = [a for a in resume_args("hetlora") if not a.startswith("precision")]
    cfg = make_config({"model": str(tiny_model), **_values(args)})
    assert cfg.precision == "auto"
    out = tmp_path / "run"
    monkeypatch.setattr(workspace, "resolve_bf16", lambda choice, device: before)
    with pytest.raises(Stop):
        local.LocalRun(cfg, progress=_stop_after_round_2).run(out)
    monkeypatch.setattr(workspace, "resolve_bf16", lambda choice, device: after)
    summary = local.LocalRun(cfg).run(out, resume=True)
    assert summary["bf16"] is after
    assert [r["round"] for r in rows(out)] == [0, 1, 2, 3, 4]


def test_a_format_1_checkpoint_is_compared_with_the_prepared_base():
    config = make_config({}).to_dict()
    old = {"version": 1, "config": config, "model": "prepared-fp", "data": "d"}
    checkpoint.check_matches(old, config, "loaded-fp", "d", lambda: "prepared-fp")
    with pytest.raises(HetLoRAError, match="another base model"):
        checkpoint.check_matches(old, config, "loaded-fp", "d", lambda: "other-fp")
    new = {**old, "version": 2}
    with pytest.raises(HetLoRAError, match="another base model"):
        checkpoint.check_matches(new, config, "loaded-fp", "d", lambda: "prepared-fp")
    checkpoint.check_matches({**new, "model": "loaded-fp"}, config, "loaded-fp", "d")


def test_a_relative_model_path_is_stored_absolute(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    out = tmp_path / "run"
    args = cli_args(Path(tiny_model.name), out, "rounds=1", "rouge_examples=0")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert tomllib.loads((out / "config.toml").read_text())["model"] == str(tiny_model)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(app, ["evaluate", str(out)])
    assert result.exit_code == 0, result.output

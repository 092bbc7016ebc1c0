"""End to end on a tiny random Llama: client training through PEFT, full runs, the saved adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hetlora import adapters
from hetlora.cli import app
from hetlora.client import TrainSettings, train_client
from hetlora.config import make_config
from hetlora.data import load_clients
from hetlora.data.batching import batch_stream, tokenize_all
from hetlora.evaluate import perplexity
from hetlora.lora import rank_of, tail_start, truncate
from hetlora.models import load_base_model
from hetlora.runtime.local import LocalRun

FAST = [
    "rounds=3",
    "clients_per_round=3",
    "local_steps=3",
    "batch_size=4",
    "lr=0.01",
    "eval_examples=32",
    "rouge_examples=2",
    "max_new_tokens=8",
    "precision='fp32'",
    "min_examples=60",
]


def sets(model: Path, extra: list[str] = ()) -> list[str]:
    args = []
    for item in [f"model='{model}'", *FAST, *extra]:
        args += ["--set", item]
    return args


@pytest.fixture()
def peft_model(tiny_model):
    base = load_base_model(str(tiny_model))
    torch.manual_seed(0)
    return adapters.wrap(base.model, 8, 2.0, ["q_proj", "v_proj"]), base.tokenizer


def client_batches(tokenizer, seed=0):
    clients = load_clients("shakespeare", min_examples=100)
    items = tokenize_all(tokenizer, clients["hamlet/HAMLET"][:40], 64)
    return batch_stream(items, 4, np.random.default_rng(seed), tokenizer.pad_token_id)


def test_regulariser_carries_gradient_through_peft(peft_model):
    from hetlora.lora import tail_norm

    model, _ = peft_model
    start = adapters.read_factors(model)
    for b, _ in start.values():
        b.normal_()
    live = adapters.attach(model, truncate(start, 6), 6, 2.0, ["q_proj", "v_proj"])
    tail_norm(live, 0.5).backward()
    g = tail_start(6, 0.5)
    for b, a in live.values():
        assert torch.count_nonzero(b.grad[:, g:]) > 0 and torch.count_nonzero(a.grad[g:]) > 0
        assert torch.count_nonzero(b.grad[:, :g]) == 0 and torch.count_nonzero(a.grad[:g]) == 0
    adapters.detach(model)


def test_client_training_prunes_and_leaves_the_global_adapter_alone(peft_model):
    model, tok = peft_model
    global_before = adapters.read_factors(model)
    received = truncate(global_before, 6)
    for b, _ in received.values():  # a non-zero tail for the regulariser to shrink
        b.normal_(std=0.5)
    settings = TrainSettings(
        local_steps=5, lr=0.05, lambda_=5.0, gamma=0.5, r_min=2, lora_scale=2.0
    )
    result = train_client(
        model, received, client_batches(tok), settings, ["q_proj", "v_proj"], torch.device("cpu")
    )
    assert result.stats.tail_after < result.stats.tail_before
    assert result.stats.rank_received == 6 and result.rank == 3 and rank_of(result.factors) == 3
    assert result.stats.steps == 5 and result.stats.tokens > 0 and np.isfinite(result.train_loss)
    assert set(model.peft_config) == {adapters.GLOBAL}
    after = adapters.read_factors(model)
    for name in global_before:
        assert torch.equal(after[name][0], global_before[name][0])
    assert not any(p.requires_grad for p in model.parameters())


def test_client_without_regulariser_keeps_rank(peft_model):
    model, tok = peft_model
    received = truncate(adapters.read_factors(model), 4)
    settings = TrainSettings(local_steps=2, lr=0.01, lambda_=0.0, pruning=False)
    result = train_client(
        model, received, client_batches(tok), settings, ["q_proj", "v_proj"], torch.device("cpu")
    )
    assert result.rank == 4
    assert any(torch.count_nonzero(b) > 0 for b, _ in result.factors.values())  # B moved off 0


def test_cli_run_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", "--out", str(out), *sets(tiny_model, ["lambda_=1.0", "gamma=0.9"])]
    )
    assert result.exit_code == 0, result.output
    for name in (
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "samples.jsonl",
        "adapter/adapter_config.json",
    ):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert {
            "train_loss",
            "test_loss",
            "test_ppl",
            "client_ranks",
            "bytes_up",
            "bytes_down",
            "wall_s",
        } <= set(r)
        assert len(r["client_ranks"]) == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        for c, rank in r["client_ranks"].items():
            assert rank <= r["ranks_received"][c]
    assert rows[-1]["test_ppl"] < rows[0]["test_ppl"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_ppl"] == pytest.approx(rows[-1]["test_ppl"])
    assert "perplexity" in result.output and "round" in result.output


def test_saved_adapter_reproduces_the_reported_perplexity(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["run", "--out", str(out), *sets(tiny_model)]).exit_code == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    cfg = make_config({"model": str(tiny_model), **_parse(FAST)})
    sim = LocalRun(cfg)  # rebuilds the same held-out set from the same seed
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    loaded = PeftModel.from_pretrained(base, str(out / "adapter"))
    _, ppl = perplexity(loaded, sim.model.eval_items, cfg.eval_batch_size, sim.model.pad_id)
    assert ppl == pytest.approx(last["test_ppl"], rel=1e-5)
    result = CliRunner().invoke(app, ["evaluate", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{last['test_ppl']:.4f} measured" in result.output.replace("\n", "")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == cfg.r_max and config["lora_alpha"] == pytest.approx(
        cfg.lora_scale * cfg.r_max
    )


def test_same_seed_same_adapter(tiny_model, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        extra = ["rounds=2", "rouge_examples=0"]
        assert (
            CliRunner().invoke(app, ["run", "--out", str(out), *sets(tiny_model, extra)]).exit_code
            == 0
        )
        outs.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k])


def _parse(items: list[str]) -> dict:
    import tomllib

    return {k: tomllib.loads(f"v = {v}")["v"] for k, v in (i.split("=", 1) for i in items)}

"""HetLoRA on Flower, on a tiny random Llama.

* the records and checks every reply goes through (fast, no processes);
* the ServerApp and ClientApp over an in-memory Grid (``localfed.loopback``: the real apps and
  strategy, nothing but the transport replaced): the in-process engine's adapter and rows over
  two rounds of three nodes, nodes that fail in every way a node can (no answer, an exception, a malformed or
  non-finite reply), too few replies, and what nodes declare (rank budget, tier, unknown client);
* real processes, kept few because each costs tens of seconds: a SuperLink with TLS and
  SuperNode authentication and two SuperNodes give the in-process adapter while a SuperNode
  whose key is not registered is refused; Flower's simulation runtime (Ray) gives it too; no
  process started by these tests is left running.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from safetensors.torch import load_file

from hetlora.client import TrainSettings
from hetlora.config import make_config
from hetlora.errors import HetLoRAError
from hetlora.lora import truncate
from hetlora.methods.base import ClientTask, Reply, TrainStats
from hetlora.methods.hetlora import HetLoRAServer
from hetlora.runtime.flower import client_app, records, server_app
from hetlora.runtime.flower.client_app import node_client
from hetlora.runtime.flower.project import (
    RunOptions,
    app_run_config,
    config_from_run_config,
    write_app,
)
from hetlora.runtime.local import LocalRun, evaluate_run
from localfed.deploy import NodeSpec
from localfed.launch import deploy_locally, simulate_locally
from localfed.loopback import LoopbackGrid, run_server_app, server_identity
from localfed.privacy import device_texts, leaked_into, leaks


def tiny_config(model: Path, **extra):
    values = {
        "model": str(model),
        "max_clients": 3,
        "clients_per_round": 3,
        "min_examples": 60,
        "precision": "fp32",
        "device": "cpu",
        "rounds": 2,
        "local_steps": 3,
        "batch_size": 4,
        "lr": 0.01,
        "lambda_": 1.0,
        "gamma": 0.8,
        "eval_examples": 32,
        "rouge_examples": 0,
    }
    values.update(extra)
    if values.get("method", "hetlora") != "hetlora":  # lambda_ and gamma are HetLoRA's only
        del values["lambda_"], values["gamma"]
    elif values.get("pruning") is False:  # and apply with pruning only
        del values["lambda_"], values["gamma"]
    return make_config(values)


def process_env() -> dict[str, str]:
    """The private caches conftest set for this test, for the Flower processes too."""
    keys = (
        "HF_HOME",
        "HF_DATASETS_CACHE",
        "HETLORA_CACHE",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
    )
    return {k: os.environ[k] for k in keys if k in os.environ}


def processes_naming(folder: Path) -> list[tuple[int, str]]:
    """The live processes whose command line or environment names `folder` (every Flower process
    of a federation has its FLWR_HOME there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            text = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        text = text.replace(b"\0", b" ").decode(errors="replace")
        if state != "Z" and str(folder) in text:
            found.append((int(entry.name), text[:160]))
    return found


@pytest.fixture
def workdir(tmp_path):
    """A federation's folder; when the test ends, no process it started may still run (checked
    in the teardown of the test itself, so it holds whichever worker runs the test)."""
    path = (tmp_path / "fed").resolve()
    yield path
    if Path("/proc").is_dir():
        deadline = time.monotonic() + 10  # a stopped process may take a moment to go
        while (leftovers := processes_naming(path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert leftovers == [], f"processes left running: {leftovers}"


# -- records: what every reply goes through (no processes) --------------------------------------


def _factors(rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return {
        "layers.0.q_proj": (torch.randn(6, rank, generator=g), torch.randn(rank, 5, generator=g)),
        "layers.0.v_proj": (torch.randn(4, rank, generator=g), torch.randn(rank, 5, generator=g)),
    }


def _reply(factors, rank: int, metrics: dict | None = None) -> RecordDict:
    stats = TrainStats(6, 1.5, 2.0, 1.0, 100, 60, 3, 0.5)
    content = records.reply_content(Reply("c", 10, factors=factors, rank=rank, stats=stats))
    for key, value in (metrics or {}).items():
        content.metric_records[records.METRICS][key] = value
    return content


def test_task_and_reply_round_trip():
    task = ClientTask("hamlet/HAMLET", "lora", rank=6, factors=_factors(6), pruning=True)
    settings = TrainSettings(local_steps=3, lr=0.01, lambda_=0.5, gamma=0.9, r_min=2)
    content = records.train_content(task, 4, settings, index=2)
    got, round_idx, got_settings, index = records.read_train(content, bf16=False)
    assert (got.client_id, got.rank, got.pruning, round_idx, index) == (
        "hamlet/HAMLET",
        6,
        True,
        4,
        2,
    )
    assert got_settings == settings
    for name, (b, a) in task.factors.items():
        assert torch.equal(got.factors[name][0], b) and torch.equal(got.factors[name][1], a)
    pruned = truncate(_factors(6), 5)
    update = records.read_reply(_reply(pruned, 5), task)
    assert update.rank == 5 and update.num_examples == 10 and update.stats.rank_received == 6
    assert torch.equal(update.factors["layers.0.q_proj"][0], pruned["layers.0.q_proj"][0])


@pytest.mark.parametrize(
    "case",
    [
        "rank above the one sent",
        "declared rank differs",
        "wrong d_out",
        "NaN",
        "missing module",
        "no examples",
    ],
)
def test_malformed_replies_are_refused_by_the_servers_validator(case):
    """Decoding reads any well-formed record; the method server's one validator refuses it."""
    task = ClientTask("c", "lora", rank=6, factors=_factors(6))
    server = HetLoRAServer(_factors(8), {"c": 6})
    factors, rank, metrics = truncate(_factors(6), 5), 5, {}
    if case == "rank above the one sent":
        factors, rank = truncate(_factors(8), 7), 7
    elif case == "declared rank differs":
        metrics = {"rank": 4}
    elif case == "wrong d_out":
        b, a = factors["layers.0.v_proj"]
        factors["layers.0.v_proj"] = (torch.zeros(3, 5), a)
    elif case == "NaN":
        factors["layers.0.q_proj"][0][0, 0] = float("nan")
    elif case == "missing module":
        del factors["layers.0.v_proj"]
    elif case == "no examples":
        metrics = {"num-examples": 0}
    update = records.read_reply(_reply(factors, rank, metrics), task)
    with pytest.raises(HetLoRAError, match="client c"):
        server.check(update)
    good = records.read_reply(_reply(truncate(_factors(6), 5), 5), task)
    server.check(good)


@pytest.mark.parametrize(
    "metrics", [{}, {"rank": 2.5}, {"steps": [1, 2]}, {"tokens": float("nan")}]
)
def test_undecodable_replies_raise(metrics):
    task = ClientTask("c", "lora", rank=6, factors=_factors(6))
    with pytest.raises(HetLoRAError):
        records.read_reply(RecordDict({records.ARRAYS: ArrayRecord()}), task)
    if metrics:
        with pytest.raises(HetLoRAError, match="metric"):
            records.read_reply(_reply(truncate(_factors(6), 5), 5, metrics), task)


def test_rouge_sums_combine_into_rouge_l_and_bad_generation_replies_are_refused():
    """Per-holder ROUGE-L sums combine into the ROUGE-L of the union (not a mean of means);
    a generation reply must score exactly the examples asked, each F1 within [0, 1]."""
    from hetlora.evaluate import combine_rouge, rouge_l, rouge_sums

    preds = ["the king is dead", "long live the king", "to be or not", "a horse", "my lord"]
    refs = ["the king is dead now", "the queen", "to be or not to be", "my kingdom", "my good lord"]
    parts = [rouge_sums(preds[:1], refs[:1]), rouge_sums(preds[1:], refs[1:])]
    union = rouge_l(preds, refs)
    assert 0 < union < 1 and combine_rouge(parts) == pytest.approx(union, rel=1e-12)
    assert combine_rouge(parts) != pytest.approx((parts[0][0] + parts[1][0] / 4) / 2)
    score, n = parts[1]
    assert records.read_rouge_reply(records.rouge_reply(score, n), n) == (score, n)
    for bad_score, bad_n, asked in ((score, n, n + 1), (n + 0.5, n, n), (float("nan"), n, n)):
        with pytest.raises(HetLoRAError, match="generation reply"):
            records.read_rouge_reply(records.rouge_reply(bad_score, bad_n), asked)


def test_an_evaluation_at_several_ranks_is_one_instruction_and_one_reply():
    """The final evaluation asks for every tier at once: the node cuts the factors it got to
    each rank (0: as sent) and replies with one (NLL sum, tokens) per rank, in order; a reply
    with another number of sums, or a bad sum, is refused."""
    content = records.evaluate_content(_factors(6), "test", [3, 1], 0, ranks=[2, 0, 4, 9])
    task = records.read_evaluate(content)
    assert (task.split, task.positions, task.generate, task.ranks) == (
        "test",
        [3, 1],
        False,
        [2, 0, 4, 9],
    )
    for rank, want in ((2, 2), (0, 6), (4, 4), (9, 6)):
        cut = task.at(rank)
        assert {b.shape[1] for b, _ in cut.values()} == {want}
        assert torch.equal(cut["layers.0.q_proj"][0], _factors(6)["layers.0.q_proj"][0][:, :want])
    sums = [(12.5, 10), (11.0, 10), (10.25, 10), (10.0, 10)]
    assert records.read_evaluate_reply(records.evaluate_reply(sums), 4) == sums
    with pytest.raises(HetLoRAError, match="4 sums, 3 ranks"):
        records.read_evaluate_reply(records.evaluate_reply(sums), 3)
    for bad in ([(float("nan"), 10)], [(-1.0, 10)], [(2.0, 0)]):
        with pytest.raises(HetLoRAError, match="evaluation reply with NLL"):
            records.read_evaluate_reply(records.evaluate_reply(bad), 1)
    for ranks in ([], [-1], [True]):
        bad = records.evaluate_content(_factors(6), "test", [0], 0)
        bad.config_records[records.CONFIG]["ranks"] = ranks
        with pytest.raises(HetLoRAError, match="ranks"):
            records.read_evaluate(bad)


def test_a_node_answers_only_the_evaluations_an_honest_server_asks_for():
    """Per run and kind of measurement, a node refuses an example named twice, fewer examples
    than its min-eval-examples, other examples than its first request, and more than rounds + 2
    requests; an honest server's requests (the same positions each time) pass."""
    from hetlora.runtime.flower.client_app import guard_evaluation

    def context(**node):
        return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})

    ctx = context()
    for _ in range(5):  # rounds 0-3 and the final repeat
        guard_evaluation(ctx, "test", False, [4, 2, 9], rounds=3)
    with pytest.raises(HetLoRAError, match="more than rounds \\+ 2 = 5 requests"):
        guard_evaluation(ctx, "test", False, [2, 4, 9], rounds=3)
    guard_evaluation(ctx, "test", True, [2], rounds=3)  # ROUGE-L: its own sample and count
    guard_evaluation(ctx, "val", False, [0, 1], rounds=3)
    with pytest.raises(HetLoRAError, match="other examples than the first request"):
        guard_evaluation(ctx, "val", False, [0], rounds=3)
    with pytest.raises(HetLoRAError, match="other examples than the first request"):
        guard_evaluation(ctx, "test", True, [3], rounds=3)
    with pytest.raises(HetLoRAError, match="more than once"):
        guard_evaluation(context(), "test", False, [1, 1], rounds=3)
    strict = context(**{"min-eval-examples": 3})
    with pytest.raises(HetLoRAError, match="fewer than this node's min-eval-examples 3"):
        guard_evaluation(strict, "test", False, [5, 6], rounds=3)
    guard_evaluation(strict, "test", False, [5, 6, 7], rounds=3)
    for bad in (0, True, "2"):
        with pytest.raises(HetLoRAError, match="min-eval-examples must be an integer"):
            guard_evaluation(context(**{"min-eval-examples": bad}), "test", False, [1], rounds=3)


def test_the_privacy_check_finds_every_kind_of_example_text(tmp_path):
    """``localfed.privacy`` (used by the tests below and by ``make flower-demo``): each line of
    prompts, responses, text rows and message contents is a needle, short lines are not, and
    a needle anywhere in a file's bytes is found, as it is, escaped or in part."""
    rows = [
        {
            "prompt": "To be, or not to be, that is the question",
            "response": "Ay.\nWhether 'tis nobler in the mind to suffer",
        },
        {"text": "The slings and arrows of outrageous fortune"},
        {
            "messages": [
                {"role": "user", "content": "Or to take arms against a sea of troubles"},
                {"role": "assistant", "content": "No."},
            ]
        },
    ]
    data = tmp_path / "device" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = device_texts([data])
    assert texts == [
        "Or to take arms against a sea of troubles",
        "The slings and arrows of outrageous fortune",
        "To be, or not to be, that is the question",
        "Whether 'tis nobler in the mind to suffer",
    ]
    server = tmp_path / "server"
    (server / "sub").mkdir(parents=True)
    (server / "clean.log").write_text("round 1 eval ppl 30.1 Ay. No.\n")
    assert leaks([server], texts) == []
    (server / "sub" / "w.bin").write_bytes(b"\x00\x01" + texts[2].encode() + b"\xff")
    assert leaks([server, data], texts) == [str(server / "sub" / "w.bin"), str(data)]
    # escaped as JSON or repr writes it, or quoted in part (an error message's first characters)
    quoted = "Whether 'tis nobler in the mind to suffer — “the question”"
    for name, written in (
        ("json.log", json.dumps({"error": quoted})),
        ("repr.log", f"ValueError({quoted!r})"),
        ("head.log", f"bad row: {quoted[:30]}..."),
        ("tail.log", f"...{quoted[-30:]}"),
    ):
        folder = tmp_path / name.removesuffix(".log")
        folder.mkdir()
        (folder / name).write_text(written, encoding="utf-8")
        assert leaks([folder], [quoted]) == [str(folder / name)], name
        assert leaked_into(written, [quoted]) == 1, name


def test_node_config_names_its_client_and_the_app_carries_the_config(tiny_model, tmp_path):
    ids = ["a/X", "b/Y", "c/Z"]
    assert node_client(ids, {"partition-id": 2, "num-partitions": 3}) == "c/Z"
    assert node_client(ids, {"client-id": "b/Y"}) == "b/Y"
    for bad in ({"partition-id": 3}, {"client-id": "d/W"}, {"rank": 4}):
        with pytest.raises(HetLoRAError):
            node_client(ids, bad)
    cfg = tiny_config(tiny_model, tiers=[{"name": "phone", "rank": 4, "share": 1.0}])
    path = write_app(tmp_path / "app", cfg, RunOptions(out_dir=str(tmp_path / "run")))
    import tomllib

    run_config = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    assert config_from_run_config(run_config) == cfg
    with pytest.raises(HetLoRAError, match="not supported on Flower"):
        write_app(tmp_path / "app2", tiny_config(tiny_model, method="flora"), RunOptions("x"))
    with pytest.raises(HetLoRAError, match="not supported on Flower"):  # its base changes too
        write_app(tmp_path / "app3", tiny_config(tiny_model, method="fedex"), RunOptions("x"))


def test_a_nodes_file_is_one_named_client_or_names_its_clients(tiny_model, tmp_path):
    """A file without ``client_id`` is one client, named by the node's ``client-id`` (required);
    a file with it is read as it is, ``client-id`` picking one of its clients."""
    cfg = tiny_config(tiny_model, data="", min_examples=5)
    rows = [{"prompt": f"Line {i}?", "response": f"Answer {i}."} for i in range(23)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = client_app.node_info(cfg, {"data": str(plain), "client-id": "alice"})
    assert info.client_id == "alice"
    assert info.num_examples + info.num_val + info.num_test == 23
    with pytest.raises(HetLoRAError, match="has no client_id column.*client-id") as caught:
        client_app.node_info(cfg, {"data": str(plain)})
    assert "\n" not in str(caught.value)
    named = tmp_path / "named.jsonl"
    both = [{"client_id": "ab"[i % 2], **r} for i, r in enumerate(rows)]
    named.write_text("".join(json.dumps(r) + "\n" for r in both))
    info = client_app.node_info(cfg, {"data": str(named), "client-id": "b"})
    assert (info.client_id, info.num_examples + info.num_val + info.num_test) == ("b", 11)
    with pytest.raises(HetLoRAError, match="'partition-id' or 'client-id'"):
        client_app.node_info(cfg, {"data": str(named)})
    named.write_text("".join(json.dumps(r) + "\n" for r in both if r["client_id"] == "a"))
    assert client_app.node_info(cfg, {"data": str(named)}).client_id == "a"


def test_flower_app_command_writes_the_app_folder(tiny_model, tmp_path):
    """``hetlora flower app``: the run's Flower App folder, its config and options; a method
    Flower does not run is one error line and exit 2, nothing written."""
    import tomllib

    from typer.testing import CliRunner

    from hetlora.cli import app

    args = ["flower", "app", str(tmp_path / "app"), "--out", str(tmp_path / "run")]
    args += ["--set", f"model={tiny_model}", "--min-nodes", "2", "--round-timeout", "90"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    run_config = project["tool"]["flwr"]["app"]["config"]
    assert config_from_run_config(run_config).model == str(tiny_model)
    assert (run_config["min-nodes"], run_config["round-timeout-s"]) == (2, 90.0)
    assert run_config["out-dir"] == str((tmp_path / "run").resolve())
    bad = ["flower", "app", str(tmp_path / "app2"), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*bad, "--set", "method=full_ft"])
    assert result.exit_code == 2 and "not supported on Flower" in result.output
    assert not (tmp_path / "app2").exists()


# -- the ServerApp and ClientApp over an in-memory Grid --------------------------------------------


@pytest.fixture
def quiet_hetlora_logger():
    """The ClientApp adds a stderr handler to the ``hetlora`` logger (a SuperNode's output);
    here it runs in the test process, so the logger is restored afterwards."""
    logger = logging.getLogger("hetlora")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:], logger.level = handlers, level


def run_over_loopback(
    cfg, out: Path, nodes, deliver=None, app=client_app.app, **options
) -> LoopbackGrid:
    """The ServerApp's ``main`` over a :class:`LoopbackGrid` of the ClientApp ``app``."""
    grid = LoopbackGrid(app, nodes, app_run_config(cfg, RunOptions(str(out), **options)), deliver)
    run_server_app(server_app.app, grid)
    return grid


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_server_app_over_a_grid_gives_the_in_process_run(
    tiny_model, tmp_path, quiet_hetlora_logger
):
    """Two rounds (pruning on: ranks change between them): same rows, same adapter; the nodes'
    federated evaluation gives the in-process perplexities (test, validation, every tier)."""
    cfg = tiny_config(tiny_model, val_fraction=0.1)
    sim = LocalRun(cfg)
    ranks = dict(sim.server.ranks)
    sim.run(tmp_path / "local")
    nodes = [{"partition-id": i} for i in range(len(sim.client_ids))]  # ranks assigned
    grid = run_over_loopback(cfg, tmp_path / "flower", nodes)
    local = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    flower = load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors")
    assert local.keys() == flower.keys()
    for key in local:
        torch.testing.assert_close(flower[key], local[key], rtol=1e-5, atol=1e-6)
    rows = {"local": rows_of(tmp_path / "local"), "flower": rows_of(tmp_path / "flower")}
    assert [r["round"] for r in rows["flower"]] == [0, 1, 2]
    for a, b in zip(rows["local"], rows["flower"], strict=True):
        assert b["test_ppl"] == pytest.approx(a["test_ppl"], rel=1e-5)
        assert b["val_ppl"] == pytest.approx(a["val_ppl"], rel=1e-5)
        assert b.get("client_ranks") == a.get("client_ranks")
        assert b.get("train_loss", 0) == pytest.approx(a.get("train_loss", 0), rel=1e-5)
        assert not b.get("rejected")
    assert rows["flower"][1]["client_ranks"] == {c: ranks[c] for c in sorted(ranks)}
    # one query per node, then one train message per sampled client and round
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.count("query") == 3 and kinds.count("train") == 2 * cfg.clients_per_round
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert summary["runtime"] == "flower" and len(summary["nodes"]) == 3
    assert len(local_summary["tier_ppl"]) >= 2
    assert summary["tier_ppl"] == pytest.approx(local_summary["tier_ppl"], rel=1e-5)
    # the last round's evaluation measures the final adapter whole (0, the top tier's number)
    # and cut to every other tier, in one message per node
    top = max(int(r) for r in summary["tier_ppl"])
    assert summary["tier_ppl"][str(top)] == rows["flower"][-1]["test_ppl"]
    (tier_asks,) = {
        tuple(m.content.config_records[records.CONFIG]["ranks"])
        for m in grid.sent
        if m.metadata.message_type == "evaluate"
        and len(m.content.config_records[records.CONFIG]["ranks"]) > 1
    }
    assert sorted(tier_asks) == [0] + sorted(int(r) for r in summary["tier_ppl"] if int(r) != top)
    asks = [m for m in grid.sent if m.metadata.group_id == "evaluate-test"]
    assert sum(len(m.content.config_records[records.CONFIG]["ranks"]) > 1 for m in asks) == 3
    # one test evaluation per node and measured row, no separate final one
    assert len(asks) == 3 * sum("test_ppl" in r for r in rows["flower"])
    for key in ("eval_examples", "val_examples", "final_val_ppl"):
        assert summary[key] == pytest.approx(local_summary[key], rel=1e-5)
    check = evaluate_run(tmp_path / "flower")
    assert check["test_ppl"] == pytest.approx(check["reported_ppl"], rel=1e-4)


@pytest.mark.parametrize("method", ["hlora", "rblora"])
def test_the_svd_aggregators_over_a_grid_give_the_in_process_run(
    method, tiny_model, tmp_path, quiet_hetlora_logger
):
    """HLoRA and RB-LoRA use HetLoRA's messages (factors at the client's rank), so they run on
    Flower unchanged: the same adapter and perplexities as in-process."""
    cfg = tiny_config(tiny_model, method=method)
    sim = LocalRun(cfg)
    sim.run(tmp_path / "local")
    nodes = [{"partition-id": i} for i in range(len(sim.client_ids))]
    run_over_loopback(cfg, tmp_path / "flower", nodes)
    local = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    flower = load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors")
    for key in local:
        torch.testing.assert_close(flower[key], local[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(rows_of(tmp_path / "local"), rows_of(tmp_path / "flower"), strict=True):
        assert b["test_ppl"] == pytest.approx(a["test_ppl"], rel=1e-5)


@pytest.mark.parametrize("method", ["hetlora", "ffa"])
def test_dp_over_a_grid_gives_the_in_process_run_without_the_clients_losses(
    method, tiny_model, tmp_path, quiet_hetlora_logger
):
    """Differential privacy on Flower: the nodes clip (the server sends the clip norm and, for
    FFA, that A is frozen), the server adds the seeded noise: the same adapter and epsilon as
    in-process, and no reply carries the node's training loss, tail norm, timings or token
    counts."""
    extra = {"dp_clip_norm": 0.05, "dp_noise_multiplier": 1.0, "dp_noise_seed": 4}
    if method == "hetlora":
        extra.update(pruning=False, aggregation="uniform")
    cfg = tiny_config(tiny_model, method=method, **extra)
    sim = LocalRun(cfg)
    sim.run(tmp_path / "local")
    nodes = [{"partition-id": i} for i in range(len(sim.client_ids))]
    seen: list[Message] = []

    def keep(instruction: Message, reply: Message) -> Message:
        seen.append(reply)
        return reply

    grid = run_over_loopback(cfg, tmp_path / "flower", nodes, keep)
    local = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    flower = load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors")
    for key in local:
        torch.testing.assert_close(flower[key], local[key], rtol=1e-5, atol=1e-6)
    rows = {"local": rows_of(tmp_path / "local"), "flower": rows_of(tmp_path / "flower")}
    assert [r["epsilon"] for r in rows["flower"]] == [r["epsilon"] for r in rows["local"]]
    assert rows["flower"][-1]["epsilon"] > 0
    for row in rows["flower"][1:]:
        assert all(math.isnan(c["train_loss"]) for c in row["clients"].values())
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    config = trains[0].content.config_records["config"]
    assert config["dp-clip-norm"] == 0.05 and config["train-a"] == (method != "ffa")
    train_replies = [r for r in seen if r.metadata.message_type == "train"]
    assert len(train_replies) == len(trains)
    for reply in train_replies:
        metrics = reply.content.metric_records["metrics"]
        assert all(math.isnan(metrics[k]) for k in records.PRIVATE_METRICS)
        assert all(metrics[k] == 0 for k in records.PRIVATE_COUNTS)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert summary["epsilon"] == local_summary["epsilon"] and summary["delta"] == 1e-5


def test_flowers_strategy_interface_gives_the_round_loops_round(
    tiny_model, tmp_path, quiet_hetlora_logger
):
    """configure_train / aggregate_train (what a Flower Strategy user calls) and the round loop
    (what the ServerApp runs) give the same global adapter, round after round."""
    cfg = tiny_config(tiny_model)
    options = RunOptions(str(tmp_path))
    run_config = app_run_config(cfg, options)
    nodes = [{"partition-id": i} for i in range(3)]
    with server_identity():
        loop = server_app.flower_run(cfg, LoopbackGrid(client_app.app, nodes, run_config), options)
        grid = LoopbackGrid(client_app.app, nodes, run_config)
        strategy = server_app.flower_run(cfg, grid, options).transport.strategy
        for round_idx in (1, 2):
            loop.run_round()
            messages = strategy.configure_train(round_idx, ArrayRecord(), ConfigRecord(), grid)
            arrays, metrics = strategy.aggregate_train(
                round_idx, grid.send_and_receive(messages, timeout=60)
            )
            assert metrics["clients"] == 3 and metrics["rejected"] == 0
            expected = loop.server.global_factors()
            got = strategy.server.global_factors()
            for name, (b, a) in expected.items():
                torch.testing.assert_close(got[name][0], b, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(got[name][1], a, rtol=1e-5, atol=1e-7)
            assert strategy.server.ranks == loop.server.ranks
            assert sorted(arrays) == sorted(records.factors_record(got))
    assert strategy.configure_evaluate(1, arrays, ConfigRecord(), grid) == []


def _nan_arrays(instruction: Message, reply: Message) -> Message:
    arrays = reply.content.array_records[records.ARRAYS]
    name = sorted(arrays)[0]
    values = arrays[name].numpy().copy()
    values.flat[0] = float("nan")
    arrays[name] = Array(values)
    return reply


FAULTS = {
    "never answers": lambda instruction, reply: None,
    "raises": None,  # the ClientApp itself raises (below)
    "error reply": lambda instruction, reply: Message(
        Error(0, "out of memory"), reply_to=instruction
    ),
    "non-finite factors": _nan_arrays,
    "no arrays": lambda instruction, reply: Message(RecordDict(), reply_to=instruction),
}
REASONS = {
    "never answers": "no reply before the round timed out",
    "raises": "error from node (code 2)",
    "error reply": "error from node (code 0)",
    "non-finite factors": "non-finite",
    "no arrays": "malformed reply",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failing_node_is_rejected_and_the_round_goes_on(
    fault, tiny_model, tmp_path, quiet_hetlora_logger
):
    """Node 3 fails in round 1 only; the round aggregates the two others, round 2 all three."""
    cfg = tiny_config(tiny_model, min_clients=2)
    victim = 3

    def failing(message: Message) -> bool:
        round_idx = message.content.config_records[records.CONFIG]["server-round"]
        return message.metadata.dst_node_id == victim and round_idx == 1

    def deliver(instruction, reply):
        return (
            FAULTS[fault](instruction, reply) if failing(instruction) and FAULTS[fault] else reply
        )

    def app(message, context):  # the ClientApp, raising on the victim's round-1 task
        if fault == "raises" and message.metadata.message_type == "train" and failing(message):
            raise RuntimeError("disk full")
        return client_app.app(message, context)

    nodes = [{"partition-id": i} for i in range(3)]
    run_over_loopback(cfg, tmp_path / "flower", nodes, deliver, app)
    rows = rows_of(tmp_path / "flower")
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    client = {node: c for c, node in summary["nodes"].items()}[victim]
    assert list(rows[1]["rejected"]) == [client]
    assert REASONS[fault] in rows[1]["rejected"][client]
    assert set(rows[1]["weights"]) == set(summary["nodes"]) - {client}
    assert not rows[1]["skipped"] and not rows[2]["rejected"]
    assert set(rows[2]["weights"]) == set(summary["nodes"])
    assert summary["rejected"]["1"] == rows[1]["rejected"] and summary["rounds_skipped"] == 0
    assert rows[2]["test_ppl"] < rows[0]["test_ppl"]


def test_too_few_replies_skip_the_round_and_keep_the_global_adapter(
    tiny_model, tmp_path, quiet_hetlora_logger
):
    cfg = tiny_config(tiny_model, rounds=1, min_clients=3)
    nodes = [{"partition-id": i} for i in range(3)]

    def node_1_trains_but_never_answers(instruction, reply):
        if instruction.metadata.message_type == "train" and instruction.metadata.dst_node_id == 1:
            return None
        return reply

    run_over_loopback(cfg, tmp_path / "flower", nodes, node_1_trains_but_never_answers)
    rows = rows_of(tmp_path / "flower")
    assert rows[1]["skipped"] and len(rows[1]["rejected"]) == 1
    assert rows[1]["test_ppl"] == pytest.approx(rows[0]["test_ppl"], rel=1e-6)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["rounds_skipped"] == 1
    adapter = load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().max() == 0 for k, v in adapter.items() if "lora_B" in k)  # untrained


def test_nodes_declare_their_client_and_rank(tiny_model, tmp_path, quiet_hetlora_logger):
    """A rank budget (capped at r_max), a tier's rank, and a node whose client is not in the run
    (left out; the run goes on with the others)."""
    tiers = [
        {"name": "phone", "rank": 2, "share": 0.5},
        {"name": "laptop", "rank": 6, "share": 0.5},
    ]
    cfg = tiny_config(tiny_model, rounds=1, r_min=2, r_max=8, tiers=tiers, pruning=False)
    ids = sorted(LocalRun(cfg).client_ids)
    nodes = [
        {"client-id": ids[0], "rank": 50},
        {"client-id": ids[1], "tier": "phone"},
        {"client-id": ids[2], "tier": "laptop"},
        {"client-id": "nobody/NOBODY", "rank": 4},
    ]
    run_over_loopback(cfg, tmp_path / "flower", nodes, min_nodes=4)
    rows = rows_of(tmp_path / "flower")
    assert rows[1]["client_ranks"] == {ids[0]: 8, ids[1]: 2, ids[2]: 6}
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["nodes"] == {ids[0]: 1, ids[1]: 2, ids[2]: 3}


def device_files(folder: Path, clients: int, per_client: int = 70) -> tuple[Path, list, list]:
    """Shakespeare clients as devices: every example carries its device's marker string.

    Returns the file of all of them (for the in-process run), each device's own file and the
    markers."""
    from hetlora.data import load_clients

    chosen = [(c, ex) for c, ex in load_clients("shakespeare").items() if len(ex) >= per_client]
    rows, files, markers = [], [], []
    for i, (client, examples) in enumerate(chosen[:clients]):
        marker = f"CANARY{i}xQZV"  # fixed: the same tokens, the same run, on every try
        own = [
            {
                "client_id": client,
                "prompt": f"{marker} {ex.prompt}",
                "response": f"{ex.response} {marker}",
            }
            for ex in examples[:per_client]
        ]
        path = folder / f"device-{i}" / "data.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in own))
        rows += own
        files.append(path)
        markers.append(marker)
    everything = folder / "all.jsonl"
    everything.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return everything, files, markers


def test_a_server_without_data_runs_and_no_device_text_reaches_it(
    tiny_model, tmp_path, quiet_hetlora_logger, caplog
):
    """Each node reads only its own file; the server's ``data`` points nowhere. The run equals
    the in-process run over the same examples (perplexity every round, ROUGE-L of the base and
    the final model from the nodes' sums), and nothing the server writes or logs holds a
    device's marker or example text.

    The tiny random model's greedy words rarely meet a reference, so its ROUGE-L is often 0
    (which words it emits depends on the host's float arithmetic); the combination of non-zero
    sums is pinned by ``test_rouge_sums_combine_into_rouge_l_and_bad_generation_replies_are_refused``."""
    everything, files, markers = device_files(tmp_path, 3)
    cfg = tiny_config(tiny_model, data=str(everything), rouge_examples=6, max_new_tokens=8)
    LocalRun(cfg).run(tmp_path / "local")
    server_cfg = tiny_config(tiny_model, data=str(tmp_path / "nowhere" / "none.jsonl"))
    server_cfg = replace(server_cfg, rouge_examples=6, max_new_tokens=8)
    nodes = [{"data": str(f)} for f in files]
    with caplog.at_level(logging.INFO, logger="hetlora"):
        grid = run_over_loopback(server_cfg, tmp_path / "flower", nodes)
    rows, local = rows_of(tmp_path / "flower"), rows_of(tmp_path / "local")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for a, b in zip(local, rows, strict=True):
        assert b["test_ppl"] == pytest.approx(a["test_ppl"], rel=1e-5)
    assert rows[2]["test_ppl"] < rows[0]["test_ppl"]
    assert all(r["eval_missing"] == {} for r in rows)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    for key in ("rouge_l_base", "rouge_l"):
        assert summary[key] == pytest.approx(local_summary[key], rel=1e-12)
    generate = [m for m in grid.sent if m.content.config_records[records.CONFIG].get("generate")]
    asked = [p for m in generate for p in m.content.config_records[records.CONFIG]["positions"]]
    assert len(generate) >= 2 and len(asked) == 2 * 6  # base and final: the 6 examples, once
    texts = device_texts(files)
    assert leaks([tmp_path / "flower"], markers + texts) == []
    assert not any(t in caplog.text for t in markers + texts)  # server's and nodes' logs
    assert not (tmp_path / "flower" / "samples.jsonl").exists()
    assert leaks([tmp_path / "local" / "samples.jsonl"], markers)  # the check can fail


SERVER_LOGGERS = tuple(
    f"hetlora.runtime.{name}"
    for name in ("flower.server_app", "flower.held_out", "flower.strategy", "local", "rounds")
)


def test_a_nodes_error_stays_on_the_node(
    tiny_model, tmp_path, quiet_hetlora_logger, caplog, monkeypatch
):
    """Three node errors whose messages quote the device's data: a bad row of a file whose path
    names the device (at the query), a training step and a ROUGE scoring that fail quoting an
    example. Each is logged on its node in full; the server records only the exception's type and
    Flower's error code (the node left out, ``rejected``, ``eval_missing`` from round 0 on), so
    no marker or example text reaches the server's files or log lines."""
    _, files, markers = device_files(tmp_path, 3)
    bad_marker = f"CANARYBAD{os.getpid()}"
    bad = tmp_path / f"device-{bad_marker}" / "data.jsonl"
    bad.parent.mkdir()
    rows = [json.loads(x) for x in files[2].read_text().splitlines()]
    rows[3]["response"] = None
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = device_texts(files)
    clients = [json.loads(f.read_text().splitlines()[0])["client_id"] for f in files]
    from hetlora.runtime.workspace import Workspace

    trains = Workspace.train

    def train(self, task, *args, **kwargs):  # device 0 fails to train, quoting an example
        example = self.train_data[task.client_id][0].response
        if markers[0] in example:
            raise HetLoRAError(f"cannot train on {example!r}")
        return trains(self, task, *args, **kwargs)

    scores = client_app.rouge_sums

    def rouge_sums(preds, refs):  # device 1 fails to score, quoting a reference
        if any(markers[1] in ref for ref in refs):
            raise HetLoRAError(f"cannot score {refs[0]!r}")
        return scores(preds, refs)

    monkeypatch.setattr(Workspace, "train", train)
    monkeypatch.setattr(client_app, "rouge_sums", rouge_sums)
    cfg = tiny_config(tiny_model, data="", rounds=1, min_clients=1, rouge_examples=12)
    cfg = replace(cfg, max_new_tokens=4)
    nodes = [{"data": str(f)} for f in [*files, bad]]
    with caplog.at_level(logging.INFO, logger="hetlora"):
        run_over_loopback(cfg, tmp_path / "flower", nodes, min_nodes=4)
    formatter = logging.Formatter()
    lines = {r: formatter.format(r) for r in caplog.records}
    server = "\n".join(line for r, line in lines.items() if r.name.startswith(SERVER_LOGGERS))
    node = "\n".join(line for r, line in lines.items() if r.name.endswith("client_app"))
    assert all(m in node for m in [markers[0], markers[1], bad_marker])  # the check can fail
    assert not any(m in server for m in [*markers, bad_marker, *texts])
    assert leaks([tmp_path / "flower"], [*markers, bad_marker] + texts) == []
    assert "node 4 left out of the run: error from node (HetLoRAError, code 2)" in server
    why = "error from node (HetLoRAError, code 2)"
    flower = rows_of(tmp_path / "flower")
    assert flower[1]["rejected"] == {clients[0]: why}
    assert flower[0]["eval_missing"] == {clients[1]: f"rouge: {why}"}
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["eval_missing"]["final"] == {clients[1]: f"rouge: {why}"}
    assert sorted(summary["nodes"].values()) == [1, 2, 3]


def test_the_nodes_template_decides_the_runs_and_a_node_rendering_otherwise_is_left_out(
    tiny_chat_model, tmp_path, quiet_hetlora_logger, caplog
):
    """Nodes of ``messages`` rows declare that their examples go through the chat template, so
    the run records ``chat_template_used`` (the server holds no examples); a node of plain
    prompt/response rows (no template under ``auto``) is left out with a logged reason."""
    nodes = []
    for i in range(3):
        path = tmp_path / f"device-{i}" / "chat.jsonl"
        path.parent.mkdir()
        rows = [
            {
                "client_id": f"client-{i}",
                "messages": [
                    {"role": "user", "content": f"What is {j} and {i}?"},
                    {"role": "assistant", "content": f"It is {i + j}."},
                ],
            }
            for j in range(12)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        nodes.append({"data": str(path)})
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "".join(json.dumps({"prompt": f"Q{j}?", "response": f"A{j}."}) + "\n" for j in range(12))
    )
    nodes.append({"data": str(plain), "client-id": "plain"})
    cfg = tiny_config(tiny_chat_model, data="", rounds=1, min_examples=4, max_seq_len=64)
    with caplog.at_level(logging.WARNING, logger="hetlora"):
        run_over_loopback(cfg, tmp_path / "flower", nodes, min_nodes=4)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["chat_template_used"] is True
    assert summary["nodes"] == {"client-0": 1, "client-1": 2, "client-2": 3}
    assert "node 4 left out of the run: its examples do not go through the chat template" in (
        caplog.text
    )
    info = client_app.node_info(cfg, nodes[0])
    assert info.templated and records.NodeInfo.from_record(info.record()) == info
    record = info.record()
    record["templated"] = 1
    with pytest.raises(HetLoRAError, match="templated is 1"):
        records.NodeInfo.from_record(record)


def test_a_small_server_side_file_without_client_ids_is_one_pool(tiny_model, tmp_path, monkeypatch):
    """Six rows without ``client_id`` (fewer than the partitioner's default 10 partitions) are
    pooled, and the relative path is kept absolute in the config."""
    from hetlora.runtime.splits import server_eval_set

    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(6)]
    Path("eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tiny_model, server_eval_data="eval.jsonl")
    assert cfg.server_eval_data == str(tmp_path / "eval.jsonl")
    monkeypatch.chdir(tmp_path.parent)
    examples = server_eval_set(cfg)
    assert sorted(ex.prompt for ex in examples) == sorted(r["prompt"] for r in rows)


def test_a_server_side_set_is_measured_centrally_and_a_silent_node_is_recorded(
    tiny_model, tmp_path, quiet_hetlora_logger
):
    """``server_eval_data`` (the operator's own file): the same ``server_eval_ppl`` every round
    and ``server_rouge_l`` in both runtimes, and ``samples.jsonl`` from it in the Flower run.
    A node that does not answer round 1's evaluation is left out and named in ``eval_missing``
    (that perplexity is over fewer examples)."""
    from hetlora.data import load_clients
    from hetlora.runtime.splits import federated_splits

    cfg = tiny_config(tiny_model, rounds=1, rouge_examples=3, max_new_tokens=6)
    run_clients = set(federated_splits(cfg)[0])
    public = [
        ex for c, v in load_clients("shakespeare").items() if c not in run_clients for ex in v
    ]
    server_file = tmp_path / "public" / "eval.jsonl"
    server_file.parent.mkdir()
    rows = [{"prompt": ex.prompt, "response": ex.response} for ex in public[:12]]
    server_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = replace(cfg, server_eval_data=str(server_file))
    LocalRun(cfg).run(tmp_path / "local")
    victim, test_evals = 2, []

    def silent_in_round_1(instruction, reply):  # the victim's second test evaluation
        meta = instruction.metadata
        if meta.group_id == "evaluate-test" and meta.dst_node_id == victim:
            test_evals.append(meta.message_id)
            return None if len(test_evals) == 2 else reply
        return reply

    nodes = [{"partition-id": i} for i in range(3)]
    run_over_loopback(cfg, tmp_path / "flower", nodes, silent_in_round_1)
    local, flower = rows_of(tmp_path / "local"), rows_of(tmp_path / "flower")
    for a, b in zip(local, flower, strict=True):
        assert b["server_eval_ppl"] == pytest.approx(a["server_eval_ppl"], rel=1e-5)
    assert flower[1]["server_eval_ppl"] != pytest.approx(flower[0]["server_eval_ppl"], rel=1e-3)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    for key in ("server_rouge_l_base", "server_rouge_l", "server_final_ppl", "rouge_l"):
        assert summary[key] == pytest.approx(local_summary[key], rel=1e-5)
    assert summary["server_eval_examples"] == 12
    samples = [
        json.loads(x) for x in (tmp_path / "flower" / "samples.jsonl").read_text().split("\n") if x
    ]
    prompts = {r["prompt"] for r in rows}
    assert len(samples) == 3 and all(x["prompt"] in prompts for x in samples)
    assert samples == [
        json.loads(x) for x in (tmp_path / "local" / "samples.jsonl").read_text().split("\n") if x
    ]
    client = {node: c for c, node in summary["nodes"].items()}[victim]
    assert flower[0]["eval_missing"] == {}
    assert flower[1]["eval_missing"] == {client: "test: no reply"}
    assert summary["eval_missing"] == {"1": {client: "test: no reply"}}
    assert flower[1]["test_ppl"] != pytest.approx(local[1]["test_ppl"], rel=1e-5)
    assert flower[0]["test_ppl"] == pytest.approx(local[0]["test_ppl"], rel=1e-5)


def test_bad_declarations_and_a_node_without_data_leave_the_node_out(
    tiny_model, tmp_path, quiet_hetlora_logger, caplog
):
    """A node declaring counts the split rule cannot give, and a second node of one client,
    are left out with a logged reason; in a deployment (no run data) a node without its own
    file logs one error line saying so (no traceback) and is left out too."""
    _, files, _ = device_files(tmp_path, 2)
    cfg = tiny_config(tiny_model, data="", clients_per_round=2, rounds=1)
    nodes = [{"data": str(files[0])}, {"data": str(files[1])}, {"data": str(files[1])}]
    nodes += [{"data": str(files[0]), "liar": True}, {"client-id": "x"}]

    def app(message, context):  # node 4 inflates its training count
        reply = client_app.app(message, context)
        if context.node_config.get("liar") and message.metadata.message_type == "query":
            reply.content.config_records[records.INFO]["num-examples"] += 5
        return reply

    with caplog.at_level(logging.WARNING, logger="hetlora"):
        run_over_loopback(cfg, tmp_path / "flower", nodes, app=app, min_nodes=5)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert sorted(summary["nodes"].values()) == [1, 2]
    assert "node 3 left out of the run: client" in caplog.text and "already held" in caplog.text
    assert "node 4 left out of the run: declared (train, validation, test)" in caplog.text
    (no_data,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert no_data.name.endswith("client_app") and no_data.exc_info is None
    assert no_data.getMessage().startswith("query on node 5: this node has no data: name its own")
    assert (
        "node 5 left out of the run: error from node (HetLoRAError, code 2); the node's log "
        in caplog.text
    )
    with pytest.raises(HetLoRAError, match="this node has no data") as info:
        client_app.node_config(cfg, {"client-id": "x"})
    assert "\n" not in str(info.value)


# -- real SuperLink and SuperNodes ----------------------------------------------------------------


def test_deployment_gives_the_in_process_adapter_and_refuses_an_unregistered_node(
    tiny_model, tmp_path, workdir
):
    """A private deployment: TLS + SuperNode authentication, 2 SuperNodes each reading only its
    own file, a server config without data, 1 round; no device's marker or text reaches the
    server's run directory or logs. Meanwhile a SuperNode whose key was never registered tries
    to join and is refused."""
    everything, files, markers = device_files(tmp_path, 2)
    cfg = tiny_config(tiny_model, data=str(everything), rounds=1, clients_per_round=2)
    sim = LocalRun(cfg)
    ranks = dict(sim.server.ranks)
    sim.run(tmp_path / "local")
    # every client on its own SuperNode with its own file, declaring the rank the engine gave it
    nodes = [{"data": str(f), "rank": ranks[c]} for f, c in zip(files, sim.client_ids, strict=True)]
    fed_dir = workdir
    intruder = {}

    def start_intruder(fed) -> None:  # before the run starts: it must give up on its own
        spec = NodeSpec("intruder", {"partition-id": 0}, register=False)
        intruder["exit"] = fed.start_supernode(spec, max_retries=2).wait(timeout=180)
        intruder["log"] = (fed.logs / "intruder.log").read_text()

    result = deploy_locally(
        replace(cfg, data=""),
        tmp_path / "flower",
        nodes,
        workdir=fed_dir,
        env=process_env(),
        on_started=start_intruder,
    )
    assert intruder["exit"] != 0 and "Failed to activate SuperNode" in intruder["log"]
    assert len(result.summary["nodes"]) == 2  # the intruder's key never became a node
    local = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    flower = load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors")
    assert local.keys() == flower.keys()
    for key in local:
        torch.testing.assert_close(flower[key], local[key], rtol=1e-5, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in flower.items() if "lora_B" in k)  # it trained
    for a, b in zip(rows_of(tmp_path / "local"), result.rows, strict=True):
        assert b["test_ppl"] == pytest.approx(a["test_ppl"], rel=1e-5)
        assert b.get("client_ranks") == a.get("client_ranks")
    assert result.summary["runtime"] == "flower"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json"):
        assert (tmp_path / "flower" / name).is_file(), name
    texts = device_texts(files)
    server_side = [
        tmp_path / "flower",
        *fed_dir.rglob("superlink.log"),
        *fed_dir.rglob("flwr-run*"),
    ]
    assert len(server_side) >= 3 and leaks(server_side, markers + texts) == []
    # each node keeps its evaluation record across the run's messages (in context.state): round
    # 1's test measurement is its second request
    node_logs = [p.read_text() for p in fed_dir.rglob("*.log") if p.stem.startswith("node")]
    assert node_logs and all("evaluation test-nll: request 2 of this run" in t for t in node_logs)


def test_simulation_runtime_gives_the_in_process_adapter(tiny_model, tmp_path, workdir):
    """`flwr run` on Flower's simulation runtime (Ray, CPU, 127.0.0.1), 2 virtual SuperNodes."""
    cfg = tiny_config(tiny_model, rounds=1, max_clients=2, clients_per_round=2)
    LocalRun(cfg).run(tmp_path / "local")
    result = simulate_locally(cfg, tmp_path / "sim", 2, workdir=workdir, env=process_env())
    assert [r["round"] for r in result.rows] == [0, 1] and result.summary["runtime"] == "flower"
    local = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    sim = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    for key in local:
        torch.testing.assert_close(sim[key], local[key], rtol=1e-5, atol=1e-6)

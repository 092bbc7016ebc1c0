"""HetLoRA on Flower, on a tiny random Llama: real SuperLink/SuperNode processes on 127.0.0.1.

* the records and checks every reply goes through (fast, no processes);
* security: a SuperNode whose key is not registered is refused;
* equivalence: 2 rounds through the deployment runtime (TLS, SuperNode authentication) give the
  in-process engine's global adapter;
* simulation: the same through `flwr run` on Flower's simulation runtime (Ray);
* fault: a SuperNode killed during a round is left out and reported, the run finishes;
* no process started by these tests is left running.

About four minutes in all: every round starts a ClientApp process per node, and a killed node
is noticed by Flower's heartbeat (up to a minute).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from safetensors.torch import load_file

from hetlora.client import ClientResult, TrainSettings
from hetlora.config import make_config
from hetlora.errors import HetLoRAError
from hetlora.lora import truncate
from hetlora.methods.base import ClientTask, ClientUpdate
from hetlora.methods.hetlora import HetLoRAServer
from hetlora.runtime.flower import records
from hetlora.runtime.flower.client_app import node_client
from hetlora.runtime.flower.deploy import LocalDeployment, NodeSpec
from hetlora.runtime.flower.launch import deploy_locally, simulate_locally
from hetlora.runtime.flower.project import RunOptions, config_from_run_config, write_app
from hetlora.runtime.local import Simulation, evaluate_run

WORKDIRS: list[Path] = []  # every federation's folder, for the final leftover check


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


def workdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    WORKDIRS.append(path.resolve())
    return path


# -- records: what every reply goes through (no processes) --------------------------------------


def _factors(rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return {
        "layers.0.q_proj": (torch.randn(6, rank, generator=g), torch.randn(rank, 5, generator=g)),
        "layers.0.v_proj": (torch.randn(4, rank, generator=g), torch.randn(rank, 5, generator=g)),
    }


def _reply(factors, rank: int, metrics: dict | None = None) -> RecordDict:
    update = ClientUpdate("c", 10, factors=factors, rank=rank)
    result = ClientResult(factors, 6, rank, 1.5, 2.0, 1.0, 100, 60, 3, 0.5)
    content = records.reply_content(update, result)
    for key, value in (metrics or {}).items():
        content.metric_records[records.METRICS][key] = value
    return content


def test_task_and_reply_round_trip():
    task = ClientTask("hamlet/HAMLET", "lora", rank=6, factors=_factors(6), pruning=True)
    settings = TrainSettings(local_steps=3, lr=0.01, lambda_=0.5, gamma=0.9, r_min=2)
    content = records.train_content(task, 4, settings)
    got, round_idx, got_settings = records.read_train(content, bf16=False)
    assert (got.client_id, got.rank, got.pruning, round_idx) == ("hamlet/HAMLET", 6, True, 4)
    assert got_settings == settings
    for name, (b, a) in task.factors.items():
        assert torch.equal(got.factors[name][0], b) and torch.equal(got.factors[name][1], a)
    pruned = truncate(_factors(6), 5)
    update, result = records.read_reply(_reply(pruned, 5), task)
    assert update.rank == 5 and update.num_examples == 10 and result.rank_received == 6
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
    update, _ = records.read_reply(_reply(factors, rank, metrics), task)
    with pytest.raises(HetLoRAError, match="client c"):
        server.check(update)
    good, _ = records.read_reply(_reply(truncate(_factors(6), 5), 5), task)
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


# -- real SuperLink and SuperNodes ----------------------------------------------------------------


def test_unregistered_supernode_is_refused(tmp_path):
    with LocalDeployment(workdir(tmp_path, "fed"), process_env()) as fed:
        fed.start_superlink()
        member_id = fed.register("member")
        fed.start_supernode(NodeSpec("member", {"partition-id": 0}, register=False))
        intruder = fed.start_supernode(
            NodeSpec("intruder", {"partition-id": 1}, register=False), max_retries=2
        )
        assert intruder.wait(timeout=120) != 0
        log = (fed.logs / "intruder.log").read_text()
        assert "Failed to activate SuperNode" in log
        deadline = time.monotonic() + 60
        while (nodes := fed.online_nodes()).get(member_id) != "online":
            assert time.monotonic() < deadline, nodes
            time.sleep(1)
        assert list(nodes) == [member_id]  # the intruder's key never became a node
    assert fed.alive() == []


def test_deployment_gives_the_in_process_adapter(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model)
    sim = Simulation(cfg)
    ranks = dict(sim.server.ranks)
    sim.run(tmp_path / "local")
    # every client on its own SuperNode, declaring the rank the engine assigned it
    nodes = [{"partition-id": i, "rank": ranks[c]} for i, c in enumerate(sim.client_ids)]
    fed_dir = workdir(tmp_path, "fed")
    result = deploy_locally(cfg, tmp_path / "flower", nodes, workdir=fed_dir, env=process_env())
    local = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    flower = load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors")
    assert local.keys() == flower.keys()
    for key in local:
        torch.testing.assert_close(flower[key], local[key], rtol=1e-5, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in flower.items() if "lora_B" in k)  # it trained
    rows = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("local", "flower")
    }
    assert [r["round"] for r in rows["flower"]] == [0, 1, 2]
    for a, b in zip(rows["local"], rows["flower"], strict=True):
        assert b["eval_ppl"] == pytest.approx(a["eval_ppl"], rel=1e-5)
        assert b.get("client_ranks") == a.get("client_ranks")
        assert not b.get("rejected")
    assert result.summary["runtime"] == "flower" and len(result.summary["nodes"]) == 3
    # the run directory loads like any run
    for name in ("config.toml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json"):
        assert (tmp_path / "flower" / name).is_file(), name
    check = evaluate_run(tmp_path / "flower")
    assert check["eval_ppl"] == pytest.approx(check["reported_ppl"], rel=1e-4)


def test_simulation_runtime_gives_the_in_process_adapter(tiny_model, tmp_path):
    """`flwr run` on Flower's simulation runtime (Ray, CPU, 127.0.0.1), 3 virtual SuperNodes."""
    cfg = tiny_config(tiny_model, rounds=1)
    Simulation(cfg).run(tmp_path / "local")
    result = simulate_locally(
        cfg, tmp_path / "sim", 3, workdir=workdir(tmp_path, "fed"), env=process_env()
    )
    assert [r["round"] for r in result.rows] == [0, 1] and result.summary["runtime"] == "flower"
    local = load_file(tmp_path / "local" / "adapter" / "adapter_model.safetensors")
    sim = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    for key in local:
        torch.testing.assert_close(sim[key], local[key], rtol=1e-5, atol=1e-6)


def test_killed_supernode_is_rejected_and_reported(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model)
    victim = {"fed": None, "killed_at": None}

    def kill_during_round_one() -> None:
        fed = victim["fed"]
        if victim["killed_at"] is None and "Receiving: train message" in (
            fed.logs / "node-2.log"
        ).read_text(errors="replace"):
            fed.processes.kill("node-2")  # a crash: node, SuperExec and ClientApp at once
            victim["killed_at"] = time.monotonic()

    result = deploy_locally(
        cfg,
        tmp_path / "flower",
        [{"partition-id": i} for i in range(3)],
        workdir=workdir(tmp_path, "fed"),
        env=process_env(),
        round_timeout_s=150,
        on_started=lambda fed: victim.update(fed=fed),
        on_poll=kill_during_round_one,
    )
    assert victim["killed_at"] is not None
    rows = result.rows
    assert [r["round"] for r in rows] == [0, 1, 2]
    clients = sorted(result.summary["nodes"])  # node-i holds the i-th client
    assert len(clients) == 3
    rejected_1 = rows[1]["rejected"]
    assert list(rejected_1) == [clients[2]], rows[1]
    client, reason = clients[2], rejected_1[clients[2]]
    assert "Node Unavailable" in reason or "timed out" in reason, reason
    assert set(rows[1]["weights"]) == set(clients) - {client}  # aggregated from the two others
    assert not rows[1]["skipped"] and not rows[2]["skipped"]
    assert client in rows[2]["rejected"] and set(rows[2]["weights"]) == set(clients) - {client}
    assert result.summary["rejected"]["1"][client] == reason
    assert rows[2]["eval_ppl"] < rows[0]["eval_ppl"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_no_process_is_left_running():
    """Nothing started by the tests above runs any more: no process names one of their folders
    in its command line or environment (every Flower process there has its FLWR_HOME)."""
    if not WORKDIRS:
        pytest.skip("no deployment test ran in this session")
    leftovers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            text = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        text = text.replace(b"\0", b" ").decode(errors="replace")
        if state != "Z" and any(str(w) in text for w in WORKDIRS):
            leftovers.append((int(entry.name), text[:160]))
    assert leftovers == []

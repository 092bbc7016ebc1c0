"""Runs on conversational data: held-out perplexity, trackers read back, ``hetlora chat``,
``hetlora evaluate`` with the same rendering, and the Flower ClientApp's own data file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hetlora.cli import app
from hetlora.config import make_config
from hetlora.errors import HetLoRAError

FAST = {
    "rounds": 2,
    "clients_per_round": 2,
    "local_steps": 4,
    "batch_size": 4,
    "lr": 0.002,
    "min_examples": 4,
    "max_seq_len": 64,
    "eval_examples": 16,
    "rouge_examples": 2,
    "max_new_tokens": 6,
    "precision": "fp32",
}


def conversation(i: int, client: str) -> dict:
    return {
        "client_id": client,
        "messages": [
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": f"What is {i} and {i}?"},
            {"role": "assistant", "content": f"{i} and {i} is {2 * i}."},
            {"role": "user", "content": "And twice that?"},
            {"role": "assistant", "content": f"That is {4 * i}."},
        ],
    }


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat-data") / "chat.jsonl"
    rows = [conversation(i, f"client-{i % 3}") for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tracked_run(tiny_chat_model: Path, chat_data: Path, tmp_path_factory) -> Path:
    """A HetLoRA run on messages rows reporting to all three trackers (W&B offline)."""
    from hetlora.runtime.local import run

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path_factory.mktemp("tracked") / "run"
    cfg = make_config(
        {
            "model": str(tiny_chat_model),
            "data": str(chat_data),
            "report_to": ["tensorboard", "mlflow", "wandb"],
            **FAST,
        }
    )
    try:
        run(cfg, out)
    finally:
        mp.undo()
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_messages_run_improves_held_out_perplexity(tracked_run: Path) -> None:
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert summary["final_ppl"] < summary["base_ppl"]
    # ROUGE-L prompts are the conversation before its last answer, through the template.
    sample = json.loads((tracked_run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] == "And twice that?" and sample["reference"].startswith("That is ")


def test_evaluate_uses_the_same_rendering(tracked_run: Path) -> None:
    from hetlora.runtime.local import evaluate_run

    result = evaluate_run(tracked_run)
    assert result["test_ppl"] == pytest.approx(result["reported_ppl"], rel=1e-5)


def test_tensorboard_event_files_hold_the_round_metrics(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    rows = metrics(tracked_run)
    ppl = [(e.step, e.value) for e in acc.Scalars("test_ppl")]
    assert ppl == [(r["round"], pytest.approx(r["test_ppl"], rel=1e-6)) for r in rows]
    loss = [(e.step, e.value) for e in acc.Scalars("train_loss")]
    assert loss == [(r["round"], pytest.approx(r["train_loss"], rel=1e-6)) for r in rows[1:]]
    assert [e.value for e in acc.Scalars("bytes_up")] == [r["bytes_up"] for r in rows]
    mean_ranks = [e.value for e in acc.Scalars("rank/mean")]
    assert mean_ranks == [
        pytest.approx(sum(r["client_ranks"].values()) / len(r["client_ranks"])) for r in rows[1:]
    ]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_mlflow_file_store_holds_the_round_metrics(tracked_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("hetlora").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["r_max"] == "16" and run.data.params["report_to"].startswith("[")
    rows = metrics(tracked_run)
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_ppl")
    )
    assert history == [(r["round"], pytest.approx(r["test_ppl"])) for r in rows]
    down = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "bytes_down")
    )
    assert down == [(r["round"], r["bytes_down"]) for r in rows]
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert run.data.metrics["summary.final_ppl"] == pytest.approx(summary["final_ppl"])


def _wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file (a LevelDB-style log of 32 KiB blocks:
    a 7-byte file header, then records of checksum, length, type (full/first/middle/last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending + data if kind == 4 else data)
            pending = b""
            yield record
        else:
            pending += data


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_the_round_metrics(tracked_run: Path) -> None:
    (path,) = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
    rows = metrics(tracked_run)
    logged = [(h["_step"], h["test_ppl"]) for h in history if "test_ppl" in h]
    assert logged == [(r["round"], pytest.approx(r["test_ppl"])) for r in rows]
    assert [h["bytes_up"] for h in history if "bytes_up" in h] == [r["bytes_up"] for r in rows]
    assert config["r_max"] == 16 and config["data"].endswith("chat.jsonl")


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch) -> None:
    import importlib.util

    from hetlora import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(
        HetLoRAError, match=r"needs the mlflow package: pip install 'hetlora\[mlflow\]'"
    ):
        trackers.check_available(["tensorboard", "mlflow"])


def test_chat_answers_at_a_device_rank(tracked_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hetlora.evaluate import generate_greedy
    from hetlora.export import export_run

    runner = CliRunner()
    result = runner.invoke(
        app, ["chat", str(tracked_run), "--rank", "4", "--prompt", "What is 3 and 3?"]
    )
    assert result.exit_code == 0, result.output
    # The same answer from the rank-4 export, loaded the way a device would.
    folder = export_run(tracked_run, 4, tmp_path / "r4")
    config = json.loads((folder / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(folder))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 and 3?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    (expected,) = generate_greedy(model, tok, [prompt], FAST["max_new_tokens"], "cpu")
    assert expected and result.output == expected + "\n"
    full = runner.invoke(app, ["chat", str(tracked_run), "--prompt", "What is 3 and 3?"])
    assert full.exit_code == 0 and full.output.strip()


def test_chat_reads_a_conversation_from_stdin(tracked_run: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["chat", str(tracked_run), "--rank", "8"],
        input="What is 1 and 1?\n\nAnd?\nexit\nnever\n",
    )
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 2  # two user turns answered, then `exit`


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/nope"], "no such run directory"),
        (["{tmp}"], "is not a finished run"),
        (["{run}", "--rank", "17"], "--rank must lie in [1, 16]"),
        (["{run}", "--rank", "0"], "--rank must lie in [1, 16]"),
    ],
)
def test_chat_errors_are_one_line(tracked_run: Path, tmp_path: Path, args, message) -> None:
    args = [a.format(tmp=tmp_path, run=tracked_run) for a in args]
    result = CliRunner().invoke(app, ["chat", *args, "--prompt", "hi"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_chat_with_a_merged_model(tiny_chat_model: Path, chat_data: Path, tmp_path: Path) -> None:
    from hetlora.runtime.local import run

    out = tmp_path / "flora"
    cfg = make_config(
        {
            "model": str(tiny_chat_model),
            "data": str(chat_data),
            "method": "flora",
            **{**FAST, "rounds": 1, "rouge_examples": 0},
        }
    )
    run(cfg, out)
    result = CliRunner().invoke(app, ["chat", str(out), "--prompt", "What is 2 and 2?"])
    assert result.exit_code == 0 and result.output.strip(), result.output
    refused = CliRunner().invoke(app, ["chat", str(out), "--rank", "4", "--prompt", "hi"])
    assert refused.exit_code == 2 and "--rank does not apply" in refused.output


def test_flower_node_reads_messages_from_its_own_data_file(
    tiny_chat_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    import datasets

    from hetlora.runtime.flower.client_app import node_config, node_info, node_splits
    from hetlora.runtime.workspace import build_workspace

    # The run's data is Shakespeare; the server reports to TensorBoard, the device does not.
    run_cfg = make_config({"model": str(tiny_chat_model), "report_to": ["tensorboard"], **FAST})
    rows = [json.loads(line) for line in chat_data.read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "device"))
    datasets.DatasetDict(
        {"mine": datasets.Dataset.from_list(rows), "other": datasets.Dataset.from_list(rows[:3])}
    ).save_to_disk(str(tmp_path / "device-dict"))
    nodes = [
        {"data": str(chat_data)},
        {"data": str(tmp_path / "device")},
        {"data": str(tmp_path / "device-dict"), "split": "mine"},
    ]
    for node in nodes:
        node["client-id"] = "client-1"
        cfg = node_config(run_cfg, node)
        assert cfg.report_to == []
        info = node_info(cfg, node)
        assert info.client_id == "client-1" and info.num_examples == 8
    with pytest.raises(HetLoRAError, match="only with the node's own 'data'"):
        node_config(run_cfg, {"client-id": "client-1", "split": "mine"})
    cfg = node_config(run_cfg, nodes[1])
    ws = build_workspace(cfg, splits=node_splits(cfg, nodes[1]))  # what the node builds
    items = ws.client_items("client-1")
    assert all(item.target is not None and item.target[-1] for item in items)
    prompt = ws.renderer.prompt(ws.train_data["client-1"][0])
    assert ws.tokenizer.decode(prompt).endswith("### assistant:")

"""A resumed run goes on in the same MLflow and W&B runs (ids kept in RUN_DIR/trackers.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hetlora.trackers import IDS_FILE, Trackers


def _session(out: Path, rounds: range) -> None:
    trackers = Trackers(["mlflow", "wandb"], {"r_max": 16, "lr": 0.01}, out)
    try:
        for r in rounds:
            trackers.log_round({"round": r, "test_ppl": 100.0 - r, "bytes_up": 10 * r})
    finally:
        trackers.close()


def test_resumed_run_continues_the_same_tracker_runs(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    _session(out, range(0, 3))  # rounds 0-2, then the process dies; --resume opens again
    ids = json.loads((out / IDS_FILE).read_text())
    assert set(ids) == {"mlflow", "wandb"}
    _session(out, range(3, 5))
    assert json.loads((out / IDS_FILE).read_text()) == ids

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("hetlora").experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "test_ppl")
    )
    assert history == [(r, 100.0 - r) for r in range(5)]
    assert run.data.params["r_max"] == "16"

    # W&B offline: two offline folders (one a session), both of the same run id, which
    # `wandb sync` joins into one run. A folder is offline-run-<start second>-<id>; W&B adds
    # "-<n>" when a session starts in the same second as the last one (fast here).
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    name = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(ids['wandb'])}(-\d+)?")
    assert all(name.fullmatch(f.name) for f in folders), [f.name for f in folders]


def test_overwrite_starts_new_tracker_runs(tmp_path: Path, monkeypatch) -> None:
    """After --overwrite removed a run's tracker files, new runs start, in the same process too
    (a notebook or a sweep): MLflow keeps one store per URI for the life of a process, whose
    folder is gone, so it is laid out again."""
    from mlflow.tracking import MlflowClient

    from hetlora.runtime.loop import _prepare_out_dir

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    _session(out, range(0, 2))
    old = json.loads((out / IDS_FILE).read_text())
    _prepare_out_dir(out)  # what --overwrite does before a run
    assert not (out / IDS_FILE).exists() and not (out / "mlruns").exists()
    _session(out, range(0, 3))
    new = json.loads((out / IDS_FILE).read_text())
    assert set(new) == {"mlflow", "wandb"}
    assert new["wandb"] != old["wandb"] and new["mlflow"] != old["mlflow"]
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("hetlora").experiment_id])
    assert run.info.run_id == new["mlflow"] and run.info.status == "FINISHED"
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_ppl")
    )
    assert history == [(r, 100.0 - r) for r in range(3)]


def test_unreadable_ids_file_is_one_clear_error(tmp_path: Path) -> None:
    from hetlora.errors import HetLoRAError

    (tmp_path / IDS_FILE).write_text("{not json")
    with pytest.raises(HetLoRAError, match="trackers.json: unreadable .* remove it"):
        Trackers(["tensorboard"], {}, tmp_path)

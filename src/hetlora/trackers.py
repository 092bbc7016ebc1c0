"""Experiment trackers (the ``report_to`` key): TensorBoard, MLflow, Weights & Biases.

Every round's numbers from ``metrics.jsonl`` (losses, perplexity, ranks, bytes, FLOPs, tokens,
times) are logged at step = round, the run's config once, and the summary's numbers at the end.
Where each tracker writes:

* ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``SummaryWriter``);
* ``mlflow``: ``$MLFLOW_TRACKING_URI``, else a local file store in ``RUN_DIR/mlruns`` (MLflow 3
  keeps that store in maintenance mode; ``MLFLOW_ALLOW_FILE_STORE`` is set to allow it);
  experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``hetlora``, one MLflow run named after RUN_DIR;
* ``wandb``: project ``$WANDB_PROJECT`` or ``hetlora``, files in ``RUN_DIR/wandb``; the mode
  is W&B's own (``WANDB_MODE=offline`` keeps it on disk, ``wandb sync`` uploads it later).

Each tracker is an optional extra: ``pip install 'hetlora[tensorboard]'`` (or ``mlflow``,
``wandb``). The round loop calls `Trackers.log_round`, nothing else.

A resumed run (``--resume``) goes on in the same MLflow and W&B runs: their ids are kept in
``RUN_DIR/trackers.json`` when they open, and found there again (TensorBoard appends to the
same folder by itself). ``--overwrite`` removes the file with the trackers' folders.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from hetlora.errors import HetLoRAError, first_line

__all__ = ["OUTPUTS", "TRACKERS", "Trackers", "check_available", "round_scalars"]

log = logging.getLogger(__name__)

#: The trackers a run can report to (config key ``report_to``).
TRACKERS = ("tensorboard", "mlflow", "wandb")
#: Where the MLflow and W&B run ids of a run directory are kept, to resume them.
IDS_FILE = "trackers.json"
#: What the trackers write inside a run directory (removed by ``--overwrite``).
OUTPUTS = ("tensorboard", "mlruns", "wandb", IDS_FILE)

_ROUND_KEYS = (
    "train_loss",
    "test_loss",
    "test_ppl",
    "bytes_up",
    "bytes_down",
    "flops",
    "tokens",
    "wall_s",
    "elapsed_s",
    "epsilon",
    "clipped",
)


def check_available(names: list[str]) -> None:
    """Refuse a tracker whose package is not installed (before any work is done)."""
    for name in names:
        if name not in TRACKERS:
            raise HetLoRAError(f"unknown tracker {name!r}; expected one of: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:  # each tracker's module and extra: its name
            raise HetLoRAError(
                f"report_to {name!r} needs the {name} package: pip install 'hetlora[{name}]'"
            )


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def round_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` row, flat: its scalar keys, the sampled clients'
    ranks (``rank/mean``, ``rank/min``, ``rank/max``), ``rank_count/R`` (clients at rank R)
    and ``rejected`` (replies left out)."""
    out = {key: v for key in _ROUND_KEYS if (v := _number(row.get(key))) is not None}
    ranks = [r for r in (row.get("client_ranks") or {}).values() if isinstance(r, int)]
    if ranks:
        out["rank/mean"] = sum(ranks) / len(ranks)
        out["rank/min"] = float(min(ranks))
        out["rank/max"] = float(max(ranks))
    for rank, count in (row.get("rank_counts") or {}).items():
        out[f"rank_count/{rank}"] = float(count)
    if "rejected" in row:
        out["rejected"] = float(len(row["rejected"]))
    if "skipped" in row:
        out["skipped"] = float(bool(row["skipped"]))
    return out


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``summary.json`` under ``summary/`` (tier perplexities as
    ``summary/tier_ppl/R``)."""
    out = {}
    for key, value in summary.items():
        number = _number(value)
        if number is not None and not isinstance(value, bool):
            out[f"summary/{key}"] = number
    for rank, ppl in (summary.get("tier_ppl") or {}).items():
        if _number(ppl) is not None:
            out[f"summary/tier_ppl/{rank}"] = float(ppl)
    return out


class Trackers:
    """The open trackers of one run.

    Args:
        names: the ``report_to`` list (checked with `check_available`).
        config: the run's config as a dict (logged once).
        out_dir: the run directory, where trackers keep their files.
    """

    def __init__(self, names: list[str], config: dict[str, Any], out_dir: Path) -> None:
        check_available(names)
        self.names = list(names)
        self._tb = self._mlflow = self._mlflow_run = self._wandb = None
        name = Path(out_dir).resolve().name
        self._ids_path = Path(out_dir) / IDS_FILE
        self._ids = self._read_ids()
        try:
            if "tensorboard" in names:
                self._open_tensorboard(config, out_dir)
            if "mlflow" in names:
                self._open_mlflow(config, out_dir, name)
            if "wandb" in names:
                self._open_wandb(config, out_dir, name)
        except HetLoRAError:
            self.close()
            raise
        except Exception as exc:  # a tracker that cannot start (bad URI, W&B not logged in)
            self.close()
            raise HetLoRAError(
                f"a tracker of report_to {names} failed to start: {first_line(exc)}"
            ) from exc

    def _read_ids(self) -> dict[str, str]:
        try:
            ids = json.loads(self._ids_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            raise HetLoRAError(
                f"{self._ids_path}: unreadable ({exc}); remove it to start new tracker runs"
            ) from None
        return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}

    def _keep_id(self, tracker: str, run_id: str) -> None:
        self._ids[tracker] = run_id
        self._ids_path.parent.mkdir(parents=True, exist_ok=True)
        self._ids_path.write_text(json.dumps(self._ids, indent=2) + "\n")

    def _open_tensorboard(self, config: dict[str, Any], out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        lines = "\n".join(f"    {k} = {v!r}" for k, v in config.items())
        self._tb.add_text("config", lines, global_step=0)
        self._tb.flush()

    def _open_mlflow(self, config: dict[str, Any], out_dir: Path, name: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            store = out_dir / "mlruns"
            uri = store.resolve().as_uri()
            # MLflow 3 keeps its file store only on request; it is the one that needs no server
            # or database, so a run directory can hold its own tracking data.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            # MLflow keeps one store object per URI for the life of the process, and a store
            # lays out its folder only when it is built: after --overwrite removed the folder,
            # a second run in the same process (a notebook, a sweep) would find none. A new
            # FileStore lays it out again for the cached one.
            if not store.is_dir():
                from mlflow.store.tracking.file_store import FileStore

                FileStore(uri)
        client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "hetlora"
        previous = self._ids.get("mlflow")
        if previous:  # a resumed run: the same MLflow run goes on (its params are logged)
            client.update_run(previous, status="RUNNING")
            self._mlflow, self._mlflow_run = client, previous
            log.info("mlflow: resuming run %s in %s", previous, uri)
            return
        found = client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=name)
        params = [Param(k, str(v)[:6000]) for k, v in config.items()]
        client.log_batch(run.info.run_id, params=params)
        self._mlflow, self._mlflow_run = client, run.info.run_id
        self._keep_id("mlflow", run.info.run_id)
        log.info("mlflow: run %s in %s", run.info.run_id, uri)

    def _open_wandb(self, config: dict[str, Any], out_dir: Path, name: str) -> None:
        import wandb

        previous = self._ids.get("wandb")
        self._wandb = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "hetlora",
            name=name,
            dir=str(out_dir),
            config=config,
            # a resumed run goes on in the same W&B run ("allow": offline files are synced into it)
            **({"id": previous, "resume": "allow"} if previous else {}),
            # hetlora's own display owns the terminal: no W&B banner, no console capture.
            settings=wandb.Settings(silent=True, console="off"),
        )
        if not previous:
            self._keep_id("wandb", self._wandb.id)
        log.info("wandb: run %s in %s", self._wandb.id, self._wandb.dir)

    def log(self, values: dict[str, float], step: int) -> None:
        """Log ``values`` at ``step`` to every open tracker."""
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()
        if self._mlflow is not None:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(key.replace("/", "."), v, now, step) for key, v in values.items()]
            self._mlflow.log_batch(self._mlflow_run, metrics=metrics)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def log_round(self, row: dict[str, Any]) -> None:
        """Log one ``metrics.jsonl`` row (see `round_scalars`) at step = its round."""
        self.log(round_scalars(row), int(row["round"]))

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        """Log the numbers of ``summary.json`` at ``step`` (the last round)."""
        self.log(summary_scalars(summary), step)

    def close(self) -> None:
        """Flush and close every tracker (the MLflow run ends FINISHED)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._mlflow_run)
            self._mlflow = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

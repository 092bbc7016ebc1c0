"""What every process of a run builds first: the clients' data and the PEFT-wrapped base model.

`Workspace` is the set-up both sides share. A client (in-process, or a Flower ClientApp)
needs nothing more: `Workspace.train` runs `hetlora.client.run_task` on one task with
the client's own seeded batches. The server side adds the held-out sets and the method's server
(`hetlora.runtime.local`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from hetlora import adapters
from hetlora.accounting import model_size
from hetlora.client import TrainSettings, run_task
from hetlora.config import Config
from hetlora.data.batching import Tokenized, batch_stream
from hetlora.data.chat import Renderer, make_renderer
from hetlora.hardware import (
    compile_layers,
    compile_seconds,
    resolve_bf16,
    resolve_compile,
    resolve_device,
    store_frozen_linears,
    use_cpu_attention,
)
from hetlora.methods import SERVERS
from hetlora.methods.base import ClientTask, Reply
from hetlora.models import default_target_modules, load_base_model
from hetlora.runtime import checkpoint
from hetlora.runtime.splits import Splits, federated_splits

Progress = Callable[[dict[str, Any]], None]


@dataclass
class Workspace:
    """A run's data and model in one process; made by `build_workspace`.

    Attributes:
        train_data, val_data, test_data: client -> examples (`federated_splits`).
        client_ids: every client of the data, sorted (a client's index seeds its batches).
        peft_model: the base model wrapped once with PEFT at r_max (global adapter).
        settings: local-training hyperparameters (what a client does is decided by its task).
        compiled: whether the decoder layers are compiled (training uses the fixed-rank step).
    """

    cfg: Config
    device: torch.device
    bf16: bool
    train_data: Splits
    val_data: Splits
    test_data: Splits
    bad_rows_skipped: int
    tokenizer: Any
    model_path: str
    renderer: Renderer
    target_modules: list[str]
    peft_model: PeftModel
    model_fp: str  # of the pristine base, before any merge: a checkpoint names it
    size: Any
    compiled: bool
    compile_start: float
    settings: TrainSettings
    client_ids: list[str] = field(default_factory=list)
    _tokenized: dict[str, list[Tokenized]] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def client_items(self, client_id: str) -> list[Tokenized]:
        """The client's tokenised training examples (tokenised on first use)."""
        if client_id not in self._tokenized:
            items = self.renderer.tokenize_all(self.train_data[client_id], self.cfg.max_seq_len)
            self._tokenized[client_id] = items
        return self._tokenized[client_id]

    def client_batches(
        self, client_id: str, round_idx: int, index: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The client's batch stream for one round, seeded by (seed, round, client index):
        ``index`` is the client's position among the run's clients (the server sends it to a
        Flower node; default: its position in ``client_ids``)."""
        if index is None:
            index = self.client_ids.index(client_id)
        rng = np.random.default_rng([self.cfg.seed, round_idx, index, 0xBA])
        return batch_stream(self.client_items(client_id), self.cfg.batch_size, rng, self.pad_id)

    def train(
        self,
        task: ClientTask,
        round_idx: int,
        on_step: Callable[[int, float], None] | None = None,
        settings: TrainSettings | None = None,
        index: int | None = None,
    ) -> Reply:
        """What one client does in a round: `hetlora.client.run_task` on its own data
        (with ``settings`` and the batch seed's ``index`` in place of the run's: a Flower
        ClientApp's come with the task)."""
        client = task.client_id
        return run_task(
            self.peft_model,
            task,
            self.client_batches(client, round_idx, index),
            settings or self.settings,
            self.target_modules,
            self.device,
            num_examples=len(self.train_data[client]),
            on_step=on_step,
        )


def build_workspace(
    cfg: Config,
    trains_locally: bool = True,
    progress: Progress | None = None,
    splits: tuple[Splits, Splits, Splits] | None = None,
) -> Workspace:
    """Load the data and the base model, wrap it with PEFT (seeded), settle precision and compile.

    ``splits`` (train, validation, test) replaces the run's data (`federated_splits`):
    a Flower node passes its own client's, a Flower server none at all. ``trains_locally =
    False`` (a Flower ServerApp, which trains nothing) keeps ``compile = "auto"`` off.
    """
    emit = progress or (lambda event: None)
    device = resolve_device(cfg.device)
    bf16 = resolve_bf16(cfg.precision, device)
    emit({"event": "setup", "stage": "data"})
    report: dict[str, int] = {}
    train_data, val_data, test_data = (
        splits if splits is not None else federated_splits(cfg, report)
    )
    client_ids = sorted(train_data)
    emit({"event": "setup", "stage": "model"})
    base = load_base_model(cfg.model, device)
    model_fp = checkpoint.model_fingerprint(base.model)  # as loaded: before any cast
    renderer = make_renderer(
        base.tokenizer, cfg.chat_template, [ex for c in client_ids for ex in train_data[c]]
    )
    target_modules = cfg.target_modules or default_target_modules(base.model)
    if bf16 and SERVERS[cfg.method].frozen_base:  # cast once, not in every step
        store_frozen_linears(base.model, torch.bfloat16)
    use_cpu_attention(base.model, device)
    compile_start = compile_seconds()
    steps = cfg.rounds * min(cfg.clients_per_round, len(client_ids)) * cfg.local_steps
    compiled = SERVERS[cfg.method].lora and resolve_compile(
        cfg.compile, device, steps if trains_locally else 0
    )
    if compiled:
        compile_layers(base.model)
    torch.manual_seed(cfg.seed)
    peft_model = adapters.wrap(base.model, cfg.r_max, cfg.lora_scale, target_modules)
    return Workspace(
        cfg=cfg,
        device=device,
        bf16=bf16,
        train_data=train_data,
        val_data=val_data,
        test_data=test_data,
        bad_rows_skipped=report.get("bad_rows_skipped", 0),
        tokenizer=base.tokenizer,
        model_path=base.path,
        renderer=renderer,
        target_modules=target_modules,
        peft_model=peft_model,
        model_fp=model_fp,
        size=model_size(peft_model),
        compiled=compiled,
        compile_start=compile_start,
        settings=TrainSettings(
            local_steps=cfg.local_steps,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            lambda_=cfg.lambda_,
            gamma=cfg.gamma,
            r_min=cfg.r_min,
            lora_scale=cfg.lora_scale,
            bf16=bf16,
            fixed_rank=cfg.r_max if compiled else 0,
        ),
        client_ids=client_ids,
    )

"""In-process simulation: every client of a federated run, one base model, one process.

The base model is loaded once and wrapped once with PEFT; each sampled client's adapter is put in,
trained and taken out (:mod:`hetlora.client`), and the server steps come from
:mod:`hetlora.methods.hetlora`. Per-client state is only the rank (in the server state) and the
client's examples. Writes ``config.toml``, ``metrics.jsonl``, ``adapter/``, ``samples.jsonl``
and ``summary.json`` into the output directory.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetlora import adapters
from hetlora.accounting import model_size, train_flops
from hetlora.client import TrainSettings, run_task
from hetlora.config import Config
from hetlora.data import Example, cap_examples, load_clients, split_clients, split_validation
from hetlora.data.batching import Tokenized, batch_stream
from hetlora.data.chat import Renderer, make_renderer
from hetlora.errors import HetLoRAError
from hetlora.evaluate import generate_greedy, perplexity, rouge_l
from hetlora.export import export_adapter
from hetlora.hardware import (
    compile_layers,
    compile_seconds,
    compiled_graphs,
    no_compile,
    resolve_bf16,
    resolve_compile,
    resolve_device,
    store_frozen_linears,
    use_cpu_attention,
)
from hetlora.lora import live_rank, pad, rank_of, truncate
from hetlora.methods import FROZEN_BASE, hetlora, make_server
from hetlora.methods.base import BaseUpdate
from hetlora.models import default_target_modules, load_base_model
from hetlora.runtime import checkpoint
from hetlora.trackers import OUTPUTS as TRACKER_OUTPUTS
from hetlora.trackers import Trackers, check_available

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
OUTPUT_FILES = (
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "samples.jsonl",
    "adapter",
    "model",
    "checkpoint.pt",
    *TRACKER_OUTPUTS,
)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (checked before any work)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise HetLoRAError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise HetLoRAError(
            f"output directory {out_dir} is not empty (use --overwrite to replace it)"
        )


def _prepare_out_dir(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # with --overwrite: remove only what a run writes
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class Simulation:
    """A prepared run: base model, clients, ranks, method server and evaluation set.

    Call :meth:`run` for the whole run, or :meth:`run_round` / :meth:`evaluate` step by step.
    """

    #: Whether clients train in this process (the Flower ServerApp, a subclass, only evaluates:
    #: ``compile = "auto"`` stays off there).
    trains_locally = True

    def __init__(self, cfg: Config, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.progress = progress or (lambda event: None)
        self.device = resolve_device(cfg.device)
        self.bf16 = resolve_bf16(cfg.precision, self.device)
        check_available(cfg.report_to)
        self._emit("setup", stage="data")
        data_report: dict[str, int] = {}
        self.train_data, val_data, test_data = federated_splits(cfg, data_report)
        self.bad_rows_skipped = data_report.get("bad_rows_skipped", 0)
        self.client_ids = sorted(self.train_data)
        self._client_index = {c: i for i, c in enumerate(self.client_ids)}
        self._emit("setup", stage="model")
        base = load_base_model(cfg.model, self.device)
        self.tokenizer = base.tokenizer
        self.model_path = base.path
        self.renderer: Renderer = make_renderer(
            self.tokenizer,
            cfg.chat_template,
            [ex for c in self.client_ids for ex in self.train_data[c]],
        )
        self.target_modules = cfg.target_modules or default_target_modules(base.model)
        if self.bf16 and cfg.method in FROZEN_BASE:  # cast once, not in every step
            store_frozen_linears(base.model, torch.bfloat16)
        use_cpu_attention(base.model, self.device)
        self._compile_start = compile_seconds()
        self.compiled = cfg.method != "full_ft" and resolve_compile(
            cfg.compile,
            self.device,
            cfg.rounds * min(cfg.clients_per_round, len(self.client_ids)) * cfg.local_steps
            if self.trains_locally
            else 0,
        )
        if self.compiled:
            compile_layers(base.model)
        torch.manual_seed(cfg.seed)
        self.peft_model = adapters.wrap(base.model, cfg.r_max, cfg.lora_scale, self.target_modules)
        # of the pristine base: FLoRA and full fine-tuning change the base weights every round,
        # and a checkpoint must name the model the run started from, which resume rebuilds
        self._model_fp = checkpoint.model_fingerprint(base.model)
        self.size = model_size(self.peft_model)
        self.pad_id = self.tokenizer.pad_token_id
        self.eval_examples = eval_set(test_data, cfg.eval_examples, cfg.seed)
        self.eval_items = self.renderer.tokenize_all(self.eval_examples, cfg.max_seq_len)
        # the validation set (val_fraction > 0): the same cap and shuffle as the test set
        self.val_items = (
            self.renderer.tokenize_all(
                eval_set(val_data, cfg.eval_examples, cfg.seed), cfg.max_seq_len
            )
            if cfg.val_fraction > 0
            else []
        )
        self._tokenized: dict[str, list[Tokenized]] = {}
        ranks = hetlora.assign_ranks(
            self.client_ids,
            cfg.r_min,
            cfg.r_max,
            cfg.seed,
            cfg.tiers or None,
        )
        initial = adapters.read_factors(self.peft_model)
        base_weights = (
            {n: p.detach() for n, p in adapters.base_parameters(self.peft_model).items()}
            if cfg.method == "full_ft"
            else None
        )
        self.server = make_server(cfg, initial, ranks, self.client_ids, base_weights)
        self._pristine: dict[str, torch.Tensor] | None = None  # W0 of adapted modules (FLoRA)
        self._initial_ranks = dict(self.server.ranks)
        self.round = 0  # rounds attempted (a skipped round counts; the server counts aggregations)
        self.settings = TrainSettings(
            local_steps=cfg.local_steps,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            lambda_=cfg.lambda_,
            gamma=cfg.gamma,
            r_min=cfg.r_min,
            pruning=cfg.pruning,
            lora_scale=cfg.lora_scale,
            bf16=self.bf16,
            fixed_rank=cfg.r_max if self.compiled else 0,
        )

    def _emit(self, event: str, **fields: Any) -> None:
        self.progress({"event": event, **fields})

    def client_items(self, client_id: str) -> list[Tokenized]:
        """The client's tokenised training examples (tokenised on first use)."""
        if client_id not in self._tokenized:
            items = self.renderer.tokenize_all(self.train_data[client_id], self.cfg.max_seq_len)
            self._tokenized[client_id] = items
        return self._tokenized[client_id]

    def client_batches(self, client_id: str, round_idx: int) -> Iterator[dict[str, torch.Tensor]]:
        """The client's batch stream for one round, seeded by (seed, round, client index)."""
        index = self._client_index[client_id]
        rng = np.random.default_rng([self.cfg.seed, round_idx, index, 0xBA])
        return batch_stream(self.client_items(client_id), self.cfg.batch_size, rng, self.pad_id)

    def sample_clients(self, round_idx: int) -> list[str]:
        """The round's clients: a seeded choice without replacement."""
        rng = np.random.default_rng([self.cfg.seed, round_idx, 0x5A])
        k = min(self.cfg.clients_per_round, len(self.client_ids))
        picked = sorted(rng.choice(len(self.client_ids), k, replace=False))
        return [self.client_ids[i] for i in picked]

    def _show_global(self, rank: int | None = None) -> None:
        """Put the server's global adapter (cut to ``rank``) into the model; zeros if it has none."""
        factors = self.server.global_factors()
        if factors is None:
            live = adapters.live_factors(self.peft_model, adapters.GLOBAL)
            with torch.no_grad():
                for b, _ in live.values():
                    b.zero_()  # B = 0: the adapter adds nothing to the (merged) base
            return
        r_max = self.cfg.r_max
        if rank is not None and rank < rank_of(factors):
            factors = truncate(factors, rank)
        adapters.write_factors(
            self.peft_model, {n: pad(b, a, r_max) for n, (b, a) in factors.items()}
        )

    def evaluate(self, rank: int | None = None, split: str = "test") -> tuple[float, float]:
        """Mean NLL and perplexity of the global model (adapter cut to ``rank``) on the held-out
        test set, or on the validation set with ``split = "val"``.

        Eager even when training is compiled: see docs/performance.md (compiled evaluation).
        """
        self._show_global(rank)
        with no_compile():
            return perplexity(
                self.peft_model,
                self.val_items if split == "val" else self.eval_items,
                self.cfg.eval_batch_size,
                self.pad_id,
                self.device,
                bf16=self.bf16,
            )

    def _apply_base_update(self) -> None:
        update = self.server.base_update()
        if update is None:
            return
        if update.deltas:  # W = W0 + (sum of every merge): the same arithmetic on resume
            self._set_merged_base(self.server.base_state())
        if update.weights:
            adapters.load_base_weights(self.peft_model, update.weights)

    def _set_merged_base(self, base: BaseUpdate | None) -> None:
        if base is None or not base.deltas:
            return
        if self._pristine is None:  # the base as loaded, before any merge
            self._pristine = adapters.adapted_base_weights(self.peft_model)
        adapters.set_base(self.peft_model, self._pristine, base.deltas)

    def run_round(self) -> dict[str, Any]:
        """One federated round: sample, distribute, train (and prune) locally, aggregate."""
        cfg = self.cfg
        t0 = time.perf_counter()
        round_idx = self.round + 1
        sampled = self.sample_clients(round_idx)
        per_client: dict[str, dict[str, Any]] = {}
        rejected: dict[str, str] = {}
        for i, client_id in enumerate(sampled):
            task = self.server.task(client_id)
            self._emit(
                "client_start",
                round=round_idx,
                client=client_id,
                index=i,
                of=len(sampled),
                rank=task.rank,
            )
            batches = self.client_batches(client_id, round_idx)
            update, result = run_task(
                self.peft_model,
                task,
                batches,
                self.settings,
                self.target_modules,
                self.device,
                num_examples=len(self.train_data[client_id]),
                on_step=lambda step, loss, c=client_id: self._emit(
                    "step", round=round_idx, client=c, step=step, of=cfg.local_steps, loss=loss
                ),
            )
            params = update.trainable_params
            per_client[client_id] = {
                "rank_received": task.rank,
                "rank": update.rank,
                "train_loss": result.train_loss,
                "bytes_down": task.nbytes,
                "bytes_up": update.nbytes,
                "trainable_params": params,
                "flops": train_flops(
                    self.size, result.tokens, result.target_tokens, params, task.kind == "full"
                ),
                "tokens": result.tokens,
                "step_s": result.step_seconds,
                "compile_s": result.compile_seconds,
            }
            try:
                self.server.check(update, cfg.max_update_norm)
                self.server.add(update)
            except HetLoRAError as exc:
                log.warning("round %d: reply of %s left out: %s", round_idx, client_id, exc)
                rejected[client_id] = str(exc)
            del update
            self._emit(
                "client_end",
                round=round_idx,
                client=client_id,
                loss=result.train_loss,
                rank=per_client[client_id]["rank"],
                rank_received=task.rank,
            )
        accepted = len(per_client) - len(rejected)
        if accepted < cfg.min_clients:
            log.warning(
                "round %d skipped: %d valid replies, fewer than min_clients = %d",
                round_idx,
                accepted,
                cfg.min_clients,
            )
            self.server.reset_round()
            weights: dict[str, float] = {}
        else:
            weights = self.server.finish()
            self._apply_base_update()
        self.round = round_idx
        ranks = self.server.ranks
        row: dict[str, Any] = {
            "round": round_idx,
            "train_loss": float(np.mean([c["train_loss"] for c in per_client.values()])),
            "client_ranks": {c: ranks[c] for c in sampled},
            "ranks_received": {c: v["rank_received"] for c, v in per_client.items()},
            "rank_counts": _counts(ranks.values()),
            **self.rank_dynamics(),
            "weights": weights,
            "bytes_up": sum(c["bytes_up"] for c in per_client.values()),
            "bytes_down": sum(c["bytes_down"] for c in per_client.values()),
            "flops": sum(c["flops"] for c in per_client.values()),
            "tokens": sum(c["tokens"] for c in per_client.values()),
            "step_s": sum(c["step_s"] for c in per_client.values()),
            "compile_s": sum(c["compile_s"] for c in per_client.values()),
            "clients": per_client,
            "rejected": rejected,
            "skipped": accepted < cfg.min_clients,
        }
        if round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds:
            self._emit("eval", round=round_idx)
            row.update(self.evaluations())
        row["wall_s"] = time.perf_counter() - t0
        return row

    def evaluations(self) -> dict[str, float]:
        """The metrics row's evaluation: ``eval_loss``/``eval_ppl`` on the test set, and
        ``val_loss``/``val_ppl`` on the validation set where the run has one."""
        out: dict[str, float] = {}
        if self.val_items:
            out["val_loss"], out["val_ppl"] = self.evaluate(split="val")
        out["eval_loss"], out["eval_ppl"] = self.evaluate()
        return out

    def rank_dynamics(self) -> dict[str, Any]:
        """Ranks after the round, for the metrics row.

        ``global_rank``: the live rank of the global adapter (:func:`hetlora.lora.live_rank`:
        positions where both global factors are non-zero), the largest over modules, and
        ``global_rank_min`` the smallest; absent for methods without a global adapter (FLoRA,
        full fine-tuning). ``ranks``: every client's current rank (sampled or not; absent
        where the method has no ranks).
        """
        out: dict[str, Any] = {}
        factors = self.server.global_factors() if self.server.has_global_adapter else None
        if factors:
            out["global_rank_min"], out["global_rank"] = live_rank(factors)
        if any(self.server.ranks.values()):
            out["ranks"] = dict(self.server.ranks)
        return out

    def generations(self) -> tuple[list[str], list[str]]:
        """Greedy generations of the current global model on the ROUGE sample."""
        sample = self.eval_examples[: self.cfg.rouge_examples]
        self._show_global()
        with no_compile():  # one new token per call: compiled layers would recompile per length
            preds = generate_greedy(
                self.peft_model,
                self.tokenizer,
                [self.renderer.prompt(ex) for ex in sample],
                self.cfg.max_new_tokens,
                self.device,
                bf16=self.bf16,
            )
        return preds, [ex.response.strip() for ex in sample]

    def tier_ranks(self) -> list[int]:
        """Ranks at which the final global adapter is evaluated: every tier in use, r_min, r_max."""
        cfg = self.cfg
        if not self.server.has_global_adapter:
            return []
        in_use = set(self._initial_ranks.values()) | set(self.server.ranks.values())
        if cfg.tiers or cfg.method == "homlora":
            ranks = in_use
        else:  # uniform draws: every rank is "in use"; evaluate the ends and the middle
            ranks = {cfg.r_min, (cfg.r_min + cfg.r_max) // 2}
        top = self.server.r_max()
        return sorted(r for r in ranks | {cfg.r_min, top} if 1 <= r <= top)

    def save_model(self, out_dir: Path) -> None:
        """The global adapter (``adapter/``), or the merged model (``model/``) for FLoRA/full FT.

        For FLoRA and full fine-tuning this removes the LoRA layers: call it last.
        """
        if self.server.has_global_adapter:
            self._show_global()
            if self.server.r_max() < self.cfg.r_max:  # homlora at rank < r_max: save at its rank
                export_adapter(
                    adapters.read_factors(self.peft_model),
                    self.server.r_max(),
                    self.cfg.lora_scale,
                    self.target_modules,
                    self.model_path,
                    out_dir / "adapter",
                )
            else:
                self.peft_model.save_pretrained(
                    str(out_dir / "adapter"), selected_adapters=[adapters.GLOBAL]
                )
            return
        # The merged base is the global model; dropping the LoRA layers ends the simulation.
        self.peft_model.unload().save_pretrained(str(out_dir / "model"))
        self.tokenizer.save_pretrained(str(out_dir / "model"))

    def _fingerprints(self) -> tuple[str, str]:
        data = {c: len(self.train_data[c]) for c in self.client_ids}
        return self._model_fp, checkpoint.fingerprint(data)

    def _save_checkpoint(
        self, out_dir: Path, metrics: list[dict[str, Any]], base_preds: list[str]
    ) -> None:
        model_fp, data_fp = self._fingerprints()
        checkpoint.save(
            out_dir,
            {
                "config": self.cfg.to_dict(),
                "model": model_fp,
                "data": data_fp,
                "round": self.round,
                "server": self.server,
                "initial_ranks": self._initial_ranks,
                "metrics": metrics,
                "base_preds": base_preds,
            },
        )

    def _restore(self, out_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
        payload = checkpoint.load(out_dir)
        model_fp, data_fp = self._fingerprints()
        checkpoint.check_matches(payload, self.cfg.to_dict(), model_fp, data_fp)
        self.server = payload["server"]
        self.round = payload["round"]
        self._initial_ranks = payload["initial_ranks"]
        base = self.server.base_state()
        self._set_merged_base(base)
        if base is not None and base.weights:
            adapters.load_base_weights(self.peft_model, base.weights)
        return list(payload["metrics"]), list(payload.get("base_preds") or [])

    def run(self, out_dir: Path, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
        """Run every round, writing the output directory as it goes; returns the summary.

        A checkpoint is written after every round; with ``resume`` the run continues from the
        last complete round in ``out_dir`` (same config, model and data, else refused).
        """
        cfg = self.cfg
        metrics: list[dict[str, Any]] = []
        base_preds: list[str] = []
        if resume:
            metrics, base_preds = self._restore(out_dir)
        else:
            check_out_dir(out_dir, overwrite)
            _prepare_out_dir(out_dir)
            cfg.save(out_dir / "config.toml")
        trackers = Trackers(cfg.report_to, cfg.to_dict(), out_dir)
        try:
            return self._run(out_dir, metrics, base_preds, resume, trackers)
        finally:
            trackers.close()

    def _run(
        self,
        out_dir: Path,
        metrics: list[dict[str, Any]],
        base_preds: list[str],
        resume: bool,
        trackers: Trackers,
    ) -> dict[str, Any]:
        cfg = self.cfg
        start = time.perf_counter() - (metrics[-1]["elapsed_s"] if metrics else 0.0)
        with (out_dir / "metrics.jsonl").open("w") as fh:
            for row in metrics:  # on resume: exactly the rows of the checkpointed rounds
                fh.write(json.dumps(row) + "\n")
            fh.flush()

            def record(row: dict[str, Any]) -> None:
                row["elapsed_s"] = time.perf_counter() - start
                metrics.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                trackers.log_round(row)
                self._emit("round_end", row=row, rounds=cfg.rounds)

            if not resume:
                self._emit("eval", round=0)
                t0 = time.perf_counter()
                evals = self.evaluations()
                if cfg.rouge_examples:
                    self._emit("generate", which="base")
                    base_preds, _ = self.generations()
                record(
                    {
                        "round": 0,
                        **evals,
                        "rank_counts": _counts(self.server.ranks.values()),
                        **self.rank_dynamics(),
                        "bytes_up": 0,
                        "bytes_down": 0,
                        "flops": 0,
                        "wall_s": time.perf_counter() - t0,
                    }
                )
                self._save_checkpoint(out_dir, metrics, base_preds)
            else:
                self._emit("resume", round=self.round)
            while self.round < cfg.rounds:
                self._emit("round_start", round=self.round + 1, rounds=cfg.rounds)
                record(self.run_round())
                self._save_checkpoint(out_dir, metrics, base_preds)
        summary = self._summary(metrics)
        tiers = {}
        for rank in self.tier_ranks():
            self._emit("eval", round=f"final, rank {rank}")
            tiers[str(rank)] = self.evaluate(rank)[1]
        summary["tier_ppl"] = tiers
        if cfg.rouge_examples:
            self._emit("generate", which="final")
            preds, refs = self.generations()
            summary["rouge_l_base"] = rouge_l(base_preds, refs)
            summary["rouge_l"] = rouge_l(preds, refs)
            with (out_dir / "samples.jsonl").open("w") as fh:
                for ex, base, pred in zip(self.eval_examples, base_preds, preds, strict=False):
                    sample = {"prompt": ex.prompt, "reference": ex.response.strip()}
                    sample.update({"base": base, cfg.method: pred})
                    fh.write(json.dumps(sample) + "\n")
        self.save_model(out_dir)
        summary["wall_s"] = time.perf_counter() - start
        trackers.log_summary(summary, self.round)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._emit("done", summary=summary)
        return summary

    def _summary(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        evals = [m for m in metrics if "eval_ppl" in m]
        best = min(evals, key=lambda m: m["eval_ppl"])
        ranks = list(self.server.ranks.values())
        per_client = [c for m in metrics for c in m.get("clients", {}).values()]
        summary = {
            "method": self.cfg.method,
            "model": self.model_path,
            "device": str(self.device),
            "bf16": self.bf16,
            "rounds": self.cfg.rounds,
            "clients": len(self.client_ids),
            "bad_rows_skipped": self.bad_rows_skipped,
            "eval_examples": len(self.eval_items),
            "base_ppl": evals[0]["eval_ppl"],
            "final_ppl": evals[-1]["eval_ppl"],
            "best_ppl": best["eval_ppl"],
            "best_round": best["round"],
            "bytes_up": sum(m.get("bytes_up", 0) for m in metrics),
            "bytes_down": sum(m.get("bytes_down", 0) for m in metrics),
            "flops": sum(m.get("flops", 0) for m in metrics),
            "tokens": sum(m.get("tokens", 0) for m in metrics),
            "compiled": self.compiled,
            "step_s": sum(m.get("step_s", 0.0) for m in metrics),
            "compile_s": compile_seconds() - self._compile_start,  # this process's
            "compiled_graphs": compiled_graphs(),
            "trainable_params_mean": float(np.mean([c["trainable_params"] for c in per_client]))
            if per_client
            else 0.0,
            "mean_rank_initial": float(np.mean(list(self._initial_ranks.values()))),
            "mean_rank_final": float(np.mean(ranks)),
            "clients_pruned": sum(
                1 for c, r in self.server.ranks.items() if r < self._initial_ranks[c]
            ),
            "target_modules": self.target_modules,
        }
        if "global_rank" in metrics[-1]:
            summary["global_rank_final"] = metrics[-1]["global_rank"]
        if self.val_items:  # test perplexity is reported as final/best_ppl; these add validation
            best_val = min(evals, key=lambda m: m["val_ppl"])
            summary.update(
                {
                    "val_examples": len(self.val_items),
                    "final_val_ppl": evals[-1]["val_ppl"],
                    "best_val_ppl": best_val["val_ppl"],
                    "best_val_round": best_val["round"],
                    "test_ppl_at_best_val": best_val["eval_ppl"],
                }
            )
        return summary


def _counts(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def federated_data(
    cfg: Config, report: dict[str, int] | None = None
) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """The run's clients, split per client into training and held-out test examples (seeded);
    the validation split, if any, is left out of the training examples."""
    train, _, test = federated_splits(cfg, report)
    return train, test


def federated_splits(
    cfg: Config, report: dict[str, int] | None = None
) -> tuple[dict[str, list[Example]], dict[str, list[Example]], dict[str, list[Example]]]:
    """The run's clients, split per client into training, validation and test examples.

    ``max_clients`` picks the clients and ``max_examples_per_client`` caps each one's examples
    (both seeded), then :func:`~hetlora.data.split_clients` takes the test split and
    :func:`~hetlora.data.split_validation` the validation split out of the rest, so the test
    split does not depend on ``val_fraction``. ``report``, if given, receives
    ``bad_rows_skipped`` (see :func:`hetlora.data.load_clients`).
    """
    clients = load_clients(
        cfg.data,
        min_examples=cfg.min_examples,
        partitioner=cfg.partitioner,
        num_partitions=cfg.num_partitions,
        partition_by=cfg.partition_by or None,
        dirichlet_alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        on_bad_rows=cfg.on_bad_rows,
        report=report,
        split=cfg.split,
    )
    if cfg.max_clients and len(clients) > cfg.max_clients:
        rng = np.random.default_rng([cfg.seed, 0xC11])
        keep = sorted(rng.choice(sorted(clients), size=cfg.max_clients, replace=False))
        clients = {c: clients[c] for c in keep}
    if cfg.max_examples_per_client:
        clients = cap_examples(clients, cfg.max_examples_per_client, cfg.seed)
    train, test = split_clients(clients, cfg.test_fraction, cfg.seed)
    sizes = {c: len(v) for c, v in clients.items()}
    train, val = split_validation(train, sizes, cfg.val_fraction, cfg.seed)
    return train, val, test


def eval_set(test_data: dict[str, list[Example]], cap: int, seed: int) -> list[Example]:
    """The fixed held-out set: the union of the clients' test splits, shuffled, capped at ``cap``."""
    pooled = [ex for c in sorted(test_data) for ex in test_data[c]]
    if not pooled:
        raise HetLoRAError("no held-out examples: raise test_fraction or min_examples")
    order = np.random.default_rng([seed, 0xE7]).permutation(len(pooled))
    if cap:
        order = order[:cap]
    return [pooled[i] for i in order]


def run(
    cfg: Config, out_dir: Path | str, overwrite: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    """Prepare and run a simulation; see :class:`Simulation`."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    sim = Simulation(cfg, progress)
    return sim.run(out_dir, overwrite=overwrite)


def evaluate_run(run_dir: Path | str) -> dict[str, Any]:
    """Reload a finished run's adapter with ``PeftModel.from_pretrained`` and re-measure it.

    Rebuilds the held-out set from the run's ``config.toml`` (same seed, same split), loads the
    base model and the saved ``adapter/`` the way a user would, and returns the perplexity it
    measures next to the one ``metrics.jsonl`` reports for the last round.
    """
    from peft import PeftModel

    from hetlora.config import load_config

    run_dir = Path(run_dir)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json"):
        if not (run_dir / name).is_file():
            raise HetLoRAError(f"{run_dir} is not a finished run: {name} is missing")
    cfg = load_config(run_dir / "config.toml")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reported = [r for r in rows if "eval_ppl" in r][-1]
    device = resolve_device(cfg.device)
    base = load_base_model(cfg.model, device)
    use_cpu_attention(base.model, device)
    model = PeftModel.from_pretrained(base.model, str(run_dir / "adapter")).to(device)
    train_data, test_data = federated_data(cfg)
    renderer = make_renderer(
        base.tokenizer, cfg.chat_template, [ex for v in train_data.values() for ex in v]
    )
    items = renderer.tokenize_all(eval_set(test_data, cfg.eval_examples, cfg.seed), cfg.max_seq_len)
    loss, ppl = perplexity(
        model, items, cfg.eval_batch_size, base.tokenizer.pad_token_id, device, bf16=summary["bf16"]
    )
    return {
        "round": reported["round"],
        "reported_ppl": reported["eval_ppl"],
        "eval_loss": loss,
        "eval_ppl": ppl,
        "bf16": summary["bf16"],
        "eval_examples": len(items),
    }

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetlora import adapters
from hetlora.client import TrainSettings, train_client
from hetlora.config import Config
from hetlora.data import Example, load_clients, split_clients
from hetlora.data.batching import Tokenized, batch_stream, tokenize_all
from hetlora.errors import HetLoRAError
from hetlora.evaluate import generate_greedy, perplexity, rouge_l
from hetlora.hardware import resolve_bf16, resolve_device
from hetlora.methods import hetlora
from hetlora.models import default_target_modules, load_base_model

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
OUTPUT_FILES = ("config.toml", "metrics.jsonl", "summary.json", "samples.jsonl", "adapter")


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
    """A prepared run: base model, clients, ranks and evaluation set, ready for :meth:`run`."""

    def __init__(self, cfg: Config, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.progress = progress or (lambda event: None)
        self.device = resolve_device(cfg.device)
        self.bf16 = resolve_bf16(cfg.precision, self.device)
        self._emit("setup", stage="data")
        self.train_data, test_data = federated_data(cfg)
        self.client_ids = sorted(self.train_data)
        self._emit("setup", stage="model")
        base = load_base_model(cfg.model, self.device)
        self.tokenizer = base.tokenizer
        self.model_path = base.path
        self.target_modules = cfg.target_modules or default_target_modules(base.model)
        torch.manual_seed(cfg.seed)
        self.peft_model = adapters.wrap(base.model, cfg.r_max, cfg.lora_scale, self.target_modules)
        self.pad_id = self.tokenizer.pad_token_id
        self.eval_examples = eval_set(test_data, cfg.eval_examples, cfg.seed)
        self.eval_items = tokenize_all(self.tokenizer, self.eval_examples, cfg.max_seq_len)
        self._tokenized: dict[str, list[Tokenized]] = {}
        ranks = hetlora.assign_ranks(
            self.client_ids,
            cfg.r_min,
            cfg.r_max,
            cfg.seed,
            cfg.tiers if cfg.rank_distribution == "tiers" else None,
        )
        self._initial_ranks = dict(ranks)
        self.state = hetlora.init(adapters.read_factors(self.peft_model), ranks)
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
        )

    def _emit(self, event: str, **fields: Any) -> None:
        self.progress({"event": event, **fields})

    def client_items(self, client_id: str) -> list[Tokenized]:
        """The client's tokenised training examples (tokenised on first use)."""
        if client_id not in self._tokenized:
            items = tokenize_all(self.tokenizer, self.train_data[client_id], self.cfg.max_seq_len)
            self._tokenized[client_id] = items
        return self._tokenized[client_id]

    def sample_clients(self, round_idx: int) -> list[str]:
        """The round's clients: a seeded choice without replacement."""
        rng = np.random.default_rng([self.cfg.seed, round_idx, 0x5A])
        k = min(self.cfg.clients_per_round, len(self.client_ids))
        return [
            self.client_ids[i] for i in sorted(rng.choice(len(self.client_ids), k, replace=False))
        ]

    def evaluate(self) -> tuple[float, float]:
        """Mean NLL and perplexity of the current global adapter on the held-out set."""
        adapters.write_factors(self.peft_model, self.state.factors)
        return perplexity(
            self.peft_model,
            self.eval_items,
            self.cfg.eval_batch_size,
            self.pad_id,
            self.device,
            bf16=self.bf16,
        )

    def run_round(self) -> dict[str, Any]:
        """One federated round: sample, distribute, train and prune locally, aggregate."""
        cfg = self.cfg
        t0 = time.perf_counter()
        round_idx = self.state.round + 1
        sampled = self.sample_clients(round_idx)
        agg = hetlora.Aggregator(
            self.state,
            aggregation=cfg.aggregation,
            per_module=cfg.per_module_weights,
            data_size_factor=cfg.data_size_factor,
        )
        losses, bytes_up, bytes_down, tokens = [], 0, 0, 0
        ranks_received: dict[str, int] = {}
        for i, client_id in enumerate(sampled):
            message = hetlora.client_message(self.state, client_id)
            bytes_down += hetlora.factors_nbytes(message)
            ranks_received[client_id] = self.state.ranks[client_id]
            self._emit(
                "client_start",
                round=round_idx,
                client=client_id,
                index=i,
                of=len(sampled),
                rank=ranks_received[client_id],
            )
            index = self.client_ids.index(client_id)
            rng = np.random.default_rng([cfg.seed, round_idx, index, 0xBA])
            batches = batch_stream(self.client_items(client_id), cfg.batch_size, rng, self.pad_id)
            result = train_client(
                self.peft_model,
                message,
                batches,
                self.settings,
                self.target_modules,
                self.device,
                on_step=lambda step, loss, c=client_id: self._emit(
                    "step", round=round_idx, client=c, step=step, of=cfg.local_steps, loss=loss
                ),
            )
            bytes_up += hetlora.factors_nbytes(result.factors)
            tokens += result.tokens
            losses.append(result.train_loss)
            agg.add(
                hetlora.ClientUpdate(
                    client_id=client_id,
                    factors=result.factors,
                    rank=result.rank,
                    num_examples=len(self.train_data[client_id]),
                    train_loss=result.train_loss,
                )
            )
            self._emit(
                "client_end",
                round=round_idx,
                client=client_id,
                loss=result.train_loss,
                rank=result.rank,
                rank_received=result.rank_received,
            )
        self.state = agg.finish()
        row: dict[str, Any] = {
            "round": round_idx,
            "train_loss": float(np.mean(losses)),
            "client_ranks": {c: self.state.ranks[c] for c in sampled},
            "ranks_received": ranks_received,
            "weights": agg.weights(),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "tokens": tokens,
        }
        if round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds:
            self._emit("eval", round=round_idx)
            row["eval_loss"], row["eval_ppl"] = self.evaluate()
        row["wall_s"] = time.perf_counter() - t0
        return row

    def generations(self) -> tuple[list[str], list[str]]:
        """Greedy generations of the current global adapter on the ROUGE sample."""
        sample = self.eval_examples[: self.cfg.rouge_examples]
        adapters.write_factors(self.peft_model, self.state.factors)
        preds = generate_greedy(
            self.peft_model,
            self.tokenizer,
            [ex.prompt for ex in sample],
            self.cfg.max_new_tokens,
            self.device,
        )
        return preds, [ex.response.strip() for ex in sample]

    def run(self, out_dir: Path, overwrite: bool = False) -> dict[str, Any]:
        """Run every round, writing the output directory as it goes; returns the summary."""
        cfg = self.cfg
        check_out_dir(out_dir, overwrite)
        _prepare_out_dir(out_dir)
        cfg.save(out_dir / "config.toml")
        start = time.perf_counter()
        metrics: list[dict[str, Any]] = []
        with (out_dir / "metrics.jsonl").open("w") as fh:

            def record(row: dict[str, Any]) -> None:
                row["elapsed_s"] = time.perf_counter() - start
                metrics.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                self._emit("round_end", row=row, rounds=cfg.rounds)

            self._emit("eval", round=0)
            t0 = time.perf_counter()
            loss0, ppl0 = self.evaluate()
            record(
                {
                    "round": 0,
                    "eval_loss": loss0,
                    "eval_ppl": ppl0,
                    "bytes_up": 0,
                    "bytes_down": 0,
                    "wall_s": time.perf_counter() - t0,
                }
            )
            base_preds: list[str] = []
            if cfg.rouge_examples:
                self._emit("generate", which="base")
                base_preds, refs = self.generations()
            for _ in range(cfg.rounds):
                self._emit("round_start", round=self.state.round + 1, rounds=cfg.rounds)
                record(self.run_round())
        adapters.write_factors(self.peft_model, self.state.factors)
        self.peft_model.save_pretrained(
            str(out_dir / "adapter"), selected_adapters=[adapters.GLOBAL]
        )
        summary = self._summary(metrics, time.perf_counter() - start)
        if cfg.rouge_examples:
            self._emit("generate", which="final")
            preds, refs = self.generations()
            summary["rouge_l_base"] = rouge_l(base_preds, refs)
            summary["rouge_l"] = rouge_l(preds, refs)
            with (out_dir / "samples.jsonl").open("w") as fh:
                for ex, base, pred in zip(self.eval_examples, base_preds, preds, strict=False):
                    fh.write(
                        json.dumps(
                            {
                                "prompt": ex.prompt,
                                "reference": ex.response.strip(),
                                "base": base,
                                "hetlora": pred,
                            }
                        )
                        + "\n"
                    )
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._emit("done", summary=summary)
        return summary

    def _summary(self, metrics: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
        evals = [m for m in metrics if "eval_ppl" in m]
        best = min(evals, key=lambda m: m["eval_ppl"])
        ranks = list(self.state.ranks.values())
        return {
            "method": self.cfg.method,
            "model": self.model_path,
            "device": str(self.device),
            "bf16": self.bf16,
            "rounds": self.cfg.rounds,
            "clients": len(self.client_ids),
            "eval_examples": len(self.eval_items),
            "base_ppl": evals[0]["eval_ppl"],
            "final_ppl": evals[-1]["eval_ppl"],
            "best_ppl": best["eval_ppl"],
            "best_round": best["round"],
            "bytes_up": sum(m.get("bytes_up", 0) for m in metrics),
            "bytes_down": sum(m.get("bytes_down", 0) for m in metrics),
            "tokens": sum(m.get("tokens", 0) for m in metrics),
            "mean_rank_initial": float(np.mean(list(self._initial_ranks.values()))),
            "mean_rank_final": float(np.mean(ranks)),
            "clients_pruned": sum(
                1 for c, r in self.state.ranks.items() if r < self._initial_ranks[c]
            ),
            "target_modules": self.target_modules,
            "wall_s": wall_s,
        }


def federated_data(cfg: Config) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """The run's clients, split per client into training and held-out examples (seeded)."""
    clients = load_clients(
        cfg.data,
        min_examples=cfg.min_examples,
        partitioner=cfg.partitioner,
        num_partitions=cfg.num_partitions,
        partition_by=cfg.partition_by or None,
        dirichlet_alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
    )
    if cfg.max_clients and len(clients) > cfg.max_clients:
        rng = np.random.default_rng([cfg.seed, 0xC11])
        keep = sorted(rng.choice(sorted(clients), size=cfg.max_clients, replace=False))
        clients = {c: clients[c] for c in keep}
    return split_clients(clients, cfg.test_fraction, cfg.seed)


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
    model = PeftModel.from_pretrained(base.model, str(run_dir / "adapter")).to(device)
    _, test_data = federated_data(cfg)
    items = tokenize_all(
        base.tokenizer, eval_set(test_data, cfg.eval_examples, cfg.seed), cfg.max_seq_len
    )
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

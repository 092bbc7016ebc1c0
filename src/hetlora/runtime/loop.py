"""The round loop both runtimes share: every round over a transport, evaluation, checkpoints
and the run directory.

`RoundLoop` runs every round (`.rounds`) over a transport: `.rounds.InProcessClients` in
`hetlora.runtime.local.LocalRun`, the in-process run (one base model, wrapped once with PEFT,
every client's adapter put in, trained and taken out in turn), or Flower's Grid in
`hetlora.runtime.flower.server_app`, which builds its `RoundLoop` by composition. Writes
``config.toml``, ``metrics.jsonl``, ``adapter/``, ``samples.jsonl``, ``summary.json`` and
``checkpoint.pt`` into the output directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
import tomllib
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from hetlora import adapters, provenance
from hetlora.config import Config
from hetlora.errors import HetLoRAError
from hetlora.evaluate import combine_nll, combine_rouge, generate_greedy, perplexity, rouge_sums
from hetlora.export import export_adapter
from hetlora.hardware import (
    compile_seconds,
    compiled_graphs,
    no_compile,
)
from hetlora.lora import cut
from hetlora.methods import hetlora, make_server, server_class
from hetlora.methods.base import Server
from hetlora.runtime import checkpoint
from hetlora.runtime.rounds import (
    Transport,
    counts,
    current_names,
    play_round,
    rank_dynamics,
    round_clients,
    round_row,
)
from hetlora.runtime.splits import eval_set, server_eval_set
from hetlora.runtime.workspace import Progress, Workspace
from hetlora.trackers import OUTPUTS as TRACKER_OUTPUTS
from hetlora.trackers import Trackers

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


def check_out_dir(out_dir: Path, overwrite: bool, resume_hint: str = "") -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (checked before any work);
    ``resume_hint`` names the option that would continue what is there."""
    if out_dir.exists() and not out_dir.is_dir():
        raise HetLoRAError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        go_on = f"{resume_hint} to go on with it, or " if resume_hint else ""
        raise HetLoRAError(
            f"output directory {out_dir} is not empty (use {go_on}--overwrite to replace it)"
        )


def _prepare_out_dir(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # with --overwrite: remove only what a run writes
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class HeldOut(Protocol):
    """Held-out examples measured elsewhere (a Flower run's nodes, each on its own split).

    ``counts``: examples in the capped sample per split (``"test"``, ``"val"``).
    ``sums(server, ranks, split)``: rank -> the `hetlora.evaluate.nll_sums` of every holder of
    the split's sample, for the server's global adapter cut to each of ``ranks`` (None: whole).
    ``rouge_sums(server)``: the `hetlora.evaluate.rouge_sums` of every holder of the ROUGE
    sample (the first ``rouge_examples`` of the test sample), for the global adapter.
    ``missing``: client -> why it was left out of a measurement since the dict was last cleared.
    """

    counts: dict[str, int]
    missing: dict[str, str]

    def sums(
        self, server: Server, ranks: Sequence[int | None], split: str
    ) -> dict[int | None, list[tuple[float, int]]]: ...

    def rouge_sums(self, server: Server) -> list[tuple[float, int]]: ...


class GlobalModel:
    """The server's view of the global model: the held-out sets, evaluation, generation, saving.

    It shows the server's global adapter (or merged base) in the workspace's model and measures
    it on the union of the clients' held-out examples, or asks ``held_out`` for the sums and
    combines them (`hetlora.evaluate.combine_nll`: the same perplexity; ROUGE-L likewise,
    `hetlora.evaluate.combine_rouge`). Without a validation split ``val_count`` is 0;
    with ``held_out`` no generation is seen here (the holders score their own).
    """

    def __init__(self, ws: Workspace, held_out: HeldOut | None = None) -> None:
        cfg = ws.cfg
        self.ws = ws
        self.cfg = cfg
        self.pad_id = ws.pad_id
        self.held_out = held_out
        self.eval_examples: list = []
        self.eval_items: list = []
        self.val_items: list = []
        if held_out is None:
            self.eval_examples = eval_set(ws.test_data, cfg.eval_examples, cfg.seed)
            self.eval_items = ws.renderer.tokenize_all(self.eval_examples, cfg.max_seq_len)
            # the validation set (val_fraction > 0): the same cap and shuffle as the test set
            val = eval_set(ws.val_data, cfg.eval_examples, cfg.seed) if cfg.val_fraction > 0 else []
            self.val_items = ws.renderer.tokenize_all(val, cfg.max_seq_len)
        self.server_examples = server_eval_set(cfg) if cfg.server_eval_data else []
        self.server_items = ws.renderer.tokenize_all(self.server_examples, cfg.max_seq_len)
        self._pristine: dict[str, torch.Tensor] | None = None  # W0 of adapted modules (FLoRA)

    @property
    def eval_count(self) -> int:
        """Examples in the held-out test sample."""
        return self.held_out.counts["test"] if self.held_out is not None else len(self.eval_items)

    @property
    def val_count(self) -> int:
        """Examples in the validation sample (0: no validation split)."""
        return self.held_out.counts["val"] if self.held_out is not None else len(self.val_items)

    @property
    def scores_rouge(self) -> bool:
        """Whether the run reports ROUGE-L (``rouge_examples`` > 0)."""
        return bool(self.cfg.rouge_examples)

    def rouge(self, server: Server) -> tuple[float, list[str]]:
        """ROUGE-L of the global model's greedy generations on the ROUGE sample, and the
        generations where they are made here (none when the holders score their own)."""
        if self.held_out is not None:
            return combine_rouge(self.held_out.rouge_sums(server)), []
        preds, refs = self.generations(server, self.eval_examples)
        return combine_rouge([rouge_sums(preds, refs)]), preds

    def server_rouge(self, server: Server) -> tuple[float, list[str]]:
        """ROUGE-L and the generations of the global model on the first ``rouge_examples`` of
        the server-side evaluation set."""
        preds, refs = self.generations(server, self.server_examples)
        return combine_rouge([rouge_sums(preds, refs)]), preds

    def show(self, server: Server, rank: int | None = None) -> None:
        """Put the server's global adapter (cut to ``rank``) into the model; zeros if it has none."""
        model = self.ws.peft_model
        factors = server.global_factors()
        if factors is None:
            with torch.no_grad():
                for b, _ in adapters.live_factors(model, adapters.GLOBAL).values():
                    b.zero_()  # B = 0: the adapter adds nothing to the (merged) base
            return
        adapters.write_padded(model, cut(factors, rank), self.cfg.r_max)

    def evaluate(
        self, server: Server, rank: int | None = None, split: str = "test"
    ) -> tuple[float, float]:
        """Mean NLL and perplexity of the global model (adapter cut to ``rank``) on the held-out
        test set, on the validation set with ``split = "val"``, or on the server-side evaluation
        set with ``split = "server"`` (always measured here).

        Eager even when training is compiled: see docs/performance.md (compiled evaluation).
        """
        if self.held_out is not None and split != "server":
            return combine_nll(self.held_out.sums(server, [rank], split)[rank])
        items = {"val": self.val_items, "server": self.server_items}.get(split, self.eval_items)
        self.show(server, rank)
        with no_compile():
            return perplexity(
                self.ws.peft_model,
                items,
                self.cfg.eval_batch_size,
                self.pad_id,
                self.ws.device,
                bf16=self.ws.bf16,
            )

    def evaluate_ranks(
        self, server: Server, ranks: Sequence[int | None]
    ) -> dict[int | None, tuple[float, float]]:
        """`evaluate` on the test set at each of ``ranks`` (None: the whole adapter); with
        ``held_out``, one request to each holder for all of them."""
        if self.held_out is not None and ranks:
            sums = self.held_out.sums(server, ranks, "test")
            return {rank: combine_nll(sums[rank]) for rank in ranks}
        return {rank: self.evaluate(server, rank) for rank in ranks}

    def evaluations(
        self, server: Server, tiers: Sequence[int] = ()
    ) -> tuple[dict[str, Any], dict[int, float]]:
        """The metrics row's evaluation, and the test perplexity at each of ``tiers`` (measured
        with the row's own: one request to each holder for all of them).

        The row has ``test_loss``/``test_ppl`` on the test set, and
        ``val_loss``/``val_ppl`` on the validation set where the run has one,
        ``server_eval_loss``/``server_eval_ppl`` on the server-side set where the run names one
        (``server_eval_data``). With ``held_out`` also ``eval_missing``: client -> why it was
        left out of these measurements (empty when every holder answered), so a perplexity over
        fewer examples shows."""
        out: dict[str, Any] = {}
        if self.held_out is not None:
            self.held_out.missing.clear()
        if self.val_count:
            out["val_loss"], out["val_ppl"] = self.evaluate(server, split="val")
        test = self.evaluate_ranks(server, [None, *tiers])
        out["test_loss"], out["test_ppl"] = test[None]
        if self.server_items:
            out["server_eval_loss"], out["server_eval_ppl"] = self.evaluate(server, split="server")
        if self.held_out is not None:
            out["eval_missing"] = dict(sorted(self.held_out.missing.items()))
        return out, {rank: test[rank][1] for rank in tiers}

    def generations(self, server: Server, examples: list) -> tuple[list[str], list[str]]:
        """Greedy generations of the current global model on the first ``rouge_examples`` of
        ``examples`` (the held-out or the server-side sample), and their references."""
        sample = examples[: self.cfg.rouge_examples]
        self.show(server)
        with no_compile():  # one new token per call: compiled layers would recompile per length
            preds = generate_greedy(
                self.ws.peft_model,
                self.ws.tokenizer,
                [self.ws.renderer.prompt(ex) for ex in sample],
                self.cfg.max_new_tokens,
                self.ws.device,
                bf16=self.ws.bf16,
                extra_stops=self.ws.renderer.end_of_turn,
            )
        return preds, [ex.response.strip() for ex in sample]

    def set_base(self, server: Server) -> None:
        """The base model as the method has changed it so far (FLoRA, full FT), after a round
        and on resume: W0 + the sum of every merge (the same arithmetic both times), and every
        replaced weight."""
        base = server.base_state()
        if base is None:
            return
        if base.deltas:
            if self._pristine is None:  # the base as loaded, before any merge
                self._pristine = adapters.adapted_base_weights(self.ws.peft_model)
            adapters.set_base(self.ws.peft_model, self._pristine, base.deltas)
        if base.weights:
            adapters.load_base_weights(self.ws.peft_model, base.weights)

    def save(self, server: Server, out_dir: Path) -> None:
        """The global adapter (``adapter/``), or the merged model (``model/``) for FLoRA, FedEx-LoRA
        and full FT.

        For FLoRA, FedEx-LoRA and full fine-tuning this removes the LoRA layers: call it last.
        """
        ws = self.ws
        if server.has_global_adapter and server.base_state() is not None:
            # FedEx-LoRA: the global model is the changed base plus the adapter; a PEFT adapter
            # alone would load onto the pristine base, so the merged model is what is saved
            self.show(server)
            merged = ws.peft_model.merge_and_unload(adapter_names=[adapters.GLOBAL])
            merged.save_pretrained(str(out_dir / "model"))
            ws.tokenizer.save_pretrained(str(out_dir / "model"))
            return
        if server.has_global_adapter:
            self.show(server)
            if server.r_max() < self.cfg.r_max:  # homlora at rank < r_max: save at its rank
                export_adapter(
                    adapters.read_factors(ws.peft_model),
                    server.r_max(),
                    self.cfg.lora_scale,
                    ws.target_modules,
                    ws.model_path,
                    out_dir / "adapter",
                )
            else:
                ws.peft_model.save_pretrained(
                    str(out_dir / "adapter"), selected_adapters=[adapters.GLOBAL]
                )
            return
        # The merged base is the global model; dropping the LoRA layers ends the run.
        ws.peft_model.unload().save_pretrained(str(out_dir / "model"))
        ws.tokenizer.save_pretrained(str(out_dir / "model"))


class RoundLoop:
    """Every round of a run over one transport: the round loop both runtimes use.

    Args:
        ws: the run's data and model (`hetlora.runtime.workspace.build_workspace`).
        server: the method's server over ``client_ids``.
        transport: moves tasks and replies (`.rounds.InProcessClients`, Flower's Grid).
        client_ids: the clients taking part (sampled from, in this order).
        min_clients: a round with fewer accepted replies is skipped.
        progress: receives the run's progress events.
        summary_extra: entries the transport adds to ``summary.json`` (Flower: runtime, nodes).
        held_out: where the held-out sets are measured (Flower: the nodes); None: here, on the
            workspace's test and validation splits.
        sizes: client -> training examples (default: the workspace's; a Flower server has
            only the counts its nodes declared).

    Call `run` for the whole run, or `run_round` / `evaluate` step by step.
    """

    def __init__(
        self,
        ws: Workspace,
        server: Server,
        transport: Transport,
        client_ids: Sequence[str],
        min_clients: int,
        progress: Progress | None = None,
        summary_extra: dict[str, Any] | None = None,
        held_out: HeldOut | None = None,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.ws = ws
        self.cfg = ws.cfg
        self.server = server
        self.transport = transport
        self.client_ids = list(client_ids)
        self.min_clients = min_clients
        self.progress = progress or (lambda event: None)
        self.summary_extra = summary_extra or {}
        self.model = GlobalModel(ws, held_out)
        # the tiers' test perplexities, measured with the last round's row (`run_round`)
        self.final_tiers: dict[int, float] | None = None
        self.sizes = (
            dict(sizes) if sizes is not None else {c: len(ws.train_data[c]) for c in client_ids}
        )
        self.initial_ranks = dict(server.ranks)
        self.round = 0  # rounds attempted (a skipped round counts; the server counts aggregations)

    def _emit(self, event: str, **fields: Any) -> None:
        self.progress({"event": event, **fields})

    def sample_clients(self, round_idx: int) -> list[str]:
        """The round's clients: a seeded choice without replacement (`round_clients`)."""
        return round_clients(self.cfg, self.server, self.client_ids, round_idx)

    def evaluate(self, rank: int | None = None, split: str = "test") -> tuple[float, float]:
        """Mean NLL and perplexity of the global model; see `GlobalModel.evaluate`."""
        return self.model.evaluate(self.server, rank, split)

    def run_round(self) -> dict[str, Any]:
        """One federated round (`.rounds.play_round`); returns its metrics row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        round_idx = self.round + 1
        outcome = play_round(
            round_idx,
            self.server,
            self.transport,
            self.sample_clients(round_idx),
            self.min_clients,
            cfg.max_update_norm,
            self.ws.size,
        )
        if not outcome.skipped:
            self.model.set_base(self.server)
        self.round = round_idx
        row = round_row(outcome, self.server)
        if round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds:
            self._emit("eval", round=round_idx)
            # the last round's adapter is the final one: its tiers below the whole adapter
            # (which the row measures) go in the same request
            last = round_idx == cfg.rounds
            tiers = [r for r in self.tier_ranks() if r < self.server.r_max()] if last else []
            evals, tier_ppl = self.model.evaluations(self.server, tiers)
            row.update(evals)
            if last:
                self.final_tiers = tier_ppl
        row["wall_s"] = time.perf_counter() - t0
        return row

    def tier_ranks(self) -> list[int]:
        """Ranks at which the final global adapter is evaluated: every tier in use, r_min, r_max."""
        cfg = self.cfg
        if not self.server.has_global_adapter:
            return []
        if cfg.tiers or "tiers" not in type(self.server).options:  # the ranks in use
            ranks = set(self.initial_ranks.values()) | set(self.server.ranks.values())
        else:  # uniform draws: every rank is "in use"; evaluate the ends and the middle
            ranks = {cfg.r_min, (cfg.r_min + cfg.r_max) // 2}
        top = self.server.r_max()
        return sorted(r for r in ranks | {cfg.r_min, top} if 1 <= r <= top)

    def _fingerprints(self) -> tuple[str, str]:
        data = {c: self.sizes[c] for c in self.client_ids}
        return self.ws.model_fp, checkpoint.fingerprint(data)

    def _save_checkpoint(
        self, out_dir: Path, metrics: list[dict[str, Any]], base: dict[str, Any]
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
                "initial_ranks": self.initial_ranks,
                "metrics": metrics,
                "base_preds": base.get("preds", []),
                "base": base,
            },
        )

    def _restore(self, out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        payload = checkpoint.load(out_dir)
        model_fp, data_fp = self._fingerprints()
        prepared = functools.partial(checkpoint.model_fingerprint, self.ws.peft_model)
        checkpoint.check_matches(payload, self.cfg.to_dict(), model_fp, data_fp, prepared)
        self.server = payload["server"]
        plan = getattr(self.server, "dp", None)
        if plan is not None and not plan.target_epsilon and plan.rounds != self.cfg.rounds:
            # a given sigma: the run may go on to more rounds (the accountant composes them all)
            self.server.dp = dataclasses.replace(plan, rounds=self.cfg.rounds)
        self.round = payload["round"]
        self.initial_ranks = payload["initial_ranks"]
        self.model.set_base(self.server)
        base = payload.get("base")
        if base is None:  # a checkpoint that kept the base generations only
            preds = list(payload.get("base_preds") or [])
            refs = [ex.response.strip() for ex in self.model.eval_examples[: len(preds)]]
            if len(refs) != len(preds):  # generations made where this run has no examples
                raise HetLoRAError(
                    f"{out_dir} has a checkpoint without the base model's ROUGE-L that this "
                    "run cannot recompute (its held-out examples are on the nodes): start afresh"
                )
            base = {"preds": preds, "rouge_l": combine_rouge([rouge_sums(preds, refs)])}
        return [current_names(row) for row in payload["metrics"]], base

    def run(self, out_dir: Path, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
        """Run every round, writing the output directory as it goes; returns the summary.

        A checkpoint is written after every round; with ``resume`` the run continues from the
        last complete round in ``out_dir`` (same config, model and data, else refused; more
        ``rounds`` extend the run).
        """
        cfg = self.cfg
        provenance.code_state()  # the commit of the code this process runs, before any round
        metrics: list[dict[str, Any]] = []
        base: dict[str, Any] = {}
        if resume:
            metrics, base = self._restore(out_dir)
            stored = tomllib.loads((out_dir / "config.toml").read_text())
            if stored.get("rounds") != cfg.rounds:  # extended: the file says what now ran
                cfg.save(out_dir / "config.toml")
        else:
            check_out_dir(out_dir, overwrite)
            _prepare_out_dir(out_dir)
            cfg.save(out_dir / "config.toml")
        with closing(Trackers(cfg.report_to, cfg.to_dict(), out_dir)) as trackers:
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
                    row, base = self._round_zero()
                    record(row)
                    self._save_checkpoint(out_dir, metrics, base)
                else:
                    self._emit("resume", round=self.round)
                while self.round < cfg.rounds:
                    self._emit("round_start", round=self.round + 1, rounds=cfg.rounds)
                    record(self.run_round())
                    self._save_checkpoint(out_dir, metrics, base)
            summary = self._summary(metrics)
            held_out = self.model.held_out
            if held_out is not None:
                held_out.missing.clear()
            ranks = self.tier_ranks()
            # the last round run here measured the final adapter whole (the top tier) and cut
            # to the other tiers, on the same test set: those are the tiers' numbers, unless
            # some holder did not answer then (it is asked again)
            last = metrics[-1]
            known: dict[int, float] = {}
            if ranks and self.final_tiers is not None and not last.get("eval_missing"):
                known = {**self.final_tiers, self.server.r_max(): last["test_ppl"]}
            asked = [rank for rank in ranks if rank not in known]
            if asked:
                self._emit("eval", round=f"final, ranks {', '.join(map(str, asked))}")
            tiers = self.model.evaluate_ranks(self.server, asked)
            known |= {rank: tiers[rank][1] for rank in asked}
            summary["tier_ppl"] = {str(rank): known[rank] for rank in ranks}
            if self.model.scores_rouge:
                self._emit("generate", which="final")
                summary["rouge_l_base"] = base["rouge_l"]
                summary["rouge_l"], preds = self.model.rouge(self.server)
                shown = (self.model.eval_examples, base.get("preds", []), preds)
                if self.model.server_examples:
                    summary["server_rouge_l_base"] = base["server_rouge_l"]
                    summary["server_rouge_l"], preds = self.model.server_rouge(self.server)
                    shown = (self.model.server_examples, base["server_preds"], preds)
                if shown[2]:  # generations seen here: the server's own set's, or in-process
                    write_samples(out_dir / "samples.jsonl", cfg.method, *shown)
            if held_out is not None and held_out.missing:
                summary["eval_missing"]["final"] = dict(sorted(held_out.missing.items()))
            self.model.save(self.server, out_dir)
            summary["wall_s"] = time.perf_counter() - start
            trackers.log_summary(summary, self.round)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._emit("done", summary=summary)
        return summary

    def _round_zero(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The base model's row (round 0) and its ROUGE-L (``rouge_l``, and ``server_rouge_l``
        with a server-side set) with the generations seen here (``preds``, ``server_preds``).
        The row's ``eval_missing`` covers the ROUGE-L measurement too."""
        self._emit("eval", round=0)
        t0 = time.perf_counter()
        evals, _ = self.model.evaluations(self.server)
        base: dict[str, Any] = {"preds": []}
        if self.model.scores_rouge:
            self._emit("generate", which="base")
            base["rouge_l"], base["preds"] = self.model.rouge(self.server)
            if self.model.server_examples:
                base["server_rouge_l"], base["server_preds"] = self.model.server_rouge(self.server)
            if self.model.held_out is not None:  # with the holders the ROUGE-L left out
                evals["eval_missing"] = dict(sorted(self.model.held_out.missing.items()))
        row = {
            "round": 0,
            **evals,
            "rank_counts": counts(self.server.ranks.values()),
            **rank_dynamics(self.server),
            "bytes_up": 0,
            "bytes_down": 0,
            "flops": 0,
            "wall_s": time.perf_counter() - t0,
        }
        if self.server.dp is not None:
            row["epsilon"] = 0.0
        return row, base

    def _summary(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        ws = self.ws
        evals = [m for m in metrics if "test_ppl" in m]
        best = min(evals, key=lambda m: m["test_ppl"])
        ranks = list(self.server.ranks.values())
        per_client = [c for m in metrics for c in m.get("clients", {}).values()]
        summary = {
            "method": self.cfg.method,
            "model": ws.model_path,
            "device": str(ws.device),
            "bf16": ws.bf16,
            "rounds": self.cfg.rounds,
            "clients": len(self.client_ids),
            "bad_rows_skipped": ws.bad_rows_skipped,
            "eval_examples": self.model.eval_count,
            "base_ppl": evals[0]["test_ppl"],
            "final_ppl": evals[-1]["test_ppl"],
            "best_ppl": best["test_ppl"],
            "best_round": best["round"],
            "bytes_up": sum(m.get("bytes_up", 0) for m in metrics),
            "bytes_down": sum(m.get("bytes_down", 0) for m in metrics),
            "flops": sum(m.get("flops", 0) for m in metrics),
            "tokens": sum(m.get("tokens", 0) for m in metrics),
            "compiled": ws.compiled,
            "step_s": sum(m.get("step_s", 0.0) for m in metrics),
            "compile_s": compile_seconds() - ws.compile_start,  # this process's
            "compiled_graphs": compiled_graphs(),
            "trainable_params_mean": float(np.mean([c["trainable_params"] for c in per_client]))
            if per_client
            else 0.0,
            "mean_rank_initial": float(np.mean(list(self.initial_ranks.values()))),
            "mean_rank_final": float(np.mean(ranks)),
            "clients_pruned": sum(
                1 for c, r in self.server.ranks.items() if r < self.initial_ranks[c]
            ),
            "target_modules": ws.target_modules,
            "chat_template_used": ws.renderer.templated,
            "provenance": provenance.collect(ws.bf16, ws.device),
        }
        if "global_rank" in metrics[-1]:
            summary["global_rank_final"] = metrics[-1]["global_rank"]
        if self.model.val_count:  # test perplexity is final/best_ppl; these add validation
            best_val = min(evals, key=lambda m: m["val_ppl"])
            summary.update(
                {
                    "val_examples": self.model.val_count,
                    "final_val_ppl": evals[-1]["val_ppl"],
                    "best_val_ppl": best_val["val_ppl"],
                    "best_val_round": best_val["round"],
                    "test_ppl_at_best_val": best_val["test_ppl"],
                }
            )
        # round -> client -> why its reply was rejected (only rounds that rejected one)
        summary["rejected"] = {str(m["round"]): m["rejected"] for m in metrics if m.get("rejected")}
        summary["rounds_skipped"] = sum(1 for m in metrics if m.get("skipped"))
        if self.model.held_out is not None:  # round -> client -> why it was left out
            summary["eval_missing"] = {
                str(m["round"]): m["eval_missing"] for m in metrics if m.get("eval_missing")
            }
        if self.model.server_examples:
            summary["server_eval_examples"] = len(self.model.server_examples)
            summary["server_base_ppl"] = evals[0]["server_eval_ppl"]
            summary["server_final_ppl"] = evals[-1]["server_eval_ppl"]
        plan = self.server.dp
        if plan is not None:
            summary.update(
                epsilon=plan.epsilon(self.round),
                delta=plan.delta,
                dp_clip_norm=plan.clip_norm,
                dp_noise_multiplier=plan.noise_multiplier,
                dp_planned_rounds=plan.rounds,
            )
        summary.update(self.summary_extra)
        return summary


def write_samples(
    path: Path, method: str, examples: Sequence, base_preds: Sequence[str], preds: Sequence[str]
) -> None:
    """``samples.jsonl``: prompt, reference, the base model's and the final model's generation."""
    with path.open("w") as fh:
        for ex, base, pred in zip(examples, base_preds, preds, strict=False):
            sample = {"prompt": ex.prompt, "reference": ex.response.strip()}
            fh.write(json.dumps({**sample, "base": base, method: pred}) + "\n")


def initial_server(cfg: Config, ws: Workspace, ranks: dict[str, int]) -> Server:
    """The method's server at the start of a run: PEFT's init of the global adapter (and the
    base weights for full fine-tuning) over the clients of ``ranks``."""
    initial = adapters.read_factors(ws.peft_model)
    base_weights = (
        {n: p.detach() for n, p in adapters.base_parameters(ws.peft_model).items()}
        if not server_class(cfg.method).lora
        else None
    )
    return make_server(cfg, initial, ranks, sorted(ranks), base_weights)


def assigned_ranks(cfg: Config, client_ids: Sequence[str]) -> dict[str, int]:
    """Every client's seeded starting rank (`hetlora.methods.hetlora.assign_ranks`)."""
    tiers = cfg.tiers or None
    return hetlora.assign_ranks(list(client_ids), cfg.r_min, cfg.r_max, cfg.seed, tiers)

"""The in-process run (`LocalRun`: every sampled client trains in this process on one shared
base model) and `evaluate_run`, which re-measures a finished run or an exported adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hetlora.config import Config
from hetlora.data.chat import make_renderer
from hetlora.errors import HetLoRAError
from hetlora.evaluate import perplexity
from hetlora.hardware import resolve_device, use_cpu_attention
from hetlora.models import load_base_model
from hetlora.runtime.loop import RoundLoop, assigned_ranks, check_out_dir, initial_server
from hetlora.runtime.rounds import InProcessClients, read_metrics
from hetlora.runtime.splits import eval_set, federated_splits
from hetlora.runtime.workspace import Progress, build_workspace
from hetlora.trackers import check_available


class LocalRun(RoundLoop):
    """The in-process run: a `RoundLoop` whose transport trains every sampled client in
    this process (`.rounds.InProcessClients` over `Workspace.train`)."""

    def __init__(self, cfg: Config, progress: Progress | None = None) -> None:
        check_available(cfg.report_to)
        ws = build_workspace(cfg, trains_locally=True, progress=progress)
        server = initial_server(cfg, ws, assigned_ranks(cfg, ws.client_ids))
        transport = InProcessClients(ws.train, cfg.local_steps, self._emit)
        super().__init__(ws, server, transport, ws.client_ids, cfg.min_clients, progress)


def run(
    cfg: Config, out_dir: Path | str, overwrite: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    """Prepare and run a simulation; see `LocalRun`."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    return LocalRun(cfg, progress).run(out_dir, overwrite=overwrite)


def evaluate_run(run_dir: Path | str, data: str | None = None) -> dict[str, Any]:
    """Reload a finished run's adapter, or an adapter folder from ``hetlora export``, with
    ``PeftModel.from_pretrained`` and re-measure it.

    Rebuilds the held-out set from the run's config (its ``config.toml``, or the copy in the
    export's ``hetlora.json``; ``data`` replaces its ``data`` key), loads the base model and the
    adapter the way a user would, and returns the perplexity it measures next to the one the run
    reported: ``metrics.jsonl``'s last round for a run, ``tier_ppl`` at the adapter's rank for an
    export (``None`` where ``data`` changed the held-out set).
    """
    from peft import PeftModel

    from hetlora.config import drop_inapplicable, load_config, make_config
    from hetlora.export import exported_base, is_exported, read_export_meta

    run_dir = Path(run_dir)
    if is_exported(run_dir):
        meta = read_export_meta(run_dir)
        values = drop_inapplicable(meta["config"], str(run_dir / "hetlora.json"))
        cfg = make_config({**values, **({"data": data} if data else {})})
        adapter_dir, base_name, bf16 = run_dir, exported_base(run_dir, meta), bool(meta["bf16"])
        reported: dict[str, Any] = {"round": None, "test_ppl": meta.get("tier_ppl")}
        what = f"tier_ppl at rank {meta.get('rank')}"
        original_data = values.get("data")
    else:
        for name in ("config.toml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json"):
            if not (run_dir / name).is_file():
                raise HetLoRAError(
                    f"{run_dir} is neither a finished run ({name} is missing) nor an adapter "
                    "folder from `hetlora export`"
                )
        original_data = load_config(run_dir / "config.toml", stored=True).data
        cfg = load_config(
            run_dir / "config.toml",
            stored=True,
            overrides=[f"data={json.dumps(data)}"] if data else None,
        )
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = read_metrics(run_dir / "metrics.jsonl")
        reported = [r for r in rows if "test_ppl" in r][-1]
        adapter_dir, base_name, bf16 = run_dir / "adapter", cfg.model, bool(summary["bf16"])
        what = f"metrics.jsonl's round {reported['round']}"
    changed = data is not None and data != original_data
    device = resolve_device(cfg.device)
    base = load_base_model(base_name, device)
    use_cpu_attention(base.model, device)
    model = PeftModel.from_pretrained(base.model, str(adapter_dir)).to(device)
    train_data, _, test_data = federated_splits(cfg)
    renderer = make_renderer(
        base.tokenizer, cfg.chat_template, [ex for v in train_data.values() for ex in v]
    )
    items = renderer.tokenize_all(eval_set(test_data, cfg.eval_examples, cfg.seed), cfg.max_seq_len)
    loss, ppl = perplexity(
        model, items, cfg.eval_batch_size, base.tokenizer.pad_token_id, device, bf16=bf16
    )
    return {
        "round": reported["round"],
        "reported_ppl": None if changed else reported["test_ppl"],
        "reported_as": what,
        "test_loss": loss,
        "test_ppl": ppl,
        "bf16": bf16,
        "eval_examples": len(items),
    }

"""Talk to the result of a run (``hetlora chat``): its global model, as a device tier runs it.

For the methods with a global adapter, the run's global adapter (or an adapter folder that
``hetlora export`` wrote) is cut to rank R as a device of
tier R receives it (`hetlora.export`) and loaded onto the base model with
``PeftModel.from_pretrained``; for FLoRA and full fine-tuning the run's merged ``model/`` is
loaded. A reply is the greedy continuation of the conversation rendered as the run rendered
its training data (`hetlora.data.chat.Renderer`): through the chat template when the
run's examples went through it (``chat_template_used`` in ``summary.json``), else the last user
turn raw, as a run on raw prompts or text trained.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetlora.data.chat import Renderer, has_chat_template, make_renderer
from hetlora.errors import HetLoRAError

__all__ = ["ChatModel", "load_chat_model"]

log = logging.getLogger(__name__)


@dataclass
class ChatModel:
    """A run's global model ready to answer; ``rank`` is ``None`` for a merged model."""

    model: torch.nn.Module
    tokenizer: Any
    renderer: Renderer
    device: torch.device
    bf16: bool
    rank: int | None
    max_seq_len: int
    max_new_tokens: int

    def reply(self, turns: list[tuple[str, str]]) -> str:
        """The answer to a conversation ending with a user turn.

        The oldest turns are left out while the rendered conversation is longer than the run's
        ``max_seq_len`` (the last user turn is always kept).
        """
        from hetlora.evaluate import generate_greedy

        if not turns or turns[-1][0] != "user":
            raise HetLoRAError("a reply needs a conversation that ends with a user turn")
        start, prompt = 0, self.renderer.chat_prompt(turns)
        while start < len(turns) - 1 and len(prompt) > self.max_seq_len:
            start += 1
            prompt = self.renderer.chat_prompt(turns[start:])
        return generate_greedy(
            self.model,
            self.tokenizer,
            [prompt],
            self.max_new_tokens,
            self.device,
            self.bf16,
            extra_stops=self.renderer.end_of_turn,
        )[0]


def _source(path: Path) -> tuple[Any, dict[str, Any], Path, str, bool]:
    """The config, summary (or export metadata), adapter or model folder, base model and
    whether the folder is a merged model, of a run directory or of an adapter folder written
    by ``hetlora export``."""
    import json

    from hetlora.config import drop_inapplicable, load_config, make_config
    from hetlora.export import exported_base, is_exported, read_export_meta

    if not path.is_dir():
        raise HetLoRAError(f"no such run directory or adapter folder: {path}")
    if is_exported(path):
        meta = read_export_meta(path)
        cfg = make_config(drop_inapplicable(meta["config"], str(path / "hetlora.json")))
        return cfg, meta, path, exported_base(path, meta), False
    merged = path / "model" / "config.json"
    adapter = path / "adapter" / "adapter_config.json"
    if not (path / "config.toml").is_file() or not (merged.is_file() or adapter.is_file()):
        raise HetLoRAError(
            f"{path} is not a finished run (needs config.toml and adapter/ or model/) "
            "nor an adapter folder from `hetlora export`"
        )
    cfg = load_config(path / "config.toml", stored=True)
    summary_file = path / "summary.json"
    summary: object = {}
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HetLoRAError(f"{summary_file}: unreadable ({exc})") from None
    if not isinstance(summary, dict):
        raise HetLoRAError(f"{summary_file}: expected a JSON object, got {type(summary).__name__}")
    folder = path / ("model" if merged.is_file() else "adapter")
    return cfg, summary, folder, cfg.model, merged.is_file()


def load_chat_model(
    run_dir: Path | str, rank: int | None = None, max_new_tokens: int | None = None
) -> ChatModel:
    """Load a finished run's global model, or an exported adapter, at ``rank`` (default: the
    adapter's full rank).

    Raises:
        HetLoRAError: neither a finished run nor an exported adapter, ``rank`` outside
            [1, adapter rank], or ``rank`` given for a merged model (FLoRA, full fine-tuning).
    """
    from hetlora.export import export_adapter, read_adapter, tier_settings
    from hetlora.hardware import resolve_bf16, resolve_device, use_cpu_attention
    from hetlora.models import load_base_model

    run_dir = Path(run_dir)
    cfg, summary, folder, base_name, is_merged = _source(run_dir)
    device = resolve_device(cfg.device)
    bf16 = resolve_bf16(cfg.precision, device)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise HetLoRAError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if is_merged:
        if rank is not None:
            raise HetLoRAError(
                f"--rank does not apply: {run_dir} holds a merged model ({cfg.method}), "
                "not an adapter with ranks"
            )
        base = load_base_model(str(folder), device)
        use_cpu_attention(base.model, device)
        model = base.model
    else:
        from peft import PeftModel

        factors, adapter_cfg = read_adapter(folder, base=base_name)
        rank, scale, targets = tier_settings(factors, adapter_cfg, rank)
        base = load_base_model(base_name, device)
        use_cpu_attention(base.model, device)
        with tempfile.TemporaryDirectory(prefix="hetlora-chat-") as tmp:
            cut = export_adapter(factors, rank, scale, targets, base.path, Path(tmp))
            model = PeftModel.from_pretrained(base.model, str(cut)).to(device)
    model.eval()
    log.info("chat: %s at rank %s on %s", run_dir, rank if rank is not None else "-", device)
    return ChatModel(
        model=model,
        tokenizer=base.tokenizer,
        renderer=make_renderer(
            base.tokenizer,
            cfg.chat_template,
            # a run without the key: the template wherever the run could have used it
            templated=summary.get(
                "chat_template_used",
                cfg.chat_template != "off" and has_chat_template(base.tokenizer),
            ),
        ),
        device=device,
        bf16=bf16,
        rank=rank,
        max_seq_len=cfg.max_seq_len,
        max_new_tokens=max_new_tokens or cfg.max_new_tokens,
    )

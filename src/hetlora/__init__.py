"""HetLoRA: heterogeneous-rank LoRA for federated fine-tuning of on-device language models.

Reference implementation of Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024 (arXiv 2401.06432).

The public API (imported on first use, so ``import hetlora`` stays light):

- `run`, `Config`, `make_config`, `load_config`: configure and run
  (progress to the ``hetlora`` logger);
- `export_run`, `evaluate_run`, `load_chat_model`: use a finished run;
- the methods: `make_server`, `SERVERS` (every method's server class by name), `HetLoRAServer`,
  and what a server exchanges with a client, `ClientTask` and `Reply`;
- the factor math `truncate`, `pad`, `rank_of`, `pruned_rank`.
"""

from __future__ import annotations

import importlib
from typing import Any

from hetlora.errors import HetLoRAError

__version__ = "0.1.0"

_LAZY = {
    "run": "hetlora.api",
    "log_progress": "hetlora.api",
    "Config": "hetlora.config",
    "make_config": "hetlora.config",
    "load_config": "hetlora.config",
    "export_run": "hetlora.export",
    "evaluate_run": "hetlora.runtime.local",
    "load_chat_model": "hetlora.chat",
    "make_server": "hetlora.methods",
    "SERVERS": "hetlora.methods",
    "HetLoRAServer": "hetlora.methods.hetlora",
    "ClientTask": "hetlora.methods.base",
    "Reply": "hetlora.methods.base",
    "truncate": "hetlora.lora",
    "pad": "hetlora.lora",
    "pruned_rank": "hetlora.lora",
    "rank_of": "hetlora.lora",
}

__all__ = ["HetLoRAError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hetlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

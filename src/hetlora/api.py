"""The Python API: what a user's own code calls, with progress to the ``hetlora`` logger.

>>> from hetlora import Config, make_config
>>> cfg = make_config({"rounds": 3, "r_min": 2, "r_max": 8})
>>> (cfg.method, cfg.rounds, cfg.r_max)
('hetlora', 3, 8)
>>> Config().method
'hetlora'
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hetlora.config import Config, load_config, make_config
from hetlora.errors import HetLoRAError

log = logging.getLogger("hetlora")

Progress = Callable[[dict[str, Any]], None]


def log_progress(event: dict[str, Any]) -> None:
    """The default progress of `run`: one INFO line per stage and per round on the
    ``hetlora`` logger (``logging.basicConfig(level=logging.INFO)`` shows them)."""
    from hetlora.runtime.rounds import round_line

    kind = event.get("event")
    if kind == "setup":
        log.info("loading %s", event.get("stage"))
    elif kind == "round_end":
        log.info("%s (of %s)", round_line(event["row"]), event.get("rounds"))
    elif kind == "resume":
        log.info("resuming after round %s", event.get("round"))
    elif kind == "done":
        summary = event["summary"]
        log.info(
            "perplexity %.2f (base) -> %.2f (final), best %.2f at round %s",
            summary["base_ppl"],
            summary["final_ppl"],
            summary["best_ppl"],
            summary["best_round"],
        )


def _config(config: Config | Mapping[str, Any] | str | Path | None, keys: dict[str, Any]) -> Config:
    if isinstance(config, Config):
        return make_config({**config.to_dict(), **keys}) if keys else config
    if isinstance(config, Mapping):
        return make_config({**config, **keys})
    if config is None:
        return make_config(keys)
    cfg = load_config(config)
    return make_config({**cfg.to_dict(), **keys}) if keys else cfg


def run(
    config: Config | Mapping[str, Any] | str | Path | None = None,
    out: str | Path = "runs/latest",
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress | None = log_progress,
    **keys: Any,
) -> dict[str, Any]:
    """Run federated fine-tuning in this process, as ``hetlora run`` does; returns the summary
    (``summary.json``).

    Args:
        config: a `Config`, a dict of keys, a TOML file, or ``None`` (the defaults).
        out: the run directory (refused if not empty, unless ``overwrite`` or ``resume``).
        resume: continue the run in ``out`` from its checkpoint (config from its
            ``config.toml`` when ``config`` is ``None``; a larger ``rounds`` extends it).
        progress: called with every progress event; default: `log_progress`.
        **keys: config keys over ``config`` (``rounds=2``, ``data="chats.jsonl"``).

    Example (the default model and data, two short rounds):

    ```python
    import logging, hetlora
    logging.basicConfig(level=logging.INFO)
    summary = hetlora.run(rounds=2, local_steps=2, eval_examples=16, out="runs/api")
    print(summary["final_ppl"], summary["tier_ppl"])
    ```
    """
    from hetlora.runtime.local import LocalRun
    from hetlora.runtime.loop import check_out_dir

    out = Path(out)
    if resume:
        if overwrite:
            raise HetLoRAError("resume and overwrite cannot be used together")
        if not (out / "checkpoint.pt").is_file():
            raise HetLoRAError(f"resume: no checkpoint in {out}, nothing to resume")
        if config is None:
            config = out / "config.toml"
            cfg = load_config(config, [], stored=True)
            cfg = make_config({**cfg.to_dict(), **keys}) if keys else cfg
        else:
            cfg = _config(config, keys)
    else:
        cfg = _config(config, keys)
        check_out_dir(out, overwrite)
    return LocalRun(cfg, progress).run(out, overwrite=overwrite, resume=resume)

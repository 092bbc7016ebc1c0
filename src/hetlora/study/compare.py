"""Several methods on the same clients, sampling and seeds, one after the other.

A comparison file is a run config (any key, shared by every method) plus a list of
``[[compare]]`` tables, each with a ``name``, an optional ``group`` and the keys it overrides::

    rounds = 10
    [[compare]]
    name = "HetLoRA [4, 16]"
    method = "hetlora"
    [[compare]]
    name = "HomLoRA r=4"
    method = "homlora"
    rank = 4

Each entry runs with `hetlora.runtime.local.LocalRun` into ``OUT/<slug>/``; then
``results.csv``, ``results.md`` and the plots are written by `hetlora.study.report.report`.

Seeds: a top-level ``seeds = [0, 1, 2]`` runs every entry once per seed, into
``OUT/<slug>/seed-<s>/`` (each its own resumable run; the seed drives ranks, sampling, splits,
init and batches). An entry may narrow it with its own ``seeds`` list (a costly method run on
fewer seeds); ``seed`` itself may then not be set. The report then picks each group's grid
point and gives its test numbers over the seeds (`hetlora.study.report`).

Tuning in two stages: with ``tune_seeds = [0]`` (a subset of ``seeds``), every grid point of a
group of two or more entries runs on the tune seeds only; the point with the lowest validation
perplexity averaged over them (`hetlora.study.report.choose`, the rule the report uses) then
runs on the remaining seeds, and the other points never do. Groups run one after the other, in
the file's order, so a study stopped half-way has whole methods, not a slice of every method.

With ``resume``, an interrupted comparison goes on where it stopped: entries whose run finished
with the same config are kept, an entry with a checkpoint continues from its last round, the
rest run from the start. Entries added to the file since run too, so a method can be added to a
finished comparison without rerunning the others.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetlora.config import Config, _parse_override, inapplicable, load_config, make_config
from hetlora.errors import HetLoRAError
from hetlora.runtime.local import LocalRun
from hetlora.runtime.loop import check_out_dir
from hetlora.runtime.workspace import Progress


@dataclass
class Entry:
    """One run of a comparison: its display name, folder, full config, optional group
    (entries of one group are a hyperparameter grid of one method; reports keep the best) and
    seed (``None`` in a comparison without ``seeds``)."""

    name: str
    slug: str
    cfg: Config
    group: str = ""
    seed: int | None = None
    #: Runs only if its grid point wins the group on the tune seeds (``tune_seeds``).
    deferred: bool = False


def _seed_list(value: Any, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        or len(set(value)) != len(value)
    ):
        raise HetLoRAError(f"{where}: seeds must be a non-empty list of distinct integers >= 0")
    return list(value)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def load_comparison(path: Path | str, overrides: list[str] | None = None) -> list[Entry]:
    """Read a comparison file; ``overrides`` (``key=value``) apply to every entry."""
    path = Path(path)
    if not path.is_file():
        raise HetLoRAError(f"comparison file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise HetLoRAError(f"comparison file {path} is not valid TOML: {exc}") from None
    entries = raw.pop("compare", None)
    if not isinstance(entries, list) or not entries:
        raise HetLoRAError(f"{path} has no [[compare]] entries")
    shared = dict(raw)
    shared.update(_parse_override(item) for item in overrides or [])
    seeds = _seed_list(shared.pop("seeds"), str(path)) if "seeds" in shared else None
    if seeds is not None and "seed" in shared:
        raise HetLoRAError(f"{path}: set either seeds (a list, one run each) or seed, not both")
    tune = None
    if "tune_seeds" in shared:
        tune = _seed_list(shared.pop("tune_seeds"), f"{path}: tune_seeds")
        if seeds is None or not set(tune) < set(seeds):
            raise HetLoRAError(
                f"{path}: tune_seeds {tune} must be a proper subset of the top-level seeds list"
            )
    sizes = Counter(e["group"] for e in entries if isinstance(e, dict) and e.get("group"))
    out, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise HetLoRAError(f"[[compare]] entry {i} needs a name")
        name = entry["name"]
        slug = _slug(name)
        if slug in seen:
            raise HetLoRAError(f"two [[compare]] entries are named like {name!r}")
        seen.add(slug)
        where = f"[[compare]] entry {name!r}"
        group = entry.get("group", "")
        if not isinstance(group, str):
            raise HetLoRAError(f"{where}: group must be a string")
        keys = {k: v for k, v in entry.items() if k not in ("name", "group", "seeds")}
        if "seeds" in entry:
            if seeds is None:
                raise HetLoRAError(f"{where}: seeds needs a top-level seeds list")
            mine = _seed_list(entry["seeds"], where)
            if not set(mine) <= set(seeds):
                raise HetLoRAError(f"{where}: seeds {mine} are not all in the top-level {seeds}")
        else:
            mine = seeds
        if mine is not None and "seed" in keys:
            raise HetLoRAError(f"{where}: set either seeds (a list, one run each) or seed")
        # a shared key applies to the entries it applies to (r_max is not full FT's)
        unused = inapplicable({**shared, **keys}, [k for k in shared if k not in keys])
        common = {k: v for k, v in shared.items() if k not in unused}
        for seed in mine if mine is not None else [None]:
            values = {**common, **keys} if seed is None else {**common, **keys, "seed": seed}
            try:
                cfg = make_config(values)
            except HetLoRAError as exc:
                raise HetLoRAError(f"{where}: {exc}") from None
            run_slug = slug if seed is None else f"{slug}/seed-{seed}"
            deferred = tune is not None and sizes.get(group, 0) > 1 and seed not in tune
            out.append(
                Entry(name=name, slug=run_slug, cfg=cfg, group=group, seed=seed, deferred=deferred)
            )
    return out


def _resume_state(entry: Entry, run_dir: Path) -> str:
    """What ``--resume`` does with an entry's folder: ``new`` (empty or absent), ``done``
    (finished, kept), ``partial`` (checkpointed, continued) or ``restart`` (started but no round
    checkpointed). A folder that holds a run of another config is refused: nothing is
    overwritten."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new"
    if not (run_dir / "config.toml").is_file():
        raise HetLoRAError(f"--resume: {run_dir} is not a run directory (config.toml missing)")
    if load_config(run_dir / "config.toml", stored=True).to_dict() != entry.cfg.to_dict():
        raise HetLoRAError(
            f"--resume: {run_dir} was run with another config than entry {entry.name!r} "
            "(use --overwrite to run the comparison again)"
        )
    if (run_dir / "summary.json").is_file():
        return "done"
    return "partial" if (run_dir / "checkpoint.pt").is_file() else "restart"


def run_comparison(
    entries: list[Entry],
    out_dir: Path | str,
    overwrite: bool = False,
    progress: Progress | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every entry into ``out_dir/<slug>/``, then write the tables and plots.

    ``resume`` keeps the finished entries of an earlier run into ``out_dir`` and continues the
    others (see the module's docstring); it cannot be combined with ``overwrite``.
    """
    from hetlora.study.report import report

    out_dir = Path(out_dir)
    if resume and overwrite:
        raise HetLoRAError("--resume and --overwrite cannot be used together")
    states = {e.slug: _resume_state(e, out_dir / e.slug) for e in entries} if resume else {}
    if not resume:
        check_out_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.group or e.name, []).append(e)
    planned = [e for e in entries if not e.deferred]
    total = len(planned) + len({(e.group, e.seed) for e in entries if e.deferred})
    # a resumed study lists its finished runs from the start, the later seeds' ones too, so that
    # `hetlora report` while it runs shows every finished run
    kept = [e for e in entries if e.deferred and states.get(e.slug) == "done"]
    _write_manifest(out_dir, [e for e in entries if e in planned or e in kept])
    emit = progress or (lambda event: None)
    done = 0

    def run(entry: Entry) -> None:
        nonlocal done
        state = states.get(entry.slug, "new")
        emit(
            {
                "event": "method_start",
                "name": entry.name if entry.seed is None else f"{entry.name}, seed {entry.seed}",
                "index": done,
                "of": total,
                "state": state,
            }
        )
        done += 1
        if state == "done":
            return
        LocalRun(entry.cfg, progress).run(
            out_dir / entry.slug,
            overwrite=overwrite or state == "restart",
            resume=state == "partial",
        )

    for members in groups.values():
        tuned = [e for e in members if not e.deferred]
        for entry in tuned:
            run(entry)
        if later := [e for e in members if e.deferred]:
            winner = _tuned_winner(out_dir, tuned)
            chosen = [e for e in later if e.name == winner]
            planned += chosen
            _write_manifest(out_dir, [e for e in entries if e in planned or e in kept])
            for entry in chosen:
                run(entry)
    return report(out_dir)


def _write_manifest(out_dir: Path, entries: list[Entry]) -> None:
    """``comparison.json``: the runs of the comparison so far, in the file's order."""
    manifest = {
        "runs": [
            {
                "name": e.name,
                "dir": e.slug,
                "method": e.cfg.method,
                "group": e.group,
                **({"seed": e.seed} if e.seed is not None else {}),
            }
            for e in entries
        ]
    }
    (out_dir / "comparison.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _tuned_winner(out_dir: Path, tuned: list[Entry]) -> str:
    """The grid point of a group that goes on to the remaining seeds: the report's rule
    (`hetlora.study.report.choose`) applied to the finished tune-seed runs."""
    from hetlora.study.report import choose, load_run

    grid: dict[str, list[dict[str, Any]]] = {}
    for e in tuned:
        summary, _ = load_run(out_dir / e.slug)
        grid.setdefault(e.name, []).append(
            {
                "seed": e.seed,
                "val_ppl": summary.get("final_val_ppl", float("nan")),
                "test_ppl": summary["final_ppl"],
            }
        )
    return choose(grid)[0]

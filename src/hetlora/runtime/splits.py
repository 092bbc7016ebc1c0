"""The run's data as examples per client: the training, validation and test splits, the
held-out sample, the server-side evaluation set, and what ``hetlora data`` shows of them
(`data_overview`).

Everything here reads data and the tokenizer only (no model, no PEFT), so a Flower node that
is only asked who it is (`hetlora.runtime.flower.client_app`) imports no more than this.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from hetlora.config import Config
from hetlora.data import (
    Example,
    cap_examples,
    has_client_ids,
    load_clients,
    split_clients,
    split_validation,
)
from hetlora.data.chat import make_renderer
from hetlora.errors import HetLoRAError
from hetlora.models import load_tokenizer

Splits = dict[str, list[Example]]


def federated_splits(
    cfg: Config, report: dict[str, int] | None = None
) -> tuple[Splits, Splits, Splits]:
    """The run's clients, split per client into training, validation and test examples.

    ``max_clients`` picks the clients and ``max_examples_per_client`` caps each one's examples
    (both seeded), then `hetlora.data.split_clients` takes the test split and
    `hetlora.data.split_validation` the validation split out of the rest, so the test
    split does not depend on ``val_fraction``. ``report``, if given, receives
    ``bad_rows_skipped`` (see `hetlora.data.load_clients`).
    """
    if not cfg.data.strip():
        raise HetLoRAError(
            "config key 'data' is empty: only the server of a Flower deployment runs without "
            "data (each node reads its own)"
        )
    clients = load_data(cfg, cfg.data, report)
    if cfg.max_clients and len(clients) > cfg.max_clients:
        rng = np.random.default_rng([cfg.seed, 0xC11])
        keep = sorted(rng.choice(sorted(clients), size=cfg.max_clients, replace=False))
        clients = {c: clients[c] for c in keep}
    return client_splits(clients, cfg)


def load_data(
    cfg: Config, source: str, report: dict[str, int] | None = None, split: str | None = None
) -> Splits:
    """Every client of ``source`` (the run's ``data``, or a node's own file), read with the
    run's data keys (`hetlora.data.load_clients`); ``split`` defaults to the run's."""
    return load_clients(
        source,
        min_examples=cfg.min_examples,
        partitioner=cfg.partitioner,
        num_partitions=cfg.num_partitions,
        partition_by=cfg.partition_by or None,
        dirichlet_alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        on_bad_rows=cfg.on_bad_rows,
        report=report,
        split=cfg.split if split is None else split,
        tokenizer_loader=functools.partial(load_tokenizer, cfg.model),
    )


def client_splits(clients: Splits, cfg: Config) -> tuple[Splits, Splits, Splits]:
    """Training, validation and test examples of ``clients``: the ``max_examples_per_client``
    cap, then `hetlora.data.split_clients` and `hetlora.data.split_validation`.

    Each client's splits depend only on the seed and its own id and examples, so a node holding
    one client's data alone splits it as a process holding every client does.
    """
    if cfg.max_examples_per_client:
        clients = cap_examples(clients, cfg.max_examples_per_client, cfg.seed)
    train, test = split_clients(clients, cfg.test_fraction, cfg.seed)
    sizes = {c: len(v) for c, v in clients.items()}
    train, val = split_validation(train, sizes, cfg.val_fraction, cfg.seed)
    return train, val, test


def held_out_order(counts: Mapping[str, int], cap: int, seed: int) -> list[tuple[str, int]]:
    """The capped held-out sample as (client, position in its split) pairs, in sample order.

    The clients' splits are pooled (sorted clients, each in its own order), shuffled (seeded)
    and cut at ``cap`` (0: all). Only the counts are needed, so a server that holds no data can
    tell each node which of its held-out examples are in the sample.
    """
    pooled = [(c, i) for c in sorted(counts) for i in range(counts[c])]
    order = np.random.default_rng([seed, 0xE7]).permutation(len(pooled))
    if cap:
        order = order[:cap]
    return [pooled[i] for i in order]


def eval_set(test_data: Splits, cap: int, seed: int) -> list[Example]:
    """The fixed held-out set: the union of the clients' test splits, shuffled, capped at ``cap``
    (`held_out_order`)."""
    order = held_out_order({c: len(v) for c, v in test_data.items()}, cap, seed)
    if not order:
        raise HetLoRAError("no held-out examples: raise test_fraction or min_examples")
    return [test_data[c][i] for c, i in order]


def server_eval_set(cfg: Config) -> list[Example]:
    """The server-side evaluation set (``server_eval_data``, a file the operator owns): every
    row of it (any client ids pooled, no minimum per client; rows without them are one pool,
    not partitioned; ``messages`` rows checked against the model's chat template), shuffled
    and capped at ``eval_examples`` as the held-out set is (`eval_set`)."""
    source = cfg.server_eval_data
    one = {} if has_client_ids(source) else {"partitioner": "iid", "num_partitions": 1}
    clients = load_clients(
        source,
        seed=cfg.seed,
        on_bad_rows=cfg.on_bad_rows,
        tokenizer_loader=functools.partial(load_tokenizer, cfg.model),
        **one,
    )
    return eval_set(clients, cfg.eval_examples, cfg.seed)


def data_overview(cfg: Config, sample: int = 2000) -> dict[str, Any]:
    """The facts ``hetlora data`` prints, as a dict (JSON-ready).

    ``clients``, the per-split totals and the quantiles of examples per client count every
    example; the token figures come from a seeded sample of at most ``sample`` training
    examples (``tokens_sampled`` of them), each tokenised as training does: ``tokens`` whole,
    ``kept`` after the cut at ``max_seq_len``, ``loss`` the tokens the loss is taken on.
    ``per_client`` lists every client's examples, most first, and ``token_lengths`` the sampled
    examples' whole lengths. ``example`` is the first training example of the first client (with one) as
    ``segments``: its text in order, in runs of tokens with the loss on them or not.
    """
    report: dict[str, int] = {}
    train, val, test = federated_splits(cfg, report)
    clients = sorted(train)
    sizes = np.array([len(train[c]) + len(val[c]) + len(test[c]) for c in clients])
    tokenizer = load_tokenizer(cfg.model)
    examples = [ex for c in clients for ex in train[c]]
    renderer = make_renderer(tokenizer, cfg.chat_template, examples)
    picked = random.Random(cfg.seed).sample(examples, min(sample, len(examples)))
    whole = [len(item.ids) for item in renderer.tokenize_all(picked, 1 << 30)]
    cut = renderer.tokenize_all(picked, cfg.max_seq_len)
    loss = [item.n_target for item in cut]
    shown = next(c for c in clients if train[c])
    first = renderer.tokenize(train[shown][0], cfg.max_seq_len)
    segments: list[tuple[str, bool]] = []  # the example's text in order, runs of loss or not
    start = 0
    for on_loss, run in itertools.groupby(_loss_mask(first)):
        end = start + len(list(run))
        segments.append((tokenizer.decode(list(first.ids[start:end])), on_loss))
        start = end
    per_round = min(cfg.clients_per_round, len(clients))
    return {
        "data": cfg.data,
        "clients": len(clients),
        "bad_rows_skipped": report.get("bad_rows_skipped", 0),
        "train": sum(len(v) for v in train.values()),
        "val": sum(len(v) for v in val.values()),
        "test": sum(len(v) for v in test.values()),
        "examples_per_client": {
            q: int(np.quantile(sizes, p, method="lower"))
            for q, p in (("min", 0), ("p10", 0.1), ("median", 0.5), ("p90", 0.9), ("max", 1))
        },
        "rounds_per_client": cfg.rounds * per_round / len(clients),
        "chat_template": renderer.templated,
        "max_seq_len": cfg.max_seq_len,
        "tokens_sampled": len(picked),
        "tokens_mean": float(np.mean(whole)),
        "tokens_p90": int(np.quantile(whole, 0.9, method="lower")),
        "tokens_max": int(max(whole)),
        "truncated": float(np.mean([n > cfg.max_seq_len for n in whole])),
        "kept_mean": float(np.mean([len(item.ids) for item in cut])),
        "loss_mean": float(np.mean(loss)),
        "per_client": sorted(sizes.tolist(), reverse=True),
        "token_lengths": whole,
        "example": {"client": shown, "segments": segments},
    }


def _loss_mask(item: Any) -> list[bool]:
    """Per token of a tokenised example, whether the loss is taken on it (the first token,
    which nothing predicts, never)."""
    marks = (
        list(item.target)
        if item.target is not None
        else [i >= item.n_prompt for i in range(len(item.ids))]
    )
    return [False, *marks[1:]]

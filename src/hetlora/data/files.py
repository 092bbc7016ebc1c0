"""User data from a local ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file.

The file is read with Hugging Face ``datasets`` (packaged builders on a local file, with a
throw-away cache folder: no hub access, nothing left in the user's cache). Accepted columns:

* ``client_id``, ``prompt``, ``response``, or ``client_id``, ``text``: natural clients;
* ``client_id``, ``messages``: natural clients of conversations (:mod:`hetlora.data.chat`);
* ``prompt``, ``response``, ``messages`` or ``text`` alone: the rows are split into clients by
  an ``flwr-datasets`` partitioner (``iid`` or ``dirichlet``), with ids ``partition-000``, ...

The same columns are read from a ``datasets`` folder or hub id (:mod:`hetlora.data.sources`).

Text-only rows become examples with an empty prompt. Extra columns are ignored (except the
Dirichlet ``partition_by`` column).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from hetlora.data import BAD_ROW_ACTIONS, PARTITIONERS, Example
from hetlora.data.chat import example_from_messages, messages_problem
from hetlora.errors import HetLoRAError

__all__ = ["FORMATS", "dataset_clients", "load_file_clients"]

logger = logging.getLogger(__name__)

#: File suffix -> ``datasets`` packaged builder.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

_ROW = "__hetlora_row__"
#: How many bad rows a message lists (the count covers all of them).
SHOWN_BAD_ROWS = 5


def _one_line(exc: BaseException) -> str:
    """A one-line description of ``exc`` and, when wrapped, of its innermost cause."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_blank(path: Path, *, text: bool) -> bool:
    """Whether the file has no bytes (or, for text formats, only whitespace)."""
    if path.stat().st_size == 0:
        return True
    if not text:
        return False
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _parquet_rows(path: Path) -> int:
    """The row count in a Parquet file's metadata (``datasets`` fails on 0 rows)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # not a Parquet file, or a damaged one
        raise HetLoRAError(f"cannot read {path} as parquet: {_one_line(exc)}") from exc


def _read(path: Path, builder: str) -> Any:
    """Read ``path`` into a ``datasets.Dataset`` with a temporary cache folder."""
    import datasets

    # Quiet while reading: our error message replaces datasets' own log lines and bars.
    bars_were_on = not datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="hetlora-datasets-") as cache_dir:
            try:
                ds = datasets.load_dataset(
                    builder,
                    data_files=str(path),
                    split="train",
                    cache_dir=cache_dir,
                    keep_in_memory=True,
                )
            except (StopIteration, datasets.exceptions.DatasetGenerationError) as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                if isinstance(exc, StopIteration) or "EmptyDataError" in type(cause).__name__:
                    raise HetLoRAError(f"data file {path} has no rows") from exc
                raise HetLoRAError(f"cannot read {path} as {builder}: {_one_line(exc)}") from exc
            except ValueError as exc:
                if "corresponds to no data" in str(exc):
                    raise HetLoRAError(f"data file {path} has no rows") from exc
                raise HetLoRAError(f"cannot read {path} as {builder}: {_one_line(exc)}") from exc
            except Exception as exc:  # any parse failure is the file's fault
                raise HetLoRAError(f"cannot read {path} as {builder}: {_one_line(exc)}") from exc
            # keep_in_memory: the table no longer refers to files in cache_dir.
            return ds
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _column(ds: Any, name: str) -> list[Any]:
    """The Python values of one column, in row order.

    A JSON column whose rows hold values of different types (strings and numbers, say) is
    stored by ``datasets`` as JSON text per cell; those cells are decoded, so a number stays
    a number (and is reported as a bad row) instead of becoming the text ``"7"``.
    """
    values = ds.data.column(name).to_pylist()
    if type(ds.features.get(name)).__name__ == "Json":
        values = [None if v is None else json.loads(v) for v in values]
    return values


def _text_problem(value: Any, name: str, *, allow_empty: bool) -> str | None:
    """Why a cell of a text column is unusable (None if it is fine)."""
    if value is None:
        return f"column {name!r} is null"
    if not isinstance(value, str):
        return f"column {name!r} must be a string, got {type(value).__name__} {value!r:.40}"
    if not allow_empty and not value.strip():
        return f"column {name!r} is empty"
    return None


def _client_id_problem(value: Any) -> str | None:
    """Why a ``client_id`` cell is unusable (None if it is fine)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "column 'client_id' is empty"
    if isinstance(value, list | dict):
        return f"column 'client_id' must be a string or an integer, got {type(value).__name__}"
    return None


def _text_columns(ds: Any, path: Path) -> list[tuple[str, bool]]:
    """The text columns the rows are read from, each with whether it may be empty."""
    columns = set(ds.column_names)
    if "messages" in columns:
        return [("messages", False)]
    if {"prompt", "response"} <= columns:
        return [("prompt", True), ("response", False)]
    if "text" in columns:
        return [("text", False)]
    raise HetLoRAError(
        f"{path}: needs columns (messages), (prompt, response) or (text), optionally with "
        "client_id; "
        f"found: {', '.join(ds.column_names) or 'none'}"
    )


def _bad_rows(ds: Any, path: Path, label: str | None) -> dict[int, list[str]]:
    """Every unusable row (0-based index) with all of its reasons, in one pass over the file.

    ``label`` is the Dirichlet ``partition_by`` column, whose cells must not be null.
    """
    problems: dict[int, list[str]] = {}
    for name, allow_empty in _text_columns(ds, path):
        for i, value in enumerate(_column(ds, name)):
            if name == "messages":
                why = messages_problem(value)
            else:
                why = _text_problem(value, name, allow_empty=allow_empty)
            if why is not None:
                problems.setdefault(i, []).append(why)
    if "client_id" in ds.column_names:
        for i, value in enumerate(_column(ds, "client_id")):
            if (why := _client_id_problem(value)) is not None:
                problems.setdefault(i, []).append(why)
    elif label is not None and label in ds.column_names:
        for i, value in enumerate(_column(ds, label)):
            if value is None:
                problems.setdefault(i, []).append(f"partition_by column {label!r} is null")
    return dict(sorted(problems.items()))


def _describe_bad_rows(problems: dict[int, list[str]], total: int) -> str:
    """``N bad rows of M: row i: reason, reason; row j: ...; and K more`` on one line."""
    shown = list(problems.items())[:SHOWN_BAD_ROWS]
    rows = "; ".join(f"row {i + 1}: {', '.join(why)}" for i, why in shown)
    n = len(problems)
    more = f"; and {n - len(shown)} more" if n > len(shown) else ""
    return f"{n} bad row{'s' if n != 1 else ''} of {total}: {rows}{more}"


def _drop_bad_rows(ds: Any, path: Path, on_bad_rows: str, label: str | None) -> tuple[Any, int]:
    """Check every row; raise for bad rows (``"error"``) or drop them with one warning line
    (``"skip"``). Returns the clean rows and how many were dropped."""
    if on_bad_rows not in BAD_ROW_ACTIONS:
        raise HetLoRAError(
            f"on_bad_rows must be one of {', '.join(BAD_ROW_ACTIONS)}; got {on_bad_rows!r}"
        )
    problems = _bad_rows(ds, path, label)
    if not problems:
        return ds, 0
    described = _describe_bad_rows(problems, ds.num_rows)
    if on_bad_rows == "error":
        raise HetLoRAError(f'{path}: {described} (fix them, or set on_bad_rows = "skip")')
    if len(problems) == ds.num_rows:
        raise HetLoRAError(f"{path}: no usable rows: {described}")
    logger.warning('%s: skipped (on_bad_rows = "skip") %s', path, described)
    keep = [i for i in range(ds.num_rows) if i not in problems]
    # flatten: _column reads the table itself, which must hold only the kept rows
    clean = ds.select(keep, keep_in_memory=True).flatten_indices(keep_in_memory=True)
    return clean, len(problems)


def _examples(ds: Any, path: Path) -> list[Example]:
    """One example per row, from (messages), (prompt, response) or (text) columns (rows
    already checked)."""
    columns = [name for name, _ in _text_columns(ds, path)]
    if columns == ["messages"]:
        return [example_from_messages(v) for v in _column(ds, "messages")]
    if columns == ["text"]:
        return [Example(prompt="", response=t) for t in _column(ds, "text")]
    return [
        Example(prompt=p, response=r)
        for p, r in zip(_column(ds, "prompt"), _column(ds, "response"), strict=True)
    ]


def _natural_clients(ds: Any, examples: list[Example]) -> dict[str, list[Example]]:
    """Group rows by their ``client_id`` value (converted to ``str``; rows already checked)."""
    clients: dict[str, list[Example]] = {}
    for cid, example in zip(_column(ds, "client_id"), examples, strict=True):
        clients.setdefault(str(cid), []).append(example)
    return clients


def _partition(
    ds: Any,
    examples: list[Example],
    path: Path,
    *,
    partitioner: str,
    num_partitions: int,
    partition_by: str | None,
    dirichlet_alpha: float,
    seed: int,
) -> dict[str, list[Example]]:
    """Split the rows into ``num_partitions`` clients with an flwr-datasets partitioner."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

    n = len(examples)
    if num_partitions > n:
        raise HetLoRAError(f"num_partitions={num_partitions} is larger than the {n} rows of {path}")
    part: Partitioner
    if partitioner == "iid":
        # IidPartitioner cuts contiguous shards: shuffle first so the shards are random.
        index = datasets.Dataset.from_dict({_ROW: list(range(n))}).shuffle(
            seed=seed, keep_in_memory=True
        )
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        if not partition_by:
            raise HetLoRAError(
                "the dirichlet partitioner needs partition_by, the name of a column of "
                f"{path} (found: {', '.join(ds.column_names)})"
            )
        if partition_by not in ds.column_names:
            raise HetLoRAError(
                f"partition_by column {partition_by!r} is not in {path} "
                f"(found: {', '.join(ds.column_names)})"
            )
        index = ds.select_columns([partition_by]).add_column(_ROW, list(range(n)))
        # min_partition_size=0: small partitions are dropped by load_clients' min_examples.
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
            alpha=float(dirichlet_alpha),
            min_partition_size=0,
            seed=seed,
        )
    else:  # load_clients checks the name first; keep this for direct callers.
        raise HetLoRAError(
            f"unknown partitioner {partitioner!r}; expected one of: {', '.join(PARTITIONERS)}"
        )

    part.dataset = index
    width = max(3, len(str(num_partitions - 1)))
    clients: dict[str, list[Example]] = {}
    try:
        for pid in range(num_partitions):
            rows = part.load_partition(pid)[_ROW]
            clients[f"partition-{pid:0{width}d}"] = [examples[r] for r in rows]
    except HetLoRAError:
        raise
    except Exception as exc:  # flwr-datasets rejects the data or parameters
        raise HetLoRAError(
            f"{partitioner} partitioning of {path} failed: {_one_line(exc)}"
        ) from exc
    logger.info(
        "partitioned %d rows of %s into %d clients (%s)", n, path, num_partitions, partitioner
    )
    return clients


def load_file_clients(
    source: str | Path,
    *,
    partitioner: str = "iid",
    num_partitions: int = 10,
    partition_by: str | None = None,
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
    on_bad_rows: str = "error",
    report: dict[str, int] | None = None,
) -> dict[str, list[Example]]:
    """Read a data file and return its clients (unfiltered, keys in sorted order).

    The partitioner arguments are used only when the file has no ``client_id`` column. Every
    row is checked before any is used: with ``on_bad_rows = "error"`` one error gives the count
    of bad rows and the first few with their reasons; ``"skip"`` drops them with one warning
    line and, when ``report`` is given, sets ``report["bad_rows_skipped"]`` to their count.

    Raises:
        HetLoRAError: missing, empty, unreadable or malformed file, bad rows (``"error"``),
            no usable row, or bad partitioning.
    """
    path = Path(source)
    if not path.exists():
        raise HetLoRAError(f"data file not found: {path}")
    if not path.is_file():
        raise HetLoRAError(f"data source is not a file: {path}")
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise HetLoRAError(
            f"unsupported data file type {path.suffix or '(none)'!r} for {path}; "
            f"expected one of: {', '.join(FORMATS)} (or 'shakespeare')"
        )
    if _is_blank(path, text=builder != "parquet"):
        raise HetLoRAError(f"data file {path} is empty")

    if builder == "parquet" and _parquet_rows(path) == 0:
        raise HetLoRAError(f"data file {path} has no rows")
    ds = _read(path, builder)
    return dataset_clients(
        ds,
        path,
        partitioner=partitioner,
        num_partitions=num_partitions,
        partition_by=partition_by,
        dirichlet_alpha=dirichlet_alpha,
        seed=seed,
        on_bad_rows=on_bad_rows,
        report=report,
    )


def dataset_clients(
    ds: Any,
    path: Path | str,
    *,
    partitioner: str = "iid",
    num_partitions: int = 10,
    partition_by: str | None = None,
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
    on_bad_rows: str = "error",
    report: dict[str, int] | None = None,
) -> dict[str, list[Example]]:
    """The clients of a ``datasets.Dataset`` (``path`` names its source in messages).

    Every row is checked first (``on_bad_rows`` and ``report`` as in :func:`load_file_clients`).

    Raises:
        HetLoRAError: no rows, bad rows (``"error"``), no usable row, or bad partitioning.
    """
    if ds.num_rows == 0:
        raise HetLoRAError(f"data file {path} has no rows")
    label = partition_by if partitioner == "dirichlet" else None
    ds, skipped = _drop_bad_rows(ds, path, on_bad_rows, label)
    if report is not None:
        report["bad_rows_skipped"] = skipped
    examples = _examples(ds, path)
    if "client_id" in ds.column_names:
        clients = _natural_clients(ds, examples)
        logger.info(
            "read %d rows of %s: %d clients by client_id", len(examples), path, len(clients)
        )
    else:
        clients = _partition(
            ds,
            examples,
            path,
            partitioner=partitioner,
            num_partitions=num_partitions,
            partition_by=partition_by,
            dirichlet_alpha=dirichlet_alpha,
            seed=seed,
        )
    return {cid: clients[cid] for cid in sorted(clients)}

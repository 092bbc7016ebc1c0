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

import logging
import tempfile
from pathlib import Path
from typing import Any

from hetlora.data import PARTITIONERS, Example
from hetlora.errors import HetLoRAError

__all__ = ["FORMATS", "dataset_clients", "load_file_clients"]

logger = logging.getLogger(__name__)

#: File suffix -> ``datasets`` packaged builder.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

_ROW = "__hetlora_row__"


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
    """The Python values of one column, in row order."""
    return ds.data.column(name).to_pylist()


def _text_column(ds: Any, name: str, path: Path, *, allow_empty: bool) -> list[str]:
    """A column that must hold strings (non-empty unless ``allow_empty``)."""
    values = _column(ds, name)
    for i, value in enumerate(values):
        if value is None:
            raise HetLoRAError(f"{path}: row {i + 1}: column {name!r} is null")
        if not isinstance(value, str):
            raise HetLoRAError(
                f"{path}: row {i + 1}: column {name!r} must be a string, "
                f"got {type(value).__name__} {value!r:.40}"
            )
        if not allow_empty and not value.strip():
            raise HetLoRAError(f"{path}: row {i + 1}: column {name!r} is empty")
    return values


def _messages_examples(ds: Any, path: Path) -> list[Example]:
    """One conversation per row of a ``messages`` column; every bad row is reported."""
    from hetlora.data.chat import example_from_messages, messages_problem

    values = _column(ds, "messages")
    problems = [(i, messages_problem(v)) for i, v in enumerate(values)]
    bad = [(i, reason) for i, reason in problems if reason is not None]
    if bad:
        shown = "; ".join(f"row {i + 1}: {reason}" for i, reason in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise HetLoRAError(f"{path}: {len(bad)} bad messages rows: {shown}{more}")
    return [example_from_messages(v) for v in values]


def _examples(ds: Any, path: Path) -> list[Example]:
    """One example per row, from (messages), (prompt, response) or (text) columns."""
    columns = set(ds.column_names)
    if "messages" in columns:
        return _messages_examples(ds, path)
    if {"prompt", "response"} <= columns:
        prompts = _text_column(ds, "prompt", path, allow_empty=True)
        responses = _text_column(ds, "response", path, allow_empty=False)
        return [Example(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
    if "text" in columns:
        return [
            Example(prompt="", response=t)
            for t in _text_column(ds, "text", path, allow_empty=False)
        ]
    raise HetLoRAError(
        f"{path}: needs columns (messages), (prompt, response) or (text), optionally with "
        "client_id; "
        f"found: {', '.join(ds.column_names) or 'none'}"
    )


def _natural_clients(ds: Any, examples: list[Example], path: Path) -> dict[str, list[Example]]:
    """Group rows by their ``client_id`` value (converted to ``str``)."""
    clients: dict[str, list[Example]] = {}
    for i, (cid, example) in enumerate(zip(_column(ds, "client_id"), examples, strict=True)):
        if cid is None or (isinstance(cid, str) and not cid.strip()):
            raise HetLoRAError(f"{path}: row {i + 1}: column 'client_id' is empty")
        if isinstance(cid, list | dict):
            raise HetLoRAError(
                f"{path}: row {i + 1}: column 'client_id' must be a string or an integer, "
                f"got {type(cid).__name__}"
            )
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
        labels = _column(ds, partition_by)
        for i, label in enumerate(labels):
            if label is None:
                raise HetLoRAError(
                    f"{path}: row {i + 1}: partition_by column {partition_by!r} is null"
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
) -> dict[str, list[Example]]:
    """Read a data file and return its clients (unfiltered, keys in sorted order).

    The partitioner arguments are used only when the file has no ``client_id`` column.

    Raises:
        HetLoRAError: missing, empty, unreadable or malformed file, or bad partitioning.
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
) -> dict[str, list[Example]]:
    """The clients of a ``datasets.Dataset`` (``path`` names its source in messages).

    Raises:
        HetLoRAError: no rows, malformed rows, or bad partitioning.
    """
    if ds.num_rows == 0:
        raise HetLoRAError(f"data file {path} has no rows")
    examples = _examples(ds, path)
    if "client_id" in ds.column_names:
        clients = _natural_clients(ds, examples, path)
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

"""User data: a local ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file, or the rows of a
``datasets`` folder or hub id (`hetlora.data.sources`).

A file is read with Hugging Face ``datasets`` (packaged builders on a local file, with a
throw-away cache folder: no hub access, nothing left in the user's cache). Accepted columns:

* ``client_id``, ``prompt``, ``response``, or ``client_id``, ``text``: natural clients;
* ``client_id``, ``messages``: natural clients of conversations (`hetlora.data.chat`), or
  ``conversations`` in ShareGPT's form (``from``/``value`` turns,
  `hetlora.data.chat.from_sharegpt`);
* ``instruction``, ``output`` (and ``input``, Alpaca's form: the prompt is the instruction, the
  input where there is one and the output, each after a blank line) with or without
  ``client_id``, as ``prompt``, ``response``;
* ``prompt``, ``response``, ``messages``, ``conversations`` or ``text`` alone: the rows are
  split into clients by an ``flwr-datasets`` partitioner (``iid`` or ``dirichlet``), with ids
  ``partition-000``, ...

Text-only rows become examples with an empty prompt. Extra columns are ignored (except the
Dirichlet ``partition_by`` column).

Cells are taken as written. A CSV file has no types: every cell is read as its text, with no
number or missing-value guessing (``007`` and ``7`` are two client ids, ``NA`` and ``42`` are
answers, an empty cell is the empty string). JSON and Parquet cells keep their types: a text
column must hold strings, and a ``client_id`` is a string or an integer (read as its decimal
string); a float id is a bad row, since ``1.10`` and ``1.1`` are the same float and an id
column of floats usually holds integers that went through a missing value.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetlora.data import PARTITION_DEFAULTS, Example
from hetlora.data.chat import (
    conversation_problem,
    example_from_messages,
    from_sharegpt,
    messages_problem,
    sharegpt_problem,
)
from hetlora.errors import HetLoRAError

__all__ = ["FORMATS", "dataset_clients", "read_file"]

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


def _check_utf8(path: Path) -> None:
    """Refuse a text file that is not UTF-8, naming the line (the readers would take the bytes
    in and fail later, on the first cell of it that is read)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line += exc.object[: exc.start].count(b"\n")  # the chunk after held bytes
                raise HetLoRAError(
                    f"{path}: line {line} is not UTF-8 (byte {exc.object[exc.start]:#04x}): save the "
                    "file as UTF-8"
                ) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise HetLoRAError(f"{path}: ends inside a UTF-8 character") from None


def _check_csv_fields(path: Path) -> None:
    """Refuse a CSV row with more fields than its header: pandas would take the first such row's
    extra field for an index and shift its cells one column left without a word (an unquoted
    comma in a response, say)."""
    csv.field_size_limit(sys.maxsize)  # pandas has no limit on a field's length
    with path.open(encoding="utf-8-sig", newline="") as fh:
        rows = csv.reader(fh)
        try:
            header = next((r for r in rows if r), [])  # pandas skips blank lines
            for row in rows:
                if len(row) > len(header):
                    raise HetLoRAError(
                        f"{path}: line {rows.line_num} has {len(row)} fields, the header "
                        f"{len(header)}: quote a field that holds a comma"
                    )
        except csv.Error as exc:
            raise HetLoRAError(f"cannot read {path} as csv: line {rows.line_num}: {exc}") from None


def read_file(path: Path) -> Any:
    """Read a data file into a ``datasets.Dataset``, with a temporary cache folder.

    Raises:
        HetLoRAError: missing, empty, unreadable or malformed file.
    """
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
    if builder != "parquet":
        _check_utf8(path)
    if builder == "csv":
        _check_csv_fields(path)
    options = _csv_options(path) if builder == "csv" else {}
    if builder == "parquet":  # datasets fails on a Parquet file of 0 rows: read its metadata
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # not a Parquet file, or a damaged one
            raise HetLoRAError(f"cannot read {path} as parquet: {_one_line(exc)}") from exc
        if rows == 0:
            raise HetLoRAError(f"data file {path} has no rows")

    import datasets

    # Quiet while reading: our error message replaces datasets' own log lines and bars.
    with _quiet_datasets():
        with tempfile.TemporaryDirectory(prefix="hetlora-datasets-") as cache_dir:
            try:  # keep_in_memory: the table does not refer to files in cache_dir
                ds = datasets.load_dataset(
                    builder,
                    data_files=str(path),
                    split="train",
                    cache_dir=cache_dir,
                    keep_in_memory=True,
                    **options,
                )
            except Exception as exc:  # any parse failure is the file's fault
                cause = exc.__cause__ or exc
                if (
                    isinstance(exc, StopIteration)
                    or (
                        isinstance(exc, datasets.exceptions.DatasetGenerationError)
                        and "EmptyDataError" in type(cause).__name__
                    )
                    or (isinstance(exc, ValueError) and "corresponds to no data" in str(exc))
                ):
                    raise HetLoRAError(f"data file {path} has no rows") from exc
                raise HetLoRAError(f"cannot read {path} as {builder}: {_one_line(exc)}") from exc
    mixed = [n for n, f in ds.features.items() if _holds_json(f)]
    return _with_json_cells(ds, path, mixed) if builder == "json" and mixed else ds


def _holds_json(feature: Any) -> bool:
    """Whether a column's feature is, or holds, ``datasets``' ``Json`` (values of several types:
    a ``messages`` column whose contents are strings in some turns and lists of parts in
    others)."""
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, dict):
        return any(_holds_json(f) for f in feature.values())
    inner = getattr(feature, "feature", None)
    return inner is not None and _holds_json(inner)


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets`` without its progress bars and log lines for the block (as they were
    after it)."""
    import datasets

    were_on = not datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if were_on:
            datasets.enable_progress_bars()


def _with_json_cells(ds: Any, path: Path, names: list[str]) -> Any:
    """``ds`` with its columns ``names`` (of values of several types, or holding such values:
    a ``messages`` column with string and list contents) rebuilt from the file as JSON text per
    cell, which `_column` decodes to the values written. ``datasets`` keeps such
    a column as text in which a string that looks like a number is not quoted, so ``"42"``
    came back as the number 42 and ``"007"`` did not decode at all."""
    text = path.read_text(encoding="utf-8")
    try:  # JSON Lines, as datasets tries first: one object a line (one line: one row)
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        rows = None
    whole: Any = rows
    if rows is None or not all(isinstance(row, dict) for row in rows):
        try:  # one JSON document: a list of rows
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = rows  # lines of other values than objects
    if not isinstance(whole, list) or len(whole) != len(ds):
        raise HetLoRAError(f"{path}: cannot match its rows to the {len(ds)} read")
    whole = [row if isinstance(row, dict) else {"text": row} for row in whole]  # as datasets
    for name in names:
        cells = [json.dumps(row.get(name)) for row in whole]
        feature = ds.features[name]
        if type(feature).__name__ != "Json":  # a column that holds one: JSON text as a whole
            from datasets.features import Json

            feature = Json()
        temp = f"{_ROW}{name}"  # added before the old column goes: a table keeps a column
        ds = ds.add_column(temp, cells, feature=feature).remove_columns(name)
        ds = ds.rename_column(temp, name)
    return ds


def _csv_options(path: Path) -> dict[str, Any]:
    """``load_dataset`` options that read every column of a CSV file as the text written in it:
    each column a string (its names from the header, read as pandas reads it) and no cell
    taken for a missing value."""
    import datasets
    import pandas as pd

    try:
        header = pd.read_csv(path, nrows=0)
    except Exception as exc:  # an unreadable header is the file's fault
        raise HetLoRAError(f"cannot read {path} as csv: {_one_line(exc)}") from exc
    if listed := {"messages", "conversations"} & {str(c) for c in header.columns}:
        raise HetLoRAError(
            f"{path}: a CSV cannot hold lists, so its '{min(listed)}' column cannot be a "
            "conversation: use JSONL or parquet (or prompt/response columns)"
        )
    features = datasets.Features({str(c): datasets.Value("string") for c in header.columns})
    return {"features": features, "keep_default_na": False, "na_filter": False}


def _column(ds: Any, name: str) -> list[Any]:
    """The Python values of one column, in row order.

    A JSON column whose rows hold values of different types (strings and numbers, say) is
    stored by ``datasets`` as JSON text per cell; those cells are decoded, so a number stays
    a number (and is reported as a bad row) instead of becoming the text ``"7"``.
    """
    values = ds.data.column(name).to_pylist()
    if type(ds.features.get(name)).__name__ == "Json":  # `_with_json_cells` made it one
        values = [None if v is None else json.loads(v) for v in values]
    return values


def _text_problem(value: Any, name: str, allow_empty: bool) -> str | None:
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
    if isinstance(value, bool) or not isinstance(value, str | int):
        return (
            f"column 'client_id' must be a string or an integer, got {type(value).__name__} "
            f"{value!r:.40}"
        )
    return None


def _text_columns(ds: Any, path: Path | str) -> list[str]:
    """The text columns the rows are read from: (messages), (conversations: ShareGPT's),
    (prompt, response), (instruction, input, output: Alpaca's, input optional) or (text)."""
    columns = set(ds.column_names)
    alpaca = ["instruction", "input", "output"] if "input" in columns else ["instruction", "output"]
    for names in (["messages"], ["conversations"], ["prompt", "response"], alpaca, ["text"]):
        if set(names) <= columns:
            return names
    raise HetLoRAError(
        f"{path}: needs columns (messages), (conversations), (prompt, response), (instruction, "
        "output) or (text), optionally with client_id; "
        f"found: {', '.join(ds.column_names) or 'none'}"
    )


#: The columns that hold a conversation: how a value's shape is checked, and how it is read as
#: a ``messages`` value (ShareGPT's translated, `hetlora.data.chat.from_sharegpt`).
_CONVERSATIONS: dict[str, tuple[Callable[[Any], str | None], Callable[[Any], Any]]] = {
    "messages": (messages_problem, lambda value: value),
    "conversations": (sharegpt_problem, from_sharegpt),
}


def _drop_bad_rows(
    ds: Any,
    path: Path | str,
    on_bad_rows: str,
    label: str | None,
    tokenizer_loader: Callable[[], Any] | None = None,
) -> tuple[Any, int]:
    """Check every row in one pass; raise for bad rows (``"error"``) or drop them with one
    warning line (``"skip"``). Returns the clean rows and how many were dropped.

    ``label`` is the Dirichlet ``partition_by`` column, whose cells must not be null. With
    ``tokenizer_loader``, ``messages`` rows are rendered and tokenised too
    (`hetlora.data.chat.conversation_problem`); it is called only for such rows, after
    the columns are known to be usable.
    """
    columns = _text_columns(ds, path)
    checks: list[tuple[str, Callable[[Any], str | None]]]
    if columns[0] in _CONVERSATIONS:
        shape, as_messages = _CONVERSATIONS[columns[0]]
        check = shape
        if tokenizer_loader is not None:  # the structure first, then the template
            tokenizer = tokenizer_loader()

            def check(v: Any) -> str | None:
                return shape(v) or conversation_problem(tokenizer, as_messages(v))

        checks = [(columns[0], check)]
    else:
        checks = [
            (name, functools.partial(_text_problem, name=name, allow_empty=name == "prompt"))
            for name in columns
            if name != "input"
        ]
        if "input" in columns:  # Alpaca's optional input: empty or null where there is none
            checks.append(
                (
                    "input",
                    lambda v: None if v is None else _text_problem(v, "input", allow_empty=True),
                )
            )
    if "client_id" in ds.column_names:
        checks.append(("client_id", _client_id_problem))
    elif label is not None and label in ds.column_names:
        null = f"partition_by column {label!r} is null"
        checks.append((label, lambda value: null if value is None else None))
    problems: dict[int, list[str]] = {}
    for name, check in checks:
        for i, value in enumerate(_column(ds, name)):
            if (why := check(value)) is not None:
                problems.setdefault(i, []).append(why)
    if not problems:
        return ds, 0
    n = len(problems)
    shown = sorted(problems.items())[:SHOWN_BAD_ROWS]
    rows = "; ".join(f"row {i + 1}: {', '.join(why)}" for i, why in shown)
    more = f"; and {n - len(shown)} more" if n > len(shown) else ""
    described = f"{n} bad row{'s' if n != 1 else ''} of {ds.num_rows}: {rows}{more}"
    if on_bad_rows == "error":
        raise HetLoRAError(f'{path}: {described} (fix them, or set on_bad_rows = "skip")')
    if n == ds.num_rows:
        raise HetLoRAError(f"{path}: no usable rows: {described}")
    logger.warning('%s: skipped (on_bad_rows = "skip") %s', path, described)
    keep = [i for i in range(ds.num_rows) if i not in problems]
    # flatten: _column reads the table itself, which must hold only the kept rows
    clean = ds.select(keep, keep_in_memory=True)
    with _quiet_datasets():  # no progress bar of its own for a copy of the kept rows
        clean = clean.flatten_indices(keep_in_memory=True)
    return clean, n


def _partition(
    ds: Any,
    examples: list[Example],
    path: Path | str,
    *,
    partitioner: str,
    num_partitions: int,
    partition_by: str | None,
    dirichlet_alpha: float,
    seed: int,
) -> dict[str, list[Example]]:
    """Split the rows into ``num_partitions`` clients with an flwr-datasets partitioner
    (``partitioner`` already checked by `hetlora.data.load_clients`)."""
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
    else:
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
    part.dataset = index
    width = max(3, len(str(num_partitions - 1)))
    try:
        clients = {
            f"partition-{pid:0{width}d}": [examples[r] for r in part.load_partition(pid)[_ROW]]
            for pid in range(num_partitions)
        }
    except Exception as exc:  # flwr-datasets rejects the data or parameters
        raise HetLoRAError(
            f"{partitioner} partitioning of {path} failed: {_one_line(exc)}"
        ) from exc
    logger.info(
        "partitioned %d rows of %s into %d clients (%s)", n, path, num_partitions, partitioner
    )
    return clients


def _check_not_partitioned(path: Path | str, **keys: Any) -> None:
    """Refuse partitioner keys at other values than their defaults for data with client_id."""
    set_here = [f"{k} = {v!r}" for k, v in keys.items() if v != PARTITION_DEFAULTS[k]]
    if set_here:
        raise HetLoRAError(
            f"{path} has a client_id column, so its rows are not partitioned: remove "
            f"{', '.join(set_here)}"
        )


def dataset_clients(
    ds: Any,
    path: Path | str,
    *,
    partitioner: str,
    num_partitions: int,
    partition_by: str | None,
    dirichlet_alpha: float,
    seed: int,
    on_bad_rows: str,
    report: dict[str, int] | None,
    tokenizer_loader: Callable[[], Any] | None = None,
) -> dict[str, list[Example]]:
    """The clients of a ``datasets.Dataset`` (unfiltered, keys in sorted order); ``path``
    names its source in messages. The arguments are `hetlora.data.load_clients`'s, which
    checks them; the partitioner ones are used only when there is no ``client_id`` column, and
    must be at their defaults when there is.
    Every row is checked before any is used (with ``tokenizer_loader``, rendered and tokenised).

    Raises:
        HetLoRAError: no rows, bad rows (``"error"``), no usable row, bad partitioning, or
            partitioner keys set for rows with ``client_id``.
    """
    if ds.num_rows == 0:
        raise HetLoRAError(f"data file {path} has no rows")
    label = partition_by if partitioner == "dirichlet" else None
    ds, skipped = _drop_bad_rows(ds, path, on_bad_rows, label, tokenizer_loader)
    if report is not None:
        report["bad_rows_skipped"] = skipped
    columns = _text_columns(ds, path)
    if columns[0] in _CONVERSATIONS:
        as_messages = _CONVERSATIONS[columns[0]][1]
        examples = [example_from_messages(as_messages(v)) for v in _column(ds, columns[0])]
    elif columns == ["text"]:
        examples = [Example(prompt="", response=t) for t in _column(ds, "text")]
    elif columns[0] == "instruction":  # Alpaca's: the input after a blank line, the output too
        inputs = _column(ds, "input") if "input" in columns else [""] * ds.num_rows
        examples = [
            Example(prompt=(f"{i}\n\n{x}" if x and x.strip() else i) + "\n\n", response=o)
            for i, x, o in zip(
                _column(ds, "instruction"), inputs, _column(ds, "output"), strict=True
            )
        ]
    else:
        examples = [
            Example(prompt=p, response=r)
            for p, r in zip(_column(ds, "prompt"), _column(ds, "response"), strict=True)
        ]
    if "client_id" not in ds.column_names:
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
    else:
        _check_not_partitioned(
            path,
            partitioner=partitioner,
            num_partitions=num_partitions,
            partition_by=partition_by or "",
            dirichlet_alpha=dirichlet_alpha,
        )
        clients = {}
        for cid, example in zip(_column(ds, "client_id"), examples, strict=True):
            clients.setdefault(str(cid), []).append(example)
        logger.info(
            "read %d rows of %s: %d clients by client_id", len(examples), path, len(clients)
        )
    return {cid: clients[cid] for cid in sorted(clients)}

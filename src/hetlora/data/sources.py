"""Data held by Hugging Face ``datasets``: a ``save_to_disk`` folder or a hub id.

* A folder written by ``Dataset.save_to_disk`` is read whole; one written by
  ``DatasetDict.save_to_disk`` needs the ``split`` key unless it has a single split.
* A hub id (``owner/name``, not ending in a data file's suffix) is read with
  ``datasets.load_dataset(id, split=split or "train")`` where a network exists; offline it is
  one error line.

The rows then have the columns of a data file (`hetlora.data.files`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from hetlora.errors import HetLoRAError, first_line

__all__ = ["is_hub_id", "load_hub", "load_saved"]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(source: str) -> bool:
    """Whether ``source`` is read as a hub dataset id: ``owner/name``, not an existing local
    path and not ending in a data file's suffix (``mydata/train.jsonl`` is a file path)."""
    from hetlora.data.files import FORMATS

    return (
        bool(_HUB_ID.fullmatch(source))
        and not source.lower().endswith(tuple(FORMATS))
        and not Path(source).exists()
    )


def load_saved(path: Path, split: str) -> Any:
    """The ``datasets.Dataset`` of a ``save_to_disk`` folder (``split`` picks a DatasetDict's).

    Raises:
        HetLoRAError: not such a folder, unreadable, or ``split`` missing or unknown.
    """
    import datasets

    markers = ("dataset_dict.json", "state.json", "dataset_info.json")
    if not (path.is_dir() and any((path / m).is_file() for m in markers)):
        raise HetLoRAError(
            f"data folder {path} was not written by Dataset.save_to_disk or "
            "DatasetDict.save_to_disk (no dataset_dict.json, state.json or dataset_info.json)"
        )
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # a damaged folder
        raise HetLoRAError(f"cannot read the datasets folder {path}: {first_line(exc)}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        if not split and len(names) == 1:
            split = names[0]
        if not split:
            raise HetLoRAError(
                f"{path} holds the splits {', '.join(names)}: set split to one of them"
            )
        if split not in loaded:
            raise HetLoRAError(
                f"split {split!r} is not in {path}; its splits: {', '.join(names) or 'none'}"
            )
        logger.info("read split %s of %s", split, path)
        return loaded[split]
    if split:
        raise HetLoRAError(
            f"{path} holds one Dataset, not a DatasetDict: split {split!r} does not apply"
        )
    return loaded


def load_hub(source: str, split: str) -> Any:
    """Split ``split`` (default ``train``) of the hub dataset ``source``.

    Raises:
        HetLoRAError: offline, unknown id or split, or any other failure to fetch it.
    """
    import datasets
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE:
        raise HetLoRAError(
            f"data {source!r} is a hub dataset id, but the hub is offline here "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); save it with save_to_disk where a network "
            "exists and pass that folder"
        )
    try:
        return datasets.load_dataset(source, split=split or "train")
    except Exception as exc:  # network down, unknown id or split
        raise HetLoRAError(
            f"cannot load the hub dataset {source!r} (split {split or 'train'!r}): "
            f"{first_line(exc)}"
        ) from exc

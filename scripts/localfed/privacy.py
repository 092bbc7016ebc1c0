"""Did any device's text reach the server? A check over files and captured output.

A Flower run whose server holds no data must write no example text: not in its run directory,
not in the SuperLink's or the ServerApp's logs, not on the console. ``device_texts`` collects
the distinct texts of the devices' own data files (every prompt, response, text field and
message content, each line of it), ``leaks`` lists the files in which any of them occurs.
Texts shorter than ``min_chars`` are left out: a line such as "Ay, my lord." may occur by
chance in a log line or in the bytes of a weights file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

FIELDS = ("prompt", "response", "text")


def _strings(row: dict) -> Iterable[str]:
    for key in FIELDS:
        if isinstance(row.get(key), str):
            yield row[key]
    for message in row.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            yield message["content"]


def device_texts(files: Iterable[Path | str], min_chars: int = 24) -> list[str]:
    """The distinct lines (stripped, at least ``min_chars`` long) of the examples of the
    devices' JSON Lines files, sorted."""
    texts = set()
    for path in files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                for value in _strings(json.loads(line)):
                    texts.update(p.strip() for p in value.splitlines())
    return sorted(t for t in texts if len(t) >= min_chars)


def leaks(paths: Iterable[Path | str], needles: Iterable[str]) -> list[str]:
    """The files under ``paths`` (folders are searched whole, as bytes) that hold a needle."""
    encoded = [n.encode("utf-8") for n in needles]
    found = []
    for root in map(Path, paths):
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                if any(n in data for n in encoded):
                    found.append(str(path))
    return found


def leaked_into(text: str, needles: Iterable[str]) -> int:
    """How many of the needles occur in ``text`` (captured console output)."""
    return sum(n in text for n in needles)

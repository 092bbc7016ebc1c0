"""Did any device's text reach the server? A check over files and captured output.

A Flower run whose server holds no data must write no example text: not in its run directory,
not in the SuperLink's or the ServerApp's logs, not on the console. ``device_texts`` collects
the distinct texts of the devices' own data files (every prompt, response, text field and
message content, each line of it), ``leaks`` lists the files in which any of them occurs, as it
is, escaped (JSON, ``repr``) or in part (its head or tail).
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


def forms(needle: str, head: int = 24) -> set[bytes]:
    """The byte strings a needle may be written as: UTF-8 as it is, escaped as JSON writes it
    (``\\uXXXX``, ``\\"``; ASCII-only or not) and as Python's ``repr`` does, and the first and
    last ``head`` characters of each (an error or log line that quotes part of a row)."""
    texts = {needle, json.dumps(needle)[1:-1], json.dumps(needle, ensure_ascii=False)[1:-1]}
    texts.add(repr(needle)[1:-1])
    texts |= {t[:head] for t in list(texts)} | {t[-head:] for t in list(texts)}
    return {t.encode("utf-8") for t in texts if t}


def leaks(paths: Iterable[Path | str], needles: Iterable[str]) -> list[str]:
    """The files under ``paths`` (folders are searched whole, as bytes) that hold a needle in
    any of its `forms`."""
    encoded = sorted({form for n in needles for form in forms(n)})
    found = []
    for root in map(Path, paths):
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                if any(n in data for n in encoded):
                    found.append(str(path))
    return found


def leaked_into(text: str, needles: Iterable[str]) -> int:
    """How many of the needles occur in ``text`` (captured console output), in any of their
    `forms`."""
    data = text.encode("utf-8")
    return sum(any(form in data for form in forms(n)) for n in needles)

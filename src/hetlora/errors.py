"""The one error type for expected failures: bad config, bad data, bad client update.

The CLI turns a `HetLoRAError` into one clear line on stderr and exit code 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HetLoRAError(Exception):
    """An expected failure caused by the user's input or a client's reply."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

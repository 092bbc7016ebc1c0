"""File modes: what hetlora writes is readable as ``save_pretrained`` writes it.

``tempfile.mkstemp`` and ``mkdtemp`` create 0600 files and 0700 folders; a checkpoint or an
export staged through them would stay unreadable to a serving or sync process running as
another user. `make_readable` gives them the modes the process's umask gives a plain
``open``/``mkdir`` (0644 and 0755 under the usual umask 022).
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: Path | str) -> None:
    """Set ``path`` (and, for a folder, everything under it) to 0666 / 0777 less the umask."""
    mask = umask()
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)

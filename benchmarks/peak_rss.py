"""Peak resident memory of this process, for the bench's ``rss_ratio`` (no heavy imports)."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's own peak RSS in MiB: ``VmHWM``, the high-water mark of its memory map.

    Not ``getrusage().ru_maxrss``: Linux carries into a child the RSS its parent had when it
    forked (the forked copy of the parent's memory map is counted at ``exec``), so a child of
    the 4 GiB bench would report at least the parent's 4 GiB whatever it uses itself.
    ``ru_maxrss`` (kilobytes on Linux) is the fallback where ``/proc`` is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

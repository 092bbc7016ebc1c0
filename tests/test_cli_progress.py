"""The live display counts each run's rounds from 0, also for the next method of a comparison."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from hetlora.cli import LiveProgress


def test_rounds_restart_for_the_next_method():
    progress = Progress(console=Console(file=io.StringIO()))
    live = LiveProgress(progress)
    task = progress.tasks[live.rounds]
    for rnd in (1, 2):
        live({"event": "round_start", "round": rnd, "rounds": 2})
        live({"event": "round_end", "row": {"round": rnd, "wall_s": 0.0}, "rounds": 2})
    assert (task.completed, task.total) == (2, 2)
    live.reset()  # the comparison's next method
    live({"event": "round_start", "round": 1, "rounds": 2})
    live({"event": "round_end", "row": {"round": 1, "wall_s": 0.0}, "rounds": 2})
    assert (task.completed, task.total) == (1, 2)  # 1/2, not 3/2

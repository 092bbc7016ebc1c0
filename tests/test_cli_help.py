"""Every command's --help shows its docstring and option texts as written (no markup eaten)."""

from __future__ import annotations

import inspect
import re

import pytest
import typer
from typer.testing import CliRunner

from hetlora.cli import app


def _commands(group, prefix=()) -> dict[tuple[str, ...], object]:
    """Every command by its path, sub-apps (``hetlora flower ...``) included."""
    out = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            out.update(_commands(command, (*prefix, name)))
        else:
            out[(*prefix, name)] = command
    return out


COMMANDS = _commands(typer.main.get_command(app))


def _flat(text: str) -> str:
    """The text without rich's panel borders, whitespace collapsed (wrapping is not content)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("name", sorted(COMMANDS), ids=" ".join)
def test_help_shows_docstring_and_option_texts_as_written(name):
    command = COMMANDS[name]
    result = CliRunner().invoke(app, [*name, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    shown = _flat(result.output)
    doc = inspect.getdoc(command.callback)
    assert doc and _flat(doc) in shown
    for param in command.params:
        if getattr(param, "help", None):
            # a help text may escape "[" for rich ("\[[compare]]"); it must show as "[[compare]]"
            assert _flat(param.help.replace("\\[", "[")) in shown, (name, param.name)


def test_compare_help_shows_the_toml_table_name():
    result = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "100"})
    assert "shared keys plus [[compare]] entries" in _flat(result.output)

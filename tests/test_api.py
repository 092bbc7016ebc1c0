"""The public API: `from hetlora import run, Config`, its doctests, progress to the log."""

from __future__ import annotations

import doctest
import json
import logging

import pytest

import hetlora


@pytest.mark.parametrize("module", ["hetlora.api", "hetlora.lora", "hetlora.methods.hetlora"])
def test_docstring_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted >= 1 and result.failed == 0


def test_public_names_resolve():
    for name in hetlora.__all__:
        assert getattr(hetlora, name) is not None, name
    with pytest.raises(AttributeError):
        hetlora.no_such_name  # noqa: B018


def test_run_from_python_logs_progress_and_writes_the_run(tiny_model, tmp_path, caplog):
    out = tmp_path / "api"
    with caplog.at_level(logging.INFO, logger="hetlora"):
        summary = hetlora.run(
            {"model": str(tiny_model), "min_examples": 120, "r_min": 2, "r_max": 8},
            out,
            rounds=2,
            clients_per_round=2,
            local_steps=2,
            batch_size=4,
            lr=0.01,
            eval_examples=16,
            rouge_examples=0,
            precision="fp32",
        )
    assert json.loads((out / "summary.json").read_text())["final_ppl"] == summary["final_ppl"]
    lines = [r.getMessage() for r in caplog.records if r.name == "hetlora"]
    assert any(line.startswith("round   2") and "test ppl" in line for line in lines), lines
    final = f"-> {summary['final_ppl']:.2f} (final)"
    assert any(final in line for line in lines), lines
    with pytest.raises(hetlora.HetLoRAError, match="not empty"):
        hetlora.run({"model": str(tiny_model)}, out)
    # a larger rounds extends the finished run, progress silenced
    more = hetlora.run(out=out, resume=True, rounds=3, progress=None)
    assert more["rounds"] == 3

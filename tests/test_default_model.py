"""One short federated run on the real default model (SmolLM2-135M-Instruct) and data.

Slow-ish (about a minute: the packaged GGUF is converted into a private cache first); it is the
check that the packaged model, the Shakespeare clients and the whole engine work together.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hetlora.cli import app


@pytest.mark.slow
def test_short_run_on_default_model(tmp_path):
    out = tmp_path / "run"
    # the smallest run that still shows learning: one round of two clients, 8 held-out
    # examples, one ROUGE-L generation of a few tokens
    settings = [
        "rounds=1",
        "clients_per_round=2",
        "local_steps=2",
        "batch_size=4",
        "eval_every=1",
        "eval_examples=8",
        "rouge_examples=1",
        "max_new_tokens=6",
        "lr=0.002",
    ]
    args = ["run", "--out", str(out)]
    for item in settings:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    # the base instruct model is far from Shakespeare's dialogue; one small round already helps
    assert rows[-1]["test_ppl"] < rows[0]["test_ppl"]
    summary = json.loads((out / "summary.json").read_text())
    assert "SmolLM2-135M-Instruct" in summary["model"]
    assert summary["target_modules"] == ["q_proj", "v_proj"]
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == summary["model"]
    # The GGUF conversion keeps the model's ChatML template (messages rows depend on it).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(summary["model"])
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_processes_starting_at_once_convert_the_packaged_model_once(tmp_path, monkeypatch):
    """The conversion runs under a file lock: callers that find no converted folder wait for
    the one converting, then use its folder."""
    import threading
    import time

    from hetlora import models

    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))
    calls = []

    def slow_convert(gguf_file, target):
        calls.append(target)
        time.sleep(0.3)
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", slow_convert)
    found = []
    threads = [
        threading.Thread(target=lambda: found.append(models.default_model_folder()))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert found == [calls[0]] * 3 and (calls[0] / "config.json").is_file()

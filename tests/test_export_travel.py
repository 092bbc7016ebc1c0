"""An exported adapter travels: it loads from a copy elsewhere with AutoPeftModelForCausalLM,
`hetlora evaluate` and `hetlora chat`, giving its run's tier perplexity; files are readable."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from typer.testing import CliRunner

from hetlora.cli import app

SETTINGS = [
    "rounds=2",
    "clients_per_round=2",
    "local_steps=2",
    "batch_size=4",
    "lr=0.01",
    "eval_examples=16",
    "rouge_examples=0",
    "max_new_tokens=4",
    "precision='fp32'",
    "min_examples=120",
    "r_min=2",
    "r_max=8",
]


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    old = os.umask(0o022)
    try:
        out = tmp_path_factory.mktemp("travel") / "run"
        args = ["run", "--out", str(out), "--set", f"model='{tiny_model}'"]
        for item in SETTINGS:
            args += ["--set", item]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    return out, json.loads((out / "summary.json").read_text())


def _modes(folder):
    return {
        p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in [folder, *folder.rglob("*")]
    }


def test_exported_adapter_loads_from_a_copy_with_its_tier_perplexity(
    finished, tiny_model, tmp_path
):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hetlora.runtime.local import evaluate_run

    run_dir, summary = finished
    rank = min(int(r) for r in summary["tier_ppl"])
    old = os.umask(0o022)
    try:
        res = CliRunner().invoke(
            app,
            [
                "export",
                str(run_dir),
                "--rank",
                str(rank),
                "--out",
                str(tmp_path / "x"),
                "--base-model",
                str(tiny_model),
            ],
        )
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    modes = _modes(tmp_path / "x")
    assert modes["."] == 0o755 and modes["adapter_model.safetensors"] == 0o644, modes
    assert set(modes.values()) <= {0o644, 0o755}, modes
    copy = tmp_path / "device" / "adapter"
    shutil.copytree(tmp_path / "x", copy)
    shutil.rmtree(tmp_path / "x")
    config = json.loads((copy / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model) and config["r"] == rank
    meta = json.loads((copy / "hetlora.json").read_text())
    assert meta["rank"] == rank and meta["tier_ppl"] == summary["tier_ppl"][str(rank)]

    auto = AutoPeftModelForCausalLM.from_pretrained(str(copy))  # names its own base
    tokenizer = AutoTokenizer.from_pretrained(str(copy))  # saved beside the adapter
    assert tokenizer("to be or not")["input_ids"]
    direct = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(copy))
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, direct(ids).logits)

    result = evaluate_run(copy)
    assert result["test_ppl"] == pytest.approx(summary["tier_ppl"][str(rank)], rel=1e-5)
    assert result["reported_ppl"] == summary["tier_ppl"][str(rank)]
    res = CliRunner().invoke(app, ["evaluate", str(copy)])
    assert res.exit_code == 0 and f"tier_ppl at rank {rank} reports" in res.output, res.output

    prompt = ["chat", "--prompt", "to be or not", "--max-new-tokens", "6"]
    from_copy = CliRunner().invoke(app, [*prompt[:1], str(copy), *prompt[1:]])
    from_run = CliRunner().invoke(app, [prompt[0], str(run_dir), "--rank", str(rank), *prompt[1:]])
    assert from_copy.exit_code == 0 and from_run.exit_code == 0, from_copy.output
    assert from_copy.output == from_run.output


def test_export_names_a_portable_base_and_merges_in_a_chosen_dtype(finished, tmp_path):
    from safetensors import safe_open

    from hetlora.export import exported_base
    from hetlora.models import DEFAULT_HUB_ID, DEFAULT_MODEL, portable_name

    assert portable_name(DEFAULT_MODEL) == DEFAULT_HUB_ID
    assert portable_name("org/model") == "org/model"
    # the packaged model's hub id names other (unquantised) weights: load the packaged copy
    assert exported_base(tmp_path, {"base_model": DEFAULT_MODEL}) == DEFAULT_MODEL

    run_dir, _ = finished
    ckpt = run_dir / "checkpoint.pt"
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o644  # not mkstemp's 0600
    res = CliRunner().invoke(
        app,
        [
            "export",
            str(run_dir),
            "--rank",
            "2",
            "--merge",
            "--dtype",
            "bf16",
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert res.exit_code == 0, res.output
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as fh:
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}
    assert dtypes == {torch.bfloat16}
    res = CliRunner().invoke(
        app, ["export", str(run_dir), "--rank", "2", "--merge", "--out", str(tmp_path / "m32")]
    )
    assert res.exit_code == 0, res.output
    with safe_open(str(tmp_path / "m32" / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}  # the base's own
    for bad, line in (
        (["--merge", "--base-model", "x/y"], "--base-model applies to an adapter export"),
        (["--dtype", "bf16"], "--dtype applies to --merge"),
        (["--merge", "--dtype", "int8"], "--dtype must be one of fp32, bf16, fp16"),
    ):
        res = CliRunner().invoke(
            app, ["export", str(run_dir), "--rank", "2", "--out", str(tmp_path / "bad"), *bad]
        )
        assert res.exit_code == 2 and line in res.stderr, res.output


def test_a_gguf_export_is_llama_cpps_lora_of_the_gguf_base(tmp_path, monkeypatch):
    """`hetlora export --gguf` on a run whose model is a GGUF file: llama.cpp's LoRA layout.
    Its A and B are PEFT's at the rank, B's rows in the order the base GGUF stores the layer's
    rows (llama.cpp adds ``scale B A`` to the stored weight), recovered here from the two
    files' weights, not from the export's code; alpha is ``scale * rank``, as PEFT's."""
    import types

    import gguf
    from safetensors.torch import load_file
    from tiny import make_tiny_gguf

    from hetlora.errors import HetLoRAError
    from hetlora.export import export_gguf_lora

    monkeypatch.setenv("HETLORA_CACHE", str(tmp_path / "cache"))
    base = make_tiny_gguf(tmp_path / "g")
    run = tmp_path / "run"
    args = ["run", "--out", str(run), "--set", f"model='{base}'"]
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for item in [*SETTINGS, f"target_modules={every}"]:
        args += ["--set", item]
    assert CliRunner().invoke(app, args).exit_code == 0
    res = CliRunner().invoke(
        app, ["export", str(run), "--rank", "3", "--out", str(tmp_path / "x"), "--gguf"]
    )
    assert res.exit_code == 0, res.output
    assert f"its base for llama.cpp: {base}" in res.output
    peft = tmp_path / "peft"
    plain = ["export", str(run), "--rank", "3", "--out", str(peft)]
    refused = CliRunner().invoke(app, plain)  # AutoPeftModel cannot load a .gguf base
    assert refused.exit_code == 2
    assert "name its Hugging Face original with --base-model" in refused.stderr
    hf_folder = str(tmp_path / "g" / "hf")
    assert CliRunner().invoke(app, [*plain, "--base-model", hf_folder]).exit_code == 0
    config = json.loads((peft / "adapter_config.json").read_text())
    theirs = load_file(peft / "adapter_model.safetensors")

    reader = gguf.GGUFReader(tmp_path / "x" / "adapter.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(config["lora_alpha"])
    mine = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(base).tensors}
    hf = load_file(tmp_path / "g" / "hf" / "model.safetensors")
    assert len(mine) == len(theirs) == 28  # 7 modules of 2 layers, A and B each
    kinds = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(2):
        for short, long in kinds.items():
            key = f"base_model.model.model.layers.{i}.{long}"
            a, b = theirs[f"{key}.lora_A.weight"], theirs[f"{key}.lora_B.weight"]
            assert a.shape[0] == 3
            # the stored rows of this layer, found among the original's rows
            weight = stored[f"blk.{i}.{short}.weight"]
            original = hf[f"model.layers.{i}.{long}.weight"]
            rows = torch.cdist(weight, original).argmin(dim=1)
            torch.testing.assert_close(original[rows], weight)
            # llama.cpp keeps the query's and key's rows (4 heads; 2 for the key) in its order
            in_order = bool((rows == torch.arange(len(rows))).all())
            assert in_order == (short not in ("attn_q", "attn_k"))
            torch.testing.assert_close(mine[f"blk.{i}.{short}.weight.lora_a"], a)
            torch.testing.assert_close(mine[f"blk.{i}.{short}.weight.lora_b"], b[rows])
    with pytest.raises(HetLoRAError, match=r"--gguf writes adapters of llama models .*'qwen2'"):
        export_gguf_lora({}, 1, 1.0, types.SimpleNamespace(model_type="qwen2"), tmp_path / "q", "q")
    tied = types.SimpleNamespace(
        model_type="llama",
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    head = {"lm_head": (torch.zeros(5, 1), torch.zeros(1, 3))}
    with pytest.raises(HetLoRAError, match=r"tied embeddings is the token embedding in llama"):
        export_gguf_lora(head, 1, 1.0, tied, tmp_path / "t.gguf", "t")

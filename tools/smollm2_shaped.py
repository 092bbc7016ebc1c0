"""Write a randomly initialised model of SmolLM2-135M's exact shape (with the tiny tokenizer).

For timing where the packaged weights cannot travel (e.g. a GPU machine without network):
speed depends on the shapes, not the values. Usage:

    python tools/smollm2_shaped.py OUT_DIR
    python benchmarks/bench.py --model OUT_DIR --out bench-gpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny import make_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def main(out: str) -> None:
    folder = make_tiny_model(Path(out))  # the tokenizer (512 ids, all below the vocab size)
    tiny = AutoConfig.from_pretrained(folder)
    config = AutoConfig.for_model(
        "llama",
        eos_token_id=tiny.eos_token_id,
        pad_token_id=tiny.pad_token_id,
        bos_token_id=tiny.bos_token_id,
        **SMOLLM2_135M,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    print(f"{folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main(sys.argv[1])

"""Cost accounting: what a client sends and receives, and what its local training costs.

FLOPs are estimated the usual way for transformer training (Kaplan et al. 2020): a matmul
parameter costs 2 FLOPs per token forward and 4 backward when its weight gets a gradient, 2
backward when only the activation gradient flows through it (a frozen weight under LoRA).

* LoRA client: ``tokens * (4 * N_body + 6 * N_lora) + targets * 4 * N_head``
* full fine-tuning: ``tokens * 6 * N_body + targets * 6 * N_head``

``N_body`` counts the weights of the linear layers inside the decoder blocks; ``N_head`` is the
output projection, which runs only at labelled positions (`hetlora.evaluate.response_nll`);
``tokens`` are the real (non-padding) tokens and ``targets`` the labelled ones. Attention's
score computation and norms are left out (small at these sequence lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSize:
    """Matmul parameter counts of a causal LM."""

    body: int
    head: int
    total: int


def model_size(model: torch.nn.Module) -> ModelSize:
    """Count the decoder's linear weights, the output head, and all parameters."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    body = sum(
        module.weight.numel()
        for name, module in base.get_decoder().named_modules()
        if "lora_" not in name
        and getattr(module, "weight", None) is not None
        and module.weight.ndim == 2
        and not isinstance(module, torch.nn.Embedding)
    )
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    return ModelSize(body=body, head=head.weight.numel(), total=total)


def train_flops(size: ModelSize, tokens: int, targets: int, trainable: int, full: bool) -> float:
    """Estimated FLOPs of one client's local training (see the module docstring)."""
    if full:
        return float(tokens * 6 * size.body + targets * 6 * size.head)
    return float(tokens * (4 * size.body + 6 * trainable) + targets * 4 * size.head)

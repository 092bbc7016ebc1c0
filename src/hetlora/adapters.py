"""Put LoRA factors into a PEFT model and take them out again.

The base model is wrapped once (`wrap`) with the global adapter named ``"default"`` at rank
r_max. A client's adapter of rank r_k is added next to it, trained, read out and deleted
(`attach`, `detach`), so one base model serves every simulated client. Module names
are the base model's own (``model.layers.0.self_attn.q_proj``).

The fixed-shape variant (`attach_fixed`, `release_fixed`) keeps one client adapter at
r_max for good and writes each client's rank-r_k factors into its first r_k positions, the rest
zero: every client then runs modules of the same shapes, which a compiled step needs.
With PEFT's scale ``lora_alpha / r`` set to ``s`` at r_max, ``W0 + s B A`` is the same layer.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors, pad

GLOBAL = "default"
CLIENT = "client"
FIXED = "client_fixed"  # the client adapter of the fixed-shape step, kept at r_max
_PREFIX = "base_model.model."


def lora_config(rank: int, scale: float, target_modules: list[str]) -> LoraConfig:
    """A PEFT config whose scale ``lora_alpha / r`` equals ``scale`` for every rank."""
    return LoraConfig(
        r=rank,
        lora_alpha=scale * rank,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap(model: torch.nn.Module, rank: int, scale: float, target_modules: list[str]) -> PeftModel:
    """Wrap the frozen base once, with the global adapter at ``rank`` (PEFT's init: B = 0).

    Every name of ``target_modules`` must name a module (PEFT's rule: the module's name, or the
    last parts of its dotted path); PEFT itself only refuses a list of which none matches, and a
    list written for another family (``q_proj`` on Phi-3's fused ``qkv_proj``) would train
    fewer modules than asked without a word."""
    modules = dict(model.named_modules())
    matched = {t: [n for n in modules if n == t or n.endswith("." + t)] for t in target_modules}
    unmatched = [t for t, found in matched.items() if not found]
    if unmatched:
        raise HetLoRAError(
            f"target_modules {unmatched} name no module of this model (its linear layers: "
            f"{', '.join(sorted(linear_leaves(model)))})"
        )
    # PEFT's embedding LoRA keeps other factors (lora_embedding_A/B) than the ones trained,
    # aggregated and exported here: it would stay at its init, without a word
    embeddings = [
        t
        for t, found in matched.items()
        if any(isinstance(modules[n], torch.nn.Embedding) for n in found)
    ]
    if embeddings:
        raise HetLoRAError(
            f"target_modules {embeddings} name an embedding layer; LoRA here goes on linear "
            f"layers only ({', '.join(sorted(linear_leaves(model)))})"
        )
    try:
        peft_model = get_peft_model(model, lora_config(rank, scale, target_modules))
    except ValueError as exc:
        raise HetLoRAError(f"cannot put LoRA on modules {target_modules}: {exc}") from None
    return peft_model


def linear_leaves(model: torch.nn.Module) -> set[str]:
    """The last names of the layers LoRA can adapt (``nn.Linear``, GPT-2's ``Conv1D``)."""
    return {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }


def live_factors(
    peft_model: PeftModel, adapter: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's ``(B, A)`` weight parameters per module (live, not copies)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
            out[key] = (module.lora_B[adapter].weight, module.lora_A[adapter].weight)
    if not out:
        raise HetLoRAError(f"the model has no LoRA adapter named {adapter!r}")
    return out


def read_factors(peft_model: PeftModel, adapter: str = GLOBAL) -> Factors:
    """Detached CPU fp32 copies of an adapter's factors."""
    return {
        k: (b.detach().float().cpu().clone(), a.detach().float().cpu().clone())
        for k, (b, a) in live_factors(peft_model, adapter).items()
    }


@torch.no_grad()
def write_factors(peft_model: PeftModel, factors: Factors, adapter: str = GLOBAL) -> None:
    """Copy ``factors`` into an adapter of the same module names and shapes."""
    live = live_factors(peft_model, adapter)
    if set(live) != set(factors):
        missing, extra = sorted(set(live) - set(factors)), sorted(set(factors) - set(live))
        raise HetLoRAError(
            f"factor modules do not match the adapter: missing {missing[:3]}, extra {extra[:3]}"
        )
    for name, (b, a) in factors.items():
        lb, la = live[name]
        if lb.shape != b.shape or la.shape != a.shape:
            raise HetLoRAError(
                f"{name}: factors of shape {tuple(b.shape)}, {tuple(a.shape)} do not fit "
                f"the adapter's {tuple(lb.shape)}, {tuple(la.shape)}"
            )
        lb.copy_(b)
        la.copy_(a)


def write_padded(peft_model: PeftModel, factors: Factors, r_max: int) -> None:
    """Write factors of any rank up to ``r_max`` into the rank-``r_max`` global adapter,
    zero-padded (the same product ``B A``)."""
    write_factors(peft_model, {n: pad(b, a, r_max) for n, (b, a) in factors.items()})


def attach(
    peft_model: PeftModel, factors: Factors, rank: int, scale: float, target_modules: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Add the client adapter at ``rank`` holding ``factors``, make it the only trainable one."""
    peft_model.add_adapter(CLIENT, lora_config(rank, scale, target_modules))
    return _train_only(peft_model, CLIENT, factors)


def _train_only(
    peft_model: PeftModel, adapter: str, factors: Factors
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Activate ``adapter``, write ``factors`` into it and make its factors the only trainable
    parameters; returns them (live)."""
    peft_model.set_adapter(adapter)
    write_factors(peft_model, factors, adapter)
    live = live_factors(peft_model, adapter)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    for b, a in live.values():
        b.requires_grad_(True)
        a.requires_grad_(True)
    return live


def detach(peft_model: PeftModel) -> None:
    """Delete the client adapter and make the global adapter active again."""
    peft_model.set_adapter(GLOBAL)
    peft_model.delete_adapter(CLIENT)
    for p in peft_model.parameters():
        p.requires_grad_(False)


def attach_fixed(
    peft_model: PeftModel, factors: Factors, r_max: int, scale: float, target_modules: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write a rank-r_k client into the fixed adapter at ``r_max``: positions >= r_k are zero.

    The adapter is added on first use and never deleted, so its modules, shapes and parameter
    objects stay the same from client to client. Its factors become the only trainable ones.
    """
    if FIXED not in peft_model.peft_config:
        peft_model.add_adapter(FIXED, lora_config(r_max, scale, target_modules))
    config = peft_model.peft_config[FIXED]
    if config.r != r_max or config.lora_alpha != scale * r_max:
        raise HetLoRAError(
            f"the fixed client adapter has rank {config.r} and alpha {config.lora_alpha}, "
            f"not rank {r_max} and alpha {scale * r_max}"
        )
    return _train_only(peft_model, FIXED, {n: pad(b, a, r_max) for n, (b, a) in factors.items()})


def release_fixed(peft_model: PeftModel) -> None:
    """Make the global adapter active again; the fixed client adapter stays, frozen."""
    peft_model.set_adapter(GLOBAL)
    for p in peft_model.parameters():
        p.requires_grad_(False)


def base_parameters(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's own parameters by name (no LoRA factors), for full fine-tuning."""
    return {
        name: p for name, p in peft_model.get_base_model().named_parameters() if "lora_" not in name
    }


@torch.no_grad()
def adapted_base_weights(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of every adapted module's base weight ``W0`` (keyed like factor dicts)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in peft_model.named_modules():
        key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        if isinstance(module, LoraLayer):
            out[key] = module.get_base_layer().weight.detach().clone()
    return out


@torch.no_grad()
def set_base(
    peft_model: PeftModel, pristine: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]
) -> None:
    """``W <- W0 + dW`` for every adapted module in ``deltas``, from its pristine ``W0``.

    Rather than adding each round's ``dW`` to the current weights, the result depends only on the
    cumulative ``dW``, so a run resumed from a checkpoint holding that sum gets bit-identical
    weights.
    """
    for name, module in peft_model.named_modules():
        key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        if isinstance(module, LoraLayer) and key in deltas:
            weight = module.get_base_layer().weight
            delta = deltas[key].to(weight.device, weight.dtype)
            delta = delta.T if getattr(module, "fan_in_fan_out", False) else delta
            weight.copy_(pristine[key] + delta)


@torch.no_grad()
def load_base_weights(peft_model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    """Copy named values into the base model's parameters."""
    params = base_parameters(peft_model)
    for name, value in weights.items():
        params[name].copy_(value)

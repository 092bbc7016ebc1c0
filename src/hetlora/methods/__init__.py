"""Federated methods, one file each, all on the same engine (`hetlora.methods.base`).

* ``hetlora``   -- the paper's method (truncation, self-pruning, sparsity-weighted zero-padding)
* ``homlora``   -- every client at one rank, FedAvg of the factors (FedIT)
* ``recon_svd`` -- average of the products, truncated SVD back to each rank (FlexLoRA-like)
* ``hlora``     -- the same product re-factored through QR, singular values in A (HLoRA)
* ``rblora``    -- rank-balanced (rarity-weighted) zero-padding, SVD projection (RB-LoRA)
* ``fedex``     -- factor averaging plus the exact residual merged into the base (FedEx-LoRA)
* ``flora``     -- stacking, merged into the base every round (FLoRA)
* ``ffa``       -- A frozen at its seeded init, B trained and zero-padded (FFA-LoRA)
* ``full_ft``   -- FedAvg of every weight

HetLoRA's ablations are config keys of ``hetlora``: ``pruning = false``, ``aggregation =
"uniform"`` or ``"data_size"`` (zero-padding without sparsity weights) or
``"sparsity_data_size"``, ``per_module_weights``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hetlora.config import METHODS
from hetlora.lora import Factors
from hetlora.methods.base import Server

FROZEN_BASE = (
    "hetlora",
    "homlora",
    "recon_svd",
    "hlora",
    "rblora",
    "ffa",
)  # methods that never change the base weights


def make_server(
    cfg,
    initial_factors: Factors,
    ranks: Mapping[str, int],
    client_ids: Sequence[str],
    base_weights: dict[str, torch.Tensor] | None = None,
) -> Server:
    """The server of ``cfg.method`` over the run's clients.

    ``initial_factors`` are PEFT's init at r_max; ``ranks`` the assigned starting ranks;
    ``base_weights`` the base model's parameters (needed by ``full_ft`` only).
    """
    from hetlora import dp
    from hetlora.errors import HetLoRAError

    privacy = dp.plan(cfg, len(client_ids))
    if cfg.method == "hetlora":
        from hetlora.methods.hetlora import HetLoRAServer

        return HetLoRAServer(
            initial_factors,
            ranks,
            aggregation=cfg.aggregation,
            per_module=cfg.per_module_weights,
            padding=cfg.padding,
            pruning=cfg.pruning,
            regularise=cfg.pruning and cfg.lambda_ > 0,
            dp=privacy,
        )
    if cfg.method == "homlora":
        from hetlora.methods.homlora import HomLoRAServer

        return HomLoRAServer(initial_factors, client_ids, cfg.rank or cfg.r_max, dp=privacy)
    if cfg.method == "ffa":
        from hetlora.methods.ffa import FFAServer

        weighting = "uniform" if cfg.aggregation == "uniform" else "data_size"
        return FFAServer(initial_factors, ranks, weighting, dp=privacy)
    svd_path = cfg.svd_path if cfg.svd_path != "auto" else None
    if cfg.method == "recon_svd":
        from hetlora.methods.recon_svd import ReconSVDServer

        return ReconSVDServer(initial_factors, ranks, path=svd_path or "dense")
    if cfg.method == "hlora":
        from hetlora.methods.hlora import HLoRAServer

        return HLoRAServer(initial_factors, ranks, path=svd_path or "qr")
    if cfg.method == "rblora":
        from hetlora.methods.rblora import RBLoRAServer

        return RBLoRAServer(initial_factors, ranks, path=svd_path or "qr")
    if cfg.method == "fedex":
        from hetlora.methods.fedex import FedExServer

        weighting = "uniform" if cfg.aggregation == "uniform" else "data_size"
        return FedExServer(initial_factors, ranks, cfg.lora_scale, weighting)
    if cfg.method == "flora":
        from hetlora.methods.flora import FLoRAServer

        shapes = {n: (b.shape[0], a.shape[1]) for n, (b, a) in initial_factors.items()}
        return FLoRAServer(shapes, ranks, cfg.lora_scale, cfg.seed)
    if cfg.method == "full_ft":
        from hetlora.methods.full_ft import FullFTServer

        if base_weights is None:
            raise HetLoRAError("full_ft needs the base model's weights")
        return FullFTServer(base_weights, client_ids)
    raise HetLoRAError(f"unknown method {cfg.method!r}; one of {', '.join(METHODS)}")


__all__ = ["METHODS", "Server", "make_server"]

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

Each server class declares what the method is (`Server.lora`, `Server.frozen_base`,
`Server.has_global_adapter`, `Server.options`, `Server.aggregations`) and how a config builds it
(`Server.from_config`); `SERVERS` is the one list of methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors
from hetlora.methods.base import Server
from hetlora.methods.fedex import FedExServer
from hetlora.methods.ffa import FFAServer
from hetlora.methods.flora import FLoRAServer
from hetlora.methods.full_ft import FullFTServer
from hetlora.methods.hetlora import HetLoRAServer
from hetlora.methods.hlora import HLoRAServer
from hetlora.methods.homlora import HomLoRAServer
from hetlora.methods.rblora import RBLoRAServer
from hetlora.methods.recon_svd import ReconSVDServer

#: Every method by its config name (``method``), in the order the docs list them.
SERVERS: dict[str, type[Server]] = {
    cls.name: cls
    for cls in (
        HetLoRAServer,
        HomLoRAServer,
        ReconSVDServer,
        HLoRAServer,
        RBLoRAServer,
        FedExServer,
        FLoRAServer,
        FFAServer,
        FullFTServer,
    )
}
METHODS = tuple(SERVERS)


def server_class(method: str) -> type[Server]:
    """The server class of a method name; `HetLoRAError` for an unknown name."""
    if method not in SERVERS:
        raise HetLoRAError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    return SERVERS[method]


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
    return server_class(cfg.method).from_config(
        cfg, initial_factors, ranks, client_ids, base_weights
    )


__all__ = ["METHODS", "SERVERS", "Server", "make_server", "server_class"]

"""Reconstruction + SVD (FlexLoRA-like): average the products, redistribute by truncated SVD.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources" (FlexLoRA, 2024), the heterogeneous-rank baseline HetLoRA is compared against. Per
module, the server forms ``dW = sum_k p_k B_k A_k`` (``p_k`` = example share), takes its SVD
``U S V^T`` and keeps rank r_max with the singular values in B (our reading of FlexLoRA's split;
its reference code, FederatedScope's FlexLoRA branch, was not at hand to check), ``B = U_r S_r``, ``A = V_r^T``. Because singular values come sorted, truncating these
factors to r_k is exactly the best rank-r_k approximation each client receives. A's rows stay
orthonormal, so rank positions beyond the rank of ``dW`` get ``B = 0`` and a unit-norm row of A,
like LoRA's own init (B = 0, A random), and a client of higher rank can still learn there; the
symmetric split ``U sqrt(S)``, ``sqrt(S) V^T`` would leave both factors near zero, a near-fixed
point of training.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors, rank_of, truncate
from hetlora.methods.base import ClientTask, Reply, Server

SVD_PATHS = ("dense", "qr")
SVD_SPLITS = ("b", "a")


def _split(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    shape: tuple[int, int],
    rank: int,
    split: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors from an SVD ``u diag(s) vh`` of a ``shape`` matrix, the singular values
    in B (``split = "b"``: ``B = U S``, ``A = V^T``) or in A (``"a"``: ``B = U``, ``A = S V^T``).

    Singular values below the numerical-rank tolerance (``max(S) * max(d_out, d_in) * eps``, as
    ``torch.linalg.matrix_rank``) count as zero: those positions get exactly zero in the factor
    that carries S, while the other keeps its orthonormal column/row. Positions beyond the
    number of singular values are zero in both.
    """
    if split not in SVD_SPLITS:
        raise HetLoRAError(f"SVD split must be one of {', '.join(SVD_SPLITS)}; got {split!r}")
    k = min(rank, s.numel())
    tol = float(s.max()) * max(shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    kept = torch.where(s[:k] > tol, s[:k], torch.zeros_like(s[:k]))
    b = torch.zeros(shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, shape[1], dtype=torch.float64)
    if split == "b":
        b[:, :k] = u[:, :k] * kept
        a[:k] = vh[:k]
    else:
        b[:, :k] = u[:, :k]
        a[:k] = kept[:, None] * vh[:k]
    return b.float(), a.float()


def svd_factors(
    delta: torch.Tensor, rank: int, split: str = "b"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` split of the dense ``delta`` (FlexLoRA: ``B = U_r S_r``, ``A = V_r^T``;
    ``split = "a"`` puts S in A instead). Cost: an SVD of the d_out x d_in matrix."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _split(u, s, vh, tuple(delta.shape), rank, split)


def qr_svd_factors(
    left: torch.Tensor, right: torch.Tensor, rank: int, split: str = "b"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` split of ``left @ right`` without forming it (HLoRA's server step).

    ``left`` is d_out x R and ``right`` R x d_in (R = the sum of the stacked clients' ranks).
    With ``left = Q_L R_L`` and ``right^T = Q_R R_R`` (reduced QR), ``left @ right = Q_L (R_L
    R_R^T) Q_R^T``; the SVD of the small core ``R_L R_R^T = U' S V'^T`` gives ``U = Q_L U'`` and
    ``V^T = V'^T Q_R^T``, the SVD of the product. Cost: two thin QRs and an R x R SVD, memory
    O((d_out + d_in) R) instead of O(d_out d_in).
    """
    q_l, r_l = torch.linalg.qr(left.double(), mode="reduced")
    q_r, r_r = torch.linalg.qr(right.double().T, mode="reduced")
    u_c, s, vh_c = torch.linalg.svd(r_l @ r_r.T, full_matrices=False)
    shape = (left.shape[0], right.shape[1])
    return _split(q_l @ u_c, s, vh_c @ q_r.T, shape, rank, split)


class ReconSVDServer(Server):
    """Weighted average of the clients' products, truncated SVD back to each client's rank.

    Args:
        initial_factors: PEFT-initialised global factors at r_max (round 1 sends their slices).
        ranks: every client's fixed rank (no self-pruning).
        path: ``dense`` (form ``sum_k p_k B_k A_k`` and take its SVD) or ``qr`` (QR of the
            stacked factors and a small SVD, `qr_svd_factors`): the same factors up to
            round-off, at a different cost.
        split: where the singular values go: ``b`` (FlexLoRA, ``B = U S``) or ``a`` (HLoRA,
            ``A = S V^T``).
    """

    name = "recon_svd"
    options = ("tiers", "svd_path")
    #: the SVD path that ``svd_path = "auto"`` means
    svd_default = "dense"

    @classmethod
    def from_config(cls, cfg, initial_factors, ranks, client_ids, base_weights):
        path = cfg.svd_path if cfg.svd_path != "auto" else cls.svd_default
        return cls(initial_factors, ranks, path=path)

    def __init__(
        self,
        initial_factors: Factors,
        ranks: Mapping[str, int],
        path: str = "dense",
        split: str = "b",
    ) -> None:
        super().__init__(ranks)
        if path not in SVD_PATHS:
            raise HetLoRAError(f"SVD path must be one of {', '.join(SVD_PATHS)}; got {path!r}")
        if split not in SVD_SPLITS:
            raise HetLoRAError(f"SVD split must be one of {', '.join(SVD_SPLITS)}; got {split!r}")
        self.factors = initial_factors
        self.path, self.split = path, split
        self._sum: dict[str, torch.Tensor] = {}  # dense path: name -> sum_k p_k B_k A_k
        self._replies: list[tuple[float, Factors]] = []  # qr path: (p_k, factors)
        self._total = 0.0
        self._weights: dict[str, float] = {}

    def __setstate__(self, state: dict) -> None:
        # a checkpoint written before the SVD options existed resumes on the path it ran
        state.setdefault("path", "dense")
        state.setdefault("split", "b")
        state.setdefault("_replies", [])
        self.__dict__.update(state)

    def task(self, client_id: str) -> ClientTask:
        rank = self.ranks[client_id]
        return ClientTask(client_id, "lora", rank=rank, factors=truncate(self.factors, rank))

    def add(self, update: Reply) -> None:
        p = float(update.num_examples)
        if self.path == "qr":
            self._replies.append((p, update.factors))
        else:
            for name, (b, a) in update.factors.items():
                prod = b.double() @ a.double()
                acc = self._sum.get(name)
                self._sum[name] = prod * p if acc is None else acc.add_(prod, alpha=p)
        self._total += p
        self._weights[update.client_id] = p

    def joined(self) -> Factors:
        """This round's ``sum_k p_k B_k A_k`` (normalised example shares) at rank r_max, by the
        server's SVD path and split."""
        if (not self._sum and not self._replies) or self._total <= 0:
            raise HetLoRAError("no client updates to aggregate")
        r_max = rank_of(self.factors)
        if self.path == "dense":
            return {
                n: svd_factors(s / self._total, r_max, self.split) for n, s in self._sum.items()
            }
        out: Factors = {}
        for name in self._replies[0][1]:
            # sum_k p_k B_k A_k = [sqrt(p_k) B_k]_k [sqrt(p_k) A_k]_k
            roots = [(p / self._total) ** 0.5 for p, _ in self._replies]
            left = torch.cat(
                [w * f[name][0].double() for w, (_, f) in zip(roots, self._replies, strict=True)], 1
            )
            right = torch.cat(
                [w * f[name][1].double() for w, (_, f) in zip(roots, self._replies, strict=True)]
            )
            out[name] = qr_svd_factors(left, right, r_max, self.split)
        return out

    def finish(self) -> dict[str, float]:
        self.factors = self.joined()
        weights = {c: w / self._total for c, w in self._weights.items()}
        self.reset_round()
        self.round += 1
        return weights

    def reset_round(self) -> None:
        self._sum, self._replies, self._total, self._weights = {}, [], 0.0, {}

    def global_factors(self) -> Factors:
        return self.factors

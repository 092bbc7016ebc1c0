"""HLoRA: the weighted sum of the clients' products, re-factored at r_max through QR and a small SVD.

Liu et al., "HLoRA: Towards Efficient Federated Fine-Tuning of Large Language Models with
Heterogeneous LoRA" (arXiv 2503.00813); the server rule as NVIDIA NVFlare implements it
(``HLoRAMaxRankAggregator``, ``examples/advanced/medgemma/custom_aggregators.py``). Per module,
with ``p_k = n_k / sum_j n_j`` (example shares):

    dW = sum_k p_k B_k A_k = L R,   L = [sqrt(p_1) B_1, ..., sqrt(p_K) B_K],
                                    R = [sqrt(p_1) A_1; ...; sqrt(p_K) A_K]
    L = Q_L R_L,  R^T = Q_R R_R,  R_L R_R^T = U' S V'^T
    B = (Q_L U')[:, :r_max],  A = (S V'^T Q_R^T)[:r_max, :]

and client k receives ``B[:, :r_k]``, ``A[:r_k, :]``, the best rank-r_k approximation of dW.

How it relates to ``recon_svd`` (FlexLoRA-like): the same global adapter product, the best
rank-r_max approximation of the same ``dW`` with the same weights; it differs in two places
only, so it is `hetlora.methods.recon_svd.ReconSVDServer` with two options:

* the factor split: HLoRA puts the singular values in A (``B = U``, orthonormal columns); ours
  for FlexLoRA puts them in B (``A = V^T``). The products, and so the model every client starts
  from, are equal; what training does next differs (the gradients of B and A scale with each
  other's norms), so the two are different methods in practice;
* the cost: QR of the stacked factors (d x R with R = sum_k r_k) and an R x R SVD, never the
  dense d_out x d_in product; config ``svd_path = "dense"`` runs HLoRA's split on the dense path
  and ``svd_path = "qr"`` FlexLoRA's split on the QR path (``benchmarks/bench_svd_paths.py``
  measures both at the model's shapes).
"""

from __future__ import annotations

from collections.abc import Mapping

from hetlora.lora import Factors
from hetlora.methods.recon_svd import ReconSVDServer


class HLoRAServer(ReconSVDServer):
    """HLoRA's server: `ReconSVDServer` with the singular values in A, on the QR path by
    default."""

    name = "hlora"
    svd_default = "qr"

    def __init__(
        self, initial_factors: Factors, ranks: Mapping[str, int], path: str = "qr"
    ) -> None:
        super().__init__(initial_factors, ranks, path=path, split="a")

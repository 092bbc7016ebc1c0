"""HetLoRA: heterogeneous-rank LoRA for federated fine-tuning of on-device language models.

Reference implementation of Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024 (arXiv 2401.06432).
"""

from hetlora.errors import HetLoRAError

__version__ = "0.1.0"
__all__ = ["HetLoRAError", "__version__"]

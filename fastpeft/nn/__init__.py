"""Drop-in replacements for ``torch.nn.Linear`` with low-rank adapters."""

from .linear import LowRankLinear

__all__ = ["LowRankLinear"]

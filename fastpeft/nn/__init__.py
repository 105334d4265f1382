"""Drop-in replacements for ``torch.nn.Linear`` with low-rank adapters."""

from .linear import LowRankLinear
from .linear4bit import LowRankLinear4bit

__all__ = ["LowRankLinear", "LowRankLinear4bit"]

"""Drop-in replacements for ``torch.nn.Linear`` with low-rank adapters."""

from .group import LowRankLinearGroup, group_forward, group_projections, ungroup_projections
from .linear import LowRankLinear
from .linear4bit import LowRankLinear4bit

__all__ = ["LowRankLinear", "LowRankLinear4bit", "LowRankLinearGroup", "group_forward", "group_projections",
           "ungroup_projections"]

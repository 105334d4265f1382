"""Autograd Functions and torch.library custom ops of fastpeft (kernel launchers live in
``fastpeft.kernels``)."""

from .lowrank import LowRankLinearFunction, lowrank_linear
from .lowrank_group import LowRankLinearGroupFunction, lowrank_linear_group
from .lowrank_4bit import LowRankLinear4bitFunction, lowrank_linear_4bit

__all__ = ["LowRankLinearFunction", "LowRankLinearGroupFunction", "LowRankLinear4bitFunction", "lowrank_linear",
           "lowrank_linear_group", "lowrank_linear_4bit"]

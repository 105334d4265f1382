"""Autograd Functions and torch.library custom ops of fastpeft (kernel launchers live in
``fastpeft.kernels``)."""

from .lowrank import LowRankLinearFunction, lowrank_linear

__all__ = ["LowRankLinearFunction", "lowrank_linear"]

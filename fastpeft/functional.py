"""One-line functional forms of the fastpeft ops."""

from .ops.lowrank import lowrank_linear

__all__ = ["lowrank_linear"]

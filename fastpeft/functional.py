"""One-line functional forms of the fastpeft ops."""

from .ops.lowrank import lowrank_linear
from .ops.lowrank_group import lowrank_linear_group

__all__ = ["lowrank_linear", "lowrank_linear_group"]

"""fastpeft: fused kernels and memory-lean autograd for low-rank adapters (LoRA family).

>>> import torch, fastpeft
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
>>> model = fastpeft.inject(model, fastpeft.AdapterConfig(method="lamda", r=4, target_modules=["0", "2"]))
>>> model(torch.randn(5, 32)).shape
torch.Size([5, 8])
"""

from ._backend import get_backend, use_backend
from .adapters import active_adapter, add_adapter, delete_adapter, list_adapters, mixed_batch, set_adapter
from .adalora import AdaLoRABudget, budget_schedule, orthogonality_loss
from .config import AdapterConfig
from .inject import (adapter_state_dict, inject, load_adapter, merge, save_adapter, trainable_parameter_count,
                     unmerge)
from .lamda import PMBFreezer, energy_scores, lamda_plus_ranks, pmb_freezer_callback
from .nn import LowRankLinear, LowRankLinear4bit
from .nn import LowRankLinearGroup, group_projections, ungroup_projections
from .ops.dora import dora_linear, dora_linear_4bit
from .ops.lowrank import LowRankLinearFunction, lowrank_linear
from .ops.lowrank_group import LowRankLinearGroupFunction, lowrank_linear_group
from .ops.lowrank_4bit import LowRankLinear4bitFunction, lowrank_linear_4bit
from .ops.lowrank_mixed import MixedAdapter, lowrank_linear_mixed
from .peft_compat import from_peft, to_peft
from .quant import dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = [
    "AdaLoRABudget",
    "AdapterConfig",
    "LowRankLinear",
    "LowRankLinearFunction",
    "LowRankLinearGroupFunction",
    "LowRankLinear4bit",
    "LowRankLinear4bitFunction",
    "LowRankLinearGroup",
    "MixedAdapter",
    "PMBFreezer",
    "active_adapter",
    "add_adapter",
    "adapter_state_dict",
    "budget_schedule",
    "delete_adapter",
    "dequantize_4bit",
    "dora_linear",
    "dora_linear_4bit",
    "energy_scores",
    "from_peft",
    "get_backend",
    "group_projections",
    "inject",
    "lamda_plus_ranks",
    "list_adapters",
    "load_adapter",
    "lowrank_linear",
    "lowrank_linear_group",
    "lowrank_linear_4bit",
    "lowrank_linear_mixed",
    "mixed_batch",
    "merge",
    "orthogonality_loss",
    "pmb_freezer_callback",
    "quantize_4bit",
    "save_adapter",
    "set_adapter",
    "to_peft",
    "trainable_parameter_count",
    "ungroup_projections",
    "unmerge",
    "use_backend",
    "__version__",
]

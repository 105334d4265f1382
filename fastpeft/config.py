"""Adapter configuration and the method presets.

Every method is a preset of the one op ``Y = X Wᵀ + b + s·(σ(D(X) Aᵀ) Sᵀ) Bᵀ ⊙ λ_b``:

=============  ===================  =====================  ===============  =====================
method         A (lora_A)           core S (lora_core)     B (lora_B)       notes
=============  ===================  =====================  ===============  =====================
``lora``       trainable, Kaiming   none                   trainable, 0     Hu et al. 2022
``lora_fa``    frozen, Kaiming      none                   trainable, 0     Zhang et al. 2023
``lamda``      frozen, top-r right  trainable r×r, 0       trainable, top-r Azizi et al. 2024;
               singular vectors                            left singular    B freezes gradually
                                                           vectors
``vera``       frozen random,       diag λ_d, trainable    frozen random,   λ_b [d] trainable
               shared by layers                            shared
``adalora``    trainable (P)        diag Λ, trainable, 0   trainable (Q)    rank budget pruning
``parallel``   trainable, Kaiming   none                   trainable, 0     σ on the r-dim middle
``bitfit``     —                    —                      —                only biases train
``dora``       trainable, Kaiming   none                   trainable, 0     magnitude m [d]
                                                                            trainable, ‖W_j‖ at
                                                                            start (Liu et al.
                                                                            2024): y = (m/n) ⊙
                                                                            (x Wᵀ + s·x AᵀBᵀ) + b
=============  ===================  =====================  ===============  =====================

``train_bias=True`` adds BitFit to any preset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = ["AdapterConfig", "METHODS", "MethodSpec", "method_spec"]


@dataclass(frozen=True)
class MethodSpec:
    """What a preset trains and how it initialises."""
    train_A: bool
    train_B: bool
    core: Optional[str]          # None | "diag" | "full"
    out_scale: bool
    init: str                    # "kaiming" | "svd" | "vera" | "adalora"
    activation: Optional[str] = None
    has_adapter: bool = True
    magnitude: bool = False      # DoRA: a trainable row magnitude m [d] (``lora_magnitude``)


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec(True, True, None, False, "kaiming"),
    "lora_fa": MethodSpec(False, True, None, False, "kaiming"),
    "lamda": MethodSpec(False, True, "full", False, "svd"),
    "vera": MethodSpec(False, False, "diag", True, "vera"),
    "adalora": MethodSpec(True, True, "diag", False, "adalora"),
    "parallel": MethodSpec(True, True, None, False, "kaiming", activation="relu"),
    "bitfit": MethodSpec(False, False, None, False, "kaiming", has_adapter=False),
    "dora": MethodSpec(True, True, None, False, "kaiming", magnitude=True),
}
_ALIASES = {"lamda++": "lamda", "lamdapp": "lamda", "lora-fa": "lora_fa", "parallel_adapter": "parallel"}


def method_spec(method: str) -> MethodSpec:
    """The :class:`MethodSpec` of a method name (a clear error for an unknown one)."""
    key = _ALIASES.get(method, method)
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    return METHODS[key]


@dataclass
class AdapterConfig:
    """How to adapt Linear layers.

    Args:
        method: a preset name (see the module docstring).
        r: rank (ignored by ``bitfit``). ``rank_pattern`` overrides it per layer
            (``{"layers.0.q_proj": 8, r".*mlp.*": 4}``; names or regexes, as PEFT).
        alpha: scaling numerator; ``scale = alpha / r`` (``alpha / sqrt(r)`` with
            ``use_rslora``). Defaults to ``r`` (scale 1). VeRA uses scale 1.
        dropout: dropout probability on the adapter input (mask regenerated, never stored).
        target_modules: module names (a name matches itself and any dotted suffix, as PEFT) or
            one regex matched against the full name; ``None`` or ``"all-linear"`` adapts every
            Linear layer except an output head (``lm_head``, ``classifier``, ``score``).
        exclude_modules: names or a regex never to adapt.
        activation: activation on the r-dim intermediate (``parallel`` defaults to ``"relu"``).
        train_bias: also train the biases of the adapted layers (BitFit); ``bitfit`` alone
            trains every bias of the targeted layers and adds no adapter.
        adapter_dtype: dtype of the adapter tensors as a string (``"float32"``); default: the
            base weight's dtype.
        seed: seed of the random initialisations that must be reproducible (VeRA's shared
            projections).
        vera_d_initial: initial value of VeRA's λ_d.
        freeze_b_steps: LaMDA's PMB gradual freezing horizon (steps), ``None`` to keep B trainable.
    """
    method: str = "lora"
    r: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    use_rslora: bool = False
    activation: Optional[str] = None
    train_bias: bool = False
    adapter_dtype: Optional[str] = None
    seed: int = 0
    vera_d_initial: float = 0.1
    freeze_b_steps: Optional[int] = None

    def __post_init__(self):
        self.spec  # validates the method
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an int >= 1, got {self.r!r}")
        for name, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank_pattern[{name!r}] must be an int >= 1, got {rank!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.alpha is not None and (not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number or None, got {self.alpha!r}")
        from .ops.lowrank import ACTIVATIONS
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.adapter_dtype is not None:
            self.torch_adapter_dtype  # validates
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if self.freeze_b_steps is not None and (not isinstance(self.freeze_b_steps, int) or self.freeze_b_steps < 0):
            raise ValueError(f"freeze_b_steps must be an int >= 0 or None, got {self.freeze_b_steps!r}")

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.method)

    @property
    def effective_activation(self) -> Optional[str]:
        return self.activation if self.activation is not None else self.spec.activation

    @property
    def torch_adapter_dtype(self):
        import torch
        if self.adapter_dtype is None:
            return None
        dtype = getattr(torch, str(self.adapter_dtype).replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"adapter_dtype must name a floating dtype such as 'float32', got {self.adapter_dtype!r}")
        return dtype

    def rank_for(self, module_name: str) -> int:
        """The rank of one layer: the first ``rank_pattern`` entry that matches, else ``r``."""
        for pattern, rank in self.rank_pattern.items():
            if module_name == pattern or module_name.endswith("." + pattern) \
                    or re.fullmatch(pattern, module_name):
                return rank
        return self.r

    def scale_for(self, r: int) -> float:
        """s = alpha / r (or alpha / sqrt(r) with rsLoRA); VeRA has no scaling."""
        if self.spec.init == "vera":
            return 1.0
        alpha = float(self.alpha) if self.alpha is not None else float(self.r)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

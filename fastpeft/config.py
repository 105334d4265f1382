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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field_name}: {pattern!r} is not a valid regex ({err})") from None


def _check_names(field_name: str, value, regex: bool = True):
    """``None``, one regex (a str) or a list of names; tuples and sets become sorted lists."""
    if value is None:
        return None
    if isinstance(value, str):
        if not regex:
            return [value]
        if value != "all-linear":
            _check_regex(field_name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [n for n in value if not isinstance(n, str) or not n]
        if bad:
            raise TypeError(f"{field_name} must list module names (non-empty str), got {bad[0]!r}")
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{field_name} must be None, a regex (str) or a list of module names, got {value!r}")


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
            Linear-like layer (``nn.Linear`` and subclasses, transformers ``Conv1D``,
            bitsandbytes ``Linear4bit``) except a transformers model's output layer
            (``get_output_embeddings()``, e.g. ``lm_head``), exactly as PEFT selects them.
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
        modules_to_save: names of whole modules (a classification head, say) that train fully
            beside the adapter, as PEFT's ``modules_to_save``: their parameters are saved with
            the adapter and exported by :func:`fastpeft.to_peft`.

    Every field is checked when the config is built: a TypeError or ValueError names the field
    and what it expects (booleans must be ``True``/``False``, regexes must compile).
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
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a string such as 'lora', got {self.method!r}")
        self.spec  # validates the method
        if not _is_int(self.r) or self.r < 1:
            raise ValueError(f"r must be an int >= 1, got {self.r!r}")
        if not isinstance(self.rank_pattern, dict):
            raise TypeError(f"rank_pattern must be a dict {{name or regex: rank}}, got {self.rank_pattern!r}")
        for name, rank in self.rank_pattern.items():
            if not isinstance(name, str):
                raise TypeError(f"rank_pattern keys must be names or regexes (str), got {name!r}")
            _check_regex("rank_pattern", name)
            if not _is_int(rank) or rank < 1:
                raise ValueError(f"rank_pattern[{name!r}] must be an int >= 1, got {rank!r}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.alpha is not None and (not _is_real(self.alpha) or not math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number or None, got {self.alpha!r}")
        for name in ("use_rslora", "train_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        from .ops.lowrank import ACTIVATIONS
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.adapter_dtype is not None:
            if not isinstance(self.adapter_dtype, str):  # a torch.dtype is kept by its name (JSON)
                self.adapter_dtype = str(self.adapter_dtype).replace("torch.", "")
            self.torch_adapter_dtype  # validates
        self.target_modules = _check_names("target_modules", self.target_modules)
        self.exclude_modules = _check_names("exclude_modules", self.exclude_modules)
        self.modules_to_save = _check_names("modules_to_save", self.modules_to_save, regex=False)
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if not _is_real(self.vera_d_initial) or not math.isfinite(self.vera_d_initial):
            raise ValueError(f"vera_d_initial must be a finite number, got {self.vera_d_initial!r}")
        if self.freeze_b_steps is not None and (not _is_int(self.freeze_b_steps) or self.freeze_b_steps < 0):
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
        if not isinstance(data, dict):
            raise TypeError(f"an AdapterConfig is read from a dict (a JSON object), got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

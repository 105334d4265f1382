"""``LowRankLinear4bit``: a low-rank adapter beside a frozen 4-bit (NF4/FP4) base weight, in
bitsandbytes' layout (QLoRA-style)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..config import AdapterConfig
from ..ops.dora import dora_linear_4bit, dora_norm, dora_row_scale, row_sq_norms
from ..ops.lowrank_4bit import lowrank_linear_4bit
from ..quant import dequantize_4bit, quantize_4bit, validate_4bit
from .linear import LowRankLinear

__all__ = ["LowRankLinear4bit", "is_bnb_linear4bit"]


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for bitsandbytes' ``Linear4bit`` (and its ``LinearNF4`` / ``LinearFP4``), checked
    without importing bitsandbytes."""
    return any(cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
               for cls in type(module).__mro__)


class LowRankLinear4bit(LowRankLinear):
    """``y = x Wᵀ + b + s·(σ(D(x) Aᵀ) coreᵀ) Bᵀ ⊙ out_scale`` with W stored in 4 bits.

    ``weight`` is the packed uint8 tensor (a bitsandbytes ``Params4bit`` when built by
    :meth:`from_bnb`, shared with the original layer: no copy) and ``quant_state`` its
    QuantState; ``bias`` and the adapter tensors (``lora_A`` [r, k], ``lora_B`` [d, r],
    ``lora_core``, ``lora_out_scale``) are as in :class:`fastpeft.LowRankLinear`, with every
    preset of :class:`fastpeft.AdapterConfig`. The computation runs in ``compute_dtype`` (the
    bitsandbytes layer's, else the input's dtype) and the output is returned in the input's
    dtype, as bitsandbytes' ``Linear4bit`` does. The state dict holds ``weight`` (packed),
    ``bias``, the adapter tensors and the quant state under ``weight.*`` (bitsandbytes' keys).

    ``merge()`` is refused: adding ΔW to a 4-bit weight means dequantising, adding and
    quantising again, which moves every weight of a block by up to half a quantisation step
    (far more than ΔW itself for a young adapter) and cannot be undone by ``unmerge()``. Use
    :meth:`to_linear` to get a dense ``nn.Linear`` with the adapter merged exactly instead.

    >>> import torch, fastpeft
    >>> base = torch.nn.Linear(64, 32)
    >>> layer = fastpeft.LowRankLinear4bit.from_linear(base, fastpeft.AdapterConfig(method="lora", r=4))
    >>> layer.weight.dtype, layer(torch.randn(3, 64)).shape
    (torch.uint8, torch.Size([3, 32]))
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("build a LowRankLinear4bit with LowRankLinear4bit.from_bnb(linear4bit, config) "
                        "or LowRankLinear4bit.from_linear(linear, config, quant_type=..., blocksize=...)")

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def _build(cls, packed, quant_state, bias, config, r, vera_shared, compute_dtype):
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be a fastpeft.AdapterConfig, got {type(config).__name__}")
        shape, _ = validate_4bit(packed, quant_state)
        if len(shape) != 2:
            raise ValueError(f"the 4-bit weight must be 2-D [d, k], got quant_state.shape {tuple(shape)}")
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"compute_dtype must be float32, float16, bfloat16 or None, got {compute_dtype}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.quant_state = quant_state
        layer.compute_dtype = compute_dtype
        if not isinstance(packed, nn.Parameter):
            packed = nn.Parameter(packed, requires_grad=False)
        layer._setup(packed, bias, config, r, vera_shared, base_dtype=compute_dtype or quant_state.dtype)
        return layer

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module, config: AdapterConfig, *, r: Optional[int] = None,
                 vera_shared: Optional[tuple[Tensor, Tensor]] = None) -> "LowRankLinear4bit":
        """Wrap a bitsandbytes ``Linear4bit``: its ``Params4bit`` weight, quant state and bias are
        shared (the same objects, no copy). The layer must already be quantised (bitsandbytes
        quantises when the layer is moved to a device). A weight that bitsandbytes repacked for
        its CPU inference kernel is converted back to the 4-bit layout first (in place, as
        bitsandbytes does when saving)."""
        if not is_bnb_linear4bit(linear4bit):
            raise TypeError(f"linear4bit must be a bitsandbytes.nn.Linear4bit, got {type(linear4bit).__name__}")
        weight = linear4bit.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError("linear4bit is not quantised yet: bitsandbytes quantises a Linear4bit when "
                             "it is moved to a device (linear4bit.to('cuda') or .to('cpu'))")
        if getattr(quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
            quant_state = weight.quant_state
        if tuple(quant_state.shape) != (linear4bit.out_features, linear4bit.in_features):
            raise ValueError(f"linear4bit's quant_state.shape {tuple(quant_state.shape)} does not match "
                             f"[out_features={linear4bit.out_features}, in_features={linear4bit.in_features}]")
        return cls._build(weight, quant_state, linear4bit.bias, config, r, vera_shared,
                          getattr(linear4bit, "compute_dtype", None))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: AdapterConfig, *, quant_type: str = "nf4",
                    blocksize: int = 64, compress_statistics: bool = True,
                    compute_dtype: Optional[torch.dtype] = None, r: Optional[int] = None,
                    vera_shared: Optional[tuple[Tensor, Tensor]] = None) -> "LowRankLinear4bit":
        """Quantise ``linear``'s weight (see :func:`fastpeft.quantize_4bit`) and wrap it; the bias
        is shared. ``compute_dtype`` defaults to the input's dtype at each call."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        packed, quant_state = quantize_4bit(linear.weight.detach(), quant_type=quant_type,
                                            blocksize=blocksize, compress_statistics=compress_statistics)
        return cls._build(packed, quant_state, linear.bias, config, r, vera_shared, compute_dtype)

    def _base_shape(self, weight) -> tuple[int, int]:
        return tuple(self.quant_state.shape)

    def _dense_weight_fp32(self) -> Tensor:
        return dequantize_4bit(self.weight, self.quant_state).float()

    def _weight_sq_norm(self) -> Tensor:
        """‖W_j‖² (fp32 [d]) of the dequantised weight, cached while the packed weight and its
        quant state are unchanged (computed once, through a transient dense W)."""
        w, qs = self.weight, self.quant_state
        if torch.compiler.is_compiling():   # traced: computed in the graph, not cached
            return row_sq_norms(dequantize_4bit(w, qs))
        key = (w.data_ptr(), w._version, w.device, id(qs))
        if self._w_sq_cache is None or self._w_sq_cache[0] != key:
            self._w_sq_cache = (key, row_sq_norms(dequantize_4bit(w, qs)))
        return self._w_sq_cache[1]

    def dora_norm(self) -> Tensor:
        """n = ‖W + s·B·A‖ per output row (fp32 [d], detached); the Triton backend dequantises
        W's tiles in registers, never a dense W."""
        dtype = self.compute_dtype or self.quant_state.dtype
        return dora_norm(self.weight, self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype),
                         self.scale, quant_state=self.quant_state, weight_sq_norm=self._weight_sq_norm())

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self._routing is not None:    # a mixed batch, or the model's active adapter is not here
            return self._routing(self, x)
        dtype = self.compute_dtype or x.dtype
        xc = x if x.dtype == dtype else x.to(dtype)
        lora_a, lora_b, core, out_scale = self.adapter_tensors(dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)
        if self.lora_magnitude is not None:
            y = dora_linear_4bit(xc, self.weight, self.quant_state, bias, lora_a, lora_b, self.lora_magnitude,
                                 scale=self.scale, dropout_p=self.dropout_p if self.training else 0.0,
                                 weight_sq_norm=self._weight_sq_norm())
            return y if y.dtype == x.dtype else y.to(x.dtype)
        y = lowrank_linear_4bit(xc, self.weight, self.quant_state, bias, lora_a, lora_b, core=core,
                                out_scale=out_scale, scale=self.scale,
                                dropout_p=self.dropout_p if self.training else 0.0,
                                activation=self.activation)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    # -- merging ----------------------------------------------------------------------------

    def merge_refusal(self) -> Optional[str]:
        return "a 4-bit weight is never merged (see merge()); use layer.to_linear()"

    def merge(self) -> None:
        raise RuntimeError(
            "merge() is refused for a 4-bit weight: W + ΔW would have to be quantised again, which "
            "moves every weight by up to half a quantisation step and cannot be undone; use "
            "layer.to_linear() for a dense nn.Linear with the adapter merged exactly")

    def unmerge(self) -> None:
        raise RuntimeError("a 4-bit layer is never merged (merge() is refused); nothing to unmerge")

    @torch.no_grad()
    def to_linear(self, merge: bool = True, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantised weight (in ``dtype``, default the quant
        state's), plus the adapter merged in fp32 when ``merge``; the bias is copied."""
        dtype = dtype or self.quant_state.dtype
        w = dequantize_4bit(self.weight, self.quant_state).float()
        if merge:
            if self.lora_magnitude is not None:     # DoRA: (m / n) ⊙ (W + ΔW)
                factor = dora_row_scale(self.lora_magnitude.detach(), self.dora_norm())
                w = (w + self.delta_weight()) * factor[:, None]
            else:
                w = w + self.delta_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=dtype)
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    # -- state dict: the quant state beside the packed weight, under bitsandbytes' keys -------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the packed bytes load into ``weight`` as usual; the quant state, when the state dict
        # carries one, replaces the module's once everything else has loaded without error
        qs_prefix = prefix + "weight."
        qs_items = {k[len(qs_prefix):]: v for k, v in state_dict.items() if k.startswith(qs_prefix)}
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for key in [qs_prefix + k for k in qs_items]:
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        if qs_items and len(error_msgs) == n_errors:
            state = type(self.quant_state).from_dict(qs_items, device=self.weight.device)
            validate_4bit(self.weight, state)
            self.quant_state = state
            if hasattr(self.weight, "quant_state"):
                self.weight.quant_state = state

    def extra_repr(self) -> str:
        qs = self.quant_state
        return (super().extra_repr() + f", quant_type={qs.quant_type}, blocksize={qs.blocksize}"
                + (", nested" if qs.state2 is not None else ""))

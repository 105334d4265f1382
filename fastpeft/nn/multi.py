"""Several named adapters on one fastpeft layer.

The active adapter's tensors are the layer's own parameters (``lora_A``, ``lora_B``,
``lora_core``, ``lora_out_scale``) and its settings the layer's attributes (``r``, ``method``,
``scale``, ``dropout_p``, ``activation``): code and state dicts written for one adapter see the
active one. The other adapters wait in ``lora_slots`` (an ``nn.ModuleDict`` of
:class:`AdapterSlot`, created with the second adapter), so that ``.to()``, ``parameters()`` and
optimizers see them too. Switching the active adapter exchanges parameter objects between the
layer and a slot, never copies them: an optimizer's state stays with its tensor, and a compiled
model reads the new tensors as the same graph inputs (no recompilation when shapes and settings
agree).

A layer's ``_routing`` (``None`` normally) redirects its forward: :data:`BASE_ONLY` when the
model's active adapter is not on this layer, or a mixed-batch routing (``fastpeft.mixed_batch``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..ops.lowrank_mixed import MixedAdapter, MixedRows, lowrank_linear_mixed
from .linear import ADAPTER_PARAMS, LowRankLinear

__all__ = ["AdapterSlot", "MULTI_METHODS", "SLOT_SETTINGS", "BASE_ONLY", "MixedRouting", "adapter_names",
           "adapter_tensors_of", "adapter_settings_of", "activate_adapter", "add_adapter_slot",
           "remove_adapter_slot", "mixed_adapter_of", "base_forward"]

# presets of the one op whose adapters may share a layer (and a mixed batch)
MULTI_METHODS = ("lora", "lora_fa", "lamda", "vera")
SLOT_SETTINGS = ("method", "r", "scale", "dropout_p", "activation")


class AdapterSlot(nn.Module):
    """An adapter of a fastpeft layer other than its active one: its tensors (``lora_A``,
    ``lora_B``, ``lora_core``, ``lora_out_scale``) and settings (``method``, ``r``, ``scale``,
    ``dropout_p``, ``activation``)."""

    def __init__(self, tensors: dict, settings: dict):
        super().__init__()
        for attr in ADAPTER_PARAMS:
            setattr(self, attr, tensors.get(attr))
        for key in SLOT_SETTINGS:
            setattr(self, key, settings[key])

    def extra_repr(self) -> str:
        return f"method={self.method}, r={self.r}, scale={self.scale:g}"


def _slots(layer: LowRankLinear) -> Optional[nn.ModuleDict]:
    return layer._modules.get("lora_slots")


def adapter_names(layer: LowRankLinear) -> list[str]:
    """The names of the adapters on ``layer``, the active (or top-level) one first."""
    slots = _slots(layer)
    return [layer.active_adapter] + (list(slots) if slots is not None else [])


def adapter_tensors_of(layer: LowRankLinear, name: str) -> dict:
    """{attr: tensor or None} of adapter ``name`` on ``layer`` (the parameters themselves)."""
    holder = layer if name == layer.active_adapter else _slots(layer)[name]
    return {attr: getattr(holder, attr) for attr in ADAPTER_PARAMS}


def adapter_settings_of(layer: LowRankLinear, name: str) -> dict:
    holder = layer if name == layer.active_adapter else _slots(layer)[name]
    return {key: getattr(holder, key) for key in SLOT_SETTINGS}


def _set_top(layer: LowRankLinear, tensors: dict, settings: dict) -> None:
    for attr in ADAPTER_PARAMS:
        value = tensors.get(attr)
        if value is None and attr in layer._parameters:
            layer._parameters[attr] = None
        else:
            setattr(layer, attr, value)
    for key in SLOT_SETTINGS:
        setattr(layer, key, settings[key])


def activate_adapter(layer: LowRankLinear, name: str) -> None:
    """Make adapter ``name`` (on this layer) the layer's active one: its parameter objects move to
    the layer, the previous active one's into a slot. Nothing is copied."""
    if name == layer.active_adapter:
        return
    slots = _slots(layer)
    incoming = slots[name]
    outgoing = AdapterSlot(adapter_tensors_of(layer, layer.active_adapter),
                           adapter_settings_of(layer, layer.active_adapter))
    tensors = {attr: getattr(incoming, attr) for attr in ADAPTER_PARAMS}
    settings = {key: getattr(incoming, key) for key in SLOT_SETTINGS}
    previous = layer.active_adapter
    del slots[name]
    slots[previous] = outgoing
    _set_top(layer, tensors, settings)
    layer.active_adapter = name


def add_adapter_slot(layer: LowRankLinear, name: str, tensors: dict, settings: dict) -> None:
    """Add adapter ``name`` to ``layer`` beside the active one (tensors as they are: no copy)."""
    if _slots(layer) is None:
        layer.lora_slots = nn.ModuleDict()
    layer.lora_slots[name] = AdapterSlot(tensors, settings)


def remove_adapter_slot(layer: LowRankLinear, name: str) -> None:
    """Remove a waiting adapter ``name`` (never the layer's top-level one)."""
    slots = _slots(layer)
    del slots[name]
    if not len(slots):
        del layer.lora_slots


def _cast(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def mixed_adapter_of(layer: LowRankLinear, name: str, dtype) -> MixedAdapter:
    """Adapter ``name`` of ``layer`` as the mixed op takes it (tensors cast to ``dtype``)."""
    h = layer if name == layer.active_adapter else layer._modules["lora_slots"]._modules[name]
    return MixedAdapter(_cast(h.lora_A, dtype), _cast(h.lora_B, dtype), _cast(h.lora_core, dtype),
                        _cast(h.lora_out_scale, dtype), h.scale, h.dropout_p if layer.training else 0.0,
                        h.activation)


def _mixed_call(layer: LowRankLinear, x: Tensor, adapters: list, rows) -> Tensor:
    quant_state = getattr(layer, "quant_state", None)
    if quant_state is None:
        return lowrank_linear_mixed(x, layer.weight, layer.bias, adapters, rows, check_adapters=False)
    dtype = layer.compute_dtype or x.dtype                      # as LowRankLinear4bit.forward
    xc = x if x.dtype == dtype else x.to(dtype)
    bias = layer.bias if layer.bias is None or layer.bias.dtype == dtype else layer.bias.to(dtype)
    adapters = [None if a is None else a._replace(**{f: _cast(getattr(a, f), dtype) for f in
                                                     ("lora_A", "lora_B", "core", "out_scale")})
                for a in adapters]
    y = lowrank_linear_mixed(xc, layer.weight, bias, adapters, rows, quant_state=quant_state,
                             check_adapters=False)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def base_forward(layer: LowRankLinear, x: Tensor) -> Tensor:
    """The base layer alone (``x Wᵀ + b``), through the mixed op so that a 4-bit weight is
    dequantised again in backward rather than kept dense."""
    if x.dim() < 2:
        return base_forward(layer, x[None])[0]
    return _mixed_call(layer, x, [], MixedRows([-1] * x.shape[0], 0))


class _BaseOnly:
    """Routing of a layer that lacks the model's active adapter: the base layer alone."""

    def __call__(self, layer: LowRankLinear, x: Tensor) -> Tensor:
        return base_forward(layer, x)

    def __repr__(self) -> str:
        return "BASE_ONLY"


BASE_ONLY = _BaseOnly()


class MixedRouting:
    """Routing inside ``fastpeft.mixed_batch``: each sample runs with its own adapter."""

    def __init__(self, names: list[str], rows: MixedRows):
        self.names = names          # the distinct adapter names of the batch (MixedRows indexes them)
        self.rows = rows

    def __call__(self, layer: LowRankLinear, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[0] != len(self.rows):
            raise ValueError(f"mixed_batch was given {len(self.rows)} adapter names (one per sample) but "
                             f"{type(layer).__name__} received an input of shape {tuple(x.shape)} whose "
                             f"batch dim 0 has {x.shape[0] if x.dim() else 0} samples")
        on_layer = set(adapter_names(layer)) if "lora_slots" in layer._modules else {layer.active_adapter}
        dtype = getattr(layer, "compute_dtype", None) or x.dtype
        if getattr(layer, "quant_state", None) is None:
            dtype = layer.weight.dtype
        adapters = [mixed_adapter_of(layer, n, dtype) if n in on_layer else None for n in self.names]
        return _mixed_call(layer, x, adapters, self.rows)

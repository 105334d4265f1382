"""Sibling projections that read the same input (q/k/v, gate/up), computed with one pass over it.

Two ways to use :func:`fastpeft.lowrank_linear_group` with :class:`~fastpeft.LowRankLinear` layers:

* :class:`LowRankLinearGroup` (explicit, for your own model code): ``q, k, v = group(x)``.
* :func:`group_projections` (for existing models, e.g. after :func:`fastpeft.inject`): links the
  named sibling layers of every module that has them all (``q_proj``/``k_proj``/``v_proj``,
  ``gate_proj``/``up_proj``, ...). The model's code is unchanged: the first sibling called on a
  tensor x computes every sibling's output in one op and returns its own; each other sibling,
  called next on the *same* tensor (same object, unchanged version counter, same parameters and
  modes), returns the output computed for it, which is then dropped. Nothing outlives the
  forward in which it was computed except when a sibling is never called; that pattern (e.g.
  q on one tensor and k/v on another, as in cross-attention, or k/v skipped for a key-value
  cache) turns grouping off for that group with a warning, and its layers run one by one.

Differences from calling the layers one by one, both intended: with dropout, the siblings share
one dropout mask on x (the mask belongs to the input, drawn from one seed), and the results can
differ in the last bits (T of every adapter comes from one product with the concatenated A).
Under ``torch.compile`` the layers always run one by one (no graph breaks), and so they do on
inference tensors (``torch.inference_mode``: no version counter) and where they cannot be grouped
(merged, different activation or dropout, other layer types).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .._backend import get_backend
from ..ops.lowrank_group import lowrank_linear_group
from .linear import SIBLING_GROUPS, LowRankLinear

__all__ = ["LowRankLinearGroup", "group_forward", "group_projections", "ungroup_projections",
           "DEFAULT_GROUPS"]

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def _why_not_grouped(layers: Sequence[nn.Module], x: Tensor) -> Optional[str]:
    """``None`` if ``layers`` can run as one group op on ``x``, else the reason."""
    first = layers[0]
    for layer in layers:
        if type(layer) is not LowRankLinear:
            return f"{type(layer).__name__} is not a dense fastpeft.LowRankLinear"
        if layer.merged:
            return "a layer is merged"
        if getattr(layer, "lora_magnitude", None) is not None:
            return "a DoRA layer scales its own rows"
        if layer.in_features != first.in_features or layer.weight.dtype != first.weight.dtype \
                or layer.weight.device != first.weight.device:
            return "the layers differ in input size, dtype or device"
        if layer.activation != first.activation:
            return "the layers differ in activation"
        if layer.training != first.training or (layer.training and layer.dropout_p != first.dropout_p):
            return "the layers differ in dropout"
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != first.in_features:
        return "x does not match the layers' input size"
    return None


def group_forward(layers: Sequence[LowRankLinear], x: Tensor) -> tuple[Tensor, ...]:
    """The outputs of sibling :class:`LowRankLinear` layers on one ``x``: one
    :func:`fastpeft.lowrank_linear_group` call (one pass over x, one dropout mask) when they can be
    grouped, else each layer on its own."""
    layers = list(layers)
    if _why_not_grouped(layers, x) is not None:
        return tuple(layer._forward_alone(x) for layer in layers)
    dtype = layers[0].weight.dtype
    adapters = [layer.adapter_tensors(dtype) for layer in layers]
    first = layers[0]
    return lowrank_linear_group(
        x, [layer.weight for layer in layers], [layer.bias for layer in layers],
        [a[0] for a in adapters], [a[1] for a in adapters], cores=[a[2] for a in adapters],
        out_scales=[a[3] for a in adapters], scales=[layer.scale for layer in layers],
        dropout_p=first.dropout_p if first.training else 0.0, activation=first.activation)


class LowRankLinearGroup(nn.Module):
    """Sibling :class:`LowRankLinear` layers that read the same input, run as one op.

    ``forward(x)`` returns one output per layer, computed by :func:`fastpeft.lowrank_linear_group`
    (T of every adapter from one pass over x, one dropout mask for the group). The layers stay
    ordinary submodules (``layers.0``, ``layers.1``, ...) and can still be called alone.

    >>> import torch, fastpeft
    >>> cfg = fastpeft.AdapterConfig(method="lora", r=4)
    >>> q, k = (fastpeft.LowRankLinear.from_linear(torch.nn.Linear(32, d), cfg) for d in (32, 8))
    >>> qk = fastpeft.LowRankLinearGroup([q, k])
    >>> [tuple(y.shape) for y in qk(torch.randn(5, 32))]
    [(5, 32), (5, 8)]
    """

    def __init__(self, layers: Iterable[LowRankLinear]):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("LowRankLinearGroup needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LowRankLinear):
                raise TypeError(f"layers[{i}] must be a fastpeft.LowRankLinear, got {type(layer).__name__}")
            if layer.in_features != layers[0].in_features:
                raise ValueError(f"layers[{i}] has in_features={layer.in_features}, layers[0] has "
                                 f"{layers[0].in_features}: siblings read the same input")
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return group_forward(list(self.layers), x)


# --------------------------------------------------------------------------------------------
# Linking the siblings of an existing model
# --------------------------------------------------------------------------------------------

def _tensor_state(t: Optional[Tensor]):
    return None if t is None else (id(t), t._version)


class _SiblingGroup:
    """The runtime link between sibling layers (held in ``SIBLING_GROUPS``, weakly)."""

    def __init__(self, layers: Sequence[LowRankLinear], name: str):
        self._layers = [weakref.ref(layer) for layer in layers]
        self.name = name
        self.enabled = True
        self._pending: dict[int, tuple] = {}        # sibling index -> (key, its output)

    def _state(self, layers) -> tuple:
        """Everything an output depends on besides x: a cached output is used only if it is equal."""
        layer_state = tuple((layer.training, layer.merged, layer.dropout_p, layer.scale, layer.activation,
                             *(_tensor_state(getattr(layer, n)) for n in
                               ("weight", "bias", "lora_A", "lora_B", "lora_core", "lora_out_scale")))
                            for layer in layers)
        device_type = layers[0].weight.device.type
        autocast = (torch.is_autocast_enabled(device_type),
                    torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None)
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, get_backend(), layer_state)

    def _turn_off(self, why: str) -> None:
        self.enabled = False
        self._pending.clear()
        warnings.warn(f"fastpeft: grouping of {self.name} turned off ({why}); these layers now run one "
                      "by one. Group only siblings that are always called on the same input.", stacklevel=4)

    def output_for(self, layer: LowRankLinear, x: Tensor) -> Optional[Tensor]:
        """``layer``'s output on ``x`` through the group, or ``None`` to run it alone."""
        # inference tensors have no version counter to tell an in-place change: run alone
        if not self.enabled or not isinstance(x, Tensor) or x.is_inference():
            return None
        layers = [ref() for ref in self._layers]
        index = next((i for i, other in enumerate(layers) if other is layer), None)
        if index is None or any(other is None for other in layers):
            return None
        entry = self._pending.pop(index, None)
        if entry is not None:
            (x_ref, version, state), out = entry
            if x_ref() is x and x._version == version and state == self._state(layers):
                return out
            self._turn_off(f"{type(layer).__name__} #{index} was called on another input than its siblings")
            return None
        if self._pending:     # a new pass while outputs of the last one were never taken
            self._turn_off("outputs computed for some siblings were never used")
            return None
        if _why_not_grouped(layers, x) is not None:
            return None
        outs = group_forward(layers, x)
        key = (weakref.ref(x), x._version, self._state(layers))
        self._pending = {i: (key, out) for i, out in enumerate(outs) if i != index}
        return outs[index]

    def clear(self) -> None:
        self._pending.clear()


def group_projections(model: nn.Module, groups: Sequence[Sequence[str]] = DEFAULT_GROUPS) -> nn.Module:
    """Link sibling :class:`LowRankLinear` layers of ``model`` that read the same input, so that
    each forward computes them with one pass over it (see the module docstring).

    ``groups``: tuples of child names; every module having the names of a tuple as dense
    ``LowRankLinear`` children (at least two of them) gets them linked, e.g. ``("q_proj", "k_proj", "v_proj")`` and
    ``("gate_proj", "up_proj")`` (the default also has BERT's ``("query", "key", "value")``).
    In place; returns the model. Undo with :func:`ungroup_projections`.

    >>> import torch, fastpeft
    >>> class MLP(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_proj, self.up_proj = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
    ...     def forward(self, x):
    ...         return torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
    >>> cfg = fastpeft.AdapterConfig(method="lora", r=4, target_modules=["gate_proj", "up_proj"])
    >>> model = fastpeft.group_projections(fastpeft.inject(MLP(), cfg))
    >>> model(torch.randn(3, 16)).shape
    torch.Size([3, 32])
    """
    found = 0
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        for names in groups:
            # the names that are dense adapted layers (e.g. q and v when k has no adapter)
            present = [n for n in names if type(children.get(n)) is LowRankLinear]
            layers = [children[n] for n in present]
            if len(layers) < 2 or len({layer.in_features for layer in layers}) != 1 \
                    or len({id(layer) for layer in layers}) != len(layers):
                continue
            label = "/".join(f"{parent_name}.{n}" if parent_name else n for n in present)
            group = _SiblingGroup(layers, label)
            for layer in layers:
                old = SIBLING_GROUPS.get(layer)
                if old is not None:
                    old.clear()
                SIBLING_GROUPS[layer] = group
            found += 1
    if not found:
        warnings.warn(f"group_projections: no module of {type(model).__name__} has all the dense "
                      f"LowRankLinear children of any of {list(map(tuple, groups))}; nothing grouped",
                      stacklevel=2)
    return model


def ungroup_projections(model: nn.Module) -> nn.Module:
    """Undo :func:`group_projections`: every layer of ``model`` runs on its own again."""
    for module in model.modules():
        group = SIBLING_GROUPS.pop(module, None)
        if group is not None:
            group.clear()
    return model

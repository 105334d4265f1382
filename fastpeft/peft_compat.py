"""Converting between HF PEFT models and fastpeft layers.

:func:`from_peft` turns a ``peft.PeftModel`` with a LoRA, VeRA or AdaLoRA adapter into the plain
base model whose adapted layers are fastpeft layers. Nothing is copied: the base weights and
biases keep their storage, and the adapter tensors are PEFT's own parameters wherever the layouts
agree (LoRA's ``lora_A.weight`` [r, k] and ``lora_B.weight`` [d, r], VeRA's λ_d, λ_b and shared
projections, AdaLoRA's P, Q and Λ). In eval mode the outputs are PEFT's outputs.

:func:`to_peft` writes ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format,
which ``peft.PeftModel.from_pretrained`` loads into the original base model with the same outputs.

How the methods map (``s`` is the layer's scale)::

    PEFT LoRA      y += scaling · B A D(x)                    → lora_A = A, lora_B = B, s = scaling
    PEFT VeRA      y += λ_b ⊙ B[:d] (λ_d ⊙ A[:, :k] D(x))      → core = λ_d, out_scale = λ_b, s = 1
    PEFT AdaLoRA   y += B (A ⊙ E) D(x) · α / (ranknum + 1e-5)  → core = E[:, 0], s = α / (ranknum + 1e-5)

Presets PEFT has no format for are folded exactly into LoRA where the math allows it: a full
r×r core S and an output scale λ_b become ``B' = diag(λ_b) · B · S`` (computed in float64, rounded
once to the adapter dtype). An activation on the r-dim intermediate (the parallel adapter) makes
the adapter non-linear and is refused, as is BitFit without an adapter.

>>> import torch, fastpeft                                      # doctest: +SKIP
>>> peft_model = peft.PeftModel.from_pretrained(base, "my-lora")  # doctest: +SKIP
>>> model = fastpeft.from_peft(peft_model)                       # doctest: +SKIP
>>> fastpeft.to_peft(model, "my-lora-again")                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections import Counter
from typing import Optional

import torch
import torch.nn as nn

from ._files import write_folder
from .config import AdapterConfig
from .inject import _saved_module_names, _shared_weights, linear_view_of_conv1d, lowrank_layers
from .nn.linear import LowRankLinear

__all__ = ["from_peft", "to_peft", "PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_TYPES = ("lora", "vera", "adalora")


def _import_peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("fastpeft.from_peft and fastpeft.to_peft need HF PEFT: "
                          "pip install 'fastpeft[hf]' (or pip install peft safetensors)") from err
    return peft


# --------------------------------------------------------------------------------------------
# from_peft
# --------------------------------------------------------------------------------------------

def _mro_names(module) -> set[str]:
    return {f"{c.__module__}.{c.__name__}" for c in type(module).__mro__}


def _base_kind(base: nn.Module) -> Optional[str]:
    """"linear", "conv1d" (transformers' GPT-2 Conv1D), "4bit" (bitsandbytes), or None."""
    names = _mro_names(base)
    if any(n.startswith("bitsandbytes.") and n.endswith(".Linear4bit") for n in names):
        return "4bit"
    if any(n.startswith("bitsandbytes.") for n in names):
        return None
    if isinstance(base, nn.Linear):
        return "linear"
    if any(n.endswith("pytorch_utils.Conv1D") for n in names) and getattr(base, "weight", None) is not None \
            and base.weight.dim() == 2:
        return "conv1d"
    return None


def _factory(kind: str):
    if kind == "4bit":
        from . import nn as fastpeft_nn
        import fastpeft
        cls = getattr(fastpeft, "LowRankLinear4bit", None) or getattr(fastpeft_nn, "LowRankLinear4bit", None)
        if cls is None or not hasattr(cls, "from_bnb"):
            raise NotImplementedError(
                "the adapter sits on a bitsandbytes 4-bit layer, which needs "
                "fastpeft.LowRankLinear4bit.from_bnb; this version of fastpeft does not have it")
        return cls.from_bnb
    return LowRankLinear.from_linear


def _active_adapter(peft_model) -> str:
    active = list(peft_model.active_adapters)
    if len(active) != 1:
        raise ValueError(f"peft_model must have exactly one active adapter, got {active}; "
                         "choose one with peft_model.set_adapter(name)")
    return active[0]


def _plan_layer(name, module, adapter, peft_type):
    """Check one PEFT layer; return (kind, r, merged) or raise a clear error."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.vera import VeraLayer

    layer_type = type(module).__name__
    if peft_type in ("lora", "adalora"):
        if not isinstance(module, LoraLayer):
            raise ValueError(f"{name}: a {layer_type} is not a {peft_type} layer")
        params = module.lora_A
    else:
        if not isinstance(module, VeraLayer):
            raise ValueError(f"{name}: a {layer_type} is not a VeRA layer")
        params = module.vera_lambda_d
    if not any(adapter in getattr(module, n, {}) for n in module.adapter_layer_names):
        return None  # this layer has no weights of the active adapter: PEFT runs the base layer
    base = module.get_base_layer()
    kind = _base_kind(base)
    if kind is None or adapter not in params:
        raise ValueError(f"{name}: the base layer {type(base).__name__} is not supported; expected "
                         "torch.nn.Linear, transformers Conv1D or bitsandbytes Linear4bit")
    if peft_type == "lora":
        dora = bool(module.use_dora.get(adapter, False))
        if dora and adapter in getattr(module, "merged_adapters", []) \
                and getattr(module, "_caches", {}).get(f"{adapter}-weight_norm") is None:
            raise ValueError(f"{name}: the DoRA adapter is merged but PEFT kept no norm of the unmerged "
                             "weight; call peft_model.unmerge_adapter() first")
        variant = getattr(module, "lora_variant", {}).get(adapter)
        if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
            variant = type(variant).__name__
            raise ValueError(f"{name}: the LoRA variant {variant} is not supported; expected plain LoRA")
        if module.lora_bias.get(adapter, False):
            raise ValueError(f"{name}: lora_bias=True is not supported (fastpeft's lora_B has no bias)")
    if getattr(module, "disable_adapters", False):
        raise ValueError(f"{name}: adapters are disabled on this layer; leave the "
                         "peft_model.disable_adapter() block first")
    merged = list(getattr(module, "merged_adapters", []))
    if merged and merged != [adapter]:
        raise ValueError(f"{name}: adapters {merged} are merged into the base weight, expected none or "
                         f"only the active one ({adapter!r}); call peft_model.unmerge_adapter() first")
    r = int(module.r[adapter])
    return kind, r, bool(merged)


def _dropout_p(dropout: nn.Module) -> float:
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def _shared_param(tensor: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """A Parameter over ``tensor``'s storage (no copy)."""
    if isinstance(tensor, nn.Parameter) and tensor.requires_grad == requires_grad:
        return tensor
    return nn.Parameter(tensor.detach(), requires_grad=requires_grad)


def _build_layer(module, adapter, peft_type, kind, r, merged, config):
    base = module.get_base_layer()
    target = linear_view_of_conv1d(base) if kind == "conv1d" else base
    factory = _factory(kind)
    with torch.random.fork_rng(devices=[]):  # the throw-away initialisation leaves torch's RNG alone
        if peft_type == "vera":
            shared = (module.vera_A[adapter], module.vera_B[adapter])
            layer = factory(target, config, r=r, vera_shared=shared)
        else:
            layer = factory(target, config, r=r)
    if peft_type == "lora":
        layer.lora_A = module.lora_A[adapter].weight
        layer.lora_B = module.lora_B[adapter].weight
        layer.scale = float(module.scaling[adapter])
        layer.dropout_p = _dropout_p(module.lora_dropout[adapter])
        if module.use_dora.get(adapter, False):
            layer.lora_magnitude = module.lora_magnitude_vector[adapter].weight
            if merged:          # PEFT's norm of the unmerged weight, for unmerge()
                layer._merge_norm = module._caches[f"{adapter}-weight_norm"].detach().float()
    elif peft_type == "adalora":
        lora_e = module.lora_E[adapter]
        layer.lora_A = module.lora_A[adapter]
        layer.lora_B = module.lora_B[adapter]
        layer.lora_core = _shared_param(lora_e.view(-1), lora_e.requires_grad)
        ranknum = (module.ranknum[adapter].detach().float() + 1e-5).item()
        layer.scale = float(module.scaling[adapter]) / ranknum
        layer.dropout_p = _dropout_p(module.lora_dropout[adapter])
    else:
        layer.lora_core = module.vera_lambda_d[adapter]
        layer.lora_out_scale = module.vera_lambda_b[adapter]
        layer.scale = 1.0
        layer.dropout_p = _dropout_p(module.vera_dropout[adapter])
    if kind == "conv1d":
        layer.fan_in_fan_out = True  # the weight is a transposed view of a Conv1D weight
    layer.merged = merged
    layer.train(module.training)
    return layer


def _fastpeft_config(peft_type, peft_config, names_ranks, adapter_scale):
    ranks = Counter(names_ranks.values())
    r = int(getattr(peft_config, "init_r", None) or peft_config.r) if peft_type == "adalora" \
        else int(peft_config.r)
    if r not in ranks and ranks:
        r = ranks.most_common(1)[0][0]
    rank_pattern = {name: rank for name, rank in names_ranks.items() if rank != r}
    kwargs = dict(r=r, target_modules=sorted(names_ranks), rank_pattern=rank_pattern)
    if peft_type == "lora":
        return AdapterConfig(method="dora" if getattr(peft_config, "use_dora", False) else "lora", alpha=float(peft_config.lora_alpha),
                             dropout=float(peft_config.lora_dropout),
                             use_rslora=bool(peft_config.use_rslora), **kwargs)
    if peft_type == "adalora":
        return AdapterConfig(method="adalora", alpha=adapter_scale * r,
                             dropout=float(peft_config.lora_dropout), **kwargs)
    return AdapterConfig(method="vera", dropout=float(peft_config.vera_dropout),
                         seed=int(peft_config.projection_prng_key),
                         vera_d_initial=float(peft_config.d_initial), **kwargs)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def from_peft(peft_model) -> nn.Module:
    """Convert a ``peft.PeftModel``'s active LoRA, VeRA or AdaLoRA adapter into fastpeft layers.

    Returns the **unwrapped base model** (``peft_model.base_model.model``), modified in place:
    every PEFT layer of the active adapter is replaced by a :class:`fastpeft.LowRankLinear`
    (:class:`fastpeft.LowRankLinear4bit` over a bitsandbytes 4-bit base) that shares the base
    weight and bias and, where the layouts agree, PEFT's adapter parameters themselves; PEFT's
    ``modules_to_save`` wrappers are replaced by the active copy, which the config records in its
    ``modules_to_save`` (so it is saved and exported with the adapter). The model gets a
    ``fastpeft_config`` so that :func:`fastpeft.save_adapter` and :func:`to_peft` work on it.
    Do not use ``peft_model`` afterwards: its module tree is the returned model.

    What carries over:
      - scaling: LoRA's ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA, per-layer ranks and
        alphas included) and AdaLoRA's ``lora_alpha / (ranknum + 1e-5)`` become each layer's
        ``scale``; VeRA has scale 1;
      - dropout probability (fastpeft draws its own masks, so training-mode outputs differ from
        PEFT's by the random mask only; eval-mode outputs are PEFT's);
      - ``requires_grad`` of every tensor (a PeftModel loaded with ``is_trainable=False`` gives
        frozen adapters);
      - an adapter merged with PEFT stays merged (``layer.merged`` is True);
      - GPT-2's ``Conv1D`` bases (``fan_in_fan_out``) are handled: the fastpeft layer's weight
        is the transposed view [d, k] of the Conv1D weight [k, d] (same storage), so the model's
        state-dict shows that weight transposed.

      - DoRA (``use_dora=True``, dense and bitsandbytes 4-bit bases): PEFT's magnitude vector
        becomes ``lora_magnitude`` (the same tensor); outputs and gradients are PEFT's (training
        with dropout differs as described in :mod:`fastpeft.ops.dora`).

    Refused with a ValueError naming the layer: other LoRA variants,
    ``lora_bias``, base layers other than Linear / Conv1D / 4-bit, several active adapters,
    adapters disabled or merged other than the active one, other PEFT methods. Nothing is
    changed when a check fails. Adapters keep PEFT's names. The other LoRA and VeRA adapters of
    a lora or vera active adapter are kept as named adapters beside it (:func:`fastpeft.list_adapters`,
    :func:`fastpeft.set_adapter`, :func:`fastpeft.mixed_batch`); adapters that cannot share a
    layer (AdaLoRA, DoRA, or any beside an AdaLoRA or DoRA active one) are dropped with a
    warning that names them. AdaLoRA's rank
    allocator and orthogonality regulariser live in PEFT's training loop and are not carried.
    """
    peft = _import_peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    adapter = _active_adapter(peft_model)
    peft_config = peft_model.peft_config[adapter]
    peft_type = str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).lower()
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"peft_model's adapter {adapter!r} is {peft_type.upper()}; "
                         f"from_peft converts {[t.upper() for t in _PEFT_TYPES]}")
    inner = peft_model.base_model.model

    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    # 1. check everything before changing anything
    plans, wrappers, unwrap, tuners = {}, {}, {}, {}
    for name, module in inner.named_modules():
        if any(name.startswith(p + ".") for p in list(plans) + list(wrappers) + list(unwrap)):
            continue
        if isinstance(module, AuxiliaryTrainingWrapper):
            if not isinstance(module, ModulesToSaveWrapper):
                raise ValueError(f"{name}: PEFT's {type(module).__name__} is not supported")
            wrappers[name] = module
        elif isinstance(module, BaseTunerLayer):
            tuners[name] = module
            plan = _plan_layer(name, module, adapter, peft_type)
            if plan is None or plan[1] == 0:  # no weights of the active adapter (or AdaLoRA r = 0)
                unwrap[name] = module.get_base_layer()
            else:
                plans[name] = (module, *plan)
    if not plans:
        raise ValueError(f"peft_model has no {peft_type.upper()} layer of the active adapter {adapter!r}")
    method = "dora" if peft_type == "lora" and getattr(peft_config, "use_dora", False) else peft_type
    extras, dropped = _plan_extra_adapters(peft_model, adapter, method, tuners)

    # 2. build the new layers (restoring every requires_grad flag the factories touch)
    flags = {p: p.requires_grad for p in inner.parameters()}
    try:
        new_layers = {}
        module0 = next(iter(plans.values()))[0]
        scale0 = 1.0 if peft_type == "vera" else float(module0.scaling[adapter])
        if peft_type == "adalora":
            scale0 /= (module0.ranknum[adapter].detach().float() + 1e-5).item()
        config = _fastpeft_config(peft_type, peft_config, {n: p[2] for n, p in plans.items()}, scale0)
        for name, (module, kind, r, merged) in plans.items():
            new_layers[name] = _build_layer(module, adapter, peft_type, kind, r, merged, config)
        extra_layers = {other: (extra_config, {name: _build_layer(module, other, other_type, kind, r, False,
                                                                  extra_config)
                                               for name, (module, kind, r) in layers.items()})
                        for other, (other_type, extra_config, layers) in extras.items()}
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)

    shared = _shared_weights(inner, [(name, plan[0].get_base_layer()) for name, plan in plans.items()],
                             own=lambda name: f"{name}.base_layer.weight")
    for name, others in shared.items():  # tied weights: merging is refused
        new_layers[name].weight_shared_with = others

    # 3. swap
    for name, layer in new_layers.items():
        _set_submodule(inner, name, layer)
    for name, base in unwrap.items():
        _set_submodule(inner, name, base)
    for name, wrapper in wrappers.items():
        active = getattr(wrapper, "modules_to_save", {})
        chosen = active[adapter] if adapter in active and not wrapper.disable_adapters else wrapper.original_module
        _set_submodule(inner, name, chosen)
    saved = sorted(name for name, wrapper in wrappers.items()
                   if adapter in getattr(wrapper, "modules_to_save", {}) and not wrapper.disable_adapters)
    if saved:  # the trained copies are saved and exported with the adapter
        config = dataclasses.replace(config, modules_to_save=saved)
    inner.fastpeft_config = config
    _attach_extra_adapters(inner, adapter, config, new_layers, extra_layers)
    if dropped:
        warnings.warn("from_peft kept the adapters " + str([adapter, *extra_layers]) + " and dropped "
                      + "; ".join(f"{n!r} ({why})" for n, why in dropped), stacklevel=2)
    odd = sorted(name for name, layer in new_layers.items()
                 if not math.isclose(layer.scale, config.scale_for(layer.r), rel_tol=1e-9))
    if odd:
        warnings.warn(f"{len(odd)} converted layers (first: {odd[0]!r}) have a scale that fastpeft's "
                      "AdapterConfig cannot record (per-layer alphas); the layers and to_peft keep it, "
                      "but fastpeft.save_adapter refuses it (a load would apply the config's one scale)",
                      stacklevel=2)
    return inner


def _plan_extra_adapters(peft_model, adapter, method, tuners):
    """The adapters other than the active one that can share fastpeft layers with it (LoRA and
    VeRA beside a lora / vera active adapter): ({name: (peft type, AdapterConfig, {layer:
    (module, kind, r)})}, [(name, why it is dropped)])."""
    from .nn.multi import MULTI_METHODS

    extras, dropped = {}, []
    for other, other_config in peft_model.peft_config.items():
        if other == adapter:
            continue
        other_type = str(getattr(other_config.peft_type, "value", other_config.peft_type)).lower()
        if method not in MULTI_METHODS:
            dropped.append((other, f"the active adapter is {method}, which cannot share a layer"))
            continue
        if other_type not in ("lora", "vera") or getattr(other_config, "use_dora", False):
            kind = "dora" if getattr(other_config, "use_dora", False) else other_type
            dropped.append((other, f"a {kind} adapter cannot share a layer; several adapters per layer "
                                   f"support {list(MULTI_METHODS)}"))
            continue
        layers = {}
        try:
            for name, module in tuners.items():
                if other_type == "vera" and not hasattr(module, "vera_lambda_d") \
                        or other_type == "lora" and not hasattr(module, "lora_A"):
                    continue
                if getattr(module, "merged_adapters", []):
                    raise ValueError(f"{name}: an adapter is merged into the base weight")
                plan = _plan_layer(name, module, other, other_type)
                if plan is not None and plan[1]:
                    layers[name] = (module, plan[0], plan[1])
        except ValueError as err:
            dropped.append((other, str(err)))
            continue
        if not layers:
            continue
        module0 = next(iter(layers.values()))[0]
        scale0 = 1.0 if other_type == "vera" else float(module0.scaling[other])
        extras[other] = (other_type, _fastpeft_config(other_type, other_config,
                                                      {n: p[2] for n, p in layers.items()}, scale0), layers)
    return extras, dropped


def _attach_extra_adapters(inner, adapter, config, new_layers, extra_layers) -> None:
    """Hang the converted extra adapters on the fastpeft layers (a layer where only extra
    adapters have weights becomes a fastpeft layer that runs its base while ``adapter`` is
    active)."""
    from .adapters import _set_routing, _store
    from .nn.multi import BASE_ONLY, add_adapter_slot, adapter_settings_of, adapter_tensors_of

    for layer in new_layers.values():
        layer.active_adapter = adapter               # PEFT's name for it
    registry = {adapter: config}
    for other, (extra_config, layers) in extra_layers.items():
        for name, tmp in layers.items():
            target = new_layers.get(name)
            if target is None:                       # the active adapter has no weights here
                tmp.active_adapter = other
                _set_routing(tmp, BASE_ONLY)
                _set_submodule(inner, name, tmp)
                new_layers[name] = tmp
                continue
            add_adapter_slot(target, other, adapter_tensors_of(tmp, tmp.active_adapter),
                             adapter_settings_of(tmp, tmp.active_adapter))
        registry[other] = extra_config
    _store(inner, registry, adapter)


# --------------------------------------------------------------------------------------------
# to_peft
# --------------------------------------------------------------------------------------------

def _folded_lora(layer: LowRankLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B') with B' = diag(out_scale)·B·S: the layer as plain LoRA, exactly in float64,
    rounded once to the adapter dtype. A and B are returned as they are when nothing folds."""
    lora_a, lora_b = layer.lora_A.detach(), layer.lora_B.detach()
    if layer.lora_core is None and layer.lora_out_scale is None:
        return lora_a, lora_b
    b = lora_b.double()
    if layer.lora_core is not None:
        core = layer.lora_core.detach().double()
        b = b * core if core.dim() == 1 else b @ core
    if layer.lora_out_scale is not None:
        b = b * layer.lora_out_scale.detach().double()[:, None]
    return lora_a, b.to(lora_b.dtype)


def _alpha_for(scale: float, r: int) -> float:
    """An alpha with ``alpha / r == scale`` exactly in Python floats (PEFT's LoRA scaling)."""
    alpha = scale * r
    candidates = [alpha]
    lo = hi = alpha
    for _ in range(8):
        lo, hi = math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)
        candidates += [lo, hi]
    for a in candidates:
        if a / r == scale:
            return a
    raise ValueError(f"no lora_alpha gives PEFT's scaling alpha / r == {scale!r} exactly for r={r}")


def _names_regex(names) -> str:
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _check_exportable(layers):
    problems = []
    for name, layer in layers:
        if layer.activation is not None:
            problems.append(f"{name}: activation {layer.activation!r} on the r-dim intermediate makes "
                            f"the {layer.method} adapter non-linear; PEFT has no format for it")
    if problems:
        raise ValueError("model cannot be written in PEFT's format: " + "; ".join(problems[:10]))


def _trainable_biases(model: nn.Module, layer_names) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor} of the biases that train (BitFit together with an adapter)."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad and name.endswith("bias"):
            owner = name[: -len(".bias")] if name != "bias" else ""
            key = f"{owner}.base_layer.bias" if owner in layer_names else name
            out[_PREFIX + key] = _tensor(param)
    return out


def _lora_export(layers):
    tensors, ranks, alphas = {}, {}, {}
    dora = {getattr(layer, "lora_magnitude", None) is not None for _, layer in layers}
    if len(dora) > 1:
        raise ValueError("model cannot be written in PEFT's format: some layers are DoRA and some are "
                         "not, and PEFT's use_dora holds for the whole adapter")
    for name, layer in layers:
        lora_a, lora_b = _folded_lora(layer)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = _tensor(lora_a)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = _tensor(lora_b)
        if layer.lora_magnitude is not None:
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = _tensor(layer.lora_magnitude)
        ranks[name] = layer.r
        alphas[name] = _alpha_for(float(layer.scale), layer.r)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    # pattern keys are regexes matched at a dotted boundary: escape the names
    rank_pattern = {re.escape(n): v for n, v in ranks.items() if v != r}
    alpha_pattern = {re.escape(n): v for n, v in alphas.items() if v != alpha}
    kwargs = dict(r=r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if dora == {True}:
        kwargs["use_dora"] = True
    return tensors, kwargs


def _vera_export(layers):
    problems = []
    for name, layer in layers:
        if layer.method != "vera" or layer.lora_core is None or layer.lora_core.dim() != 1 \
                or layer.lora_out_scale is None or layer.scale != 1.0:
            problems.append(f"{name}: a {layer.method} layer (scale {layer.scale:g}) is not VeRA-shaped")
    if len({layer.r for _, layer in layers}) > 1:
        problems.append("VeRA needs one rank for all layers")
    if problems:
        raise ValueError("cannot write a PEFT VeRA adapter: " + "; ".join(problems[:10])
                         + "; pass peft_type='lora' to fold it into LoRA")
    widest_a = max((layer for _, layer in layers), key=lambda l: l.in_features).lora_A.detach()
    tallest_b = max((layer for _, layer in layers), key=lambda l: l.out_features).lora_B.detach()
    tensors = {"base_model.vera_A": _tensor(widest_a), "base_model.vera_B": _tensor(tallest_b)}
    for name, layer in layers:
        if not (torch.equal(layer.lora_A.detach(), widest_a[:, : layer.in_features])
                and torch.equal(layer.lora_B.detach(), tallest_b[: layer.out_features])):
            raise ValueError(f"cannot write a PEFT VeRA adapter: {name}'s projections are not slices of "
                             "one shared pair; pass peft_type='lora' to fold it into LoRA")
        tensors[f"{_PREFIX}{name}.vera_lambda_d"] = _tensor(layer.lora_core)
        tensors[f"{_PREFIX}{name}.vera_lambda_b"] = _tensor(layer.lora_out_scale)
    return tensors, dict(r=layers[0][1].r, save_projection=True)


def _adalora_export(layers):
    problems = []
    for name, layer in layers:
        if layer.lora_out_scale is not None or layer.lora_core is None or layer.lora_core.dim() != 1:
            problems.append(f"{name}: a {layer.method} layer without a diagonal core is not AdaLoRA-shaped")
    ranks = {layer.r for _, layer in layers}
    scales = {float(layer.scale) for _, layer in layers}
    if len(ranks) > 1 or len(scales) > 1:
        problems.append(f"AdaLoRA needs one rank and one scale for all layers, got ranks {sorted(ranks)}")
    if 0.0 in scales:
        problems.append("AdaLoRA cannot express scale 0 (PEFT treats lora_alpha=0 as r)")
    if problems:
        raise ValueError("cannot write a PEFT AdaLoRA adapter: " + "; ".join(problems[:10])
                         + "; pass peft_type='lora' to fold it into LoRA")
    r, scale = ranks.pop(), scales.pop()
    # PEFT multiplies by lora_alpha and divides by the fp32 tensor ranknum + 1e-5
    ranknum = (torch.tensor(float(r)) + 1e-5).item()
    tensors = {}
    for name, layer in layers:
        tensors[f"{_PREFIX}{name}.lora_A"] = _tensor(layer.lora_A)
        tensors[f"{_PREFIX}{name}.lora_B"] = _tensor(layer.lora_B)
        tensors[f"{_PREFIX}{name}.lora_E"] = _tensor(layer.lora_core.detach().reshape(r, 1))
    return tensors, dict(init_r=r, target_r=r, lora_alpha=scale * ranknum, total_step=1)


def to_peft(model: nn.Module, path: str | os.PathLike, *, peft_type: Optional[str] = None,
            task_type: Optional[str] = None, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the fastpeft adapter of ``model`` in HF PEFT's format to the folder ``path``:
    ``adapter_config.json`` and ``adapter_model.safetensors``, which
    ``peft.PeftModel.from_pretrained(base_model, path)`` loads into the original (un-adapted)
    base model with the same outputs.

    Args:
        model: a model with fastpeft layers (from :func:`fastpeft.inject` or :func:`from_peft`).
        path: output folder (created if needed).
        peft_type: ``"lora"``, ``"vera"`` or ``"adalora"``; default: ``"vera"`` when every layer is
            VeRA, ``"adalora"`` when every layer is AdaLoRA, else ``"lora"``. ``"lora"`` expresses
            every linear preset: cores and output scales fold exactly into ``B' = diag(λ_b)·B·S``.
        task_type: PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``), recorded in the config.
        base_model_name_or_path: recorded in the config.

    Per-layer ranks and scales go to ``rank_pattern`` / ``alpha_pattern`` (LoRA's ``lora_alpha``
    is chosen so that PEFT's ``lora_alpha / r`` equals the layer's scale exactly); biases that
    train (BitFit beside an adapter) are written with ``bias="all"``, and the modules of
    ``modules_to_save`` as PEFT's ``modules_to_save``. The files are written into a temporary
    folder and renamed into place (never through a symlink; a failure leaves old files whole). Refused with a ValueError:
    an activation on the r-dim intermediate (parallel adapter), a model without fastpeft layers
    (BitFit alone), a preset the requested ``peft_type`` cannot express. The file holds the
    adapter values whether or not the layers are merged.
    """
    peft = _import_peft()
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .adapters import active_layers

    layers = active_layers(model)     # the active adapter's layers (others run their base)
    if not layers:
        raise ValueError("model has no fastpeft layers (BitFit alone has no PEFT format); "
                         "adapt it with fastpeft.inject or fastpeft.from_peft first")
    _check_exportable(layers)
    methods = {layer.method for _, layer in layers}
    if peft_type is None:
        peft_type = "vera" if methods == {"vera"} else "adalora" if methods == {"adalora"} else "lora"
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"peft_type must be one of {_PEFT_TYPES} or None, got {peft_type!r}")
    exporter = {"lora": _lora_export, "vera": _vera_export, "adalora": _adalora_export}[peft_type]
    tensors, kwargs = exporter(layers)
    names = {name for name, _ in layers}
    fp_config = getattr(model, "fastpeft_config", None)
    saved = _saved_module_names(model, fp_config) if fp_config is not None and fp_config.modules_to_save else []
    saved_tensors = {f"{_PREFIX}{name}.{pname}": _tensor(param) for name in saved
                     for pname, param in model.get_submodule(name).named_parameters()}
    biases = {k: v for k, v in _trainable_biases(model, names).items() if k not in saved_tensors}
    if biases:
        kwargs["bias"] = "all"
    tensors.update(biases)
    tensors.update(saved_tensors)

    dropouts = Counter(float(layer.dropout_p) for _, layer in layers).most_common(1)[0][0]
    common = dict(target_modules=_names_regex(names), task_type=task_type, inference_mode=True,
                  base_model_name_or_path=base_model_name_or_path,
                  fan_in_fan_out=all(getattr(layer, "fan_in_fan_out", False) for _, layer in layers),
                  modules_to_save=saved or None)
    if peft_type == "lora":
        config = peft.LoraConfig(lora_dropout=dropouts, **common, **kwargs)
    elif peft_type == "adalora":
        config = peft.AdaLoraConfig(lora_dropout=dropouts, **common, **kwargs)
    else:
        config = peft.VeraConfig(vera_dropout=dropouts,
                                 projection_prng_key=int(getattr(fp_config, "seed", 0) or 0),
                                 **common, **kwargs)

    def write(folder):
        config.save_pretrained(folder)
        save_file(tensors, os.path.join(folder, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})

    write_folder(path, [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE], write)

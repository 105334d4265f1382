"""Several named adapters in one model: add, switch, delete, and mixed batches.

The first adapter a model gets (:func:`fastpeft.inject`, or :func:`fastpeft.load_adapter` into a
model without one) is named ``"default"``. :func:`add_adapter` and
:func:`fastpeft.load_adapter` with a new ``adapter_name`` add more, to layers that fastpeft
already adapts; adapters of one layer may differ in rank and method among ``lora``,
``lora_fa``, ``lamda`` and ``vera``. :func:`set_adapter` chooses the one every forward uses;
inside :func:`mixed_batch` each sample of a batch uses its own.

The model keeps ``fastpeft_adapters`` ({name: AdapterConfig}, in the order they were added) and
``fastpeft_active`` (the active name); ``fastpeft_config`` is the active adapter's config.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .config import AdapterConfig
from .nn.linear import ADAPTER_PARAMS, LowRankLinear, vera_projections
from .nn.multi import (BASE_ONLY, MULTI_METHODS, MixedRouting, activate_adapter, add_adapter_slot,
                       adapter_names, adapter_settings_of, adapter_tensors_of, remove_adapter_slot)
from .ops.lowrank_mixed import MixedRows

__all__ = ["BASE_ADAPTER", "active_layers", "add_adapter", "set_adapter", "delete_adapter", "list_adapters", "active_adapter",
           "mixed_batch"]

BASE_ADAPTER = "__base__"


def _layers(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


def active_layers(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    """(name, layer) of the fastpeft layers that run the active adapter (a layer that lacks it
    runs its base layer, and its own tensors belong to another adapter)."""
    return [(n, m) for n, m in _layers(model) if m.__dict__.get("_routing") is not BASE_ONLY]


def _registry(model: nn.Module) -> dict:
    """{name: config} of the model's adapters (built from a single-adapter model on first use)."""
    registry = model.__dict__.get("fastpeft_adapters")
    if registry is None:
        layers = _layers(model)
        config = getattr(model, "fastpeft_config", None)
        if not layers:
            return {} if config is None else {"default": config}
        registry = {}
        for _, layer in layers:
            for name in adapter_names(layer):
                registry.setdefault(name, config if name == layers[0][1].active_adapter else None)
    return registry


def list_adapters(model: nn.Module) -> list[str]:
    """The names of ``model``'s adapters, in the order they were added.

    >>> import torch, fastpeft
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> fastpeft.list_adapters(fastpeft.inject(model, fastpeft.AdapterConfig(r=2)))
    ['default']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return list(_registry(model))


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter ``model`` runs (outside :func:`mixed_batch`)."""
    active = model.__dict__.get("fastpeft_active")
    if active is not None:
        return active
    layers = _layers(model)
    return layers[0][1].active_adapter if layers else "default"


def _check_name(model: nn.Module, name, what: str = "adapter_name") -> None:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    known = list_adapters(model)
    if name not in known:
        raise ValueError(f"unknown adapter {name!r}; the model holds {known}")


def _set_routing(layer: LowRankLinear, routing) -> None:
    """``None`` falls back to the class attribute, so a compiled model's guards see the layer
    as it was when first traced."""
    if routing is None:
        layer.__dict__.pop("_routing", None)
    else:
        layer._routing = routing


def _check_unrouted(layers, action: str) -> None:
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"cannot {action} while adapters are merged into the weight of {merged[:5]}; "
                           "call unmerge() first")
    if any(isinstance(layer._routing, MixedRouting) for _, layer in layers):
        raise RuntimeError(f"cannot {action} inside a fastpeft.mixed_batch block")


def _store(model: nn.Module, registry: dict, active: str) -> None:
    model.fastpeft_adapters = registry
    model.fastpeft_active = active
    if registry.get(active) is not None:
        model.fastpeft_config = registry[active]


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Run ``adapter_name`` in every forward from now on. Layers that do not hold it run their
    base layer alone. Parameter objects move, nothing is copied, and a ``torch.compile``d model
    does not recompile when the adapters agree in rank and scale (their tensors are graph inputs,
    not constants); another alpha or rank makes it generalise once (a symbolic scale, a dynamic
    rank), after which switching does not recompile."""
    _check_name(model, adapter_name)
    layers = _layers(model)
    _check_unrouted(layers, "switch adapters")
    registry = _registry(model)
    for _, layer in layers:
        if adapter_name in adapter_names(layer):
            activate_adapter(layer, adapter_name)
            _set_routing(layer, None)
        else:
            _set_routing(layer, BASE_ONLY)
    _store(model, registry, adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` (its tensors) from every layer. The active adapter, and
    one that is the only adapter of some layer, cannot be deleted (nothing changes)."""
    _check_name(model, adapter_name)
    if adapter_name == active_adapter(model):
        raise ValueError(f"adapter {adapter_name!r} is active; fastpeft.set_adapter(model, other) first")
    layers = _layers(model)
    _check_unrouted(layers, "delete an adapter")
    alone = [n for n, layer in layers if adapter_names(layer) == [adapter_name]]
    if alone:
        raise ValueError(f"adapter {adapter_name!r} is the only adapter of {alone[:5]}; it cannot be deleted")
    registry = _registry(model)
    for _, layer in layers:
        names = adapter_names(layer)
        if adapter_name not in names:
            continue
        if layer.active_adapter == adapter_name:     # a layer running its base (BASE_ONLY)
            activate_adapter(layer, next(n for n in names if n != adapter_name))
        remove_adapter_slot(layer, adapter_name)
    registry = {k: v for k, v in registry.items() if k != adapter_name}
    _store(model, registry, active_adapter(model))


def _check_multi(method: str, where: str) -> None:
    if method not in MULTI_METHODS:
        raise ValueError(f"{where}: a {method!r} adapter cannot share a layer with other adapters; "
                         f"several adapters per layer support the methods {list(MULTI_METHODS)}")


def _new_slot_tensors(layer: LowRankLinear, config: AdapterConfig, raw: dict) -> dict:
    """Parameters of a new adapter on ``layer`` from ``raw`` tensors (copied, in the layer's
    adapter dtype and device), trainable as ``config``'s method says."""
    spec = config.spec
    like = layer.lora_A
    train = {"lora_A": spec.train_A, "lora_B": spec.train_B, "lora_core": True, "lora_out_scale": True}
    out = {}
    for attr in ADAPTER_PARAMS:
        t = raw.get(attr)
        if t is not None:
            t = t.detach().to(device=like.device, dtype=like.dtype).clone().contiguous()
            out[attr] = nn.Parameter(t, requires_grad=train[attr])
    return out


def _settings(config: AdapterConfig, r: int) -> dict:
    return dict(method=config.method, r=r, scale=config.scale_for(r), dropout_p=float(config.dropout),
                activation=config.effective_activation)


def _check_target_layers(model, layers: dict, adapter_name: str, config: AdapterConfig) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ADAPTER:
        raise ValueError(f"adapter_name must be a non-empty str other than {BASE_ADAPTER!r}, got {adapter_name!r}")
    if adapter_name in list_adapters(model):
        raise ValueError(f"the model already holds an adapter named {adapter_name!r}")
    _check_multi(config.method, f"adapter {adapter_name!r}")
    for name, layer in layers.items():
        for other in adapter_names(layer):
            _check_multi(adapter_settings_of(layer, other)["method"], f"{name} (adapter {other!r})")
    _check_unrouted(list(layers.items()), "add an adapter")


def add_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str) -> nn.Module:
    """Add a freshly initialised adapter ``adapter_name`` of ``config`` to the layers of
    ``model`` that fastpeft already adapts and ``config.target_modules`` names (all of them
    by default). The active adapter stays active. Returns ``model``.

    >>> import torch, fastpeft
    >>> model = fastpeft.inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), fastpeft.AdapterConfig(r=2))
    >>> model = fastpeft.add_adapter(model, fastpeft.AdapterConfig(method="lamda", r=4), "b")
    >>> fastpeft.list_adapters(model), model[0].lora_slots["b"].r
    (['default', 'b'], 4)
    """
    from .inject import _matches

    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a fastpeft.AdapterConfig, got {type(config).__name__}")
    layers = {n: layer for n, layer in _layers(model)
              if _matches(n, config.target_modules, True) and not _matches(n, config.exclude_modules, False)}
    if not layers:
        raise ValueError(f"no fastpeft layer matched target_modules={config.target_modules!r}; "
                         f"adapted layers: {[n for n, _ in _layers(model)][:10]}")
    _check_target_layers(model, layers, adapter_name, config)
    ranks = {n: config.rank_for(n) for n in layers}
    for n, layer in layers.items():  # any rank, but SVD initialisation takes r singular vectors
        if config.spec.init == "svd" and ranks[n] > min(layer.in_features, layer.out_features):
            raise ValueError(f"r={ranks[n]} for {n!r} must be in [1, min(d={layer.out_features}, "
                             f"k={layer.in_features})]: {config.method}'s SVD initialisation takes r "
                             "singular vectors")
    shared = None
    if config.spec.init == "vera":
        if len(set(ranks.values())) != 1:
            raise ValueError("vera shares its projections across layers and needs one rank for all")
        shared = vera_projections(config.seed, next(iter(ranks.values())),
                                  max(m.in_features for m in layers.values()),
                                  max(m.out_features for m in layers.values()))
    registry = _registry(model)
    for n, layer in layers.items():
        like = layer.lora_A
        vera = None if shared is None else tuple(p.to(like.device, like.dtype) for p in shared)
        raw = layer._init_adapter(config, ranks[n], like.device, like.dtype, vera)
        tensors = _new_slot_tensors(layer, config, dict(zip(ADAPTER_PARAMS, raw)))
        add_adapter_slot(layer, adapter_name, tensors, _settings(config, ranks[n]))
    registry = {**registry, adapter_name: config}
    _store(model, registry, active_adapter(model))
    return model


# -- saving and loading one named adapter (used by fastpeft.save_adapter / load_adapter) -------

def named_adapter_state_dict(model: nn.Module, adapter_name: str) -> dict:
    """The tensors of adapter ``adapter_name`` under the single-adapter keys
    (``{layer}.lora_A`` ...), plus the biases that train: what ``save_adapter`` writes."""
    _check_name(model, adapter_name)
    out = {}
    for name, layer in _layers(model):
        if adapter_name in adapter_names(layer):
            for attr, tensor in adapter_tensors_of(layer, adapter_name).items():
                if tensor is not None:
                    out[_key(name, attr)] = tensor.detach().cpu().contiguous().clone()
    for name, param in model.named_parameters():
        if param.requires_grad and name.endswith("bias"):
            out[name] = param.detach().cpu().contiguous().clone()
    return out


def _key(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def _split_key(key: str):
    name, _, attr = key.rpartition(".")
    return (name, attr) if attr in ADAPTER_PARAMS else (None, None)


def load_named_adapter(model: nn.Module, adapter_name: str, config: AdapterConfig, tensors: dict) -> None:
    """Load ``tensors`` (single-adapter keys) as adapter ``adapter_name``: copied in place into
    an adapter of that name, else added as a new adapter. Every name and shape is checked before
    anything changes."""
    if adapter_name in list_adapters(model):
        _load_existing(model, adapter_name, config, tensors)
    else:
        _load_new(model, adapter_name, config, tensors)


def _load_existing(model, adapter_name, config, tensors):
    layers = _layers(model)
    expected = {}
    for name, layer in layers:
        if adapter_name in adapter_names(layer):
            for attr, tensor in adapter_tensors_of(layer, adapter_name).items():
                if tensor is not None:
                    expected[_key(name, attr)] = tensor
    params = dict(model.named_parameters())
    for key in tensors:
        if key not in expected and key.endswith("bias") and key in params:
            expected[key] = params[key]
    from .inject import _canonical, check_names_and_shapes

    check_names_and_shapes(tensors, expected, f"adapter {adapter_name!r} of the model", "shapes (ranks) do not fit")

    method = _canonical(config.method)
    other = [f"{name} ({adapter_settings_of(layer, adapter_name)['method']})" for name, layer in layers
             if adapter_name in adapter_names(layer)
             and _canonical(adapter_settings_of(layer, adapter_name)["method"]) != method]
    if other:
        raise ValueError(f"the file holds a {config.method} adapter but adapter {adapter_name!r} of the model is "
                         "not: " + ", ".join(other[:10]))
    ready = {key: tensors[key].to(device=target.device, dtype=target.dtype) for key, target in expected.items()}
    with torch.no_grad():                      # nothing below can fail
        for key, target in expected.items():
            target.copy_(ready[key])
    for _, layer in layers:                    # the file's scale, dropout and activation
        if adapter_name in adapter_names(layer):
            holder = layer if layer.active_adapter == adapter_name else layer.lora_slots[adapter_name]
            holder.scale = config.scale_for(holder.r)
            holder.dropout_p = float(config.dropout)
            holder.activation = config.effective_activation
    registry = dict(_registry(model))
    registry[adapter_name] = config
    _store(model, registry, active_adapter(model))


def _load_new(model, adapter_name, config, tensors):
    modules = dict(model.named_modules())
    by_layer, problems = {}, []
    for key, tensor in tensors.items():
        name, attr = _split_key(key)
        if name is None:
            problems.append(f"{key}: a new adapter cannot carry biases (the adapters of a model share them)"
                            if key.endswith("bias") else f"{key}: not an adapter tensor")
            continue
        if not isinstance(modules.get(name), LowRankLinear):
            problems.append(f"{key}: {name!r} is not a layer that fastpeft adapts in this model")
            continue
        by_layer.setdefault(name, {})[attr] = tensor
    if problems:
        raise ValueError(f"adapter {adapter_name!r} does not fit the model: " + "; ".join(problems[:10]))
    if not by_layer:
        raise ValueError(f"adapter {adapter_name!r} holds no adapter tensors")
    layers = {name: modules[name] for name in by_layer}
    _check_target_layers(model, layers, adapter_name, config)
    spec = config.spec
    for name, raw in by_layer.items():
        layer = layers[name]
        d, k = layer.out_features, layer.in_features
        a = raw.get("lora_A")
        r = a.shape[0] if a is not None and a.dim() == 2 else None
        want = {"lora_A": (r, k), "lora_B": (d, r)}
        if spec.core is not None:
            want["lora_core"] = (r, r) if spec.core == "full" else (r,)
        if spec.out_scale:
            want["lora_out_scale"] = (d,)
        if set(raw) != set(want):
            problems.append(f"{name}: a {config.method} adapter has {sorted(want)}, the file {sorted(raw)}")
        elif r is None or r < 1:
            problems.append(f"{name}: rank {r} does not fit the layer [d={d}, k={k}] (r >= 1)")
        else:
            problems += [f"{name}.{attr}: file {tuple(raw[attr].shape)} vs layer {shape}"
                         for attr, shape in want.items() if tuple(raw[attr].shape) != shape]
    if problems:
        raise ValueError(f"adapter {adapter_name!r} does not fit the model: " + "; ".join(problems[:10]))
    registry = _registry(model)
    for name, raw in by_layer.items():
        layer = layers[name]
        add_adapter_slot(layer, adapter_name, _new_slot_tensors(layer, config, raw),
                         _settings(config, raw["lora_A"].shape[0]))
    registry = {**registry, adapter_name: config}
    _store(model, registry, active_adapter(model))


# -- mixed batches ------------------------------------------------------------------------------

@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Inside the block, sample ``b`` (batch dim 0) of every input runs with adapter
    ``adapter_names[b]`` (``"__base__"``: none), equal to running it alone with that adapter.
    Every layer runs one base GEMM for the whole batch and each adapter over its own rows; in
    training each adapter gets the gradients of its own samples only.

    >>> import torch, fastpeft
    >>> model = fastpeft.inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), fastpeft.AdapterConfig(r=2))
    >>> model = fastpeft.add_adapter(model, fastpeft.AdapterConfig(r=4), "b")
    >>> with fastpeft.mixed_batch(model, ["b", "__base__", "default"]):
    ...     y = model(torch.randn(3, 8))
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list of str, one per sample, got {type(adapter_names).__name__}")
    bad = [n for n in adapter_names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"adapter_names must hold str, got {bad[:5]}")
    if not adapter_names:
        raise ValueError("adapter_names must name one adapter per sample, got an empty list")
    known = list_adapters(model)
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}; the model holds {known} (and "
                         f"{BASE_ADAPTER!r} means none)")
    layers = _layers(model)
    _check_unrouted(layers, "start a mixed batch")
    names = list(dict.fromkeys(n for n in adapter_names if n != BASE_ADAPTER))
    index = {n: i for i, n in enumerate(names)}
    routing = MixedRouting(names, MixedRows([index.get(n, -1) for n in adapter_names], len(names)))
    previous = [(layer, layer._routing) for _, layer in layers]
    try:
        for layer, _ in previous:
            _set_routing(layer, routing)
        yield
    finally:
        for layer, routing_before in previous:
            _set_routing(layer, routing_before)

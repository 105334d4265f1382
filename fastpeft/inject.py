"""Adapting whole models: swap Linear layers for fastpeft layers, save and load adapters.

One generic walk over the module tree, matching names as HF PEFT does (a list of names, each
matching itself or any dotted suffix, or one regex over the full name), works for any model,
transformers models included.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from .config import AdapterConfig
from .nn.linear import ADAPTER_PARAMS, LowRankLinear, vera_projections
from .nn.linear4bit import LowRankLinear4bit, is_bnb_linear4bit

__all__ = ["inject", "save_adapter", "load_adapter", "adapter_state_dict", "lowrank_layers",
           "register_converter", "trainable_parameter_count", "ADAPTER_FILE", "CONFIG_FILE"]

ADAPTER_FILE = "fastpeft_adapter.safetensors"
CONFIG_FILE = "fastpeft_config.json"
_OUTPUT_HEADS = ("lm_head", "classifier", "score", "cls", "output_layer")

# (predicate, factory, (d, k) of a module): the Linear-like layer types that inject can adapt.
_CONVERTERS: list[tuple[Callable[[nn.Module], bool], Callable, Callable[[nn.Module], tuple]]] = []


def register_converter(predicate: Callable[[nn.Module], bool], factory: Callable,
                       shape: Callable[[nn.Module], tuple[int, int]]) -> None:
    """Teach :func:`inject` a new layer type: ``factory(module, config, r=..., vera_shared=...)``
    returns the fastpeft layer; ``shape(module)`` gives its (out_features, in_features).
    Converters registered later are tried first."""
    _CONVERTERS.insert(0, (predicate, factory, shape))


register_converter(lambda m: type(m) is nn.Linear, LowRankLinear.from_linear,
                   lambda m: (m.out_features, m.in_features))
register_converter(is_bnb_linear4bit, LowRankLinear4bit.from_bnb,
                   lambda m: (m.out_features, m.in_features))


def _converter(module: nn.Module):
    for predicate, factory, shape in _CONVERTERS:
        if predicate(module):
            return factory, shape
    return None


def _matches(name: str, patterns, default_all: bool) -> bool:
    if patterns is None:
        return default_all
    if isinstance(patterns, str):
        if patterns == "all-linear":
            return True
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = set()
    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] in _OUTPUT_HEADS:
            heads.add(name)
    return heads


def _find_targets(model: nn.Module, config: AdapterConfig, names: Optional[set] = None):
    """[(name, module, factory, (d, k))] of the layers ``config`` adapts."""
    targets = config.target_modules
    all_linear = targets is None or targets == "all-linear"
    heads = _output_head_names(model) if all_linear and names is None else set()
    found = []
    for name, module in model.named_modules():
        conv = _converter(module)
        if conv is None:
            continue
        if names is not None:
            if name not in names:
                continue
        elif not _matches(name, targets, True) or name in heads \
                or _matches(name, config.exclude_modules, False):
            continue
        found.append((name, module, conv[0], conv[1](module)))
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def inject(model: nn.Module, config: AdapterConfig, *, ranks: Optional[dict[str, int]] = None) -> nn.Module:
    """Swap the Linear layers of ``model`` named by ``config.target_modules`` for fastpeft
    layers, in place; freeze everything else. Returns ``model``.

    ``ranks`` ({full module name: r}, e.g. from LaMDA++'s allocation) overrides ``config.r``
    and ``config.rank_pattern`` per layer. Layers already adapted are left as they are.

    >>> import torch, fastpeft
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> model = fastpeft.inject(model, fastpeft.AdapterConfig(method="lora", r=4, target_modules=["0"]))
    >>> type(model[0]).__name__, model[0].lora_A.requires_grad, model[0].weight.requires_grad
    ('LowRankLinear', True, False)
    """
    return _inject(model, config, ranks, names=None)


def _inject(model, config, ranks, names):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a fastpeft.AdapterConfig, got {type(config).__name__}")
    spec = config.spec
    found = _find_targets(model, config, names)
    if not found and spec.has_adapter:
        linear = [n for n, m in model.named_modules() if _converter(m) is not None][:10]
        raise ValueError(f"no Linear layer matched target_modules={config.target_modules!r}; "
                         f"adaptable layers include {linear}")
    ranks = dict(ranks or {})
    unknown = sorted(set(ranks) - {name for name, *_ in found})
    if unknown:
        raise ValueError(f"ranks names layers that are not adapted: {unknown[:10]}")
    layer_ranks = {name: ranks.get(name, config.rank_for(name)) for name, *_ in found}
    for name, _, _, (d, k) in found:  # check every rank before changing anything
        r = layer_ranks[name]
        if not 1 <= r <= min(d, k):
            raise ValueError(f"r={r} for {name!r} must be in [1, min(d={d}, k={k})]")

    for param in model.parameters():
        param.requires_grad_(False)
    vera_shared = {}
    if spec.init == "vera" and found:
        if len(set(layer_ranks.values())) != 1:
            raise ValueError("vera shares its projections across layers and needs one rank for all")
        r = next(iter(layer_ranks.values()))
        max_out = max(d for *_, (d, k) in found)
        max_in = max(k for *_, (d, k) in found)
        proj = vera_projections(config.seed, r, max_in, max_out)
    for name, module, factory, _ in found:
        if spec.has_adapter:
            kwargs = {}
            if spec.init == "vera":
                weight = module.weight
                dtype = config.torch_adapter_dtype or _adapter_dtype(module)
                key = (weight.device, dtype)
                if key not in vera_shared:
                    vera_shared[key] = tuple(p.to(device=weight.device, dtype=dtype) for p in proj)
                kwargs["vera_shared"] = vera_shared[key]
            _set_submodule(model, name, factory(module, config, r=layer_ranks[name], **kwargs))
        elif getattr(module, "bias", None) is not None:  # BitFit alone
            module.bias.requires_grad_(True)
    if not spec.has_adapter and not found:
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    model.fastpeft_config = config
    return model


def _adapter_dtype(module: nn.Module) -> torch.dtype:
    dtype = module.weight.dtype
    return dtype if dtype.is_floating_point else getattr(module, "compute_dtype", None) or torch.float32


def lowrank_layers(model: nn.Module) -> Iterable[tuple[str, LowRankLinear]]:
    """(name, layer) for every fastpeft layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters that require grad (shared storage counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` (adapter parameters of every fastpeft layer, plus the
    biases that train), detached, contiguous, on CPU, under their module-qualified names.
    ``adapter_name`` picks one of several adapters (default: the active one); the keys are the
    same whichever it is (``{layer}.lora_A``, ...)."""
    from .adapters import active_adapter, list_adapters, named_adapter_state_dict

    if adapter_name is not None or len(list_adapters(model)) > 1:
        return named_adapter_state_dict(model, active_adapter(model) if adapter_name is None else adapter_name)
    out = {}
    for name, layer in lowrank_layers(model):
        for attr in ADAPTER_PARAMS:
            tensor = getattr(layer, attr)
            if tensor is not None:
                out[f"{name}.{attr}"] = tensor.detach().cpu().contiguous().clone()
    for name, param in model.named_parameters():
        if param.requires_grad and name.endswith("bias"):
            out[name] = param.detach().cpu().contiguous().clone()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: Optional[str] = None) -> None:
    """Write the adapter of ``model`` to the folder ``path``: ``fastpeft_adapter.safetensors``
    (adapter tensors only) and ``fastpeft_config.json``. Saving is deterministic: the same
    adapter always gives the same bytes. ``adapter_name`` picks one of several adapters
    (default: the active one); the file is the same as a single-adapter model's."""
    from safetensors.torch import save_file

    config = getattr(model, "fastpeft_config", None)
    if config is None:
        raise ValueError("model has no fastpeft adapter: call fastpeft.inject(model, config) first")
    if adapter_name is not None:
        from .adapters import _check_name, _registry

        _check_name(model, adapter_name)
        config = _registry(model)[adapter_name]
        if config is None:
            raise ValueError(f"adapter {adapter_name!r} has no AdapterConfig to save with it")
    tensors = adapter_state_dict(model, adapter_name)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(config.to_json() + "\n")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: Optional[str] = None) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` (injecting the layers first
    if the model has none). Names and shapes are checked before anything changes: a mismatch
    raises a ValueError and leaves the model as it was. Loading never unpickles.

    ``adapter_name``: the adapter to load into (default: the active one, or ``"default"`` in a
    model without adapters). An existing adapter is overwritten in place (its tensors keep their
    identity, so a compiled model does not recompile); a new name adds an adapter to the layers
    the file names, which fastpeft must already adapt (see :mod:`fastpeft.adapters`)."""
    from safetensors.torch import load_file

    from .adapters import BASE_ADAPTER, active_adapter, list_adapters, load_named_adapter

    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name
                                     or adapter_name == BASE_ADAPTER):
        raise ValueError(f"adapter_name must be a non-empty str other than {BASE_ADAPTER!r}, got {adapter_name!r}")

    config_path = os.path.join(path, CONFIG_FILE)
    tensor_path = os.path.join(path, ADAPTER_FILE)
    for p in (config_path, tensor_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: expected a folder written by fastpeft.save_adapter")
    with open(config_path) as f:
        config = AdapterConfig.from_dict(json.load(f))
    tensors = load_file(tensor_path)
    if lowrank_layers(model):
        names = list_adapters(model)
        name = active_adapter(model) if adapter_name is None else adapter_name
        if len(names) > 1 or name not in names:
            load_named_adapter(model, name, config, tensors)
            return model

    ranks = {key[: -len(".lora_A")]: t.shape[0] for key, t in tensors.items() if key.endswith(".lora_A")}
    snapshot = None
    if not lowrank_layers(model) and config.spec.has_adapter:
        modules = dict(model.named_modules())
        problems = []
        for name, r in ranks.items():
            module = modules.get(name)
            conv = _converter(module) if module is not None else None
            if conv is None:
                problems.append(f"{name}: no adaptable Linear layer of that name")
                continue
            d, k = conv[1](module)
            b_key = f"{name}.lora_B"
            a_shape = tuple(tensors[f"{name}.lora_A"].shape)
            b_shape = tuple(tensors[b_key].shape) if b_key in tensors else (d, a_shape[0])
            if a_shape[1] != k or b_shape[0] != d:
                problems.append(f"{name}: adapter for [d={b_shape[0]}, k={a_shape[1]}] but the layer is [d={d}, k={k}]")
        if problems:
            raise ValueError("adapter does not fit the model: " + "; ".join(problems[:10]))
        snapshot = _snapshot(model, ranks)
        _inject(model, config, ranks, names=set(ranks))
    try:
        expected = {}
        for name, layer in lowrank_layers(model):
            for attr in ADAPTER_PARAMS:
                tensor = getattr(layer, attr)
                if tensor is not None:
                    expected[f"{name}.{attr}"] = tensor
        params = dict(model.named_parameters())
        for key in tensors:
            if key not in expected and key.endswith("bias") and key in params:
                expected[key] = params[key]
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"adapter names do not match the model: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
        wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)]
        if wrong:
            raise ValueError("adapter shapes do not match the model: " + "; ".join(wrong[:10]))
    except Exception:
        if snapshot is not None:
            _restore(model, snapshot)
        raise
    if not config.spec.has_adapter and getattr(model, "fastpeft_config", None) is None:
        for param in model.parameters():  # BitFit alone, as after inject: only the saved biases train
            param.requires_grad_(False)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
            if key.endswith("bias"):
                target.requires_grad_(True)
    model.fastpeft_config = config
    if "fastpeft_adapters" in model.__dict__:
        model.fastpeft_adapters = {**model.fastpeft_adapters, active_adapter(model): config}
    if adapter_name is not None and snapshot is not None:   # a model's first adapter, named
        from .adapters import _store

        for _, layer in lowrank_layers(model):
            layer.active_adapter = adapter_name
        _store(model, {adapter_name: config}, adapter_name)
    return model


def _snapshot(model: nn.Module, names) -> dict:
    """What :func:`_inject` changes: the layers it swaps, every requires_grad flag, the config."""
    return {"modules": {name: model.get_submodule(name) for name in names},
            "grad": {id(p): p.requires_grad for p in model.parameters()},
            "config": getattr(model, "fastpeft_config", None)}


def _restore(model: nn.Module, snapshot: dict) -> None:
    for name, module in snapshot["modules"].items():
        _set_submodule(model, name, module)
    for p in model.parameters():
        p.requires_grad_(snapshot["grad"].get(id(p), p.requires_grad))
    if snapshot["config"] is None:
        model.__dict__.pop("fastpeft_config", None)
    else:
        model.fastpeft_config = snapshot["config"]

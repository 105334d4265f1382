"""Adapting whole models: swap Linear layers for fastpeft layers, save and load adapters.

One generic walk over the module tree, matching names as HF PEFT does (a list of names, each
matching itself or any dotted suffix, or one regex over the full name), works for any model,
transformers models included.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from .config import _ALIASES, AdapterConfig
from .nn.linear import ADAPTER_PARAMS, LowRankLinear, vera_projections
from .nn.linear4bit import LowRankLinear4bit, is_bnb_linear4bit

__all__ = ["inject", "save_adapter", "load_adapter", "adapter_state_dict", "lowrank_layers",
           "merge", "unmerge", "register_converter", "trainable_parameter_count", "is_conv1d",
           "linear_view_of_conv1d", "ADAPTER_FILE", "CONFIG_FILE"]

ADAPTER_FILE = "fastpeft_adapter.safetensors"
CONFIG_FILE = "fastpeft_config.json"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TENSOR_DIMS = {"lora_A": (2,), "lora_B": (2,), "lora_core": (1, 2), "lora_out_scale": (1,), "lora_magnitude": (1,)}

# (predicate, factory, (d, k) of a module): the Linear-like layer types that inject can adapt.
_CONVERTERS: list[tuple[Callable[[nn.Module], bool], Callable, Callable[[nn.Module], tuple]]] = []


def register_converter(predicate: Callable[[nn.Module], bool], factory: Callable,
                       shape: Callable[[nn.Module], tuple[int, int]]) -> None:
    """Teach :func:`inject` a new layer type: ``factory(module, config, r=..., vera_shared=...)``
    returns the fastpeft layer; ``shape(module)`` gives its (out_features, in_features).
    Converters registered later are tried first."""
    _CONVERTERS.insert(0, (predicate, factory, shape))


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 family: a Linear with its weight stored [k, d]),
    checked without importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.endswith("pytorch_utils") for c in type(module).__mro__) \
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def linear_view_of_conv1d(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` whose weight is the transposed view [d, k] of Conv1D's weight [k, d]
    (same storage: merging into it changes the Conv1D's weight too)."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = conv.weight.shape
    linear.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=conv.weight.requires_grad)
    linear.bias = conv.bias
    return linear


def _from_conv1d(conv: nn.Module, config: AdapterConfig, **kwargs) -> LowRankLinear:
    """A fastpeft layer over a Conv1D, as PEFT's ``fan_in_fan_out=True``: its weight is the
    transposed view of the Conv1D weight, so the layer computes what the Conv1D computed."""
    layer = LowRankLinear.from_linear(linear_view_of_conv1d(conv), config, **kwargs)
    layer.fan_in_fan_out = True
    return layer


register_converter(lambda m: isinstance(m, nn.Linear), LowRankLinear.from_linear,
                   lambda m: (m.out_features, m.in_features))
register_converter(is_conv1d, _from_conv1d, lambda m: (m.weight.shape[1], m.weight.shape[0]))
register_converter(is_bnb_linear4bit, LowRankLinear4bit.from_bnb,
                   lambda m: (m.out_features, m.in_features))


def _converter(module: nn.Module):
    for predicate, factory, shape in _CONVERTERS:
        if predicate(module):
            return factory, shape
    return None


def _unsupported(name: str, module: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """Why a layer that the targets name cannot be adapted (``None`` when it can)."""
    kind = type(module).__name__
    if isinstance(module, LowRankLinear):
        return f"{name!r} is already a fastpeft layer"
    if _converter(module) is None:
        return (f"{name!r} is a {kind}, not a layer fastpeft adapts (torch.nn.Linear and its subclasses, "
                "transformers Conv1D, bitsandbytes Linear4bit)")
    if is_bnb_linear4bit(module) or not isinstance(module, nn.Linear):
        return None
    if not module.weight.is_floating_point():
        return f"{name!r} ({kind}) has a {module.weight.dtype} weight; fastpeft adapts floating-point or 4-bit weights"
    if type(module).forward is not nn.Linear.forward:
        return (f"{name!r} is a {kind}, an nn.Linear subclass with its own forward, which a fastpeft layer "
                "would not run")
    if isinstance(parent, nn.MultiheadAttention):
        return f"{name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight directly"
    return None


def _matches(name: str, patterns, default_all: bool) -> bool:
    if patterns is None:
        return default_all
    if isinstance(patterns, str):
        if patterns == "all-linear":
            return True
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_embedding_names(model: nn.Module) -> set[str]:
    """The output layer that PEFT's "all-linear" leaves out: a transformers model's
    ``get_output_embeddings()`` (``lm_head``); nothing for other models."""
    if not any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__):
        return set()
    out = model.get_output_embeddings()
    return {next(name for name, module in model.named_modules() if module is out)} if out is not None else set()


def _saved_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The modules named by ``config.modules_to_save`` (each name must match one)."""
    wanted = config.modules_to_save or []
    found = [name for name, _ in model.named_modules() if name and _matches(name, wanted, False)]
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save names {missing} match no module of the model")
    return [n for n in found if not any(n.startswith(o + ".") for o in found)]


def _find_targets(model: nn.Module, config: AdapterConfig, names: Optional[set] = None):
    """[(name, module, factory, (d, k))] of the layers ``config`` adapts: with ``names``, those
    layers; else every layer that ``target_modules`` matches and ``exclude_modules`` does not
    (``None`` and ``"all-linear"``: every Linear-like layer but a transformers model's output
    layer, as PEFT). A matched module that cannot be adapted is an error, never skipped."""
    if names is None and not isinstance(model, LowRankLinear) and _converter(model) is not None:
        names = {""}  # a bare layer: the model itself is the one target
    targets = config.target_modules
    all_linear = targets is None or targets == "all-linear"
    excluded = _output_embedding_names(model) if all_linear and names is None else set()
    saved = _saved_module_names(model, config) if names is None else []
    modules = dict(model.named_modules())
    found, problems = [], []
    for name, module in modules.items():
        if names is not None:
            if name not in names:
                continue
        elif not name or name in excluded or _matches(name, config.exclude_modules, False) \
                or any(name == s or name.startswith(s + ".") for s in saved):
            continue
        elif all_linear:
            if _converter(module) is None or isinstance(module, LowRankLinear):
                continue
        elif not _matches(name, targets, True):
            continue
        parent = modules.get(name.rpartition(".")[0]) if name else None
        reason = _unsupported(name, module, parent)
        if reason is not None:
            problems.append(reason)
            continue
        conv = _converter(module)
        found.append((name, module, conv[0], conv[1](module)))
    if problems:
        raise ValueError(f"target_modules={targets!r} matches layers that cannot be adapted: "
                         + "; ".join(problems[:10]) + " (leave them out with exclude_modules)")
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _key(name: str, attr: str) -> str:
    """The state-dict key of ``attr`` of the layer ``name`` (``""``: the model itself)."""
    return f"{name}.{attr}" if name else attr


def _shared_weights(model: nn.Module, found, own: Callable[[str], str] = lambda name: _key(name, "weight")
                    ) -> dict[str, list[str]]:
    """{layer name: names of the other parameters sharing its weight's storage} (tied weights);
    ``own(name)`` is the name of the layer's weight itself."""
    by_storage: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        if param.device.type != "meta":
            by_storage.setdefault(param.untyped_storage().data_ptr(), []).append(pname)
    shared = {}
    for name, module, *_ in found:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
            continue
        others = [n for n in by_storage.get(weight.untyped_storage().data_ptr(), []) if n != own(name)]
        if others:
            shared[name] = others
    return shared


def inject(model: nn.Module, config: AdapterConfig, *, ranks: Optional[dict[str, int]] = None) -> nn.Module:
    """Swap the Linear layers of ``model`` named by ``config.target_modules`` for fastpeft
    layers, in place; freeze everything else. Returns ``model`` (a new
    :class:`fastpeft.LowRankLinear` when ``model`` is itself one Linear layer).

    Adapted: ``torch.nn.Linear`` and its subclasses, transformers' ``Conv1D`` (GPT-2; handled as
    PEFT's ``fan_in_fan_out``: the layer's weight is the transposed view of the Conv1D's) and
    bitsandbytes' ``Linear4bit``. A module that the targets name but that cannot be adapted is an
    error naming it, never skipped. ``ranks`` ({full module name: r}, e.g. from LaMDA++'s
    allocation) overrides ``config.r`` and ``config.rank_pattern`` per layer; any r >= 1 is
    accepted, except that LaMDA's SVD initialisation needs r <= min(d, k).

    Everything is checked, and every new layer built, before the model changes: on an error the
    model is as it was. A model that already has fastpeft layers is refused (load a saved
    adapter into it with :func:`load_adapter`, or inject into a fresh model).

    >>> import torch, fastpeft
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> model = fastpeft.inject(model, fastpeft.AdapterConfig(method="lora", r=4, target_modules=["0"]))
    >>> type(model[0]).__name__, model[0].lora_A.requires_grad, model[0].weight.requires_grad
    ('LowRankLinear', True, False)
    """
    return _inject(model, config, ranks, names=None)


def _check_ranks(ranks) -> dict[str, int]:
    if ranks is None:
        return {}
    if not isinstance(ranks, dict):
        raise TypeError(f"ranks must be a dict {{module name: r}}, got {type(ranks).__name__}")
    for name, r in ranks.items():
        if not isinstance(name, str):
            raise TypeError(f"ranks keys must be module names (str), got {name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"ranks[{name!r}] must be an int >= 1, got {r!r}")
    return dict(ranks)


def _inject(model, config, ranks, names):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a fastpeft.AdapterConfig, got {type(config).__name__}")
    existing = lowrank_layers(model)
    if existing:
        raise ValueError(f"model already has {len(existing)} fastpeft layers (first: {existing[0][0]!r}); "
                         "inject once per model (fastpeft.add_adapter adds another adapter to those layers, "
                         "fastpeft.load_adapter loads a saved one)")
    spec = config.spec
    ranks = _check_ranks(ranks)

    # 1. check everything
    found = _find_targets(model, config, names)
    if not found:
        linear = [n for n, m in model.named_modules() if _converter(m) is not None][:10]
        raise ValueError(f"no Linear layer matched target_modules={config.target_modules!r}; "
                         f"adaptable layers include {linear}")
    unknown = sorted(set(ranks) - {name for name, *_ in found})
    if unknown:
        raise ValueError(f"ranks names layers that are not adapted: {unknown[:10]}")
    layer_ranks = {name: ranks.get(name, config.rank_for(name)) for name, *_ in found}
    if spec.has_adapter:
        if spec.init == "svd":
            for name, _, _, (d, k) in found:
                r = layer_ranks[name]
                if r > min(d, k):
                    raise ValueError(f"r={r} for {name!r} must be in [1, min(d={d}, k={k})]: {config.method}'s "
                                     "SVD initialisation takes r singular vectors")
        if spec.init == "vera" and len(set(layer_ranks.values())) != 1:
            raise ValueError("vera shares its projections across layers and needs one rank for all, got "
                             f"{dict(list(layer_ranks.items())[:10])}")
    elif not any(getattr(module, "bias", None) is not None for _, module, *_ in found):
        raise ValueError(f"bitfit trains biases, and none of the {len(found)} layers matched by "
                         f"target_modules={config.target_modules!r} has one")
    saved = _saved_module_names(model, config)
    shared = _shared_weights(model, found)

    # 2. build the new layers (the factories set flags of the shared weights and biases)
    flags = {p: p.requires_grad for p in model.parameters()}
    new = {}
    try:
        if spec.has_adapter:
            proj = None
            if spec.init == "vera":
                r = next(iter(layer_ranks.values()))
                proj = vera_projections(config.seed, r, max(k for *_, (d, k) in found),
                                        max(d for *_, (d, k) in found))
            vera_shared, vera_of = {}, {}        # VeRA projections per (device, dtype), and per layer
            for name, module, factory, _ in found:
                if proj is not None:
                    weight = module.weight
                    dtype = config.torch_adapter_dtype or _adapter_dtype(module)
                    key = (weight.device, dtype)
                    if key not in vera_shared:
                        vera_shared[key] = tuple(p.to(device=weight.device, dtype=dtype) for p in proj)
                    vera_of[name] = vera_shared[key]

            def build(item):
                name, module, factory, _ = item
                kwargs = {"vera_shared": vera_of[name]} if proj is not None else {}
                try:
                    return factory(module, config, r=layer_ranks[name], **kwargs)
                except (ValueError, TypeError, RuntimeError) as err:
                    raise type(err)(f"layer {name!r}: {err}") from err

            # LaMDA's SVD initialisation is most of the set-up: one layer per worker thread, each
            # with one torch thread (below)
            workers = torch.get_num_threads() if spec.init == "svd" else 1
            layers = _build_layers(build, found, f"fastpeft.inject ({config.method})", workers)
            for (name, *_), layer in zip(found, layers):
                new[name] = layer
                if name in shared:
                    layer.weight_shared_with = shared[name]
    except BaseException:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise

    # 3. change the model (nothing below can fail)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module, *_ in found:
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.requires_grad_(bool(config.train_bias or not spec.has_adapter))
    for name in saved:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    for name, layer in new.items():
        if name:
            _set_submodule(model, name, layer)
        else:
            model = layer
    model.fastpeft_config = config
    return model


def _build_layers(build: Callable, items: list, desc: str, workers: int) -> list:
    """``[build(item) for item in items]`` behind a progress bar (:func:`_progress`); with
    ``workers`` > 1, on that many threads, each running torch with one intra-op thread (torch's
    thread count is restored after). For the SVD initialisation on a CPU this beats one
    layer at a time on ``workers`` OpenMP threads: skinny products parallelise poorly, and
    on a loaded machine OpenMP's barriers make two threads several times slower than one
    (bench/lamda_setup.py). Results in ``items``' order; an error is raised for the first
    failing item in that order, and the items not started are cancelled."""
    workers = min(workers, len(items))
    if workers <= 1:
        return [build(item) for item in _progress(items, desc)]
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="fastpeft-inject")
    try:
        futures = [pool.submit(build, item) for item in items]
        return [future.result() for future in _progress(futures, desc)]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _progress(items: list, desc: str):
    """``items`` behind a progress bar on stderr that shows only once the loop has run longer than
    a second (tqdm's ``delay``; LaMDA's SVD initialisation of a large model), and only on a
    terminal; the plain list without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, delay=1.0, leave=False, file=sys.stderr, disable=None)


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
    """The adapter tensors of ``model`` (adapter parameters of every fastpeft layer, the biases
    that train, and the parameters of ``modules_to_save``), detached, contiguous, on CPU, under
    their module-qualified names. ``adapter_name`` picks one of several adapters (default: the
    active one); the keys are the same whichever it is (``{layer}.lora_A``, ...)."""
    from .adapters import active_adapter, list_adapters, named_adapter_state_dict

    if adapter_name is not None or len(list_adapters(model)) > 1:
        return named_adapter_state_dict(model, active_adapter(model) if adapter_name is None else adapter_name)
    out = {}
    for name, layer in lowrank_layers(model):
        for attr in ADAPTER_PARAMS:
            tensor = getattr(layer, attr)
            if tensor is not None:
                out[_key(name, attr)] = tensor.detach().cpu().contiguous().clone()
    for name, param in model.named_parameters():
        if param.requires_grad and name.endswith("bias"):
            out[name] = param.detach().cpu().contiguous().clone()
    out.update(_saved_module_tensors(model, getattr(model, "fastpeft_config", None)))
    return out


def _saved_module_tensors(model: nn.Module, config) -> dict[str, torch.Tensor]:
    out = {}
    if config is None or not config.modules_to_save:
        return out
    for name in _saved_module_names(model, config):
        for pname, param in model.get_submodule(name).named_parameters():
            out[f"{name}.{pname}"] = param.detach().cpu().contiguous().clone()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: Optional[str] = None) -> None:
    """Write the adapter of ``model`` to the folder ``path``: ``fastpeft_adapter.safetensors``
    (adapter tensors only) and ``fastpeft_config.json``.
    Saving is deterministic: the same adapter always gives the same bytes. ``adapter_name``
    picks one of several adapters (default: the active one); the file is the same as a
    single-adapter model's.

    Both files are written into a temporary folder and renamed into place: a failure leaves the
    old adapter in ``path`` whole, and a symlink of either name in ``path`` is replaced, never
    written through."""
    from safetensors.torch import save_file

    from ._files import write_folder

    config = getattr(model, "fastpeft_config", None)
    if config is None:
        raise ValueError("model has no fastpeft adapter: call fastpeft.inject(model, config) first")
    if adapter_name is not None:
        from .adapters import _check_name, _registry

        _check_name(model, adapter_name)
        config = _registry(model)[adapter_name]
        if config is None:
            raise ValueError(f"adapter {adapter_name!r} has no AdapterConfig to save with it")
    elif len(_adapter_names(model)) <= 1:
        odd = [name for name, layer in lowrank_layers(model)
               if not math.isclose(layer.scale, config.scale_for(layer.r), rel_tol=1e-9)]
        if odd:
            raise ValueError(f"layers {odd[:10]} have a scale that fastpeft_config does not give "
                             "(per-layer alphas from from_peft); a load would not restore it: write the "
                             "adapter with fastpeft.to_peft instead")
    tensors = adapter_state_dict(model, adapter_name)
    text = config.to_json() + "\n"

    def write(folder):
        save_file(tensors, os.path.join(folder, ADAPTER_FILE), metadata={"format": "pt"})
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            f.write(text)

    write_folder(path, [ADAPTER_FILE, CONFIG_FILE], write)


def _adapter_names(model: nn.Module) -> list[str]:
    from .adapters import list_adapters

    return list_adapters(model)


def _read_adapter(path) -> tuple[AdapterConfig, dict]:
    """(config, tensors) of a folder written by :func:`save_adapter`, every
    file-level problem raised as an error that names the file."""
    from safetensors import safe_open

    config_path = os.path.join(path, CONFIG_FILE)
    tensor_path = os.path.join(path, ADAPTER_FILE)
    for p in (config_path, tensor_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: expected a folder written by fastpeft.save_adapter")
    with open(config_path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    try:
        config = AdapterConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{config_path}: {err}") from None
    try:
        with safe_open(tensor_path, "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{tensor_path} cannot be read as safetensors: {err}") from None
    problems = []
    for key, tensor in tensors.items():
        attr = key.rpartition(".")[2]
        if tensor.dtype not in _FLOAT_DTYPES:
            problems.append(f"{key} is {tensor.dtype} (adapter tensors are float16, bfloat16, float32 or float64)")
        elif attr in _TENSOR_DIMS and tensor.dim() not in _TENSOR_DIMS[attr]:
            problems.append(f"{key} is {tensor.dim()}-D, expected {' or '.join(map(str, _TENSOR_DIMS[attr]))}-D")
        elif attr == "bias" and tensor.dim() != 1:
            problems.append(f"{key} is {tensor.dim()}-D, expected 1-D")
    if problems:
        raise ValueError(f"{tensor_path}: " + "; ".join(problems[:10]))
    return config, tensors


def _canonical(method: str) -> str:
    return _ALIASES.get(method, method)


def _check_vera_file(config, tensors, tensor_path) -> None:
    """VeRA's projections are shared: every layer's A and B must be slices of one pair."""
    if config.spec.init != "vera":
        return
    for attr, cut in (("lora_A", lambda t, n: t[:, :n]), ("lora_B", lambda t, n: t[:n])):
        items = [(k, t) for k, t in tensors.items() if k.rpartition(".")[2] == attr]
        if not items:
            continue
        axis = 1 if attr == "lora_A" else 0
        widest = max((t for _, t in items), key=lambda t: t.shape[axis])
        odd = [k for k, t in items if t.shape[1 - axis] != widest.shape[1 - axis]
               or not torch.equal(cut(widest, t.shape[axis]), t)]
        if odd:
            raise ValueError(f"{tensor_path}: a vera adapter shares its projections across layers, but "
                             f"{', '.join(odd[:5])} differ from the shared {attr}")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: Optional[str] = None) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``; returns ``model``.

    A model without fastpeft layers (a fresh base model) is first injected with the saved
    config, on the layers the file names, as ``peft.PeftModel.from_pretrained`` does; a bare
    Linear layer gives a new :class:`fastpeft.LowRankLinear`, so use the returned model. A model
    with fastpeft layers must hold the same method and layers: the file's tensors are copied in,
    and its scales (alpha, rsLoRA), dropout and activation are applied to the layers.

    Everything is checked before anything changes, and a mismatch raises a ValueError that
    leaves the model as it was: names and shapes, the method, tensors that are not floating point
    (no silent casts), VeRA projections that are not shared, and layers that are merged (call
    :func:`fastpeft.unmerge` first). Loading never unpickles.

    ``adapter_name``: the adapter to load into (default: the active one, or ``"default"`` in a
    model without adapters). An existing adapter is overwritten in place (its tensors keep their
    identity, so a compiled model does not recompile); a new name adds an adapter to the layers
    the file names, which fastpeft must already adapt (see :mod:`fastpeft.adapters`)."""
    from .adapters import BASE_ADAPTER, active_adapter, list_adapters, load_named_adapter

    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name
                                     or adapter_name == BASE_ADAPTER):
        raise ValueError(f"adapter_name must be a non-empty str other than {BASE_ADAPTER!r}, got {adapter_name!r}")
    path = os.fspath(path)
    config, tensors = _read_adapter(path)
    tensor_path = os.path.join(path, ADAPTER_FILE)
    _check_vera_file(config, tensors, tensor_path)
    merged = [name for name, layer in lowrank_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"cannot load into merged layers {merged[:10]}: the weight holds the adapter; "
                         "call fastpeft.unmerge(model) first")
    if lowrank_layers(model):
        names = list_adapters(model)
        name = active_adapter(model) if adapter_name is None else adapter_name
        if len(names) > 1 or name not in names:
            load_named_adapter(model, name, config, tensors)
            return model

    lora_a = {key[: -len("lora_A")].rstrip("."): t for key, t in tensors.items()
              if key == "lora_A" or key.endswith(".lora_A")}
    ranks = {name: t.shape[0] for name, t in lora_a.items()}
    snapshot = None
    root = model
    if not lowrank_layers(model) and config.spec.has_adapter:
        modules = dict(model.named_modules())
        problems = []
        for name, a in lora_a.items():
            module = modules.get(name)
            conv = _converter(module) if module is not None else None
            if conv is None:
                problems.append(f"{name or '(the model)'}: no adaptable Linear layer of that name")
                continue
            d, k = conv[1](module)
            b = tensors.get(_key(name, "lora_B"))
            b_shape = tuple(b.shape) if b is not None else (d, a.shape[0])
            if a.shape[1] != k or b_shape[0] != d:
                problems.append(f"{name}: adapter for [d={b_shape[0]}, k={a.shape[1]}] but the layer is [d={d}, k={k}]")
        if problems:
            raise ValueError("adapter does not fit the model: " + "; ".join(problems[:10]))
        snapshot = _snapshot(model, ranks)
    try:
        if snapshot is not None:
            root = _inject(model, config, ranks, names=set(ranks))
        expected, layers, saved = _expected_tensors(root, config, tensors)
        ready = _check_load(root, config, tensors, expected, layers)
    except BaseException:
        if snapshot is not None:
            _restore(model, snapshot)
        raise

    # nothing below can fail: every tensor is converted and every check done
    if not config.spec.has_adapter and getattr(root, "fastpeft_config", None) is None:
        for param in root.parameters():  # BitFit alone, as after inject: only the saved biases train
            param.requires_grad_(False)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(ready[key])
            if key.endswith("bias") or key in saved:
                target.requires_grad_(True)
    for name, layer in layers:
        layer.scale = config.scale_for(layer.r)
        layer.dropout_p = float(config.dropout)
        layer.activation = config.effective_activation
    root.fastpeft_config = config
    if "fastpeft_adapters" in root.__dict__:
        root.fastpeft_adapters = {**root.fastpeft_adapters, active_adapter(root): config}
    if adapter_name is not None and snapshot is not None:   # a model's first adapter, named
        from .adapters import _store

        for _, layer in lowrank_layers(root):
            layer.active_adapter = adapter_name
        _store(root, {adapter_name: config}, adapter_name)
    return root


def _expected_tensors(model, config, tensors):
    """({key: the model's tensor that the file's tensor of that key is copied into}, layers,
    keys of the modules_to_save parameters)."""
    layers = lowrank_layers(model)
    expected = {}
    for name, layer in layers:
        for attr in ADAPTER_PARAMS:
            tensor = getattr(layer, attr)
            if tensor is not None:
                expected[_key(name, attr)] = tensor
    params = dict(model.named_parameters())
    for key in tensors:
        if key not in expected and key.endswith("bias") and key in params:
            expected[key] = params[key]
    saved = set()
    if config.modules_to_save:
        for name in _saved_module_names(model, config):
            for pname, param in model.get_submodule(name).named_parameters():
                expected[f"{name}.{pname}"] = param
                saved.add(f"{name}.{pname}")
    return expected, layers, saved


def check_names_and_shapes(tensors, expected, target="the model", shapes="shapes do not match") -> None:
    """A file's tensor names and shapes against the ``expected`` targets (name -> tensor); the
    errors name ``target`` (``"the model"``, or one named adapter of it)."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter names do not match {target}: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"adapter {shapes} {target}: " + "; ".join(wrong[:10]))


def _check_load(model, config, tensors, expected, layers) -> dict[str, torch.Tensor]:
    """Every check of a load; returns the file's tensors converted for their targets."""
    check_names_and_shapes(tensors, expected)
    method = _canonical(config.method)
    other = [f"{name} ({layer.method})" for name, layer in layers if _canonical(layer.method) != method]
    if other:
        raise ValueError(f"the file holds a {config.method} adapter but the model's layers are not {method}: "
                         + ", ".join(other[:10]))
    return {key: tensors[key].to(device=target.device, dtype=target.dtype) for key, target in expected.items()}


def _layers_to_merge(model: nn.Module, merged: bool) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .adapters import active_layers

    layers = active_layers(model)     # a layer that lacks the active adapter runs its base: nothing to merge
    if not layers:
        raise ValueError("model has no fastpeft layers")
    wrong = [name for name, layer in layers if layer.merged != merged]
    if wrong:
        state = "already merged" if not merged else "not merged"
        raise ValueError(f"layers {wrong[:10]} are {state}; nothing was changed")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Merge the adapter of every fastpeft layer of ``model`` into its base weight (see
    :meth:`fastpeft.LowRankLinear.merge`); returns ``model``. Every layer is checked first (all
    unmerged, all mergeable: no activation, no 4-bit weight, no weight shared with another
    module), so an error changes nothing.

    >>> import torch, fastpeft
    >>> model = fastpeft.inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), fastpeft.AdapterConfig(r=2))
    >>> fastpeft.merge(model)[0].merged, fastpeft.unmerge(model)[0].merged
    (True, False)
    """
    layers = _layers_to_merge(model, merged=False)
    problems = [f"{name}: {reason}" for name, layer in layers
                for reason in [layer.merge_refusal()] if reason is not None]
    if problems:
        raise ValueError("cannot merge: " + "; ".join(problems[:10]))
    done = []
    try:
        for _, layer in layers:
            layer.merge()
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` on every fastpeft layer of ``model``; returns ``model``. Refused,
    changing nothing, unless every layer is merged."""
    for _, layer in _layers_to_merge(model, merged=True):
        layer.unmerge()
    return model


def _snapshot(model: nn.Module, names) -> dict:
    """What :func:`_inject` changes: the layers it swaps, every requires_grad flag, the config."""
    return {"modules": {name: model.get_submodule(name) for name in names if name},
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

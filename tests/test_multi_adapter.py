"""Several named adapters per layer: add / load / save / set / delete, mixed batches, hot swap."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpeft
from fastpeft import AdapterConfig
from fastpeft.nn.multi import adapter_settings_of, adapter_tensors_of
from fastpeft.ops.lowrank_mixed import MixedAdapter, lowrank_linear_mixed

from helpers import assert_close_rel, reference_lowrank

PRESETS = ["lora", "lora_fa", "lamda", "vera"]


def _perturb(model, seed=1):
    """Random values in every trainable adapter tensor (B starts at zero, which would hide
    mistakes; VeRA's frozen projections stay the shared ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.3)


def _mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(23, 19, bias=bias), nn.GELU(), nn.Linear(19, 11, bias=bias))


def _multi(presets, bias=True, ranks=(4, 3, 5, 2)):
    model = fastpeft.inject(_mlp(bias), AdapterConfig(method=presets[0], r=ranks[0], alpha=2 * ranks[0]))
    for i, method in enumerate(presets[1:], 1):
        fastpeft.add_adapter(model, AdapterConfig(method=method, r=ranks[i], alpha=3.0, seed=i), f"a{i}")
    _perturb(model)
    return model


def _alone(model, name, x):
    """Sample-by-sample reference: the model with only ``name`` active (or no adapter)."""
    if name == "__base__":
        h = x
        for m in model:
            h = F.linear(h, m.weight, m.bias) if isinstance(m, fastpeft.LowRankLinear) else m(h)
        return h
    fastpeft.set_adapter(model, name)
    return model(x)


# -- named adapters -----------------------------------------------------------------------------

def test_single_adapter_layout_unchanged():
    model = fastpeft.inject(_mlp(), AdapterConfig(r=4))
    assert fastpeft.list_adapters(model) == ["default"] and fastpeft.active_adapter(model) == "default"
    assert sorted(k for k in model.state_dict() if "lora" in k) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    assert not hasattr(model[0], "lora_slots")


def test_add_set_delete_keep_parameter_identity():
    model = _multi(["lora", "lamda"])
    layer = model[0]
    a_default, a_b = layer.lora_A, layer.lora_slots["a1"].lora_A
    assert fastpeft.list_adapters(model) == ["default", "a1"]
    fastpeft.set_adapter(model, "a1")
    assert layer.lora_A is a_b and layer.lora_slots["default"].lora_A is a_default
    assert (layer.method, layer.r, layer.lora_core.shape) == ("lamda", 3, (3, 3))
    assert model.fastpeft_config.method == "lamda"
    assert {id(p) for p in model.parameters()} >= {id(a_default), id(a_b)}
    fastpeft.set_adapter(model, "default")
    fastpeft.delete_adapter(model, "a1")
    assert fastpeft.list_adapters(model) == ["default"] and not hasattr(layer, "lora_slots")
    assert sorted(k for k in model.state_dict() if "lora" in k) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]


def test_adapter_on_some_layers_runs_base_elsewhere():
    model = fastpeft.inject(_mlp(), AdapterConfig(r=4))
    fastpeft.add_adapter(model, AdapterConfig(r=2, target_modules=["2"]), "head")
    _perturb(model)
    x = torch.randn(3, 23)
    fastpeft.set_adapter(model, "head")
    h = F.gelu(F.linear(x, model[0].weight, model[0].bias))
    l2 = model[2]
    expected = reference_lowrank(h, l2.weight, l2.bias, l2.lora_A, l2.lora_B, scale=l2.scale)
    assert_close_rel(model(x), expected, 1e-5)
    with pytest.raises(ValueError, match="only adapter of \\['0'\\]"):
        fastpeft.delete_adapter(model, "default")


@pytest.mark.parametrize("method", PRESETS)
def test_save_load_named_round_trip(tmp_path, method):
    model = _multi(["lora", method])
    fastpeft.save_adapter(model, tmp_path / "a1", adapter_name="a1")
    x = torch.randn(2, 23)
    fastpeft.set_adapter(model, "a1")
    expected = model(x)
    # into a fresh model: it becomes that model's first adapter, under the given name
    fresh = _mlp()
    fastpeft.load_adapter(fresh, tmp_path / "a1", adapter_name="mine")
    assert fastpeft.list_adapters(fresh) == ["mine"]
    assert_close_rel(fresh(x), expected, 1e-6)
    # into an injected model as a new adapter, then switched to
    other = fastpeft.inject(_mlp(), AdapterConfig(r=6))
    fastpeft.load_adapter(other, tmp_path / "a1", adapter_name="b")
    assert fastpeft.list_adapters(other) == ["default", "b"]
    fastpeft.set_adapter(other, "b")
    assert_close_rel(other(x), expected, 1e-6)
    # the saved files are those of a single-adapter model
    keys = set(fastpeft.adapter_state_dict(model, "a1"))
    single = fastpeft.inject(_mlp(), AdapterConfig(method=method, r=3))
    assert keys == set(fastpeft.adapter_state_dict(single))


def test_load_into_existing_slot_copies_in_place(tmp_path):
    source = _multi(["lora", "lora"])
    fastpeft.save_adapter(source, tmp_path, adapter_name="a1")
    target = fastpeft.inject(_mlp(), AdapterConfig(r=4, alpha=8))
    fastpeft.add_adapter(target, AdapterConfig(r=3, alpha=3.0), "a1")
    slot_a = target[0].lora_slots["a1"].lora_A
    fastpeft.load_adapter(target, tmp_path, adapter_name="a1")
    assert target[0].lora_slots["a1"].lora_A is slot_a
    assert torch.equal(slot_a, source[0].lora_slots["a1"].lora_A)


# -- bad input: a clear error, nothing changed --------------------------------------------------

def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, fastpeft.list_adapters(model), \
        fastpeft.active_adapter(model)


def _unchanged(model, snap):
    state, names, active = snap
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert fastpeft.list_adapters(model) == names and fastpeft.active_adapter(model) == active
    assert all(m._routing is None for m in model.modules() if isinstance(m, fastpeft.LowRankLinear))


def test_bad_names_and_lengths(tmp_path):
    model = _multi(["lora", "vera"])
    snap = _snapshot(model)
    x = torch.randn(3, 23)
    with pytest.raises(ValueError, match="unknown adapter names \\['nope'\\]"):
        with fastpeft.mixed_batch(model, ["default", "nope", "a1"]):
            pass
    with pytest.raises(ValueError, match="2 adapter names .* 3 samples"):
        with fastpeft.mixed_batch(model, ["default", "a1"]):
            model(x)
    with pytest.raises(TypeError, match="list of str"):
        with fastpeft.mixed_batch(model, "default"):
            pass
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        fastpeft.set_adapter(model, "zz")
    with pytest.raises(ValueError, match="is active"):
        fastpeft.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="already holds"):
        fastpeft.add_adapter(model, AdapterConfig(r=2), "a1")
    with pytest.raises(ValueError, match="cannot share a layer"):
        fastpeft.add_adapter(model, AdapterConfig(method="adalora", r=2), "ada")
    with pytest.raises(ValueError, match="must be in \\[1"):
        fastpeft.add_adapter(model, AdapterConfig(method="lamda", r=12), "big")   # min(d, k) = 11 on layer 2
    with pytest.raises(ValueError, match="other than '__base__'"):
        fastpeft.load_adapter(model, tmp_path, adapter_name="__base__")
    with fastpeft.mixed_batch(model, ["a1", "__base__", "default"]):
        with pytest.raises(RuntimeError, match="inside a fastpeft.mixed_batch"):
            fastpeft.set_adapter(model, "a1")
    _unchanged(model, snap)


def test_ranks_that_do_not_fit(tmp_path):
    fastpeft.save_adapter(_multi(["lora", "lora"], ranks=(4, 5)), tmp_path / "r5", adapter_name="a1")
    model = _multi(["lora", "lora"], ranks=(4, 3))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="ranks\\) do not fit adapter 'a1'"):
        fastpeft.load_adapter(model, tmp_path / "r5", adapter_name="a1")
    with pytest.raises(ValueError, match="ranks\\) do not fit adapter 'default'"):
        fastpeft.load_adapter(model, tmp_path / "r5")
    small = nn.Sequential(nn.Linear(23, 4), nn.GELU(), nn.Linear(4, 11))
    fastpeft.inject(small, AdapterConfig(r=2))
    snap_small = _snapshot(small)
    with pytest.raises(ValueError, match="does not fit"):
        fastpeft.load_adapter(small, tmp_path / "r5", adapter_name="new")
    fastpeft.save_adapter(fastpeft.inject(_mlp(), AdapterConfig(method="adalora", r=2)), tmp_path / "ada")
    with pytest.raises(ValueError, match="cannot share a layer"):
        fastpeft.load_adapter(model, tmp_path / "ada", adapter_name="ada")
    _unchanged(model, snap)
    _unchanged(small, snap_small)


# -- mixed batches --------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("pair", list(itertools.combinations(PRESETS, 2)) + [("lora", "lora")],
                         ids=lambda p: "-".join(p))
def test_mixed_batch_rows_equal_alone(pair, bias):
    model = _multi(list(pair), bias=bias)
    names = ["a1", "__base__", "default", "a1", "default"] if bias else ["a1", "a1", "default", "__base__"]
    x = torch.randn(len(names), 3, 23)
    with fastpeft.mixed_batch(model, names):
        y = model(x)
    for i, name in enumerate(names):
        assert_close_rel(y[i], _alone(model, name, x[i:i + 1])[0], 1e-5, f"sample {i} ({name})")


def test_mixed_batch_four_presets_one_layer_float64_reference():
    model = _multi(PRESETS)
    layer = model[0]
    names = ["a3", "a1", "default", "__base__", "a2", "a3", "a1"]
    x = torch.randn(len(names), 2, 23)
    with fastpeft.mixed_batch(model, names):
        y = layer(x)
    for i, name in enumerate(names):
        if name == "__base__":
            expected = F.linear(x[i].double(), layer.weight.double(), layer.bias.double())
        else:
            t, s = adapter_tensors_of(layer, name), adapter_settings_of(layer, name)
            expected = reference_lowrank(x[i], layer.weight, layer.bias, t["lora_A"], t["lora_B"],
                                         t["lora_core"], t["lora_out_scale"], s["scale"])
        assert_close_rel(y[i], expected, 1e-5, f"sample {i} ({name})")


def test_mixed_batch_4bit():
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    layer = fastpeft.LowRankLinear4bit.from_linear(nn.Linear(64, 32), AdapterConfig(r=4), blocksize=64)
    model = nn.Sequential(layer)
    model.fastpeft_config = AdapterConfig(r=4)
    fastpeft.add_adapter(model, AdapterConfig(method="lamda", r=6), "b")
    _perturb(model)
    names = ["b", "default", "__base__", "b"]
    x = torch.randn(4, 3, 64, requires_grad=True)
    with fastpeft.mixed_batch(model, names):
        y = model(x)
    y.square().sum().backward()
    w = fastpeft.dequantize_4bit(layer.weight, layer.quant_state)
    for i, name in enumerate(names):
        if name == "__base__":
            expected = F.linear(x[i].double(), w.double(), layer.bias.double())
        else:
            t, s = adapter_tensors_of(layer, name), adapter_settings_of(layer, name)
            expected = reference_lowrank(x[i], w, layer.bias, t["lora_A"], t["lora_B"], t["lora_core"],
                                         t["lora_out_scale"], s["scale"])
        assert_close_rel(y[i], expected, 1e-5, f"sample {i} ({name})")
    assert x.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("names", [["a1", "default", "__base__", "a1"], ["__base__", "a1", "a1", "default"]],
                         ids=["scattered", "grouped"])   # grouped: the rows with an adapter are one run
def test_mixed_batch_gradients_per_adapter(names):
    model = _multi(["lora", "lamda"])
    x = torch.randn(4, 3, 23)
    target = torch.randn(4, 3, 11)
    params = [p for p in model.parameters() if p.requires_grad]
    with fastpeft.mixed_batch(model, names):
        F.mse_loss(model(x), target, reduction="sum").backward()
    mixed = {id(p): p.grad.clone() for p in params}
    for p in params:
        p.grad = None
    for i, name in enumerate(names):           # each sample alone, gradients accumulated
        if name != "__base__":
            F.mse_loss(_alone(model, name, x[i:i + 1]), target[i:i + 1], reduction="sum").backward()
    for p in params:
        assert_close_rel(mixed[id(p)], p.grad, 1e-5, f"gradient of a {tuple(p.shape)} parameter")
    # an adapter without samples gets no gradient
    fastpeft.set_adapter(model, "default")
    for p in params:
        p.grad = None
    with fastpeft.mixed_batch(model, ["default", "__base__"]):
        model(x[:2]).sum().backward()
    assert model[0].lora_slots["a1"].lora_B.grad is None
    assert model[0].lora_B.grad is not None


def test_mixed_op_gradcheck_with_dropout():
    torch.manual_seed(0)
    d, k = 7, 9
    x = torch.randn(4, 2, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, k, dtype=torch.float64)
    bias = torch.randn(d, dtype=torch.float64, requires_grad=True)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    a1 = MixedAdapter(mk(3, k), mk(d, 3), mk(3, 3), None, 0.5, 0.3, "gelu")
    a2 = MixedAdapter(mk(2, k), mk(d, 2), mk(2), mk(d), 1.5, 0.0, None)
    a3 = MixedAdapter(mk(5, k), mk(d, 5), None, None, 2.0, 0.2, None)

    def fn(x, bias, *t):
        ads = [MixedAdapter(*t[0:4], 0.5, 0.3, "gelu"), MixedAdapter(*t[4:8], 1.5, 0.0, None),
               MixedAdapter(t[8], t[9], None, None, 2.0, 0.2, None)]
        return lowrank_linear_mixed(x, w, bias, ads, [2, 0, -1, 1], seed=1234)

    inputs = (x, bias, *a1[:4], *a2[:4], a3.lora_A, a3.lora_B)
    assert torch.autograd.gradcheck(fn, inputs)


def test_mixed_op_bad_input():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    a = MixedAdapter(torch.randn(2, 8), torch.randn(5, 2))
    with pytest.raises(ValueError, match="one adapter per sample: got 2 for a batch of 3"):
        lowrank_linear_mixed(x, w, None, [a], [0, -1])
    with pytest.raises(ValueError, match="entries must be in \\[-1, 0\\]"):
        lowrank_linear_mixed(x, w, None, [a], [0, 1, -1])
    with pytest.raises(ValueError, match="lora_B must have shape \\[d=5, r=2\\]"):
        lowrank_linear_mixed(x, w, None, [a._replace(lora_B=torch.randn(5, 3))], [0, 0, 0])
    with pytest.raises(ValueError, match="batch dimension"):
        lowrank_linear_mixed(x[0], w, None, [a], [0])


# adapters of one rank and kind run as batched products over their samples gathered into one
# grid (padded to the largest count, padding slots scattered to a row past the batch)
_GRIDS = {"balanced": [0, 1, 2, 0, 1, 2], "padded": [1, 0, 0, -1, 2, 0, 1, 2, 0],
          "consecutive": [0, 0, 1, 1, 2, 2, -1], "base-and-missing": [3, 0, -1, 2, 3, 0, 2, -1]}


def _same_kind_adapters(kind, d, k, gen):
    """Four adapters of rank 6 (index 3: an adapter the layer lacks when used), other scales."""
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    out = []
    for i, scale in enumerate((0.5, 2.0, 0.5, 1.0)):
        core = {"plain": None, "vera": rnd(6), "lamda": rnd(6, 6) * 0.4, "gelu": None}[kind]
        out.append(MixedAdapter(rnd(6, k) * k ** -0.5, rnd(d, 6), core, rnd(d) if kind == "vera" else None,
                                scale if kind != "plain" else 1.5, 0.0, "gelu" if kind == "gelu" else None))
    return out


@pytest.mark.parametrize("kind", ["plain", "vera", "lamda", "gelu"])
@pytest.mark.parametrize("grid", list(_GRIDS), ids=list(_GRIDS))
def test_batched_adapters_equal_float64_forward_and_gradients(kind, grid):
    from fastpeft.ops.lowrank_mixed import MixedRows

    samples = _GRIDS[grid]
    gen = torch.Generator().manual_seed(len(samples))
    d, k, rows = 13, 21, 3
    ads64 = _same_kind_adapters(kind, d, k, gen)
    if grid == "base-and-missing":
        ads64[1] = None                                     # the layer lacks adapter 1
    x64 = torch.randn(len(samples), rows, k, generator=gen, dtype=torch.float64)
    w64, b64 = torch.randn(d, k, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen,
                                                                                   dtype=torch.float64)
    plan = MixedRows(samples, len(ads64))
    live = tuple(i for i, a in enumerate(ads64) if a is not None and plan.samples_of[i])
    assert plan.stacked(live, "cpu") is not None            # the batched path runs
    leaves = lambda a, dtype: None if a is None else a._replace(**{
        f: None if getattr(a, f) is None else getattr(a, f).detach().to(dtype).requires_grad_()
        for f in ("lora_A", "lora_B", "core", "out_scale")})
    ads = [leaves(a, torch.float32) for a in ads64]
    x = x64.float().requires_grad_()
    y = lowrank_linear_mixed(x, w64.float(), b64.float(), ads, plan)
    ref64 = [leaves(a, torch.float64) for a in ads64]
    xr = x64.clone().requires_grad_()
    rows_out = []
    for i, a_idx in enumerate(samples):
        a = None if a_idx < 0 else ref64[a_idx]
        if a is None:
            rows_out.append(F.linear(xr[i], w64, b64))
        else:
            rows_out.append(reference_lowrank(xr[i], w64, b64, a.lora_A, a.lora_B, a.core, a.out_scale, a.scale,
                                              activation=a.activation))
    expected = torch.stack(rows_out)
    assert_close_rel(y, expected, 1e-5, "Y")
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(g.float())
    expected.backward(g)
    assert_close_rel(x.grad, xr.grad, 1e-5, "dX")
    for i, (a, r) in enumerate(zip(ads, ref64)):
        for f in ("lora_A", "lora_B", "core", "out_scale"):
            mine, ref = (None, None) if a is None else (getattr(a, f), getattr(r, f))
            if mine is None:
                continue
            if ref.grad is None:                           # an adapter without samples: no gradient
                assert mine.grad is None or not mine.grad.any(), f"adapter {i} {f}"
            else:
                assert_close_rel(mine.grad, ref.grad, 1e-5, f"d{f} of adapter {i}")


def test_batched_path_keeps_the_caller_tensors_and_returns_contiguous_rows():
    from fastpeft.ops.lowrank_mixed import MixedRows

    gen = torch.Generator().manual_seed(3)
    ads = [a._replace(lora_A=a.lora_A.float(), lora_B=a.lora_B.float())
           for a in _same_kind_adapters("plain", 8, 10, gen)]
    x = torch.randn(5, 2, 10, generator=gen)
    w = torch.randn(8, 10, generator=gen)
    before = x.clone()
    y = lowrank_linear_mixed(x, w, None, ads, MixedRows([0, 1, 0, 0, 2], 4))   # padded: a row past the batch
    assert torch.equal(x, before)
    assert y.shape == (5, 2, 8) and y.is_contiguous()
    assert torch.equal(y[1], lowrank_linear_mixed(x[1:2], w, None, ads, [1])[0])
    kept = y.clone()                                   # the next call reuses the scratch, not y
    lowrank_linear_mixed(torch.randn(5, 2, 10, generator=gen), w, None, ads, MixedRows([2, 1, 0, 0, 2], 4))
    assert torch.equal(y, kept)


def test_mixed_batch_memory_contract():
    """Frozen A (lamda): nothing of size M×k is kept, as in the one-adapter op."""
    from helpers import saved_tensors

    model = _multi(["lamda", "vera"])
    x = torch.randn(6, 4, 23, requires_grad=True)
    with saved_tensors() as saved, fastpeft.mixed_batch(model, ["a1", "default"] * 3):
        model[0](x)
    big = [t for t in saved.tensors if t.numel() >= x.numel()]
    assert not big, [tuple(t.shape) for t in big]


# -- hot swap: no recompilation ------------------------------------------------------------------

def test_hot_swap_does_not_recompile(tmp_path):
    from torch._dynamo.testing import CompileCounter

    model = fastpeft.inject(_mlp(), AdapterConfig(r=4, alpha=8))
    fastpeft.add_adapter(model, AdapterConfig(r=4, alpha=8), "a1")   # same shapes and settings
    _perturb(model)
    fastpeft.save_adapter(model, tmp_path / "a1", adapter_name="a1")
    x = torch.randn(3, 23)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    y_default = compiled(x)
    assert counter.frame_count == 1
    fastpeft.set_adapter(model, "a1")                      # switch
    y_a1 = compiled(x)
    fastpeft.set_adapter(model, "default")
    with torch.no_grad():
        model[0].lora_B.mul_(-1.0)                         # weights changed in place
    y_changed = compiled(x)
    fastpeft.load_adapter(model, tmp_path / "a1", adapter_name="default")   # reload a slot
    y_reloaded = compiled(x)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations"
    fastpeft.set_adapter(model, "a1")
    assert_close_rel(y_a1, model(x), 1e-6)
    assert_close_rel(y_reloaded, model(x), 1e-6)
    assert (y_a1 - y_default).abs().max() > 1e-3 and (y_changed - y_default).abs().max() > 1e-3
    assert counter.frame_count == 1


# -- HF PEFT: several adapters carried over, mixed batches equal to PEFT's ------------------------

def test_from_peft_keeps_every_adapter_and_matches_peft_mixed_batches():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _mlp()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    model.add_adapter("b", peft.LoraConfig(r=6, lora_alpha=3, target_modules=["2"]))
    model.add_adapter("c", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_rslora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.eval()
    names = ["b", "__base__", "default", "c", "b", "default"]
    x = torch.randn(len(names), 3, 23)
    with torch.no_grad():
        expected = model(x, adapter_names=names)
        alone_c = model(x, adapter_names=["c"] * len(names))
    inner = fastpeft.from_peft(model)
    assert fastpeft.list_adapters(inner) == ["default", "b", "c"]
    assert fastpeft.active_adapter(inner) == "default"
    with torch.no_grad(), fastpeft.mixed_batch(inner, names):
        got = inner(x)
    assert_close_rel(got, expected, 1e-5, "mixed batch vs PEFT")
    fastpeft.set_adapter(inner, "c")                     # layer "2" has no "c": it runs its base
    with torch.no_grad():
        assert_close_rel(inner(x), alone_c, 1e-5, "adapter c vs PEFT")


def test_merge_and_to_peft_take_the_active_adapters_layers_only(tmp_path):
    model = fastpeft.inject(_mlp(), AdapterConfig(r=4))
    fastpeft.add_adapter(model, AdapterConfig(r=2, target_modules=["2"]), "head")
    _perturb(model)
    fastpeft.set_adapter(model, "head")                  # layer 0 runs its base
    x = torch.randn(3, 23)
    before = model(x)
    w0 = model[0].weight.clone()
    fastpeft.merge(model)
    assert not model[0].merged and model[2].merged and torch.equal(model[0].weight, w0)
    assert_close_rel(model(x), before, 1e-5)
    fastpeft.unmerge(model)
    pytest.importorskip("peft")
    fastpeft.to_peft(model, tmp_path)
    from safetensors.torch import load_file
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all(".2." in k or k.startswith("base_model.model.2.") for k in keys), keys


def test_switching_adapters_of_other_scales_and_ranks_settles():
    """Adapters that differ in alpha or rank: torch.compile generalises once per differing value
    (the scale becomes a symbolic float, the rank a dynamic dim), then switching never recompiles;
    every output equals eager."""
    from torch._dynamo.testing import CompileCounter

    model = fastpeft.inject(_mlp(), AdapterConfig(r=4, alpha=8))
    fastpeft.add_adapter(model, AdapterConfig(r=4, alpha=3), "b")
    fastpeft.add_adapter(model, AdapterConfig(r=6, alpha=6), "c")
    _perturb(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(3, 23)
    for name in ["default", "b", "c"]:
        fastpeft.set_adapter(model, name)
        assert_close_rel(compiled(x), model(x), 1e-6, name)
    settled = counter.frame_count
    assert settled <= 3
    for name in ["b", "default", "c", "default", "b"]:
        fastpeft.set_adapter(model, name)
        assert_close_rel(compiled(x), model(x), 1e-6, name)
    assert counter.frame_count == settled, f"recompiled after settling: {counter.frame_count} > {settled}"

"""Hostile and random input: property-based comparison with the float64 reference, deterministic
mode, NaN/Inf propagation, safetensors-only adapter files, byte-identical save cycles, and loads
that fail cleanly."""

import os
import pickle

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import AdapterConfig, LowRankLinear
from fastpeft.ops.lowrank import dropout_keep_mask_torch
from helpers import TOLERANCES, assert_close_rel, reference_lowrank

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

# preset → (A trains, core, out_scale, activation), as in fastpeft.config.METHODS
PRESETS = {
    "lora": (True, None, False, None),
    "lora_fa": (False, None, False, None),
    "lamda": (False, "full", False, None),
    "vera": (False, "diag", True, None),
    "adalora": (True, "diag", False, None),
    "parallel-relu": (True, None, False, "relu"),
    "parallel-gelu": (True, None, False, "gelu"),
    "parallel-silu": (True, "full", True, "silu"),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@st.composite
def op_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    k, d = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    r = draw(st.integers(1, 16))
    return dict(lead=lead, k=k, d=d, r=r, dtype=draw(st.sampled_from(DTYPES)),
                preset=draw(st.sampled_from(sorted(PRESETS))),
                dropout_p=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9])),
                bias=draw(st.sampled_from([None, "frozen", "trainable"])),
                scale=draw(st.sampled_from([1.0, 0.5, 2.0, 1 / 3])),
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(case=op_cases())
def test_random_cases_match_float64_reference(case):
    lead, k, d, r, dtype = case["lead"], case["k"], case["d"], case["r"], case["dtype"]
    train_a, core_kind, with_os, activation = PRESETS[case["preset"]]
    gen = torch.Generator().manual_seed(case["seed"])
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x = rnd(*lead, k).to(dtype).requires_grad_()
    weight = (rnd(d, k) / k ** 0.5).to(dtype)
    bias = None if case["bias"] is None else rnd(d).to(dtype).requires_grad_(case["bias"] == "trainable")
    lora_a = (rnd(r, k) / k ** 0.5).to(dtype).requires_grad_(train_a)
    lora_b = (rnd(d, r) / r ** 0.5).to(dtype).requires_grad_()
    core = {None: None, "diag": rnd(r), "full": rnd(r, r) / r ** 0.5}[core_kind]
    core = None if core is None else core.to(dtype).requires_grad_()
    out_scale = rnd(d).to(dtype).requires_grad_() if with_os else None
    p, seed = case["dropout_p"], case["seed"]

    y = fastpeft.lowrank_linear(x, weight, bias, lora_a, lora_b, core=core, out_scale=out_scale,
                                scale=case["scale"], dropout_p=p, activation=activation, seed=seed)
    m = x.numel() // k
    keep = dropout_keep_mask_torch(seed & 0x7FFFFFFF, m, k, p, "cpu") if p else None
    ref = reference_lowrank(x, weight, bias, lora_a, lora_b, core, out_scale, case["scale"], keep, p,
                            activation)
    tol, grad_tol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == (*lead, d)
    assert_close_rel(y, ref, tol, f"y {case}")
    named = [(n, t) for n, t in [("x", x), ("bias", bias), ("A", lora_a), ("B", lora_b), ("core", core),
                                  ("out_scale", out_scale)] if t is not None and t.requires_grad]
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(y, [t for _, t in named], grad)
    want = torch.autograd.grad(ref, [t for _, t in named], grad.double())
    for (name, _), g, e in zip(named, got, want):
        assert g.dtype == dtype
        assert_close_rel(g, e, grad_tol, f"d{name} {case}")


# -- deterministic mode ---------------------------------------------------------------------

@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _llama(seed=0, hidden=32):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                   mlp_bias=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["lora", "lamda", "vera", "adalora"])
def test_deterministic_mode_identical_runs(deterministic, method):
    def run():
        model = fastpeft.inject(_llama(), AdapterConfig(method=method, r=4, dropout=0.1, target_modules=TARGETS))
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(123)  # dropout seeds come from torch's generator
        for _ in range(2):
            opt.zero_grad()
            loss = model(input_ids=IDS, labels=IDS).loss
            loss.backward()
            opt.step()
        return loss.detach(), fastpeft.adapter_state_dict(model)

    (loss1, state1), (loss2, state2) = run(), run()
    assert torch.equal(loss1, loss2)
    assert state1.keys() == state2.keys() and all(torch.equal(state1[k], state2[k]) for k in state1)


def test_deterministic_flag_reaches_the_backward_op(deterministic, monkeypatch):
    import fastpeft.ops.lowrank as op_module

    seen = []
    real = op_module._lowrank_bwd      # the backward op's entry (custom op when traced)

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(op_module, "_lowrank_bwd", spy)
    # eager calls of the torch backend skip the op boundary (its ops take no such flag); traced
    # calls and the kernel backends cross it
    monkeypatch.setattr(op_module._backend, "plain_eager", lambda first: False)
    x = torch.randn(4, 8, requires_grad=True)
    fastpeft.lowrank_linear(x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2)).sum().backward()
    assert seen == [True]


# -- NaN / Inf ------------------------------------------------------------------------------

def _op_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    return dict(x=rnd(6, 10), weight=rnd(7, 10), bias=rnd(7), lora_A=rnd(3, 10), lora_B=rnd(7, 3),
                core=rnd(3, 3), out_scale=rnd(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["x", "weight", "bias", "lora_A", "lora_B", "core", "out_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_nonfinite_inputs_propagate(dtype, where, value, dropout_p):
    t = _op_inputs(dtype)
    t[where].view(-1)[1] = value  # one poisoned element
    leaves = {n: v.clone().requires_grad_() for n, v in t.items() if n != "weight"}
    y = fastpeft.lowrank_linear(leaves["x"], t["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                                core=leaves["core"], out_scale=leaves["out_scale"], scale=0.5,
                                dropout_p=dropout_p, seed=11)
    keep = dropout_keep_mask_torch(11, 6, 10, dropout_p, "cpu") if dropout_p else None
    ref_leaves = {n: v.detach().clone().requires_grad_() for n, v in leaves.items()}
    ref = reference_lowrank(ref_leaves["x"], t["weight"], ref_leaves["bias"], ref_leaves["lora_A"],
                            ref_leaves["lora_B"], ref_leaves["core"], ref_leaves["out_scale"], 0.5, keep,
                            dropout_p)
    assert not torch.isfinite(y).all()
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref)), f"non-finite pattern differs ({where})"
    grad = torch.ones_like(y)
    names = sorted(leaves)
    got = torch.autograd.grad(y, [leaves[n] for n in names], grad)
    want = torch.autograd.grad(ref, [ref_leaves[n] for n in names], grad.double())
    for n, g, e in zip(names, got, want):
        assert torch.equal(torch.isfinite(g), torch.isfinite(e)), f"d{n}: non-finite pattern differs ({where})"


def test_dropped_nan_is_not_zeroed_in_the_adapter_branch():
    """A NaN that dropout drops still poisons T = D(X)Aᵀ (x·0 is NaN): never masked to 0."""
    t = _op_inputs()
    keep = dropout_keep_mask_torch(3, 6, 10, 0.5, "cpu")
    row, col = map(int, torch.nonzero(~keep)[0])
    x = t["x"].clone()
    x[row, col] = float("nan")
    y, tt = torch.ops.fastpeft.lowrank_fwd(x, t["weight"], None, t["lora_A"], t["lora_B"], None, None, 1.0,
                                           0.5, torch.tensor(3), None, "torch")
    assert torch.isnan(tt[row]).all() and torch.isfinite(tt[torch.arange(6) != row]).all()
    assert torch.isnan(y[row]).all()


def test_merge_keeps_nonfinite():
    layer = LowRankLinear.from_linear(nn.Linear(8, 6), AdapterConfig(method="lora", r=2))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A[0, 3] = float("nan")
    layer.merge()
    assert torch.isnan(layer.weight[:, 3]).all() and torch.isfinite(layer.weight[:, :3]).all()


# -- adapter files: safetensors only, never unpickled, byte-identical cycles -------------------

def _trained(config, seed=0, ranks=None):
    model = fastpeft.inject(_llama(seed), config, ranks=ranks)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    return model.eval()


def _refuse_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an adapter load unpickled something")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)


CONFIGS = {
    "lora": AdapterConfig(method="lora", r=4, alpha=8, target_modules=TARGETS),
    "lamda": AdapterConfig(method="lamda", r=4, target_modules=TARGETS, train_bias=True),
    "vera": AdapterConfig(method="vera", r=4, target_modules=TARGETS),
    "adalora": AdapterConfig(method="adalora", r=4, target_modules=TARGETS),
    "parallel": AdapterConfig(method="parallel", r=4, target_modules=TARGETS, activation="gelu"),
    "bitfit": AdapterConfig(method="bitfit", target_modules=TARGETS),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_save_byte_identical_without_unpickling(tmp_path, monkeypatch, name):
    ranks = {"model.layers.1.mlp.up_proj": 2} if name == "lamda" else None
    model = _trained(CONFIGS[name], ranks=ranks)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    fastpeft.save_adapter(model, tmp_path / "a")
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == ["fastpeft_adapter.safetensors", "fastpeft_config.json"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "fastpeft_adapter.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0

    _refuse_unpickling(monkeypatch)
    fresh = _llama().eval()  # same base weights
    fastpeft.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, want, rtol=0, atol=0)
    fastpeft.save_adapter(fresh, tmp_path / "b")
    fastpeft.load_adapter(fresh, tmp_path / "b")   # loading into an adapted model, then again
    fastpeft.save_adapter(fresh, tmp_path / "c")
    for f in files:
        data = (tmp_path / "a" / f).read_bytes()
        assert data == (tmp_path / "b" / f).read_bytes() == (tmp_path / "c" / f).read_bytes(), f


def test_to_peft_file_loads_without_unpickling(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    model = _trained(CONFIGS["lamda"])
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    fastpeft.to_peft(model, tmp_path)
    _refuse_unpickling(monkeypatch)
    back = peft.PeftModel.from_pretrained(_llama(), tmp_path).eval()
    with torch.no_grad():
        assert (back(input_ids=IDS).logits - want).abs().max() <= 1e-6


def test_pickle_files_are_not_read(tmp_path, monkeypatch):
    model = _trained(CONFIGS["lora"])
    fastpeft.save_adapter(model, tmp_path)
    os.remove(tmp_path / "fastpeft_adapter.safetensors")
    torch.save(fastpeft.adapter_state_dict(model), tmp_path / "fastpeft_adapter.bin")
    _refuse_unpickling(monkeypatch)
    with pytest.raises(FileNotFoundError, match="fastpeft_adapter.safetensors"):
        fastpeft.load_adapter(_llama(), tmp_path)


# -- mismatching adapters fail with a message and change nothing ------------------------------

def _state(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()},
            getattr(model, "fastpeft_config", None))


def _assert_same(model, before):
    modules, params, buffers, config = _state(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for n, (value, flag, ptr) in params.items():
        v0, f0, p0 = before[1][n]
        assert torch.equal(value, v0) and flag == f0 and ptr == p0, n
    assert buffers.keys() == before[2].keys() and all(torch.equal(buffers[n], before[2][n]) for n in buffers)
    assert config == before[3]


def _tamper(src, dst, edit):
    """Copy an adapter folder, editing its tensors with ``edit(dict)``."""
    from safetensors.torch import load_file, save_file
    os.makedirs(dst)
    tensors = edit(load_file(os.path.join(src, "fastpeft_adapter.safetensors")))
    save_file(tensors, os.path.join(dst, "fastpeft_adapter.safetensors"))
    with open(os.path.join(src, "fastpeft_config.json")) as f, open(os.path.join(dst, "fastpeft_config.json"), "w") as g:
        g.write(f.read())
    return dst


def _one_wrong_shape(tensors):
    key = "model.layers.1.mlp.down_proj.lora_A"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    return tensors


def _renamed(tensors):
    key = "model.layers.1.mlp.down_proj.lora_B"
    tensors["model.layers.1.mlp.nope.lora_B"] = tensors.pop(key)
    return tensors


def _extra(tensors):
    tensors["model.layers.0.self_attn.k_proj.lora_A"] = torch.zeros(4, 32)
    return tensors


def _missing(tensors):
    tensors.pop("model.layers.0.self_attn.q_proj.lora_B")
    return tensors


@pytest.mark.parametrize("edit", [_one_wrong_shape, _renamed, _extra, _missing], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("target", ["fresh", "adapted", "wider"])
def test_mismatching_adapter_fails_and_leaves_model_unchanged(tmp_path, edit, target):
    model = _trained(CONFIGS["lora"])
    fastpeft.save_adapter(model, tmp_path / "good")
    bad = _tamper(tmp_path / "good", tmp_path / "bad", edit)
    if target == "fresh":
        victim = _llama(seed=1)
    elif target == "adapted":
        victim = fastpeft.inject(_llama(seed=1), CONFIGS["lora"])
    else:
        victim = _llama(seed=1, hidden=48)
    before = _state(victim)
    with pytest.raises((ValueError, KeyError), match="match|fit"):
        fastpeft.load_adapter(victim, bad)
    _assert_same(victim, before)
    if target == "wider":  # even the untampered adapter does not fit a wider model
        with pytest.raises(ValueError, match="match|fit"):
            fastpeft.load_adapter(victim, tmp_path / "good")
        _assert_same(victim, before)

"""DoRA (method="dora"): the torch path against float64 and gradcheck, equality with HF PEFT's
DoRA layer (dense and bitsandbytes 4-bit), merging, saving, bad input."""

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.ops.dora import dora_linear, dora_norm
from helpers import assert_close_rel, peft_layer

K, D, R = 48, 36, 6


def _reference(x, w, bias, a, b, m, s):
    """DoRA in float64 as PEFT writes it: W + s·B·A formed, its row norms detached."""
    w64, a64, b64 = w.double(), a.double(), b.double()
    n = torch.linalg.norm(w64 + s * b64 @ a64, dim=1).detach()
    z = x.double() @ w64.t() + s * (x.double() @ a64.t()) @ b64.t()
    y = (m.double() / n) * z
    return y if bias is None else y + bias.double()


def _dora_layer(k=K, d=D, r=R, alpha=12, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    base = nn.Linear(k, d, bias=bias, dtype=dtype)
    layer = fastpeft.LowRankLinear.from_linear(base, fastpeft.AdapterConfig(method="dora", r=r, alpha=alpha))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.rand(d, dtype=dtype) + 0.5)
    return layer


def test_preset_parameters_and_start():
    layer = _dora_layer()
    with torch.no_grad():
        layer.lora_B.zero_()
    fresh = fastpeft.LowRankLinear.from_linear(nn.Linear(K, D), fastpeft.AdapterConfig(method="dora", r=R))
    assert fresh.lora_magnitude.shape == (D,) and fresh.lora_magnitude.requires_grad
    assert fresh.lora_A.requires_grad and fresh.lora_B.requires_grad and not fresh.weight.requires_grad
    assert_close_rel(fresh.lora_magnitude, torch.linalg.norm(fresh.weight, dim=1), 1e-6, "m = ‖W_j‖")
    x = torch.randn(4, K)
    assert_close_rel(fresh(x), nn.functional.linear(x, fresh.weight, fresh.bias), 1e-6, "starts as the base")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, K), (3, 5, K)], ids=["M1", "3d"])
def test_torch_path_matches_float64(bias, shape):
    layer = _dora_layer(bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude] + ([layer.bias] if bias else [])
    if bias:
        layer.bias.requires_grad_(True)
    y = layer(x)
    want = _reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scale)
    assert_close_rel(y, want, 1e-5, "y")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], g)
    exp = torch.autograd.grad(want, [x, *params], g.double())
    for name, a, e in zip(["dx", "dA", "dB", "dm", "db"], got, exp):
        assert_close_rel(a, e, 1e-5, name)


def test_gradcheck_torch_path():
    torch.manual_seed(0)
    k, d, r = 7, 5, 3
    x = torch.randn(4, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, k, dtype=torch.float64)
    bias = torch.randn(d, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, r, dtype=torch.float64, requires_grad=True)
    m = torch.rand(d, dtype=torch.float64, requires_grad=True)
    with fastpeft.use_backend("torch"):
        # n is a constant of backward: gradcheck compares against finite differences of the
        # function whose n is held at its value for the current A and B
        norm = dora_norm(w, a, b, 0.7)
        assert torch.autograd.gradcheck(
            lambda x, bias, a, b, m: dora_linear(x, w, bias, a, b, m, scale=0.7, norm=norm), (x, bias, a, b, m))


def test_norm_identity_matches_formed_norm():
    torch.manual_seed(1)
    w, a, b = torch.randn(77, 123, dtype=torch.float64), torch.randn(12, 123, dtype=torch.float64), \
        torch.randn(77, 12, dtype=torch.float64)
    with fastpeft.use_backend("torch"):
        assert_close_rel(dora_norm(w, a, b, 0.3), torch.linalg.norm(w + 0.3 * b @ a, dim=1), 1e-6, "n")


# -- bad input and edge cases ------------------------------------------------------------------

def test_magnitude_of_wrong_shape_is_refused():
    x, w, a, b = torch.randn(2, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"magnitude must have shape \[d=6\]"):
        dora_linear(x, w, None, a, b, torch.ones(5))
    with pytest.raises(TypeError, match="magnitude must be a torch.Tensor"):
        dora_linear(x, w, None, a, b, [1.0] * 6)
    with pytest.raises(TypeError, match="floating-point"):
        dora_linear(x, w, None, a, b, torch.ones(6, dtype=torch.int64))
    layer = _dora_layer()
    with pytest.raises(ValueError, match="linear adapter"):
        fastpeft.LowRankLinear.from_linear(nn.Linear(8, 6), fastpeft.AdapterConfig(method="dora", r=2,
                                                                                   activation="relu"))
    assert layer.lora_magnitude.shape == (D,)


def test_zero_norm_rows_give_the_bias():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    w[2] = 0.0                                  # a zero row of W + s·B·A (B row 2 is zero)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    b[2] = 0.0
    bias = torch.randn(6)
    m = torch.rand(6, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)
    y = dora_linear(x, w, bias, a, b, m, scale=0.5)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 2], bias[2].expand(3))
    y.sum().backward()
    assert torch.isfinite(m.grad).all() and m.grad[2] == 0 and torch.isfinite(x.grad).all()


# -- HF PEFT's DoRA layer ------------------------------------------------------------------------

def _copy_from_peft(ref, ours):
    with torch.no_grad():
        ours.lora_A.copy_(ref.lora_A["default"].weight)
        ours.lora_B.copy_(ref.lora_B["default"].weight)
        ours.lora_magnitude.copy_(ref.lora_magnitude_vector["default"].weight)


def _peft_params(ref):
    return [ref.lora_A["default"].weight, ref.lora_B["default"].weight, ref.lora_magnitude_vector["default"].weight]


def _peft_dora(base_like, bias=True):
    pytest.importorskip("peft")
    ref = peft_layer(base_like, "lora", r=R, lora_alpha=12, lora_dropout=0.0, use_dora=True)
    with torch.no_grad():
        ref.lora_B["default"].weight.normal_()
        ref.lora_magnitude_vector["default"].weight.mul_(torch.rand(D) + 0.5)
    return ref


@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_and_one_step(bias):
    torch.manual_seed(0)
    base = nn.Linear(K, D, bias=bias)
    ref = _peft_dora(nn.Linear(K, D, bias=bias))
    ref.base_layer.load_state_dict(base.state_dict())
    ours = fastpeft.LowRankLinear.from_linear(base, fastpeft.AdapterConfig(method="dora", r=R, alpha=12))
    _copy_from_peft(ref, ours)
    x = torch.randn(3, 7, K)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), ours(x2)
    assert_close_rel(y, y_ref, 1e-5, "y")
    g = torch.randn_like(y)
    ours_p = [ours.lora_A, ours.lora_B, ours.lora_magnitude]
    got = torch.autograd.grad(y, [x2, *ours_p], g)
    want = torch.autograd.grad(y_ref, [x1, *_peft_params(ref)], g)
    for name, a, e in zip(["dx", "dA", "dB", "dm"], got, want):
        assert_close_rel(a, e, 1e-5, name)
    # one AdamW step on each: the same parameters and outputs afterwards
    opt_ref = torch.optim.AdamW(_peft_params(ref), lr=1e-2)
    opt = torch.optim.AdamW(ours_p, lr=1e-2)
    for o, model, xx in ((opt_ref, ref, x1), (opt, ours, x2)):
        o.zero_grad()
        (model(xx) * g).sum().backward()
        o.step()
    for name, a, e in zip(["A", "B", "m"], ours_p, _peft_params(ref)):
        assert_close_rel(a, e, 1e-5, name)
    with torch.no_grad():
        assert_close_rel(ours(x), ref(x), 1e-5, "y after one step")


def test_merge_unmerge_match_peft():
    torch.manual_seed(0)
    base = nn.Linear(K, D)
    ref = _peft_dora(nn.Linear(K, D))
    ref.base_layer.load_state_dict(base.state_dict())
    ours = fastpeft.LowRankLinear.from_linear(base, fastpeft.AdapterConfig(method="dora", r=R, alpha=12))
    _copy_from_peft(ref, ours)
    w0 = ours.weight.detach().clone()
    x = torch.randn(5, K)
    with torch.no_grad():
        y = ours(x)
        ref.merge()
        ours.merge()
        assert_close_rel(ours.weight, ref.base_layer.weight, 1e-6, "merged W")
        assert_close_rel(ours(x), y, 1e-5, "merged y")
        ours.unmerge()
        assert_close_rel(ours.weight, w0, 1e-6, "unmerged W")
        assert_close_rel(ours(x), y, 1e-6, "unmerged y")


def test_inject_save_load(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    model = fastpeft.inject(make(), fastpeft.AdapterConfig(method="dora", r=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
            layer.lora_magnitude.mul_(1.5)
    assert "0.lora_magnitude" in fastpeft.adapter_state_dict(model)
    fastpeft.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = make()
    fastpeft.load_adapter(fresh, tmp_path)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("backend,M", [("torch", 3), ("triton", 3), ("triton", 40)],
                         ids=["torch", "triton-decode", "triton-gemm"])
def test_4bit_matches_peft_qdora(backend, M):
    """Equal to PEFT's DoRA layer on a bitsandbytes Linear4bit: the torch path, and the fused
    Triton kernels (the decode kernel at M <= 16, the 4-bit GEMM above it, with the row scale and
    the bias in their epilogue)."""
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        dense = nn.Linear(64, 32)
        q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type=quant_type)
        q.load_state_dict(dense.state_dict())
        q = q.to("cpu")
        ref = peft_layer(q, "lora", r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True)
        with torch.no_grad():
            ref.lora_B["default"].weight.normal_()
            ref.lora_magnitude_vector["default"].weight.mul_(torch.rand(32) + 0.5)
        ours = fastpeft.LowRankLinear4bit.from_bnb(q, fastpeft.AdapterConfig(method="dora", r=4, alpha=8))
        _copy_from_peft(ref, ours)
        x = torch.randn(M, 64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours.bias.requires_grad_(True)
        ref.base_layer.bias.requires_grad_(True)
        with fastpeft.use_backend(backend):
            y_ref, y = ref(x1), ours(x2)
            assert_close_rel(y, y_ref, 1e-5, f"{quant_type} y")
            g = torch.randn_like(y)
            got = torch.autograd.grad(y, [x2, ours.lora_A, ours.lora_B, ours.lora_magnitude, ours.bias], g)
        want = torch.autograd.grad(y_ref, [x1, *_peft_params(ref), ref.base_layer.bias], g)
        for name, a, e in zip(["dx", "dA", "dB", "dm", "db"], got, want):
            assert_close_rel(a, e, 1e-5, f"{quant_type} {name}")
        # to_linear merges DoRA exactly
        with torch.no_grad():
            assert_close_rel(ours.to_linear()(x), y, 1e-5, f"{quant_type} to_linear")


def test_compiles_without_graph_break_and_opcheck():
    layer = _dora_layer()
    x = torch.randn(3, K, requires_grad=True)
    with fastpeft.use_backend("torch"):
        y0 = layer(x)
        g0 = torch.autograd.grad(y0.sum(), [x, layer.lora_A, layer.lora_magnitude])
        compiled = torch.compile(layer, fullgraph=True)
        y1 = compiled(x)
        g1 = torch.autograd.grad(y1.sum(), [x, layer.lora_A, layer.lora_magnitude])
    assert_close_rel(y1, y0, 1e-6, "compiled y")
    for a, b in zip(g1, g0):
        assert_close_rel(a, b, 1e-6, "compiled grad")
    args = (x.detach(), layer.weight, layer.bias, layer.lora_A.detach(), layer.lora_B.detach(),
            torch.rand(D), 1.0, 0.1, torch.tensor(3), True, "torch")
    torch.library.opcheck(torch.ops.fastpeft.dora_fwd.default, args)


def test_4bit_ops_opcheck():
    """The QDoRA forward op and the 4-bit backward op with the row scale pass opcheck."""
    from fastpeft.ops.lowrank_4bit import _state_meta, _state_tensors

    gen = torch.Generator().manual_seed(2)
    packed, state = fastpeft.quantize_4bit(torch.randn(D, K, generator=gen), blocksize=32)
    weight = (packed, *_state_tensors(state), *_state_meta(state))
    x, a, b = torch.randn(5, K, generator=gen), torch.randn(R, K, generator=gen), torch.randn(D, R, generator=gen)
    bias, c = torch.randn(D, generator=gen), torch.rand(D, generator=gen) + 0.5
    for store_z in (True, False):
        fwd = (x, *weight, bias, a, b, c, 0.5, 0.1, torch.tensor(3), store_z, "torch")
        torch.library.opcheck(torch.ops.fastpeft.dora_4bit_fwd.default, fwd)
    _, t, _ = torch.ops.fastpeft.dora_4bit_fwd(*fwd)
    grad_y = torch.randn(5, D, generator=gen)
    for needs in ([True, True, True, False, False, True], [True, False, True, False, False, False]):
        bwd = (grad_y, x, *weight, t, a, b, None, None, 0.5, 0.1, torch.tensor(3), None, needs, "torch", False, c)
        torch.library.opcheck(torch.ops.fastpeft.lowrank_4bit_bwd.default, bwd)

"""DoRA through the Triton kernels (``fastpeft.kernels.dora`` and the fused low-rank kernels)
against float64: the norm kernel (dense and every 4-bit layout), the layers' output and every
gradient at odd shapes, and a training step that allocates nothing of W's size.

Without a GPU they run under the Triton interpreter on CPU tensors (tests/conftest.py)."""

import os

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from fastpeft.kernels import dora as KD  # noqa: E402
from helpers import assert_close_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, D, R = 123, 77, 12


def _norm64(w, a, b, s):
    return torch.linalg.norm(w.double() + s * b.double() @ a.double(), dim=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_norm_kernel_dense(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(D, K, generator=gen).to(DEVICE, dtype)
    a, b = torch.randn(R, K, generator=gen).to(DEVICE, dtype), torch.randn(D, R, generator=gen).to(DEVICE, dtype)
    assert_close_rel(KD.dora_norm(w, a, b, 0.3), _norm64(w, a, b, 0.3), tol, "n")
    wt = torch.randn(K, D, generator=gen).to(DEVICE, dtype).t()               # a strided W
    assert_close_rel(KD.dora_norm(wt, a, b, 0.3), _norm64(wt, a, b, 0.3), tol, "n (strided W)")


@pytest.mark.parametrize("k,quant_type,blocksize,nested", [
    (123, "nf4", 64, True),      # k odd: a byte and a scale per element
    (96, "fp4", 64, False),      # rows hold whole blocks
    (100, "nf4", 128, True),     # k even, blocks straddle rows
], ids=["k123-nf4", "k96-fp4", "k100-nf4-b128"])
def test_norm_kernel_4bit(k, quant_type, blocksize, nested):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(D, k, generator=gen).to(DEVICE)
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    a, b = torch.randn(R, k, generator=gen).to(DEVICE), torch.randn(D, R, generator=gen).to(DEVICE)
    want = _norm64(fastpeft.dequantize_4bit(packed, state), a, b, 0.7)
    assert_close_rel(KD.dora_norm_4bit(packed, state, a, b, 0.7), want, 1e-6, "n")


def _layer(four_bit, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(K, D, bias=bias).to(DEVICE)
    cfg = fastpeft.AdapterConfig(method="dora", r=R, alpha=24)
    layer = (fastpeft.LowRankLinear4bit.from_linear(base, cfg) if four_bit
             else fastpeft.LowRankLinear.from_linear(base, cfg))
    with torch.no_grad():
        layer.lora_B.normal_(std=0.2)
        layer.lora_magnitude.mul_(torch.rand(D, device=DEVICE) + 0.5)
    if bias:
        layer.bias.requires_grad_(True)
    return layer


def _reference(layer, x):
    w = layer._dense_weight_fp32().double()
    a, b, m = layer.lora_A.double(), layer.lora_B.double(), layer.lora_magnitude.double()
    n = torch.linalg.norm(w + layer.scale * b @ a, dim=1).detach()
    y = (m / n) * (x.double() @ w.t() + layer.scale * (x.double() @ a.t()) @ b.t())
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "4bit"])
@pytest.mark.parametrize("M,bias", [(1, True), (300, False)], ids=["M1-bias", "M300-3tiles"])
def test_layer_through_triton_matches_float64(four_bit, M, bias):
    layer = _layer(four_bit, bias)
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude] + ([layer.bias] if bias else [])
    with fastpeft.use_backend("triton"):
        y = layer(x)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *params], g)
    want = _reference(layer, x)
    assert_close_rel(y, want, 1e-5, "y")
    exp = torch.autograd.grad(want, [x, *params], g.double())
    for name, a, e in zip(["dx", "dA", "dB", "dm", "db"], got, exp):
        assert_close_rel(a, e, 2e-5, name)


def _storage_ptr(v):
    if isinstance(v, torch.Tensor):
        return v.untyped_storage().data_ptr()
    if isinstance(v, (torch.UntypedStorage, torch.TypedStorage)):
        return v.data_ptr()
    return None


class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor an op returns in new memory (not a view or an
    in-place result of one of its inputs)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_ptr(v) for v in torch.utils._pytree.tree_leaves((args, kwargs))} - {None}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage_ptr(t) not in inputs:
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("four_bit,rows", [(False, 8), (True, 8), (True, 24)], ids=["dense", "4bit-decode", "4bit-gemm"])
def test_training_step_allocates_nothing_weight_sized(four_bit, rows):
    layer = _layer(four_bit)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(2, rows, K, device=DEVICE, requires_grad=True)
    with fastpeft.use_backend("triton"):
        layer(x).sum().backward()          # a first step (caches filled)
        opt.step()
        opt.zero_grad()
        with _Allocations() as seen:
            layer(x).square().sum().backward()
            opt.step()
    big = [(n, f) for n, f in seen.sizes if n >= D * K]
    assert seen.sizes and not big, f"weight-sized tensors allocated: {big[:5]}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 4e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("train_m", [True, False], ids=["m-trains", "m-frozen"])
def test_fused_op_with_dropout_matches_float64(dtype, tol, train_m):
    """dora_linear through the fused kernels (row scale in the GEMM epilogue, Z stored only while m
    trains), dropout on, a 3-D input: output and every gradient against float64 with the
    kernels' own mask."""
    from fastpeft.kernels import lowrank as L

    gen = torch.Generator().manual_seed(3)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen) * sc).to(DEVICE, dtype)
    x = rnd(2, 9, K).requires_grad_(True)
    w, bias = rnd(D, K, sc=K ** -0.5), rnd(D).requires_grad_(True)
    a, b = rnd(R, K, sc=K ** -0.5).requires_grad_(True), rnd(D, R, sc=R ** -0.5).requires_grad_(True)
    m = (torch.rand(D, generator=gen) + 0.5).to(DEVICE, dtype).requires_grad_(train_m)
    p, seed, s = 0.2, 77, 0.75
    with fastpeft.use_backend("triton"):
        y = fastpeft.dora_linear(x, w, bias, a, b, m, scale=s, dropout_p=p, seed=seed)
        g = torch.randn_like(y)
        params = [x, bias, a, b] + ([m] if train_m else [])
        got = torch.autograd.grad(y, params, g)
    keep = L.dropout_keep_mask(seed, 18, K, p, DEVICE).reshape(2, 9, K).double() / (1 - p)
    x64, w64, a64, b64 = x.double(), w.double(), a.double(), b.double()
    n = torch.linalg.norm(w64 + s * b64 @ a64, dim=1).detach()
    want = (m.double() / n) * (x64 @ w64.t() + s * ((x64 * keep) @ a64.t()) @ b64.t()) + bias.double()
    assert_close_rel(y, want, tol, "y")
    exp = torch.autograd.grad(want, params, g.double())
    for name, got_g, exp_g in zip(["dx", "db", "dA", "dB", "dm"], got, exp):
        assert_close_rel(got_g, exp_g, 2 * tol, name)


@pytest.mark.parametrize("train_m", [True, False], ids=["m-trains", "m-frozen"])
def test_saved_tensors_contract(train_m):
    """Backward keeps x (A trains), T [M, r], the seed, the row scale [d], and Z [M, d] and the
    inverse norm [d] only while the magnitude trains: nothing of size d × k, no dropped copy of x."""
    from helpers import saved_tensors

    layer = _layer(False, bias=True)
    layer.train()
    layer.dropout_p = 0.1
    layer.lora_magnitude.requires_grad_(train_m)
    x = torch.randn(16, K, device=DEVICE, requires_grad=True)
    with fastpeft.use_backend("triton"), saved_tensors() as saved:
        y = layer(x)
    shapes = saved.shapes()
    params = {p.data_ptr() for p in layer.parameters()}
    own = sorted(tuple(t.shape) for t in saved.tensors if t.data_ptr() not in params)
    # the row scale c [d]; while m trains also Z [M, d] and 1/n [d] (dc/dm)
    want = sorted([(16, K), (16, R), (), (D,)] + ([(16, D), (D,)] if train_m else []))
    assert own == want, shapes
    assert any(t is x for t in saved.tensors)                   # the caller's x itself
    y.sum().backward()


# -- QDoRA fused: the row scale in the 4-bit GEMM's and the decode kernel's epilogue ------------

def _qdora_inputs(k, quant_type, blocksize, nested, shape, bias, train_m, dtype=torch.float32, seed=5):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen) * sc).to(DEVICE, dtype)
    w = torch.randn(D, k, generator=gen).to(DEVICE) * k ** -0.5
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    x = rnd(*shape, k).requires_grad_(True)
    a = rnd(R, k, sc=k ** -0.5).requires_grad_(True)
    b = rnd(D, R, sc=R ** -0.5).requires_grad_(True)
    bias_t = rnd(D).requires_grad_(True) if bias else None
    m = (torch.rand(D, generator=gen) + 0.5).to(DEVICE, dtype).requires_grad_(train_m)
    return x, packed, state, bias_t, a, b, m


@pytest.mark.parametrize("k,quant_type,blocksize,shape,bias,train_m,p", [
    (123, "nf4", 64, (1,), True, True, 0.2),          # decode kernel, k odd, dropout
    (123, "nf4", 64, (2, 150), False, False, 0.2),    # GEMM, 3 M tiles, 3-D input
    (96, "fp4", 64, (300,), True, True, 0.0),         # GEMM, rows hold whole blocks
    (96, "fp4", 64, (1, 1), False, False, 0.0),       # decode, 3-D input
    (100, "nf4", 128, (40,), True, True, 0.1),        # GEMM, blocks straddle rows
], ids=["M1-k123-nf4-bias-mtrain", "M300-k123-nf4-mfrozen", "M300-k96-fp4-bias-mtrain", "M1-k96-fp4-mfrozen",
        "M40-k100-nf4-b128-bias-mtrain"])
def test_fused_4bit_matches_float64(monkeypatch, k, quant_type, blocksize, shape, bias, train_m, p):
    """dora_linear_4bit through the fused 4-bit kernels, W dequantised in registers at every M
    (c and the bias in the GEMM's or the decode kernel's epilogue, Z stored only while m trains,
    dZ = c ⊙ dY folded into backward): output and every gradient, the magnitude's included,
    against float64 with the kernels' mask."""
    from fastpeft.kernels import lowrank as L
    from fastpeft.kernels import lowrank_4bit as L4

    monkeypatch.setenv(L4.BUFFER_MIN_M_ENV, "0")

    x, packed, state, bias_t, a, b, m = _qdora_inputs(k, quant_type, blocksize, True, shape, bias, train_m)
    seed, s = 91, 0.75
    with fastpeft.use_backend("triton"):
        y = fastpeft.dora_linear_4bit(x, packed, state, bias_t, a, b, m, scale=s, dropout_p=p, seed=seed)
        g = torch.randn_like(y)
        params = [x, a, b] + ([bias_t] if bias else []) + ([m] if train_m else [])
        got = torch.autograd.grad(y, params, g)
    M = x.numel() // k
    keep = (L.dropout_keep_mask(seed, M, k, p, DEVICE).reshape(x.shape).double() / (1 - p) if p
            else torch.ones(x.shape, dtype=torch.float64))
    w64 = fastpeft.dequantize_4bit(packed, state).double()
    x64, a64, b64 = x.double(), a.double(), b.double()
    n = torch.linalg.norm(w64 + s * b64 @ a64, dim=1).detach()
    want = (m.double() / n) * (x64 @ w64.t() + s * ((x64 * keep) @ a64.t()) @ b64.t())
    if bias:
        want = want + bias_t.double()
    assert_close_rel(y, want, 1e-5, "y")
    exp = torch.autograd.grad(want, params, g.double())
    for name, got_g, exp_g in zip(["dx", "dA", "dB"] + (["db"] if bias else []) + (["dm"] if train_m else []),
                                  got, exp):
        assert_close_rel(got_g, exp_g, 2e-5, name)


@pytest.mark.parametrize("shape", [(1,), (40,)], ids=["decode", "gemm"])
def test_fused_4bit_fp16(shape):
    """fp16 through the same kernels (the interpreter computes fp16 correctly; bf16 it does not)."""
    x, packed, state, bias_t, a, b, m = _qdora_inputs(96, "nf4", 64, True, shape, True, True, torch.float16)
    with fastpeft.use_backend("triton"):
        y = fastpeft.dora_linear_4bit(x, packed, state, bias_t, a, b, m, scale=0.5)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, a, b, bias_t, m], g)
    w64 = fastpeft.dequantize_4bit(packed, state).double()
    n = torch.linalg.norm(w64 + 0.5 * b.double() @ a.double(), dim=1).detach()
    want = (m.double() / n) * (x.double() @ w64.t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t())
    want = want + bias_t.double()
    assert_close_rel(y, want, 2e-3, "y")
    exp = torch.autograd.grad(want, [x, a, b, bias_t, m], g.double())
    for name, got_g, exp_g in zip(["dx", "dA", "dB", "db", "dm"], got, exp):
        assert_close_rel(got_g, exp_g, 8e-3, name)


@pytest.mark.parametrize("M", [1, 40], ids=["decode", "gemm"])
@pytest.mark.parametrize("train_m", [True, False], ids=["m-trains", "m-frozen"])
def test_4bit_launches_no_separate_scale_pass(monkeypatch, M, train_m):
    """A QDoRA step launches the 4-bit op's kernels and nothing else of size [M, d]: forward is
    the decode kernel (M <= 16) or the T pass and the 4-bit GEMM, with c and the bias in their
    epilogue (no torch op writes an [M, d] tensor); backward scales dY inside the 4-bit backward
    (no [M, d] torch op but the product Σ dY ⊙ Z of the magnitude's gradient, while m trains)."""
    from fastpeft.kernels import _common

    launched = []
    real_launch = _common._launch
    monkeypatch.setattr(_common, "_launch", lambda kernel, grid, args, fb: (launched.append(kernel.fn.__name__ if hasattr(
        kernel, "fn") else kernel.__name__), real_launch(kernel, grid, args, fb))[1])

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.md = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and any(isinstance(t, torch.Tensor) and tuple(t.shape) == (M, D)
                                        for t in torch.utils._pytree.tree_leaves(out)):
                self.md.append(str(func))
            return out

    x, packed, state, bias, a, b, m = _qdora_inputs(123, "nf4", 64, True, (M,), True, train_m)
    norm = KD.dora_norm_4bit(packed, state, a, b, 0.5)
    with fastpeft.use_backend("triton"):
        with Ops() as fwd:
            y = fastpeft.dora_linear_4bit(x, packed, state, bias, a, b, m, scale=0.5, norm=norm)
        fwd_kernels, launched[:] = list(launched), []
        g = torch.randn_like(y)
        with Ops() as bwd:
            torch.autograd.grad(y, [x, a, b, bias] + ([m] if train_m else []), g)
    want_fwd = ["_lowrank4_decode_kernel"] if M == 1 else ["_lowrank_fwd_t_kernel", "_lowrank4_fwd_gemm_kernel"]
    assert fwd_kernels == want_fwd
    assert fwd.md == ["fastpeft.dora_4bit_fwd.default"], fwd.md          # Y and Z come from the op itself
    assert "_lowrank4_bwd_dx_kernel" in launched
    assert bwd.md == (["aten.mul.Tensor"] if train_m else []), bwd.md       # dm's Σ dY ⊙ Z only


@pytest.mark.parametrize("rows,min_m", [(40, "17"), (300, None)], ids=["M40-min17", "M300-default"])
def test_fused_4bit_never_takes_the_dense_buffer(monkeypatch, rows, min_m):
    """Where FASTPEFT_4BIT_BUFFER_MIN_M (by default BUFFER_MIN_M_DEFAULT, here set to 256 to keep
    the interpreted problem small) sends the 4-bit op through a transient dense W, QDoRA still
    dequantises in registers (its training step allocates nothing as large as W): no dense W is
    ever formed, and the results are right."""
    from fastpeft.kernels import lowrank_4bit as L4

    if min_m is None:
        monkeypatch.delenv(L4.BUFFER_MIN_M_ENV, raising=False)
        monkeypatch.setattr(L4, "BUFFER_MIN_M_DEFAULT", 256)
    else:
        monkeypatch.setenv(L4.BUFFER_MIN_M_ENV, min_m)
    assert L4._buffered(rows)

    def no_dense_w(*args, **kwargs):
        raise AssertionError("QDoRA formed a dense W")

    monkeypatch.setattr(L4, "dequantize_4bit_dense", no_dense_w)
    x, packed, state, bias, a, b, m = _qdora_inputs(96, "nf4", 64, True, (rows,), True, True)
    with fastpeft.use_backend("triton"):
        y = fastpeft.dora_linear_4bit(x, packed, state, bias, a, b, m, scale=0.5)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, a, b, bias, m], g)
    w64 = fastpeft.dequantize_4bit(packed, state).double()
    n = torch.linalg.norm(w64 + 0.5 * b.double() @ a.double(), dim=1).detach()
    want = (m.double() / n) * (x.double() @ w64.t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t())
    want = want + bias.double()
    assert_close_rel(y, want, 1e-5, "y")
    for name, got_g, exp_g in zip(["dx", "dA", "dB", "db", "dm"], got,
                                  torch.autograd.grad(want, [x, a, b, bias, m], g.double())):
        assert_close_rel(got_g, exp_g, 2e-5, name)

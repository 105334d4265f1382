"""The Triton launchers of ``fastpeft.kernels.lowrank`` against a float64 reference.

Without a GPU they run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). Shapes are tiny and odd; the launchers pick one
large block per dim under the interpreter, so every case is a handful of programs.
"""

import itertools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastpeft.kernels import lowrank as L  # noqa: E402
from helpers import reference_lowrank  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTIVATIONS = [None, "relu", "gelu", "silu"]
CORES = [None, "diag", "full"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative error bounds ‖a−b‖/‖b‖ (output and T, gradients) against float64
TOL = {torch.float32: (1e-5, 2e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
GRAD_NAMES = ("dx", "dA", "dB", "dcore", "dout_scale", "dbias")
SEED = 1234


def rel_err(actual, expected) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel(actual, expected, tol, name):
    assert actual is not None, f"{name}: missing"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def make_case(M, k, d, r, dtype, core_kind, with_os, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(DEVICE, dtype)

    x = rnd(M, k)
    w = rnd(d, k, s=k ** -0.5)
    bias = rnd(d) if with_bias else None
    a = rnd(r, k, s=k ** -0.5)
    b = rnd(d, r, s=r ** -0.5)
    core = None if core_kind is None else (rnd(r) if core_kind == "diag" else rnd(r, r, s=r ** -0.5))
    out_scale = rnd(d) if with_os else None
    gy = rnd(M, d)
    return x, w, bias, a, b, core, out_scale, gy


def reference(x, w, bias, a, b, core, out_scale, scale, p, act, gy):
    """(y, T, grads) in float64 by autograd, the dropout mask from the kernels' own generator."""
    keep = L.dropout_keep_mask(SEED, x.shape[0], x.shape[1], p, x.device).cpu() if p > 0 else None
    leaves = [None if t is None else t.detach().cpu().double().requires_grad_() for t in
              (x, w, bias, a, b, core, out_scale)]
    x64, w64, b64, a64, bb64, c64, o64 = leaves
    y = reference_lowrank(x64, w64, b64, a64, bb64, c64, o64, scale, keep_mask=keep, dropout_p=p,
                          activation=act)
    xd = x64 if keep is None else x64 * keep.double() / (1 - p)
    t = xd @ a64.t()
    y.backward(gy.detach().cpu().double())
    grads = [None if v is None else v.grad for v in (x64, a64, bb64, c64, o64, b64)]
    return y.detach(), t.detach(), grads


def run_and_check(M, k, d, r, dtype, core_kind, with_os, with_bias, act, p, deterministic=False, scale=0.75):
    x, w, bias, a, b, core, out_scale, gy = make_case(M, k, d, r, dtype, core_kind, with_os, with_bias)
    y, t = L.lowrank_fwd(x, w, bias, a, b, core, out_scale, scale, p, SEED, act)
    assert y.dtype == dtype and t.dtype == dtype
    y_ref, t_ref, g_ref = reference(x, w, bias, a, b, core, out_scale, scale, p, act, gy)
    tol_y, tol_g = TOL[dtype]
    assert_rel(y, y_ref, tol_y, "y")
    assert_rel(t, t_ref, tol_y, "T")
    grads = L.lowrank_bwd(gy, x, w, t, a, b, core, out_scale, scale, p, SEED, act,
                          True, True, True, core is not None, out_scale is not None, bias is not None,
                          deterministic=deterministic)
    owners = (x, a, b, core, out_scale, bias)
    for name, g, ref, owner in zip(GRAD_NAMES, grads, g_ref, owners):
        if owner is None:
            assert g is None, f"{name} returned for an absent tensor"
            continue
        assert g.dtype == owner.dtype, f"{name}: dtype {g.dtype} != {owner.dtype}"
        assert_rel(g, ref, tol_g, name)
    return grads


# -- the full sweep on the M=37 shape: every core x activation x dropout x dtype ---------------

SWEEP = [(core, act, p, dtype, i % 4)
         for i, (core, act, p, dtype) in enumerate(itertools.product(CORES, ACTIVATIONS, [0.0, 0.1], DTYPES))]


@pytest.mark.parametrize(
    "core_kind,act,p,dtype,flags", SWEEP,
    ids=[f"{c}-{a}-p{p}-{str(dt)[6:]}-os{f & 1}-b{f >> 1}" for c, a, p, dt, f in SWEEP])
def test_sweep_m37(core_kind, act, p, dtype, flags):
    run_and_check(37, 123, 77, 12, dtype, core_kind, bool(flags & 1), bool(flags & 2), act, p)


# -- other odd shapes: M=1 (decode), r=1, r not a power of two above 16, r=128 ---------------

SHAPES = [(1, 123, 77, 12), (5, 33, 130, 1), (70, 48, 20, 33), (9, 17, 40, 128)]
OTHER = [(shape, core, dtype, p, act)
         for i, (shape, core, dtype, p) in enumerate(itertools.product(SHAPES, CORES, DTYPES, [0.0, 0.1]))
         for act in [ACTIVATIONS[i % 4]]]


@pytest.mark.parametrize(
    "shape,core_kind,dtype,p,act", OTHER,
    ids=["M{}-k{}-d{}-r{}".format(*s) + f"-{c}-{str(dt)[6:]}-p{p}-{a}" for s, c, dt, p, a in OTHER])
def test_shapes(shape, core_kind, dtype, p, act):
    M, k, d, r = shape
    run_and_check(M, k, d, r, dtype, core_kind, True, p == 0.0, act, p)


# -- backward modes and partial gradients ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_bit_identical(dtype):
    args = (70, 48, 20, 33, dtype, "full", True, True, "silu", 0.1)
    first = run_and_check(*args, deterministic=True)
    second = run_and_check(*args, deterministic=True)
    for name, g1, g2 in zip(GRAD_NAMES, first, second):
        assert torch.equal(g1, g2), f"{name} differs between two deterministic runs"
    fast = run_and_check(*args, deterministic=False)
    for name, g1, g2 in zip(GRAD_NAMES, first, fast):
        assert rel_err(g2, g1) <= TOL[dtype][1], name


@pytest.mark.parametrize("deterministic", [False, True])
def test_partial_gradients(deterministic):
    """Each gradient alone (x=None when A is frozen) equals the one computed with all others."""
    dtype, p, act = torch.float32, 0.1, "gelu"
    x, w, bias, a, b, core, out_scale, gy = make_case(37, 123, 77, 12, dtype, "diag", True, True)
    _, t = L.lowrank_fwd(x, w, bias, a, b, core, out_scale, 0.5, p, SEED, act)
    full = L.lowrank_bwd(gy, x, w, t, a, b, core, out_scale, 0.5, p, SEED, act,
                         True, True, True, True, True, True, deterministic=deterministic)
    for i, name in enumerate(GRAD_NAMES):
        needs = [j == i for j in range(6)]
        part = L.lowrank_bwd(gy, x if needs[1] else None, w, t, a, b, core, out_scale, 0.5, p, SEED, act,
                             *needs, deterministic=deterministic)
        for j, g in enumerate(part):
            if j == i:
                assert rel_err(g, full[i]) <= 1e-6, name
            else:
                assert g is None, f"{GRAD_NAMES[j]} computed though only {name} was asked for"


def test_noncontiguous_inputs():
    """x and dY as strided views, W transposed storage: the launchers honour strides."""
    dtype = torch.float32
    x, w, bias, a, b, core, out_scale, gy = make_case(37, 123, 77, 12, dtype, "full", True, True)
    xs = x.t().contiguous().t()
    ws = w.t().contiguous().t()
    gys = gy.t().contiguous().t()
    assert xs.stride() != x.stride()
    y, t = L.lowrank_fwd(xs, ws, bias, a, b, core, out_scale, 0.5, 0.1, SEED, "relu")
    y0, t0 = L.lowrank_fwd(x, w, bias, a, b, core, out_scale, 0.5, 0.1, SEED, "relu")
    assert rel_err(y, y0) < 1e-6 and rel_err(t, t0) < 1e-6
    g = L.lowrank_bwd(gys, xs, ws, t, a, b, core, out_scale, 0.5, 0.1, SEED, "relu", *([True] * 6))
    g0 = L.lowrank_bwd(gy, x, w, t0, a, b, core, out_scale, 0.5, 0.1, SEED, "relu", *([True] * 6))
    for name, u, v in zip(GRAD_NAMES, g, g0):
        assert rel_err(u, v) < 1e-6, name


# -- the dropout mask ---------------------------------------------------------------------------

@triton.jit
def _mask_elementwise_kernel(out_ptr, seed, row0, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The documented mask, one Philox call per element (no sharing, no interleaving): element
    (m, c) is kept iff word c % 4 of Philox(seed; c // 4, m mod 2³², m >> 32, 0) >= p."""
    rm = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    z = (rm * 0).to(tl.uint32)[:, None] + (rk * 0).to(tl.uint32)[None, :]
    w0, w1, w2, w3 = tl.philox(seed, (rk // 4).to(tl.uint32)[None, :] + z, rm.to(tl.uint32)[:, None] + z,
                               (rm >> 32).to(tl.uint32)[:, None] + z, z)
    lane = (rk % 4)[None, :] + (z * 0).to(tl.int32)
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    keep = tl.uint_to_uniform_float(word) >= p
    tl.store(out_ptr + tl.arange(0, BLOCK_M)[:, None] * K + rk[None, :], keep.to(tl.int8),
             mask=(tl.arange(0, BLOCK_M) < M)[:, None] & (rk < K)[None, :])


@triton.jit
def _mask_at_kernel(out_ptr, seed, row, p, BLOCK: tl.constexpr):
    rows = tl.zeros((1,), dtype=tl.int64) + row
    cols = tl.arange(0, BLOCK)
    keep = L._keep_mask(seed, rows, cols, p)
    tl.store(out_ptr + cols[None, :], keep.to(tl.int8))


def test_mask_is_four_columns_per_philox_call():
    """The kernels' mask equals the documented definition computed one element at a time; the
    rate is 1-p; seeds give different masks; p = 0 keeps everything."""
    M, k, p = 21, 37, 0.3
    keep = L.dropout_keep_mask(SEED, M, k, p, DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (M, k)
    ref = torch.empty(M, k, dtype=torch.int8, device=DEVICE)
    _mask_elementwise_kernel[(1,)](ref, SEED, 0, M, k, p, BLOCK_M=32, BLOCK_K=64)
    assert torch.equal(keep, ref.bool())
    big = L.dropout_keep_mask(SEED, 200, 300, p, DEVICE).float().mean().item()
    assert abs(big - (1 - p)) < 0.01
    assert not torch.equal(keep, L.dropout_keep_mask(SEED + 1, M, k, p, DEVICE))
    assert L.dropout_keep_mask(SEED, M, k, 0.0, DEVICE).all()


def test_mask_words_are_independent_across_a_group_of_four():
    """The four columns sharing one Philox call get its four different words (not one word
    repeated): neighbouring columns are not correlated."""
    keep = L.dropout_keep_mask(SEED, 256, 64, 0.5, DEVICE).float()
    same = (keep[:, 0::4] == keep[:, 1::4]).float().mean().item()
    assert 0.45 < same < 0.55


def test_mask_rows_past_2_32_are_fresh():
    """Rows past 2³² draw fresh numbers (the row counter does not wrap to 32 bits)."""
    K, p = 64, 0.5
    row = (1 << 32) + 3
    hi = torch.empty((1, K), dtype=torch.int8, device=DEVICE)
    lo = torch.empty((1, K), dtype=torch.int8, device=DEVICE)
    _mask_at_kernel[(1,)](hi, SEED, row, p, BLOCK=K)
    _mask_at_kernel[(1,)](lo, SEED, 3, p, BLOCK=K)
    assert not torch.equal(hi, lo)
    ref = torch.empty((1, K), dtype=torch.int8, device=DEVICE)
    _mask_elementwise_kernel[(1,)](ref, SEED, row, 1, K, p, BLOCK_M=16, BLOCK_K=K)
    assert torch.equal(hi, ref)


def test_backward_uses_the_forward_mask():
    """The dX epilogue regenerates the forward's mask: with W = 0, dX = D'(dT A) is zero exactly
    where the forward dropped x, and T = (mask ⊙ X)Aᵀ/(1-p)."""
    M, k, d, r, p = 9, 40, 16, 16, 0.4
    x = torch.randn(M, k, device=DEVICE)
    w = torch.zeros(d, k, device=DEVICE)
    a = torch.randn(r, k, device=DEVICE)
    b = torch.eye(d, r, device=DEVICE)
    gy = torch.randn(M, d, device=DEVICE)
    _, t = L.lowrank_fwd(x, w, None, a, b, None, None, 1.0, p, SEED, None)
    dx = L.lowrank_bwd(gy, None, w, t, a, b, None, None, 1.0, p, SEED, None,
                       True, False, False, False, False, False)[0]
    keep = L.dropout_keep_mask(SEED, M, k, p, DEVICE)
    assert (dx[~keep] == 0).all()
    assert (dx[keep] != 0).all()
    keep_t = keep.float() / (1 - p)
    assert rel_err(t, (x * keep_t) @ a.t()) < 1e-6


# -- errors ----------------------------------------------------------------------------------

def test_rank_limit_and_dtype_errors():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(6, 8, device=DEVICE)
    r = L.MAX_RANK + 1
    with pytest.raises(ValueError, match=rf"r <= {L.MAX_RANK}"):
        L.lowrank_fwd(x, w, None, torch.randn(r, 8, device=DEVICE), torch.randn(6, r, device=DEVICE),
                      None, None, 1.0, 0.0, 0, None)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        L.lowrank_fwd(x.double(), w.double(), None, torch.randn(2, 8, device=DEVICE, dtype=torch.float64),
                      torch.randn(6, 2, device=DEVICE, dtype=torch.float64), None, None, 1.0, 0.0, 0, None)

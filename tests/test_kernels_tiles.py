"""The Triton kernels across several tiles: row tiles, column tiles, split-M partials.

Under the interpreter the launchers take one block per small dim; here the block cap is lowered
to 32 so that an odd M = 99 runs as 4 row tiles: the pass over dY runs 4 row programs (the last
of them sums their 4 dS partials) and column programs that reduce dB over all 4 row blocks, dA
runs 4 split-M programs per column block (the last sums their partials), and the fixed-order
reductions must give bit-identical results across runs. Each op (dense,
grouped, 4-bit) is compared with float64 autograd (output and every gradient), and the
deterministic mode must be bit-identical across runs.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from fastpeft.kernels import _common  # noqa: E402
from fastpeft.kernels import lowrank as L  # noqa: E402
from helpers import reference_lowrank, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, K, D, R, P, SEED, SCALE = 99, 72, 40, 12, 0.1, 77, 0.5
CAP = 32
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


@pytest.fixture
def small_blocks(monkeypatch):
    """Block cap 32 under the interpreter; records, per launch, the row programs of the pass over
    dY and the split-M programs of dA (whose last program of each column block reduces the
    partials of the others: the interpreter runs programs one after another, in grid order)."""
    if DEVICE == "cuda":
        pytest.skip("block sizes are the autotuner's on a GPU")
    monkeypatch.setattr(_common, "INTERPRET_BLOCK_CAP", CAP)
    assert _common._interp_block(1 << 20) == CAP       # the launchers read the cap there
    seen = {"dy_rows": [], "da_split": [], "kernels": []}
    launch = _common._launch

    def recording(kernel, grid, args, fallback):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        seen["kernels"].append(name)
        if name == "_lowrank_bwd_dy_kernel":
            seen["dy_rows"].append(args["ROW_PROGRAMS"])
        if name == "_lowrank_bwd_da_kernel":
            seen["da_split"].append(grid(fallback)[1])
        return launch(kernel, grid, args, fallback)

    monkeypatch.setattr(_common, "_launch", recording)
    yield seen
    for buf in _common._COUNTERS.values():      # every launch leaves its counters at 0
        assert not buf.any(), "reduction counters left non-zero"


def _rand(gen, *shape, s=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(DEVICE, dtype)


def _tensors(dtype, n=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _rand(gen, M, K, dtype=dtype)
    ws = [_rand(gen, D, K, s=K ** -0.5, dtype=dtype) for _ in range(n)]
    As = [_rand(gen, R, K, s=K ** -0.5, dtype=dtype) for _ in range(n)]
    Bs = [_rand(gen, D, R, s=R ** -0.5, dtype=dtype) for _ in range(n)]
    cores = [_rand(gen, R, R, s=R ** -0.5, dtype=dtype) for _ in range(n)]
    gys = [_rand(gen, M, D, dtype=dtype) for _ in range(n)]
    return x, ws, As, Bs, cores, gys


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _reference(x, w, a, b, core, gy, keep):
    x64, w64, a64, b64, c64 = [t.detach().cpu().double().requires_grad_() for t in (x, w, a, b, core)]
    y = reference_lowrank(x64, w64, None, a64, b64, c64, None, SCALE, keep_mask=keep, dropout_p=P)
    y.backward(gy.detach().cpu().double())
    return y.detach(), [x64.grad, a64.grad, b64.grad, c64.grad]


def _check(actual, expected, tol, what):
    for name, a, e in zip(("y", "dx", "dA", "dB", "dcore"), actual, expected):
        err = rel_err(a, e)
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"


def _dense_step(dtype, deterministic):
    x, (w,), (a,), (b,), (core,), (gy,) = _tensors(dtype)
    x, a, b, core = _leaves(x, a, b, core)
    with fastpeft.use_backend("triton"):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            y = fastpeft.lowrank_linear(x, w, None, a, b, core=core, scale=SCALE, dropout_p=P, seed=SEED)
            y.backward(gy)
        finally:
            torch.use_deterministic_algorithms(False)
    return [y.detach(), x.grad, a.grad, b.grad, core.grad], (x, w, a, b, core, gy)


@pytest.mark.parametrize("dtype,deterministic", [(torch.float32, False), (torch.float16, True)])
def test_dense_several_tiles_and_partials(small_blocks, dtype, deterministic):
    got, (x, w, a, b, core, gy) = _dense_step(dtype, deterministic)
    keep = L.dropout_keep_mask(SEED, M, K, P, DEVICE).cpu()
    y_ref, g_ref = _reference(x, w, a, b, core, gy, keep)
    _check(got, [y_ref, *g_ref], TOL[dtype], "dense")
    assert max(small_blocks["da_split"]) >= 3, small_blocks   # dA: one partial per 32-row block
    assert max(small_blocks["dy_rows"]) >= 3, small_blocks    # dS: one partial per dY row block


def test_dense_deterministic_mode_is_bit_identical_across_runs(small_blocks):
    first, _ = _dense_step(torch.float32, True)
    second, _ = _dense_step(torch.float32, True)
    for name, g1, g2 in zip(("y", "dx", "dA", "dB", "dcore"), first, second):
        assert torch.equal(g1, g2), f"{name} differs between two deterministic runs"
    assert max(small_blocks["dy_rows"]) >= 3 and max(small_blocks["da_split"]) >= 3


def _group_step(deterministic):
    x, ws, As, Bs, cores, gys = _tensors(torch.float32, n=3, seed=1)
    x, *params = _leaves(x, *As, *Bs, *cores)
    As, Bs, cores = params[:3], params[3:6], params[6:]
    with fastpeft.use_backend("triton"):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            ys = fastpeft.lowrank_linear_group(x, ws, None, As, Bs, cores=cores, scales=SCALE, dropout_p=P, seed=SEED)
            torch.autograd.backward(list(ys), gys)
        finally:
            torch.use_deterministic_algorithms(False)
    return ys, x, ws, As, Bs, cores, gys


def test_group_several_tiles_and_partials(small_blocks):
    ys, x, ws, As, Bs, cores, gys = _group_step(False)
    keep = L.dropout_keep_mask(SEED, M, K, P, DEVICE).cpu()
    x64 = x.detach().cpu().double().requires_grad_()
    leaves = [[t.detach().cpu().double().requires_grad_() for t in group] for group in (As, Bs, cores)]
    total = 0
    for i in range(3):
        y_ref = reference_lowrank(x64, ws[i].cpu().double(), None, leaves[0][i], leaves[1][i], leaves[2][i], None,
                                  SCALE, keep_mask=keep, dropout_p=P)
        assert rel_err(ys[i].detach(), y_ref.detach()) <= TOL[torch.float32], f"y{i}"
        total = total + (y_ref * gys[i].cpu().double()).sum()
    total.backward()
    assert rel_err(x.grad, x64.grad) <= TOL[torch.float32], "dx"
    for kind, group, ref in zip(("dA", "dB", "dcore"), (As, Bs, cores), leaves):
        for i in range(3):
            assert rel_err(group[i].grad, ref[i].grad) <= TOL[torch.float32], f"{kind}{i}"
    assert max(small_blocks["da_split"]) >= 3, small_blocks    # dA of the group: 4 split-M partials


def test_group_deterministic_mode_is_bit_identical_across_runs(small_blocks):
    runs = []
    for _ in range(2):
        ys, x, ws, As, Bs, cores, gys = _group_step(True)
        runs.append([y.detach() for y in ys] + [x.grad] + [t.grad for t in (*As, *Bs, *cores)])
    for i, (g1, g2) in enumerate(zip(*runs)):
        assert torch.equal(g1, g2), f"tensor {i} differs between two deterministic runs"
    assert max(small_blocks["dy_rows"]) >= 3 and max(small_blocks["da_split"]) >= 3, small_blocks


def _fourbit_step(deterministic, quant_type):
    x, (w,), (a,), (b,), (core,), (gy,) = _tensors(torch.float32, seed=2)
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=64, compress_statistics=True)
    x, a, b, core = _leaves(x, a, b, core)
    with fastpeft.use_backend("triton"):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            y = fastpeft.lowrank_linear_4bit(x, packed, state, None, a, b, core=core, scale=SCALE, dropout_p=P,
                                             seed=SEED)
            y.backward(gy)
        finally:
            torch.use_deterministic_algorithms(False)
    w_deq = fastpeft.dequantize_4bit(packed, state)
    return [y.detach(), x.grad, a.grad, b.grad, core.grad], (x, w_deq, a, b, core, gy)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_several_tiles_and_partials(small_blocks, quant_type):
    got, (x, w, a, b, core, gy) = _fourbit_step(False, quant_type)
    keep = L.dropout_keep_mask(SEED, M, K, P, DEVICE).cpu()
    y_ref, g_ref = _reference(x, w, a, b, core, gy, keep)
    _check(got, [y_ref, *g_ref], TOL[torch.float32], f"4-bit {quant_type}")
    assert max(small_blocks["da_split"]) >= 3 and max(small_blocks["dy_rows"]) >= 3, small_blocks


def test_4bit_deterministic_mode_is_bit_identical_across_runs(small_blocks):
    first, _ = _fourbit_step(True, "nf4")
    second, _ = _fourbit_step(True, "nf4")
    for name, g1, g2 in zip(("y", "dx", "dA", "dB", "dcore"), first, second):
        assert torch.equal(g1, g2), f"{name} differs between two deterministic runs"
    assert max(small_blocks["dy_rows"]) >= 3 and max(small_blocks["da_split"]) >= 3, small_blocks


@pytest.mark.parametrize("core_kind,act,with_os", [("diag", "relu", True), ("full", "gelu", True), (None, "silu", False)])
def test_dense_cores_out_scale_bias_several_tiles(small_blocks, core_kind, act, with_os):
    """The launchers at M = 99 (4 row programs, 2 column programs of d = 40) with a diagonal or
    full core, an activation, out_scale and a bias: every gradient against float64."""
    gen = torch.Generator().manual_seed(5)
    x, w, a, b, gy = (_rand(gen, M, K), _rand(gen, D, K, s=K ** -0.5), _rand(gen, R, K, s=K ** -0.5),
                      _rand(gen, D, R, s=R ** -0.5), _rand(gen, M, D))
    core = None if core_kind is None else (_rand(gen, R) if core_kind == "diag" else _rand(gen, R, R, s=R ** -0.5))
    out_scale = _rand(gen, D) if with_os else None
    bias = _rand(gen, D)
    y, t = L.lowrank_fwd(x, w, bias, a, b, core, out_scale, SCALE, P, SEED, act)
    grads = L.lowrank_bwd(gy, x, w, t, a, b, core, out_scale, SCALE, P, SEED, act, *([True] * 6))
    keep = L.dropout_keep_mask(SEED, M, K, P, DEVICE).cpu()
    leaves = [v.detach().cpu().double().requires_grad_() if v is not None else None
              for v in (x, a, b, core, out_scale, bias)]
    y_ref = reference_lowrank(leaves[0], w.cpu().double(), leaves[5], leaves[1], leaves[2], leaves[3], leaves[4],
                              SCALE, keep_mask=keep, dropout_p=P, activation=act)
    y_ref.backward(gy.cpu().double())
    assert rel_err(y, y_ref.detach()) <= TOL[torch.float32], "y"
    for name, g, leaf in zip(("dx", "dA", "dB", "dcore", "dout_scale", "dbias"), grads, leaves):
        assert (g is None) == (leaf is None), name
        if g is not None:
            assert rel_err(g, leaf.grad) <= TOL[torch.float32], name
    assert max(small_blocks["dy_rows"]) >= 3 and max(small_blocks["da_split"]) >= 3, small_blocks


def test_counters_are_allocated_once_and_left_at_zero(small_blocks):
    """The reduction counters are zeroed once, at their first use, and every launch leaves them
    at 0: a second training step reuses the same array and runs no fill."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _dense_step(torch.float32, True)
    before = {k: v.data_ptr() for k, v in _common._COUNTERS.items()}
    ops = []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Seen():
        _dense_step(torch.float32, True)
    assert {k: v.data_ptr() for k, v in _common._COUNTERS.items()} == before and before
    assert not {"zeros", "zero_", "fill_", "new_zeros", "zeros_like"} & set(ops), ops
    assert all(not buf.any() for buf in _common._COUNTERS.values())

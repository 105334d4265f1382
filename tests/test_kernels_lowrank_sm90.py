"""The sm_90 TMA kernels of ``fastpeft.kernels.lowrank_sm90`` against float64, and the choice
between them and the pointer kernels.

Without a GPU they run under the Triton interpreter on CPU tensors, the launchers told to
assume an sm_90 device (``INTERPRET_ARCH``); blocks are capped small so that every case has
several tiles, and a persistent launch has fewer programs (``INTERPRET_PROGRAMS``) than tiles.
TMA needs 16-byte aligned row strides: aligned shapes (k, d multiples of 8) run the TMA kernels,
odd ones (k = 123) and unaligned views the pointer kernels, on the same assumed sm_90.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from fastpeft.kernels import dora as KD  # noqa: E402
from fastpeft.kernels import _common  # noqa: E402
from fastpeft.kernels import lowrank as L  # noqa: E402
from fastpeft.kernels import lowrank_bwd as LB  # noqa: E402
from fastpeft.kernels import lowrank_sm90 as S  # noqa: E402
from helpers import assert_close_rel  # noqa: E402
from test_kernels_lowrank import SEED, TOL, make_case, run_and_check  # noqa: E402

INTERPRETED = not torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not INTERPRETED and torch.cuda.get_device_capability()[0] != 9, reason="TMA kernels run on sm_90 only")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAP = 32            # block cap under the interpreter: M = 70, d = 40 give 3 x 2 = 6 tiles


@pytest.fixture
def tf32():
    """Sets torch.backends.cuda.matmul.allow_tf32 (a property monkeypatch cannot restore)."""
    saved = torch.backends.cuda.matmul.allow_tf32

    def set_(value):
        torch.backends.cuda.matmul.allow_tf32 = value
    yield set_
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def sm90(monkeypatch):
    """An assumed sm_90 device, small blocks, 2 programs per persistent launch; records which
    GEMM launcher ran ("tma-fwd", "tma-dx", "ptr-fwd", "ptr-dx")."""
    monkeypatch.setattr(S, "INTERPRET_ARCH", 90)
    monkeypatch.setattr(S, "INTERPRET_PROGRAMS", 2)
    monkeypatch.setattr(_common, "INTERPRET_BLOCK_CAP", CAP)
    assert _common._interp_block(1 << 20) == CAP       # the launchers read the cap there
    ran = []
    fwd, dx, ptr_dx, launch = S.fwd_gemm, S.bwd_dx, LB._dx_pointer, _common._launch

    def record(name, fn):
        def wrapped(*args, **kwargs):
            ran.append(name)
            return fn(*args, **kwargs)
        return wrapped

    def launch_recording(kernel, grid, args, fallback):
        if kernel is L._lowrank_fwd_gemm_kernel:
            ran.append("ptr-fwd")
        return launch(kernel, grid, args, fallback)

    monkeypatch.setattr(S, "fwd_gemm", record("tma-fwd", fwd))
    monkeypatch.setattr(S, "bwd_dx", record("tma-dx", dx))
    monkeypatch.setattr(LB, "_dx_pointer", record("ptr-dx", ptr_dx))
    monkeypatch.setattr(_common, "_launch", launch_recording)
    return ran


# -- aligned shapes: the TMA kernels, output and every gradient --------------------------------

CASES = [  # (M, k, d, r, core, out_scale, bias, dropout)
    (70, 48, 40, 12, None, True, True, 0.1),       # 6 tiles over 2 programs, both epilogue vectors
    (70, 48, 40, 12, None, False, False, 0.0),     # no bias, no out_scale, no dropout
    (1, 64, 24, 16, "diag", False, True, 0.1),     # M = 1
    (37, 32, 72, 33, "full", True, False, 0.1),    # r = 33 (BLOCK_R 64: several R chunks), 3 column tiles
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,k,d,r,core,os_,bias,p", CASES,
                         ids=[f"M{c[0]}-k{c[1]}-d{c[2]}-r{c[3]}-{c[4]}-os{int(c[5])}-b{int(c[6])}-p{c[7]}"
                              for c in CASES])
def test_tma_kernels_match_float64(sm90, dtype, M, k, d, r, core, os_, bias, p):
    run_and_check(M, k, d, r, dtype, core, os_, bias, None, p)
    assert sorted(set(sm90)) == ["tma-dx", "tma-fwd"], sm90


def test_tf32_fp32_runs_tma(sm90, tf32):
    """fp32 whose products may use TF32 (as F.linear's) takes the TMA forward GEMM (dX, whose W
    tile is not K-major as TF32 wgmma needs, the pointer kernel); exact fp32 neither."""
    tf32(True)
    run_and_check(70, 48, 40, 12, torch.float32, None, True, True, "gelu", 0.1)
    assert sorted(set(sm90)) == ["ptr-dx", "tma-fwd"], sm90
    sm90.clear()
    tf32(False)
    run_and_check(70, 48, 40, 12, torch.float32, None, True, True, None, 0.1)
    assert sorted(set(sm90)) == ["ptr-dx", "ptr-fwd"], sm90


@pytest.mark.parametrize("persistent_programs", [1, 2, 64], ids=["1prog", "2prog", "one-per-tile"])
def test_every_tile_once_whatever_the_program_count(sm90, monkeypatch, persistent_programs):
    """A persistent program loops over tiles num_programs apart: 1 program does all 6, 64 are
    cut to one per tile; the result is the same."""
    monkeypatch.setattr(S, "INTERPRET_PROGRAMS", persistent_programs)
    run_and_check(70, 48, 40, 12, torch.float16, None, False, True, None, 0.1)
    assert "tma-fwd" in sm90 and "tma-dx" in sm90


def test_dora_row_scale_and_z_through_tma(sm90):
    """DoRA's epilogue (row scale c, bias after it, Z stored) on the TMA kernel."""
    M, k, d, r, s, p = 70, 48, 40, 12, 0.75, 0.1
    x, w, bias, a, b, _, _, _ = make_case(M, k, d, r, torch.float16, None, False, True)
    c = (torch.rand(d, generator=torch.Generator().manual_seed(3)) + 0.5).to(DEVICE)
    y, t, z = KD.dora_fwd(x, w, bias, a, b, c, s, p, SEED, True)
    keep = L.dropout_keep_mask(SEED, M, k, p, x.device).double().cpu()
    x64, w64, a64, b64 = (v.double().cpu() for v in (x, w, a, b))
    t64 = (x64 * keep / (1 - p)) @ a64.t()
    z64 = x64 @ w64.t() + s * t64 @ b64.t()
    tol = TOL[torch.float16][0]
    assert_close_rel(t, t64, tol, "T")
    assert_close_rel(z, z64, tol, "Z")
    assert_close_rel(y, c.double().cpu() * z64 + bias.double().cpu(), tol, "Y")
    assert sm90 == ["tma-fwd"]


def test_3d_input_through_the_public_op(sm90):
    """x [2, 35, 48] through fastpeft.lowrank_linear (triton backend): both GEMMs on TMA."""
    gen = torch.Generator().manual_seed(5)
    dt = torch.bfloat16
    x = torch.randn(2, 35, 48, generator=gen).to(DEVICE, dt).requires_grad_()
    w = (torch.randn(40, 48, generator=gen) / 7).to(DEVICE, dt)
    bias = torch.randn(40, generator=gen).to(DEVICE, dt)
    a = (torch.randn(8, 48, generator=gen) / 7).to(DEVICE, dt).requires_grad_()
    b = (torch.randn(40, 8, generator=gen) / 3).to(DEVICE, dt).requires_grad_()
    with fastpeft.use_backend("triton"):
        y = fastpeft.lowrank_linear(x, w, bias, a, b, scale=0.5)
    gy = torch.randn(y.shape, generator=gen).to(DEVICE, dt)
    y.backward(gy)
    x64, a64, b64 = (v.detach().double().cpu().requires_grad_() for v in (x, a, b))
    y64 = x64 @ w.double().cpu().t() + bias.double().cpu() + 0.5 * (x64 @ a64.t()) @ b64.t()
    y64.backward(gy.double().cpu())
    tol_y, tol_g = TOL[dt]
    assert_close_rel(y, y64, tol_y, "y")
    for name, got, want in (("dx", x.grad, x64.grad), ("dA", a.grad, a64.grad), ("dB", b.grad, b64.grad)):
        assert_close_rel(got, want, tol_g, name)
    assert "tma-fwd" in sm90 and "tma-dx" in sm90


# -- the choice: odd shapes and unaligned views stay on the pointer kernels --------------------

def test_odd_shapes_run_the_pointer_kernels(sm90):
    """k = 123 (row strides of 246 bytes), r = 12, M = 37: pointer kernels on sm_90 too."""
    run_and_check(37, 123, 77, 12, torch.bfloat16, None, True, True, None, 0.1)
    assert sorted(set(sm90)) == ["ptr-dx", "ptr-fwd"], sm90


def test_unaligned_views_run_the_pointer_kernels(sm90):
    """Aligned sizes, but X a view whose rows are 100 bytes apart, or whose base is 2 bytes off
    16: the forward takes the pointer kernel and stays correct."""
    M, k, d, r = 37, 48, 40, 8
    _, w, bias, a, b, _, _, _ = make_case(M, k, d, r, torch.bfloat16, None, False, True)
    gen = torch.Generator().manual_seed(9)
    big = torch.randn(M, 56, generator=gen).to(DEVICE, torch.bfloat16)
    for x in (big[:, :48].contiguous().view(M, 48)[:, :], torch.randn(M, 50, generator=gen).to(
            DEVICE, torch.bfloat16)[:, :48], big[:, 1:49]):
        sm90.clear()
        y, t = L.lowrank_fwd(x, w, bias, a, b, None, None, 0.5, 0.0, SEED, None)
        x64 = x.double().cpu()
        want = x64 @ w.double().cpu().t() + bias.double().cpu() + 0.5 * (x64 @ a.double().cpu().t()) @ b.double().cpu().t()
        assert_close_rel(y, want, TOL[torch.bfloat16][0], "y")
        aligned = x.stride(0) * 2 % 16 == 0 and x.data_ptr() % 16 == 0
        assert sm90 == (["tma-fwd"] if aligned else ["ptr-fwd"]), (x.stride(), x.data_ptr() % 16, sm90)


def test_sm80_runs_the_pointer_kernels(sm90, monkeypatch):
    monkeypatch.setattr(S, "INTERPRET_ARCH", 80)
    run_and_check(70, 48, 40, 12, torch.bfloat16, None, True, True, None, 0.1)
    assert sorted(set(sm90)) == ["ptr-dx", "ptr-fwd"], sm90


@pytest.mark.skipif(not INTERPRETED, reason="the architecture is assumed only under the interpreter")
def test_tma_ok_rule(monkeypatch, tf32):
    """The rule itself, on CPU tensors with the architecture assumed."""
    x = torch.empty(64, 48, dtype=torch.bfloat16)
    w = torch.empty(40, 48, dtype=torch.bfloat16)
    monkeypatch.setattr(S, "INTERPRET_ARCH", 90)
    assert S.tma_ok(x, w)
    assert not S.tma_ok(torch.empty(64, 50, dtype=torch.bfloat16)[:, :48], w)                # 100-byte rows
    assert not S.tma_ok(torch.empty(48, 64, dtype=torch.bfloat16).t(), w)                    # column stride 64
    assert not S.tma_ok(torch.empty(64 * 48 + 1, dtype=torch.bfloat16)[1:].view(64, 48), w)  # base 2 bytes off
    tf32(False)
    assert not S.tma_ok(x.float(), w.float())                                                # exact fp32
    tf32(True)
    assert S.tma_ok(x.float(), w.float()) and not S.tma_ok(x.float(), w.float(), tf32=False)
    monkeypatch.setattr(S, "INTERPRET_ARCH", 80)
    assert not S.tma_ok(x, w)


def test_group_forward_reads_u_column_slices_through_tma(sm90):
    """Two projections of one x with ranks 8 and 12: each forward GEMM reads its U as a column
    slice of the concatenated [M, 20] (row stride 20) on the TMA kernel; outputs and gradients
    against float64."""
    gen = torch.Generator().manual_seed(11)
    dt = torch.float16

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(DEVICE, dt)

    x = rnd(70, 48).requires_grad_()
    ws, bs = [rnd(40, 48, s=0.15), rnd(24, 48, s=0.15)], [rnd(40), None]
    As = [rnd(8, 48, s=0.15).requires_grad_(), rnd(12, 48, s=0.15).requires_grad_()]
    Bs = [rnd(40, 8, s=0.3).requires_grad_(), rnd(24, 12, s=0.3).requires_grad_()]
    with fastpeft.use_backend("triton"):
        ys = fastpeft.lowrank_linear_group(x, ws, bs, As, Bs, scales=[0.5, 2.0], seed=SEED)
    gys = [torch.randn(y.shape, generator=gen).to(DEVICE, dt) for y in ys]
    torch.autograd.backward(list(ys), gys)
    leaves = [v.detach().double().cpu().requires_grad_() for v in (x, *As, *Bs)]
    x64, a0, a1, b0, b1 = leaves
    refs = [x64 @ ws[0].double().cpu().t() + bs[0].double().cpu() + 0.5 * (x64 @ a0.t()) @ b0.t(),
            x64 @ ws[1].double().cpu().t() + 2.0 * (x64 @ a1.t()) @ b1.t()]
    torch.autograd.backward(refs, [g.double().cpu() for g in gys])
    tol_y, tol_g = TOL[dt]
    for i, (y, ref) in enumerate(zip(ys, refs)):
        assert_close_rel(y, ref, tol_y, f"y{i}")
    for name, got, want in zip(("dx", "dA0", "dA1", "dB0", "dB1"), (x.grad, *[a.grad for a in As], *[b.grad for b in Bs]),
                               [v.grad for v in leaves]):
        assert_close_rel(got, want, tol_g, name)
    assert sm90.count("tma-fwd") == 2

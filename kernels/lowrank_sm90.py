"""sm_90 main loops of the dense low-rank op's two large GEMMs (``fastpeft.kernels.lowrank_sm90``).

The forward GEMM Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o (with DoRA's row scale and Z store) and the
backward dX = dY W + s·D'(dT A), as in :mod:`fastpeft.kernels.lowrank`, with the main loop's
operand tiles loaded by the Tensor Memory Accelerator: each program builds TMA descriptors of
its two operands in the kernel (``tl.make_tensor_descriptor``) and feeds ``desc.load`` tiles to
``tl.dot``, which compiles to UTMALDG into shared memory read by wgmma (HGMMA). TMA fills tile
rows and columns past the tensor's edge with zeros, so the main loop carries no masks and no
address arithmetic.

Schedule: ``PERSISTENT`` configs launch one program per SM, each looping over output tiles in
the grouped order of :func:`fastpeft.kernels._common._grouped_tile` (GROUP_M row tiles at a time,
for L2 reuse of W) with its loop nest flattened, so that the next tile's loads are issued while
this tile's epilogue runs; the other configs launch one program per tile. Autotuning chooses.

The adapter term starts the accumulator, as in the pointer kernels: its r-wide product
(R_CHUNK columns of r at a time, pointer loads of the small U/B or dT/A tiles) runs as extra
k-steps of the same accumulator before the main loop (``fastpeft inspect`` measured it against
an epilogue product; see bench/NOTES.md).

Used when :func:`tma_ok` holds: an sm_90 device, fp16/bf16 (or fp32 with TF32 products), unit
column strides, 16-byte aligned row strides and base addresses. Everything else (sm_80, odd
shapes such as k = 123, exact fp32) runs the pointer (cp.async) kernels of
:mod:`fastpeft.kernels.lowrank` (forward) and :mod:`fastpeft.kernels.lowrank_bwd` (dX).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import _common
from ._common import _adapter_init, _grouped_tile, _op, _pow2, _store_y, _unique, _wgmma_rows_ok
from .lowrank_bwd import _dx_adapter_init

__all__ = ["tma_ok", "fwd_gemm", "bwd_dx"]

# Under the interpreter (no device): the architecture the launchers assume, and the programs
# of a persistent launch (few, so that each loops over several tiles). Tests set them.
INTERPRET_ARCH = 80
INTERPRET_PROGRAMS = 2

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, PERSISTENT), in order of preference (the
# first that fits is the choice when autotuning is off). The prune below keeps, per problem, the
# tiles `fastpeft inspect` compiles without spills.
_FWD_TILES = [(128, 256, 64, 8, 3, True), (128, 128, 64, 8, 4, True), (128, 256, 64, 8, 3, False),
              (128, 128, 64, 8, 4, False), (128, 128, 64, 8, 3, True), (64, 128, 64, 4, 4, True),
              (128, 64, 64, 4, 4, False), (64, 64, 64, 4, 4, False), (16, 64, 64, 4, 4, False)]
_DX_TILES = _FWD_TILES
# fp32 accumulator values a thread may hold (128×256 over 8 warps: 232 registers persistent, 188
# not). Fewer with DoRA's store of Z and Y (128×256 w8s3 persistent spills 16 LDL / 16 STL, the
# others sit at 255 registers) and in dX with dropout, whose mask is drawn over the whole tile
# (128×256 w8s3 spills 76 / 74 persistent, 147 / 130 not).
_ACC_VALUES, _STORE_Z_VALUES, _DX_MASK_VALUES = 128, 64, 64
# shared memory beyond the operand ring, per 16-bit element size (twice for fp32), measured:
# 4-12 KB one tile per program, 8-32 KB persistent (the flattened loop's adapter operands and
# epilogue layout conversions; fp32 128×128 w8s3 persistent: 262 KB for a 192 KB ring)
_SMEM_EXTRA = {False: 13 * 1024, True: 33 * 1024}


def _configs(tiles):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PERSISTENT": pers}, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s, pers in _unique(tiles)]


_FWD_CONFIGS = _configs(_FWD_TILES)
_DX_CONFIGS = _configs(_DX_TILES)


def _tile(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages,
            c.kwargs["PERSISTENT"])


def _tma_keep(configs, smem, M, N, elem, store_z=False, dropout=False):
    """Configs whose operand ring fits in shared memory and whose per-thread accumulator (with
    the epilogue's extra live values) fits in registers; tiles not oversized for the problem
    (a 16-row tile only below 64 rows, where wgmma's 64-row tiles would be mostly padding)."""
    def ok(c):
        bm, bn, bk, w, s, persistent = _tile(c)
        acc = bm * bn // (w * 32)
        ring = s * (bm + bn) * bk * elem + _SMEM_EXTRA[persistent] * elem // 2
        limit = _ACC_VALUES
        if store_z:
            limit = min(limit, _STORE_Z_VALUES)
        if dropout:
            limit = min(limit, _DX_MASK_VALUES)
        return ring <= smem and acc * (2 if elem == 4 else 1) <= limit

    def size_ok(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return bm <= max(16, _pow2(M)) and bn <= max(16, _pow2(N)) and _wgmma_rows_ok(90, bm, _pow2(M))

    return _common._keep(configs, set(map(_tile, configs)), _tile, ok, size_ok)


def _prune_fwd(configs, named_args, **kwargs):
    args = _common._prune_args(named_args, kwargs)
    _, smem, _ = _common._limits_of(args["x_ptr"])
    return _tma_keep(configs, smem, args["M_KEY"], args["N"], _common._elem(args), store_z=bool(args["STORE_Z"]))


def _prune_dx(configs, named_args, **kwargs):
    args = _common._prune_args(named_args, kwargs)
    _, smem, _ = _common._limits_of(args["dy_ptr"])
    return _tma_keep(configs, smem, args["M_KEY"], args["N"], _common._elem(args), dropout=bool(args["HAS_DROPOUT"]))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.autotune(configs=_FWD_CONFIGS, key=["M_KEY", "N", "K", "BLOCK_R", "STORE_Z"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _lowrank_fwd_gemm_tma_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, os_ptr, y_ptr, rs_ptr, z_ptr,
    M, N, K, R, M_KEY,
    stride_xm, stride_wn, stride_ym, stride_yn, stride_um,
    scale,
    HAS_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr = False, STORE_Z: tl.constexpr = False,
):
    """Y = s·(U Bᵀ) ⊙ o + b + X Wᵀ per [BLOCK_M, BLOCK_N] tile, the tiles of this program taken
    every ``num_programs`` in grouped order; X [M, K] and W [N, K] read through TMA descriptors
    (unit column strides). Epilogue as the pointer kernel's (row scale, Z; :func:`_store_y`)."""
    dtype = x_ptr.dtype.element_ty
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=PERSISTENT):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _adapter_init(u_ptr, b_ptr, os_ptr, bias_ptr, rm, rn, M, N, R, stride_um, scale,
                            HAS_BIAS and not HAS_ROW_SCALE, HAS_OUT_SCALE, UPCAST, DOT_PRECISION, BLOCK_R,
                            R_CHUNK, BLOCK_M, BLOCK_N)
        for k0 in range(0, K, BLOCK_K):
            xt = x_desc.load([pid_m * BLOCK_M, k0])
            wt = w_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(_op(xt, dtype, UPCAST), tl.trans(_op(wt, dtype, UPCAST)), acc,
                         input_precision=DOT_PRECISION)
        _store_y(acc, y_ptr, z_ptr, rs_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS,
                   HAS_ROW_SCALE, STORE_Z)


@triton.autotune(configs=_DX_CONFIGS, key=["M_KEY", "N", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_dx})
@triton.jit(do_not_specialize=["seed"])
def _lowrank_bwd_dx_tma_kernel(
    dy_ptr, w_ptr, dt_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_KEY,
    stride_dym, stride_wk, stride_dxm, stride_dxn,
    seed, dropout_p, adapter_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """dX [M, N=k] = s·D'(dT A) + dY W (reduction over K=d) per tile, as the pointer kernel
    (:func:`fastpeft.kernels.lowrank_bwd._dx_adapter_init` starts the accumulator), with dY [M, K]
    and W [K, N] read through TMA descriptors (unit column strides)."""
    dtype = dy_ptr.dtype.element_ty
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, K], strides=[stride_dym, 1],
                                        block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_wk, 1], block_shape=[BLOCK_K, BLOCK_N])
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=PERSISTENT):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _dx_adapter_init(dt_ptr, a_ptr, rm, rn, M, N, R, seed, dropout_p, adapter_scale, HAS_DROPOUT,
                               UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)
        for k0 in range(0, K, BLOCK_K):
            dyt = dy_desc.load([pid_m * BLOCK_M, k0])
            wt = w_desc.load([k0, pid_n * BLOCK_N])
            acc = tl.dot(_op(dyt, dtype, UPCAST), _op(wt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
        offs = rm.to(tl.int64)[:, None] * stride_dxm + rn[None, :] * stride_dxn
        tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _arch(t) -> int:
    return INTERPRET_ARCH if _common._interpreting() else _common._limits_of(t)[0]


def _aligned(t) -> bool:
    """A 2-D operand a TMA descriptor can read: unit column stride, 16-byte aligned row stride
    and base address."""
    elem = t.element_size()
    return t.stride(1) == 1 and (t.stride(0) * elem) % 16 == 0 and t.data_ptr() % 16 == 0


def tma_ok(*operands, tf32: bool = True) -> bool:
    """Whether the GEMM over these 2-D operands (the two that the main loop reads) runs the TMA
    kernels: an sm_90 device, fp16 / bf16, or fp32 whose products may use TF32 (as F.linear's)
    where ``tf32`` (the forward GEMM: both operands K-major, as TF32 wgmma needs; dX's W tile is
    not, and its loop compiles to 43 shared-memory transposes per k-step), every operand
    TMA-readable."""
    first = operands[0]
    if _arch(first) != 90:
        return False
    if first.dtype == torch.float32 and not (tf32 and _common._dot_precision(first.dtype) == "tf32"):
        return False
    return all(_aligned(t) for t in operands)


def _scratch(size: int, alignment: int, stream):
    """Global scratch of the in-kernel TMA descriptors (one 128-byte descriptor each per program)."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if _common._interpreting() else "cuda")


@contextlib.contextmanager
def _descriptor_scratch():
    """Triton's allocator for the launches inside the block (restored afterwards)."""
    from triton.runtime import _allocation

    token = _allocation._allocator.set(_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _programs(tiles: int, persistent: bool, sms: int) -> int:
    if not persistent:
        return tiles
    return min(tiles, INTERPRET_PROGRAMS if _common._interpreting() else sms)


def _launch(kernel, M, N, args: dict, fallback_configs, ref):
    """Autotuned launch (or the first kept config), the grid one program per SM when persistent."""
    interp = _common._interpreting()
    sms = 0 if interp else _common._limits_of(ref)[2]

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (_programs(tiles, meta["PERSISTENT"], sms),)

    if interp:
        fb = dict(BLOCK_M=_common._interp_block(M), BLOCK_N=_common._interp_block(N),
                  BLOCK_K=_common._interp_block(args["K"]), PERSISTENT=True, num_warps=4, num_stages=1)
    elif not _common._autotuning():
        fb = _common._fallback(fallback_configs())
    else:
        fb = {}
    with _descriptor_scratch():
        _common._launch(kernel, grid, args, fb)


def fwd_gemm(args: dict, x):
    """The forward GEMM through TMA: ``args`` as the pointer kernel's (its two unit column
    strides dropped)."""
    args = {k: v for k, v in args.items() if k not in ("stride_xk", "stride_wk")}
    _, smem, _ = (0, 0, 0) if _common._interpreting() else _common._limits_of(x)
    _launch(_lowrank_fwd_gemm_tma_kernel, args["M"], args["N"], args,
            lambda: _tma_keep(_FWD_CONFIGS, smem, args["M"], args["N"], x.element_size(),
                              store_z=bool(args["STORE_Z"])), x)


def bwd_dx(args: dict, grad_y):
    """The dX GEMM through TMA: ``args`` as the pointer kernel's (its two unit column strides
    dropped)."""
    args = {k: v for k, v in args.items() if k not in ("stride_dyk", "stride_wn")}
    _, smem, _ = (0, 0, 0) if _common._interpreting() else _common._limits_of(grad_y)
    _launch(_lowrank_bwd_dx_tma_kernel, args["M"], args["N"], args,
            lambda: _tma_keep(_DX_CONFIGS, smem, args["M"], args["N"], grad_y.element_size(),
                              dropout=bool(args["HAS_DROPOUT"])), grad_y)

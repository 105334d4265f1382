"""sm_90 main loop of the 4-bit forward GEMM through TMA (``fastpeft.kernels.lowrank_4bit_sm90``).

Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o as :func:`fastpeft.kernels.lowrank_4bit._lowrank4_fwd_gemm_kernel`
computes it, with both operands of the main loop loaded by the Tensor Memory Accelerator: X
through a 2-D descriptor over [M, k] (as the dense TMA kernels of
:mod:`fastpeft.kernels.lowrank_sm90`), and the packed weight through a 2-D descriptor over its
32-bit words, [d, k/8] (8 weights a word). TMA fills rows and columns past the edges with zeros,
so the loop carries no masks and no address arithmetic for either. The scales of each (row,
quant block) (a few bytes per 64 weights, nested statistics expanded in registers) are plain
loads issued one k-step ahead and carried in registers, so the loop's only asynchronous copies
are the two TMA loads (no cp.async). Each word is dequantised by the
byte-permute lookup (:func:`fastpeft.kernels.lowrank_4bit.lut_lookup_asm`, bit-exact with
bitsandbytes) and the tile fed to wgmma.

The tiles take 32-128 weights a thread per k-step (BLOCK_K = 128: two quant blocks of 64 a row),
so the loop's fixed cost (barriers, the scale loads, the wgmma issue) spreads over more weights
than in the pointer kernel's tiles. Measured with ``fastpeft inspect`` and listed in
bench/NOTES.md.

Used where :func:`tma_ok` holds: sm_90, the byte-permute decode (k a multiple of the blocksize,
16-bit compute dtype whose rounding the state's equals), k a multiple of 32, M >= 64, X and the
packed bytes 16-byte aligned with unit column strides. Under the interpreter (which cannot run
PTX) the words are decoded by the select tree of
:func:`fastpeft.kernels.lowrank_4bit_format._code_value` instead, unless :data:`EMULATED_LUT` is set
(tests stand a PTX emulator in for the asm).
"""

from __future__ import annotations

import triton
import triton.language as tl

# the shared building blocks, looked up in _common when called (so that replacing one there, as
# fastpeft inspect does, reaches these launchers too)
from . import _common as _dense
from . import lowrank_sm90 as _sm90
from ._common import _adapter_init, _grouped_pid, _op, _store_y
from .lowrank_4bit import _LUT_LOOKUP_ASM, _dx4_store, _lut_tables, _row_scales
from .lowrank_4bit_format import _code_value, _to_w_dtype

__all__ = ["tma_ok", "tma_dx_ok", "fwd_gemm", "bwd_dx", "TMA_GEMM_TILES", "TMA_DX_TILES"]

# Under the interpreter: take the byte-permute lookup (tests replace the asm by an emulator)
# rather than the select tree.
EMULATED_LUT = False

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), in order of preference. Non-MMA
# instructions per weight per thread in the main loop (fastpeft inspect, sm_90, bf16 NF4,
# k = d = 4096, r = 16) in bench/NOTES.md; every tile kept for a problem is compiled by the static
# tests at r = 8, 16, 64 and with DoRA's epilogue and checked for spills.
TMA_GEMM_TILES = [(128, 256, 128, 8, 2), (128, 128, 128, 8, 3), (128, 128, 64, 8, 3)]
# 128 x 256 keeps ~250 registers: not with DoRA's Z store beside Y
_Z_TILES = {(128, 128, 128, 8, 3), (128, 128, 64, 8, 3)}
_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in TMA_GEMM_TILES]


# dX: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the W tile is [BLOCK_K rows of W (d),
# BLOCK_N columns (k)], G [BLOCK_M, r] lives beside the accumulator
TMA_DX_TILES = [(64, 256, 128, 8, 2), (64, 128, 128, 8, 3)]
_DX_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in TMA_DX_TILES]


def _tile(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def _tma4_keep(configs, smem, N, store_z=False):
    """Tiles whose operand ring (X tiles, packed words, and the dequantised W tile wgmma reads)
    fits in shared memory; the 256-wide tile only where d fills it and without the Z store."""
    def ok(c):
        bm, bn, bk, w, s = _tile(c)
        ring = s * (bm * bk * 2 + bn * bk // 2) + bn * bk * 2
        return ring <= smem and (not store_z or _tile(c) in _Z_TILES)

    def size_ok(c):
        return c.kwargs["BLOCK_N"] <= max(128, _dense._pow2(N))

    return _dense._keep(configs, set(TMA_GEMM_TILES), _tile, ok, size_ok)


def _prune(configs, named_args, **kwargs):
    args = _dense._prune_args(named_args, kwargs)
    _, smem, _ = _dense._limits_of(args["x_ptr"])
    return _tma4_keep(configs, smem, args["N"], store_z=bool(args.get("STORE_Z", False)))


def _tma4_dx_keep(configs, smem, N):
    def ok(c):
        bm, bn, bk, w, s = _tile(c)
        return s * (bm * bk * 2 + bn * bk // 2 + bk * 64 * 2) + bn * bk * 2 <= smem

    def size_ok(c):
        return c.kwargs["BLOCK_N"] <= max(128, _dense._pow2(N))

    return _dense._keep(configs, set(TMA_DX_TILES), _tile, ok, size_ok)


def _prune_dx(configs, named_args, **kwargs):
    args = _dense._prune_args(named_args, kwargs)
    _, smem, _ = _dense._limits_of(args["dy_ptr"])
    return _tma4_dx_keep(configs, smem, args["N"])


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _w4_words(q, sc, QUANT: tl.constexpr, W_KIND: tl.constexpr, OUT: tl.constexpr, ROWS: tl.constexpr,
              COLS: tl.constexpr, QBLOCK: tl.constexpr, LUT: tl.constexpr):
    """The tile [ROWS, COLS] (in OUT) from its packed words q [ROWS, COLS // 8] (byte j of a word:
    elements 2j, high nibble, and 2j + 1) and the scales of its (row, quant block)s, sc [ROWS, 1]
    or [ROWS, NB]. LUT: one byte-permute lookup per word, the table of each (row, block) formed
    once (bit for bit bitsandbytes); otherwise each nibble through the select tree, scaled and
    rounded to the state's dtype (W_KIND) as bitsandbytes does."""
    NB: tl.constexpr = COLS // QBLOCK if COLS > QBLOCK else 1
    WPB: tl.constexpr = COLS // 8 // NB
    q3 = tl.reshape(q, (ROWS, NB, WPB))
    s3 = tl.reshape(sc, (ROWS, NB, 1))
    if LUT:
        t0, t1, t2, t3, t4, t5, t6, t7 = _lut_tables(s3, QUANT, OUT == tl.float16)
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _LUT_LOOKUP_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r", [q3, t0, t1, t2, t3, t4, t5, t6, t7],
            dtype=(tl.int16,) * 8, is_pure=True, pack=1)
        # v_m holds element m with its 3 bits reversed (see lut_lookup_asm)
        w = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)), tl.join(tl.join(v4, v5), tl.join(v6, v7)))
        out = tl.reshape(w, (ROWS, COLS)).to(OUT, bitcast=True)
    else:
        e = tl.arange(0, 8)
        shift = (e // 2) * 8 + (1 - e % 2) * 4                    # element e: byte e // 2, high nibble first
        codes = (q3[:, :, :, None] >> shift[None, None, None, :]) & 15
        v = _to_w_dtype(_code_value(codes, QUANT) * s3[:, :, :, None], W_KIND)
        out = tl.reshape(v, (ROWS, COLS)).to(OUT)
    return out


@triton.autotune(configs=_CONFIGS, key=["M_KEY", "N", "K", "BLOCK_R", "STORE_Z", "W_KIND"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _lowrank4_fwd_gemm_tma_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, u_ptr, b_ptr, os_ptr, y_ptr,
    rs_ptr, z_ptr,
    M, N, K, R, M_KEY,
    stride_xm, stride_ym, stride_yn,
    scale,
    HAS_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, QBLOCK: tl.constexpr, QUANT: tl.constexpr,
    W_KIND: tl.constexpr, LAYOUT: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, LUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr = False, STORE_Z: tl.constexpr = False,
):
    """Y = s·(U Bᵀ) ⊙ o + b + X Wᵀ (with HAS_ROW_SCALE, DoRA: the pointer kernel's epilogue,
    :func:`_store_y`), X [M, K] and the packed W [N, K/8 words] read through TMA descriptors,
    each W tile dequantised in registers (:func:`_w4_words`)."""
    dtype = x_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(packed_ptr.to(tl.pointer_type(tl.int32)), shape=[N, K // 8],
                                       strides=[K // 8, 1], block_shape=[BLOCK_N, BLOCK_K // 8])
    acc = _adapter_init(u_ptr, b_ptr, os_ptr, bias_ptr, rm, rn, M, N, R, R, scale, HAS_BIAS and not HAS_ROW_SCALE,
                        HAS_OUT_SCALE, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)
    rows = rn % N                                   # rows past N: wrapped (valid) scales, never stored
    # the scales of each k-step are loaded one step ahead (plain loads, no cp.async: the loop's
    # only asynchronous copies are the two TMA loads); the last step's wrap to column 0, unused
    sc = _row_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, 0, N, K, BLOCK_N, BLOCK_K, QBLOCK,
                     NESTED, BLOCK2, UPCAST)
    for k0 in range(0, K, BLOCK_K):
        xt = x_desc.load([pid_m * BLOCK_M, k0])
        q = w_desc.load([pid_n * BLOCK_N, k0 // 8])
        wt = _w4_words(q, sc, QUANT, W_KIND, dtype, BLOCK_N, BLOCK_K, QBLOCK, LUT)
        k_next = k0 + BLOCK_K
        k_next = tl.where(k_next < K, k_next, 0)
        sc = _row_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, k_next, N, K, BLOCK_N, BLOCK_K, QBLOCK,
                         NESTED, BLOCK2, UPCAST)
        acc = tl.dot(_op(xt, dtype, UPCAST), _op(tl.trans(wt), dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    _store_y(acc, y_ptr, z_ptr, rs_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS, HAS_ROW_SCALE,
             STORE_Z)


@triton.autotune(configs=_DX_CONFIGS, key=["M_KEY", "N", "K", "BLOCK_R", "W_KIND"],
                 prune_configs_by={"early_config_prune": _prune_dx})
@triton.jit(do_not_specialize=["seed"])
def _lowrank4_bwd_dx_tma_kernel(
    dy_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, t_ptr, core_ptr, b_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_KEY,
    stride_dym, stride_dxm, stride_dxn,
    seed, dropout_p, adapter_scale,
    ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    QBLOCK: tl.constexpr, QUANT: tl.constexpr, W_KIND: tl.constexpr, LAYOUT: tl.constexpr,
    NESTED: tl.constexpr, BLOCK2: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, LUT: tl.constexpr,
):
    """dX [M, N=k] = dY W + s/(1-p)·mask ⊙ (dT A), reduction over K = d, as the pointer kernel
    (without out_scale and row scale): dY [M, K], the packed W [K, N/8 words] and B [K, R] read
    through TMA descriptors; the main loop adds dY W (W dequantised in registers) and
    G = dY B beside it; the epilogue is the pointer kernel's (:func:`_dx4_store`)."""
    dtype = dy_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, K], strides=[stride_dym, 1],
                                        block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(packed_ptr.to(tl.pointer_type(tl.int32)), shape=[K, N // 8],
                                       strides=[N // 8, 1], block_shape=[BLOCK_K, BLOCK_N // 8])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, R], strides=[R, 1], block_shape=[BLOCK_K, BLOCK_R])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # W's rows of this k-step are rows k0 .. k0 + BLOCK_K of W (d); their scales loaded a step ahead
    sc = _row_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rk, pid_n * BLOCK_N, K, N, BLOCK_K, BLOCK_N,
                     QBLOCK, NESTED, BLOCK2, UPCAST)
    for k0 in range(0, K, BLOCK_K):
        dyt = dy_desc.load([pid_m * BLOCK_M, k0])
        q = w_desc.load([k0, pid_n * BLOCK_N // 8])
        bt = b_desc.load([k0, 0])
        wt = _w4_words(q, sc, QUANT, W_KIND, dtype, BLOCK_K, BLOCK_N, QBLOCK, LUT)
        # rows past K (the last step's prefetch): scale 0, no load (masked in _row_scales)
        sc = _row_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, k0 + BLOCK_K + rk, pid_n * BLOCK_N, K, N,
                         BLOCK_K, BLOCK_N, QBLOCK, NESTED, BLOCK2, UPCAST)
        dy_op = _op(dyt, dtype, UPCAST)
        acc = tl.dot(dy_op, _op(wt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
        g = tl.dot(dy_op, _op(bt, dtype, UPCAST), g, input_precision=DOT_PRECISION)
    _dx4_store(acc, g, t_ptr, core_ptr, a_ptr, dx_ptr, rm, rn, M, N, R, stride_dxm, stride_dxn, seed, dropout_p,
               adapter_scale, ACTIVATION, CORE, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def tma_ok(x, data, K: int, lut: bool) -> bool:
    """Whether the forward GEMM over x [M, K] and the packed bytes ``data`` runs the TMA kernel:
    sm_90, W formed by byte permutes (``lut``, see ``lowrank_4bit._uses_lut``), K a multiple of
    32 (the words' row stride, K/2 bytes, 16-byte aligned), M >= 64 (wgmma's rows), x and the
    packed bytes TMA-readable."""
    if not lut or K % 32 or x.shape[0] < 64 or _sm90._arch(x) != 90:
        return False
    return _sm90._aligned(x) and data.data_ptr() % 16 == 0


def fwd_gemm(args: dict, x):
    """The forward GEMM through TMA: ``args`` as the pointer kernel's (its unit column stride of
    x dropped)."""
    args = {k: v for k, v in args.items() if k != "stride_xk"}
    args["LUT"] = not _dense._interpreting() or EMULATED_LUT
    M, N = args["M"], args["N"]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    if _dense._interpreting():
        fb = dict(BLOCK_M=64, BLOCK_N=_dense._interp_block(N), BLOCK_K=max(32, _dense._interp_block(args["K"])),
                  num_warps=4, num_stages=1)
    elif not _dense._autotuning():
        _, smem, _ = _dense._limits_of(x)
        fb = _dense._fallback(_tma4_keep(_CONFIGS, smem, N, store_z=bool(args["STORE_Z"])))
    else:
        fb = {}
    with _sm90._descriptor_scratch():
        _dense._launch(_lowrank4_fwd_gemm_tma_kernel, grid, args, fb)


def tma_dx_ok(grad_y, data, b, N: int, lut: bool, plain: bool) -> bool:
    """Whether dX over dY [M, d] runs the TMA kernel: as :func:`tma_ok` (k = ``N`` a multiple of
    32), B [d, r] TMA-readable (r a multiple of 8, contiguous), and ``plain``: no out_scale and
    no row scale (those scale each dY tile by a vector: the pointer kernel)."""
    if not plain or b.shape[1] % 8 or not b.is_contiguous():
        return False
    return tma_ok(grad_y, data, N, lut) and b.data_ptr() % 16 == 0


def bwd_dx(args: dict, grad_y):
    """dX through TMA: ``args`` as the pointer kernel's, less its unit stride, out_scale and row
    scale."""
    drop = ("stride_dyk", "os_ptr", "rs_ptr", "HAS_ROW_SCALE", "HAS_OUT_SCALE")
    args = {k: v for k, v in args.items() if k not in drop}
    args["LUT"] = not _dense._interpreting() or EMULATED_LUT
    M, N = args["M"], args["N"]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    if _dense._interpreting():
        fb = dict(BLOCK_M=64, BLOCK_N=max(32, _dense._interp_block(N)), BLOCK_K=_dense._interp_block(args["K"]),
                  num_warps=4, num_stages=1)
    elif not _dense._autotuning():
        _, smem, _ = _dense._limits_of(grad_y)
        fb = _dense._fallback(_tma4_dx_keep(_DX_CONFIGS, smem, N))
    else:
        fb = {}
    with _sm90._descriptor_scratch():
        _dense._launch(_lowrank4_bwd_dx_tma_kernel, grid, args, fb)

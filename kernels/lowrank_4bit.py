"""Fused Triton kernels of the low-rank op over a 4-bit base weight (``fastpeft.kernels.lowrank_4bit``).

W [d, k] is stored as bitsandbytes packs it (:mod:`fastpeft.kernels.lowrank_4bit_format`; nested
statistics expanded where they are read, in registers, no expanded copy). Tiles of W are
dequantised in registers (``code[q] · absmax`` in fp32, rounded to the quant state's dtype as
bitsandbytes does, then fed to ``tl.dot``) and never written to memory. The tile loader has
three layouts (``LAYOUT``, from k and the blocksize): 2, k a multiple of the blocksize (and the
packed bytes 4-byte aligned): compiled for a 16-bit compute dtype, a [rows, 8j] tile is one load
of [rows, j] 32-bit words, and each (row, block) forms its 16 possible values once, which byte
permutes (``prmt.b32``, 8 weights per lookup) then pick, bit-exact with bitsandbytes (see
:func:`lut_lookup_asm`); 1, k even: byte pairs, a scale gathered per byte; 0, k odd: each element
gathers its byte and its scale. Layouts 1 and 0, other dtypes and the interpreter (which cannot
run PTX) take ``code[q]`` from a tree of selects on the four index bits (``_code_value``, with the
scales' expansion and the weight's launch arguments in the format module).

Forward, Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o (names as in :mod:`fastpeft.kernels.lowrank`):
  * M > 16: T and U from the shared T pass (``_t_pass`` of :mod:`fastpeft.kernels._common`),
    then ``_lowrank4_fwd_gemm_kernel``: the adapter term and the bias initialise the
    accumulator, the main loop adds X Wᵀ with W tiles dequantised in registers;
  * M <= 16 (decode): one launch, ``_lowrank4_decode_kernel`` of
    :mod:`fastpeft.kernels.lowrank_4bit_decode` (T and Y in one pass over the packed W).

DoRA (``row_scale`` c [d]): both forward kernels end in the dense GEMM's epilogue
(``_store_y``, HAS_ROW_SCALE): Y = c ⊙ (X Wᵀ + s·(U Bᵀ) ⊙ o) + b, the unscaled product stored
beside Y only when asked (STORE_Z); the dX kernel scales each dY tile by c as it loads it.

Backward:
  * ``_lowrank4_bwd_dx_kernel``: dX = dY W + s·D'(dT A) in one kernel: its main loop over d
    accumulates dY W (W dequantised in registers) and G = (dY ⊙ o) B beside it; the epilogue forms
    H = G S | G ⊙ S | G, dT = H ⊙ σ'(T) and adds s/(1-p)·mask ⊙ (dT A) (the mask regenerated);
  * dA, dB, dS, d_o, db: the dense backward's pass over dY and dA kernel (no fill, W never read).

On sm_90, where W is formed by byte permutes and X (dY), the packed bytes (and B) are
TMA-readable, the GEMM (M >= 64) and dX (r a multiple of 8, no out_scale or row scale) run the
TMA main loops of :mod:`fastpeft.kernels.lowrank_4bit_sm90` instead (same epilogues).

Transient dense buffer: at M > 16 and M >= :func:`buffer_min_m` (``BUFFER_MIN_M_DEFAULT``, the
crossover derived in bench/NOTES.md, or ``FASTPEFT_4BIT_BUFFER_MIN_M``; 0 turns it off), forward
and dX dequantise the whole W once into a dense buffer (``_dequant4_kernel``, bit-exact with
bitsandbytes) and run the dense fused kernels on it; the buffer (d·k elements of x's dtype) lives
only inside the launcher call, never saved for backward. Below it, and always with ``row_scale``
(DoRA: nothing as large as W in a training step), W is dequantised in registers. ``fastpeft
bench`` times both (``fastpeft-4bit-triton-registers`` / ``-buffered``) beside the default.
Every accumulation is fp32; under the interpreter the operands are upcast to fp32 (its bf16
arithmetic is wrong).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as _dense    # shared building blocks, looked up there when called
from ._common import _act_grad, _adapter_init, _core_tile, _grouped_pid, _keep_mask, _op, _store_y, _words
from .lowrank import lowrank_fwd
from .lowrank_4bit_format import _QUANT, _W_KIND, _absmax, _code_value, _to_w_dtype, _weight_args  # noqa: F401
from .lowrank_4bit_format import (_FP4_CODE, _LUT_LOOKUP_ASM, _LUT_TABLE_FP4_BF16, _LUT_TABLE_FP4_F16,  # noqa: F401
                                  _LUT_TABLE_NF4_BF16, _LUT_TABLE_NF4_F16, _NF4_CODE, lut_lookup_asm, lut_table_asm)
from .lowrank_bwd import lowrank_bwd, lowrank_bwd_da, lowrank_bwd_dy

__all__ = ["lowrank_4bit_fwd", "lowrank_4bit_bwd", "dequantize_4bit_dense", "buffer_min_m",
           "DECODE_MAX_M", "BUFFER_MIN_M_ENV", "BUFFER_MIN_M_DEFAULT"]

DECODE_MAX_M = 16
BUFFER_MIN_M_ENV = "FASTPEFT_4BIT_BUFFER_MIN_M"
# Default M from which W goes through the transient dense buffer: the crossover predicted from
# `fastpeft inspect` (the in-register GEMM main loop, dequantising by byte permutes, spends ~5.7
# more instructions per weight and M tile of 128 rows than the dense one) and the H100/H200
# roofline (the buffer adds a write and a read of d·k bf16), bench/NOTES.md "The dense-buffer
# crossover". A prediction: to be replaced by the crossover `fastpeft bench --op 4bit` measures
# on a GPU.
BUFFER_MIN_M_DEFAULT = 640
_LAYOUTS = ({"layout": 2}, {"layout": 1}, {"layout": 0})

# Tiles, in order of preference, the same on sm_80 and sm_90. Forming a W tile in registers
# (bytes, code values, scales, interleaving) costs far more registers than loading a dense one, so
# every tile keeps it at 16 weights per thread, and the layouts that gather (k not a multiple of
# the blocksize, k odd) get a smaller accumulator budget. The static tests compile each tile for
# both architectures, every layout and its worst r, and check the SASS for spills.
# GEMM and dX: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_GEMM_TILES = [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 4, 3),
               (64, 64, 32, 8, 3), (16, 64, 32, 4, 3), (16, 64, 32, 8, 3)]
_DX_TILES = [(64, 128, 32, 8, 3), (64, 64, 32, 8, 3), (64, 64, 32, 4, 3), (32, 64, 32, 8, 3), (32, 64, 32, 4, 3),
             (16, 64, 32, 8, 3), (16, 32, 32, 8, 3)]
# Tiles kept only where W is formed by byte permutes (:func:`_uses_lut`), ahead of the others: a
# lookup needs a few registers per 8 weights, so a thread can form 32-64 weights per k-step and
# the loop's fixed cost (addresses, barriers, the activation loads) and the table of each (row,
# block) spread over more weights. Non-MMA instructions per weight per thread at k = d = 4096,
# bf16 NF4 (fastpeft inspect, sm_90 / sm_80): GEMM 128x128x32 11.9 / 11.2, 128x128x64 7.4 / 8.0,
# 128x128x128 6.4 / 7.3 (sm_80: 255 registers and spills); dX 64x128x32 14.6 / 13.5,
# 64x128x64 8.8 / 9.6, 128x128x64 - / 9.3 (sm_80: half the dequantisation per row of dY, 190
# registers). Per architecture: {arch: tiles}.
_GEMM_LUT_TILES = {80: [(128, 128, 64, 8, 3)], 90: [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3)]}
_DX_LUT_TILES = {80: [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3)], 90: [(64, 128, 64, 8, 3)]}
# dequantisation into a dense buffer: (BLOCK_N, BLOCK_K, num_warps); 16 weights per thread
_DEQUANT_TILE = (32, 128, 8)

_GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bm, bn, bk, w, s in dict.fromkeys(_GEMM_LUT_TILES[90] + _GEMM_LUT_TILES[80] + _GEMM_TILES)]
_DX_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in dict.fromkeys(_DX_LUT_TILES[80] + _DX_LUT_TILES[90] + _DX_TILES)]
# 32-bit registers per thread (an fp32 value counts 2 units, as in the dense module), per layout:
# 2 (whole blocks per row), 1 (k even), 0 (k odd: a byte and a scale gathered per element).
# The W tile being formed; the fp32 accumulators (plus G [BLOCK_M, r] in dX). dX forms its W
# tile transposed and keeps G live through the main loop, so the gathering layouts get half the
# tile budget there (measured on the sm_80/sm_90 SASS by the static tests).
_TILE_WORDS = 16
_DX_TILE_WORDS = {2: 16, 1: 8, 0: 8}
_ACC_WORDS = {2: 64, 1: 64, 0: 32}
_DX_LIVE_WORDS = {2: 40, 1: 36, 0: 32}


# --------------------------------------------------------------------------------------------
# Choosing configs (pure functions of the architecture and the problem, replayed by the static
# tests for sm_80 / sm_90 without a GPU).
# --------------------------------------------------------------------------------------------

def _uses_lut(layout: int, w_kind: int, dtype: torch.dtype) -> bool:
    """Whether the compiled tile of :func:`_w4_tile` forms W by byte permutes: k a multiple of the
    blocksize, a 16-bit compute dtype, and a state dtype whose rounding that dtype's equals."""
    kind = _W_KIND.get(dtype, 0)
    return layout == 2 and kind != 0 and w_kind in (0, kind)


def _gemm_keep(configs, arch, smem, M, N, block_r, elem, layout, dx=False, store_z=False, lut=False,
               row_scale=False):
    """Y GEMM (``dx=False``; M, N = d) and dX (M, N = k) over the tiles that fit for ``layout``;
    ``store_z``: the DoRA epilogue writes Z beside Y (the dense module's limit on the tile);
    ``lut``: W formed by byte permutes, where the larger tiles of ``_GEMM_LUT_TILES`` fit."""
    lut_tiles = (_DX_LUT_TILES if dx else _GEMM_LUT_TILES)[90 if arch >= 90 else 80]
    tiles = (_DX_TILES if dx else _GEMM_TILES) + (lut_tiles if lut else [])

    def tile_of(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    def ok(c):
        bm, bn, bk, w, s = tile_of(c)
        # pipelined operands: the activation tile and the packed bytes (W is formed in registers)
        main = s * (bm * bk * elem + bn * bk // 2) + bn * bk * elem
        if (bm, bn, bk, w, s) in lut_tiles:    # checked for spills at every r by the static tests
            # sm_80's dX keeps G [BLOCK_M, r] in registers beside the mma.sync accumulators: its
            # 64x128x64 tile takes 186 registers at r <= 16, 250 at r = 32, spills at r = 64 and
            # with DoRA's row scale (the dY tile scaled in fp32); 128x128x64 190 / 254 / spills
            r_ok = not (dx and arch < 90 and (block_r > 16 or row_scale))
            return main <= smem and r_ok and _dense._z_fits(store_z, bm, bn, w)
        if dx:  # G [BM, r] lives beside the accumulator through the main loop
            live_ok = _words(bm * bn + bm * block_r, elem, w) <= _DX_LIVE_WORDS[layout]
            tile_ok = _words(bn * bk, elem, w) <= _DX_TILE_WORDS[layout]
        else:
            live_ok = _words(bm * bn, elem, w) <= _ACC_WORDS[layout]
            tile_ok = _words(bn * bk, elem, w) <= _TILE_WORDS
        # sm_80: the 8-warp 16-row dX tile spills 8-12 bytes as launched (fastpeft inspect)
        spills = dx and arch == 80 and (bm, bn, bk, w) == (16, 64, 32, 8)
        return main <= smem and live_ok and tile_ok and not spills and _dense._z_fits(store_z, bm, bn, w)

    def size_ok(c):
        bm = c.kwargs["BLOCK_M"]
        return (bm <= max(16, _dense._pow2(M)) and c.kwargs["BLOCK_N"] <= max(16, _dense._pow2(N))
                and _dense._wgmma_rows_ok(arch, bm, _dense._pow2(M)))

    return _dense._keep(configs, tiles, tile_of, ok, size_ok)


def _prune_gemm(configs, named_args, **kwargs):
    args = _dense._prune_args(named_args, kwargs)
    arch, smem, _ = _dense._limits_of(args["x_ptr"])
    return _gemm_keep(configs, arch, smem, args["M_KEY"], args["N"], args["BLOCK_R"], args["x_ptr"].element_size(),
                      args["LAYOUT"], store_z=bool(args.get("STORE_Z", False)),
                      lut=_uses_lut(args["LAYOUT"], args["W_KIND"], args["x_ptr"].dtype))


def _prune_dx(configs, named_args, **kwargs):
    args = _dense._prune_args(named_args, kwargs)
    arch, smem, _ = _dense._limits_of(args["dy_ptr"])
    return _gemm_keep(configs, arch, smem, args["M_KEY"], args["N"], args["BLOCK_R"], args["dy_ptr"].element_size(),
                      args["LAYOUT"], dx=True, lut=_uses_lut(args["LAYOUT"], args["W_KIND"], args["dy_ptr"].dtype),
                      row_scale=bool(args.get("HAS_ROW_SCALE", False)))




@triton.jit
def _row_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, col0, n_rows, n_cols, ROWS: tl.constexpr,
                COLS: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """Scales of W[rows, col0 : col0 + COLS] when every row holds whole blocks (k % QBLOCK == 0):
    [ROWS, 1] when the tile lies in one block, else [ROWS, COLS // QBLOCK]."""
    per_row = n_cols // QBLOCK
    if COLS <= QBLOCK:
        idx = rows.to(tl.int64) * per_row + col0 // QBLOCK
        sc = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, idx, rows < n_rows, NESTED, BLOCK2,
                     INTERPRETED)[:, None]
    else:
        nb = col0 // QBLOCK + tl.arange(0, COLS // QBLOCK)
        idx = rows.to(tl.int64)[:, None] * per_row + nb[None, :]
        sc = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, idx,
                     (rows < n_rows)[:, None] & (nb < per_row)[None, :], NESTED, BLOCK2, INTERPRETED)
    return sc


@triton.jit
def _scaled(v, sc, ROWS: tl.constexpr, WIDTH: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr):
    """v [ROWS, WIDTH] times per-group scales sc ([ROWS, 1], or [ROWS, WIDTH // GROUP] when SPLIT)."""
    if SPLIT:
        out = tl.reshape(tl.reshape(v, (ROWS, WIDTH // GROUP, GROUP)) * sc[:, :, None], (ROWS, WIDTH))
    else:
        out = v * sc
    return out


@triton.jit
def _lut_tables(sc, QUANT: tl.constexpr, FP16: tl.constexpr):
    """The 8 table registers of :data:`_LUT_TABLE_NF4_BF16` & co. for the fp32 scales ``sc``."""
    bits = sc.to(tl.int32, bitcast=True)
    if QUANT == 0:
        if FP16:
            asm: tl.constexpr = _LUT_TABLE_NF4_F16
        else:
            asm: tl.constexpr = _LUT_TABLE_NF4_BF16
    else:
        if FP16:
            asm: tl.constexpr = _LUT_TABLE_FP4_F16
        else:
            asm: tl.constexpr = _LUT_TABLE_FP4_BF16
    return tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,=r,=r,=r,=r,r", [bits], dtype=(tl.int32,) * 8,
                                     is_pure=True, pack=1)


@triton.jit
def _w4_tile_lut(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, col0, n_rows, n_cols,
                 ROWS: tl.constexpr, COLS: tl.constexpr, QBLOCK: tl.constexpr, QUANT: tl.constexpr, OUT: tl.constexpr,
                 NESTED: tl.constexpr, BLOCK2: tl.constexpr, INTERPRETED: tl.constexpr):
    """:func:`_w4_tile` for LAYOUT 2 by byte permutes (see :func:`lut_lookup_asm`): one word of 8
    weights per lookup, the table of each (row, block) formed once. ``col0`` is a multiple of COLS.
    ``INTERPRETED`` only selects how a nested absmax is rounded (see :func:`_absmax`)."""
    NB: tl.constexpr = COLS // QBLOCK if COLS > QBLOCK else 1      # quant blocks across the tile
    WPB: tl.constexpr = COLS // 8 // NB                               # words per row and block
    WPQ: tl.constexpr = QBLOCK // 8                                   # words per quant block
    per_row = n_cols // QBLOCK
    wi = tl.arange(0, NB)[None, :, None] * WPB + tl.arange(0, WPB)[None, None, :]     # [1, NB, WPB]
    word = (col0 // COLS) * (COLS // 8) + wi
    mask = (rows < n_rows)[:, None, None] & (word < per_row * WPQ)
    words = packed_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None, None] * (per_row * WPQ) + word
    q = tl.load(words, mask=mask, other=0)
    sc = _row_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, col0, n_rows, n_cols, ROWS, COLS, QBLOCK,
                     NESTED, BLOCK2, INTERPRETED)
    t0, t1, t2, t3, t4, t5, t6, t7 = _lut_tables(sc[:, :, None], QUANT, OUT == tl.float16)
    v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
        _LUT_LOOKUP_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r", [q, t0, t1, t2, t3, t4, t5, t6, t7],
        dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    # v_m holds element m with its bits reversed: joined as [.., i, j, k] = v_{4k+2j+i}, element 4i+2j+k
    w = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)), tl.join(tl.join(v4, v5), tl.join(v6, v7)))
    return tl.reshape(w, (ROWS, COLS)).to(OUT, bitcast=True)


@triton.jit
def _mma_operand(w, MMA_V2: tl.constexpr):
    """w unchanged, as the W operand of ``tl.dot``; with MMA_V2 (sm_80's mma.sync) behind an
    opaque copy. Triton lays out both mma.sync operands by the narrowest load behind them, halved
    past a ``tl.join`` (AccelerateMatmul's ``computeOrigBitWidth``): the uint8 codes and the
    lookup's joins gave kWidth 8, which ``ldmatrix`` cannot load, so X came through 128-bit
    shared loads and ~4 register moves per mma. A non-pure PTX copy ends that walk (kWidth 2,
    ``ldmatrix``); ptxas drops the copy. wgmma (sm_90) reads shared memory and skips it."""
    if MMA_V2:
        if w.dtype.primitive_bitwidth == 16:
            bits = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [w.to(tl.int16, bitcast=True)],
                                             dtype=tl.int16, is_pure=False, pack=2)
            out = bits.to(w.dtype, bitcast=True)
        else:
            bits = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [w.to(tl.int32, bitcast=True)],
                                             dtype=tl.int32, is_pure=False, pack=1)
            out = bits.to(w.dtype, bitcast=True)
    else:
        out = w
    return out


@triton.jit
def _w4_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, col0, n_rows, n_cols,
             ROWS: tl.constexpr, COLS: tl.constexpr, QBLOCK: tl.constexpr, QUANT: tl.constexpr,
             W_KIND: tl.constexpr, LAYOUT: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr,
             INTERPRETED: tl.constexpr, OUT: tl.constexpr):
    """W[rows, col0 : col0 + COLS] of the packed [n_rows, n_cols] weight, dequantised: code[q]·absmax
    in fp32, rounded to the state's dtype; 0 outside the weight. ``col0`` is a multiple of COLS,
    COLS even. The absmax comes from :func:`_absmax` (nested statistics expanded in registers).
    ``OUT``: the dtype the caller casts the tile to.

    LAYOUT 2 (k % QBLOCK == 0): compiled, with a 16-bit ``OUT`` that the state's rounding equals
    (state fp32, or of ``OUT``'s dtype), by table lookups (:func:`_w4_tile_lut`), in ``OUT``;
    otherwise (and under the interpreter, ``INTERPRETED``, which cannot run PTX) byte pairs, one
    scale per row and block, each value from the select tree of :func:`_code_value`.
    LAYOUT 1 (k even): byte pairs, a scale per byte; 0 (k odd): a byte and a scale per element."""
    OUT_KIND: tl.constexpr = 1 if OUT == tl.float16 else (2 if OUT == tl.bfloat16 else -1)
    if LAYOUT == 2 and not INTERPRETED and OUT_KIND > 0 and (W_KIND == 0 or W_KIND == OUT_KIND) and QBLOCK % 8 == 0:
        w = _w4_tile_lut(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, col0, n_rows, n_cols,
                         ROWS, COLS, QBLOCK, QUANT, OUT, NESTED, BLOCK2, INTERPRETED)
    elif LAYOUT == 0:
        cols = col0 + tl.arange(0, COLS)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        idx = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        b = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        q = tl.where((idx & 1) == 0, b >> 4, b & 15)
        scale = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, idx // QBLOCK, mask, NESTED, BLOCK2,
                        INTERPRETED)
        w = _to_w_dtype(_code_value(q, QUANT) * scale, W_KIND)
    else:
        # row n starts at byte n·k/2; columns (2j, 2j+1) share one byte (and one block)
        half = col0 // 2 + tl.arange(0, COLS // 2)
        mask = (rows < n_rows)[:, None] & (half < n_cols // 2)[None, :]
        byte = rows.to(tl.int64)[:, None] * (n_cols // 2) + half[None, :]
        b = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
        hi = _code_value(b >> 4, QUANT)
        lo = _code_value(b & 15, QUANT)
        if LAYOUT == 2:
            sc = _row_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, col0, n_rows, n_cols, ROWS, COLS,
                             QBLOCK, NESTED, BLOCK2, INTERPRETED)
            hi = _scaled(hi, sc, ROWS, COLS // 2, QBLOCK // 2, COLS > QBLOCK)
            lo = _scaled(lo, sc, ROWS, COLS // 2, QBLOCK // 2, COLS > QBLOCK)
        else:
            scale = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, byte // (QBLOCK // 2), mask, NESTED,
                            BLOCK2, INTERPRETED)
            hi = hi * scale
            lo = lo * scale
        w = tl.interleave(_to_w_dtype(hi, W_KIND), _to_w_dtype(lo, W_KIND))
    return w


# --------------------------------------------------------------------------------------------
# Forward kernels
# --------------------------------------------------------------------------------------------

@triton.autotune(configs=_GEMM_CONFIGS, key=["M_KEY", "N", "K", "BLOCK_R", "LAYOUT", "STORE_Z", "W_KIND", "MMA_V2"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _lowrank4_fwd_gemm_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, u_ptr, b_ptr, os_ptr, y_ptr,
    rs_ptr, z_ptr,
    M, N, K, R, M_KEY,
    stride_xm, stride_xk, stride_ym, stride_yn,
    scale,
    HAS_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, QBLOCK: tl.constexpr, QUANT: tl.constexpr,
    W_KIND: tl.constexpr, LAYOUT: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_ROW_SCALE: tl.constexpr = False, STORE_Z: tl.constexpr = False,
    MMA_V2: tl.constexpr = False,
):
    """Y = s·(U Bᵀ) ⊙ o + b + X Wᵀ, W [N, K] dequantised tile by tile in registers.

    With HAS_ROW_SCALE (DoRA) the epilogue is the dense GEMM's (``_store_y``):
    Y = c ⊙ (X Wᵀ + s·(U Bᵀ) ⊙ o) + b, and Z = X Wᵀ + s·(U Bᵀ) ⊙ o beside it with STORE_Z."""
    dtype = x_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = _adapter_init(u_ptr, b_ptr, os_ptr, bias_ptr, rm, rn, M, N, R, R, scale, HAS_BIAS and not HAS_ROW_SCALE,
                        HAS_OUT_SCALE, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)
    # rows past M read wrapped addresses and are never stored; W rows past N dequantise to 0
    x_rows = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=(kk < K)[None, :], other=0.0)
        wt = _w4_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rn % N, k0, N, K, BLOCK_N, BLOCK_K,
                      QBLOCK, QUANT, W_KIND, LAYOUT, NESTED, BLOCK2, UPCAST, dtype)
        acc = tl.dot(_op(xt, dtype, UPCAST), _op(tl.trans(_mma_operand(wt, MMA_V2)), dtype, UPCAST), acc,
                     input_precision=DOT_PRECISION)
    _store_y(acc, y_ptr, z_ptr, rs_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS, HAS_ROW_SCALE,
             STORE_Z)


# --------------------------------------------------------------------------------------------
# Backward: dX
# --------------------------------------------------------------------------------------------

@triton.jit
def _dx4_store(acc, g, t_ptr, core_ptr, a_ptr, dx_ptr, rm, rn, M, N, R, stride_dxm, stride_dxn, seed, dropout_p,
               adapter_scale, ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dX kernels' epilogue: acc = dY W [BLOCK_M, BLOCK_N] plus the adapter term from
    G = (dY ⊙ o) B [BLOCK_M, BLOCK_R]: H = G S (R_CHUNK columns at a time) | G ⊙ S | G,
    dT = H ⊙ σ'(T), s/(1-p)·mask ⊙ (dT A) with the mask regenerated; written to dX."""
    dtype = dx_ptr.dtype.element_ty
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_n = rn < N
    mask_r = rr < R
    # the adapter term: dT A, then s/(1-p) and the mask
    t_rows = t_ptr + rm.to(tl.int64)[:, None] * R
    adp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if CORE == 2:
        g_op = _op(g, dtype, UPCAST)
        for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
            rj = j0 + tl.arange(0, R_CHUNK)
            mask_j = rj < R
            h = tl.dot(g_op, _op(_core_tile(core_ptr, R, rr, rj, False), dtype, UPCAST),
                       input_precision=DOT_PRECISION)
            if ACTIVATION != 0:
                tj = tl.load(t_rows + rj[None, :], mask=mask_m[:, None] & mask_j[None, :], other=0.0)
                h = h * _act_grad(tj.to(tl.float32), ACTIVATION)
            aj = tl.load(a_ptr + rj.to(tl.int64)[:, None] * N + rn[None, :],
                         mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            adp = tl.dot(_op(h.to(dtype), dtype, UPCAST), _op(aj, dtype, UPCAST), adp, input_precision=DOT_PRECISION)
    else:
        h = g
        if CORE == 1:
            h = h * tl.load(core_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION != 0:
            tt = tl.load(t_rows + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            h = h * _act_grad(tt.to(tl.float32), ACTIVATION)
        at = tl.load(a_ptr + rr.to(tl.int64)[:, None] * N + rn[None, :],
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        adp = tl.dot(_op(h.to(dtype), dtype, UPCAST), _op(at, dtype, UPCAST), adp, input_precision=DOT_PRECISION)
    adp = adp * tl.to_tensor(adapter_scale).to(tl.float32)
    if HAS_DROPOUT:
        adp = tl.where(_keep_mask(seed, rm, rn, tl.to_tensor(dropout_p).to(tl.float32)), adp, 0.0)
    acc += adp
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rn[None, :] * stride_dxn
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_DX_CONFIGS, key=["M_KEY", "N", "K", "BLOCK_R", "LAYOUT", "W_KIND", "MMA_V2", "HAS_ROW_SCALE"],
                 prune_configs_by={"early_config_prune": _prune_dx})
@triton.jit(do_not_specialize=["seed"])
def _lowrank4_bwd_dx_kernel(
    dy_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, t_ptr, core_ptr, b_ptr, os_ptr, a_ptr, dx_ptr,
    rs_ptr,
    M, N, K, R, M_KEY,
    stride_dym, stride_dyk, stride_dxm, stride_dxn,
    seed, dropout_p, adapter_scale,
    ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    QBLOCK: tl.constexpr, QUANT: tl.constexpr, W_KIND: tl.constexpr, LAYOUT: tl.constexpr,
    NESTED: tl.constexpr, BLOCK2: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_ROW_SCALE: tl.constexpr = False,
    MMA_V2: tl.constexpr = False,
):
    """dX [M, N=k] = dY W + s/(1-p)·mask ⊙ (dT A), reduction over K = d.

    With HAS_ROW_SCALE (DoRA, Y = c ⊙ Z + b) the op's output gradient is dZ = c ⊙ dY: each dY
    tile is scaled by c [K] as it is loaded, for both terms (no [M, d] pass before the kernel).

    The main loop adds dY W (W [K, N] dequantised in registers) and, beside it,
    G = (dY ⊙ o) B [BLOCK_M, r]. Epilogue: H = G S (R_CHUNK columns at a time) | G ⊙ S | G,
    dT = H ⊙ σ'(T), and the adapter term dT A with the dropout mask regenerated from the seed.
    """
    dtype = dy_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_n = rn < N
    mask_r = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dy_rows = dy_ptr + (rm % M).to(tl.int64)[:, None] * stride_dym
    b_cols = b_ptr + (rr % R)[None, :]
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        dyt = tl.load(dy_rows + kk[None, :] * stride_dyk, mask=mask_k[None, :], other=0.0)
        if HAS_ROW_SCALE:
            dyt = dyt.to(tl.float32) * tl.load(rs_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        wt = _w4_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, kk, pid_n * BLOCK_N, K, N, BLOCK_K,
                      BLOCK_N, QBLOCK, QUANT, W_KIND, LAYOUT, NESTED, BLOCK2, UPCAST, dtype)
        dy_op = _op(dyt, dtype, UPCAST)
        acc = tl.dot(dy_op, _op(_mma_operand(wt, MMA_V2), dtype, UPCAST), acc, input_precision=DOT_PRECISION)
        bt = tl.load(b_cols + kk.to(tl.int64)[:, None] * R, mask=mask_k[:, None], other=0.0)
        if HAS_OUT_SCALE:
            osv = tl.load(os_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)
            dy_op = _op(dyt.to(tl.float32) * osv[None, :], dtype, UPCAST)
        g = tl.dot(dy_op, _op(bt, dtype, UPCAST), g, input_precision=DOT_PRECISION)
    _dx4_store(acc, g, t_ptr, core_ptr, a_ptr, dx_ptr, rm, rn, M, N, R, stride_dxm, stride_dxn, seed, dropout_p,
               adapter_scale, ACTIVATION, CORE, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)


@triton.jit
def _dequant4_kernel(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, w_ptr, N, K, stride_wn,
                     QBLOCK: tl.constexpr, QUANT: tl.constexpr, W_KIND: tl.constexpr, LAYOUT: tl.constexpr,
                     NESTED: tl.constexpr, BLOCK2: tl.constexpr, INTERPRETED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W [N, K] = code[q]·absmax, rounded to the quant state's dtype, then cast to W's dtype (as
    bitsandbytes' dequantisation followed by ``.to(dtype)``): one [BLOCK_N, BLOCK_K] tile a program."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    wt = _w4_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rn, k0, N, K, BLOCK_N, BLOCK_K, QBLOCK,
                  QUANT, W_KIND, LAYOUT, NESTED, BLOCK2, INTERPRETED, w_ptr.dtype.element_ty)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    tl.store(w_ptrs, wt.to(w_ptr.dtype.element_ty), mask=(rn < N)[:, None] & (rk < K)[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def dequantize_4bit_dense(packed, quant_state, dtype: torch.dtype, weight_args=None) -> torch.Tensor:
    """The dense W [d, k] in ``dtype`` on the packed weight's device, in one kernel: equal bit for
    bit to ``fastpeft.dequantize_4bit(packed, quant_state).to(dtype)`` (on a GPU; under the
    interpreter, which truncates fp32 -> bf16, a bf16 state may differ by one ulp).
    ``weight_args``: what :func:`_weight_args` returned for them, when the caller has it."""
    if dtype not in _W_KIND:
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    data, scales, wmeta, (d, k) = weight_args or _weight_args(packed, quant_state, None)
    w = torch.empty((d, k), dtype=dtype, device=data.device)
    if w.numel() == 0:
        return w
    if _dense._interpreting():
        bn, bk, warps = _dense._interp_block(d), max(32, _dense._interp_block(k)), 4
    else:
        bn, bk, warps = _DEQUANT_TILE
    with _dense._device(w):
        _dequant4_kernel[(triton.cdiv(d, bn), triton.cdiv(k, bk))](
            data, **scales, w_ptr=w, N=d, K=k, stride_wn=w.stride(0), BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
            INTERPRETED=_dense._interpreting(), **wmeta)
    return w


def buffer_min_m() -> Optional[int]:
    """The smallest M at which the launchers dequantise W into a transient dense buffer and run
    the dense fused kernels (only ever at M > 16): ``FASTPEFT_4BIT_BUFFER_MIN_M`` when set (0:
    never), else ``BUFFER_MIN_M_DEFAULT``."""
    value = os.environ.get(BUFFER_MIN_M_ENV, "").strip()
    if not value:
        return BUFFER_MIN_M_DEFAULT
    if not value.isdigit():
        raise ValueError(f"{BUFFER_MIN_M_ENV} must be a whole number >= 1, 0 (never) or unset (the default "
                         f"{BUFFER_MIN_M_DEFAULT}), got {value!r}")
    return int(value) or None


def _mma_v2(t) -> bool:
    """Whether the pointer kernels run on mma.sync (sm_80), where the W operand goes through
    :func:`_mma_operand`'s opaque copy; never under the interpreter (no PTX there). DoRA's dX
    (the dY tile scaled in fp32) keeps the plain operand: with the copy its 32x64x32 tile
    spilled 8 bytes on sm_80."""
    return not _dense._interpreting() and _dense._limits_of(t)[0] < 90


def _buffered(M: int) -> bool:
    min_m = buffer_min_m()
    return M > DECODE_MAX_M and min_m is not None and M >= min_m


def lowrank_4bit_fwd(x, packed, quant_state, bias, lora_A, lora_B, core, out_scale, scale: float,
                     dropout_p: float, seed: int, activation, row_scale=None, z=None):
    """Forward on 2-D x [M, k] over the 4-bit W: returns (Y [M, d], T [M, r]) in x's dtype.

    Y = X Wᵀ + b + s·(σ(D(X)Aᵀ)Sᵀ)Bᵀ ⊙ o with W dequantised in registers (never in memory), or,
    where :func:`buffer_min_m` asks for it, into a dense buffer freed when this call returns.
    ``row_scale`` c (fp32 [d], DoRA): Y = c ⊙ (X Wᵀ + s·(σ(D(X)Aᵀ)Sᵀ)Bᵀ ⊙ o) + b from the same
    epilogue, and the unscaled product written into ``z`` ([M, d], x's dtype) when given."""
    _dense._check_dtype(x)
    M, K = x.shape
    weight_args = _weight_args(packed, quant_state, x.device)
    data, scales, wmeta, (N, k) = weight_args
    if k != K:
        raise ValueError(f"x has k={K} columns but the 4-bit weight is [d={N}, k={k}]")
    if row_scale is None and _buffered(M):   # DoRA never: it allocates nothing as large as W
        weight = dequantize_4bit_dense(packed, quant_state, x.dtype, weight_args)
        return lowrank_fwd(x, weight, bias, lora_A, lora_B, core, out_scale, scale, dropout_p, seed,
                                  activation, row_scale, z)
    R = lora_A.shape[0]
    BR = _dense._block_r(R)
    act = _dense._ACTIVATIONS[activation]
    core_kind = 0 if core is None else (1 if core.dim() == 1 else 2)
    b = lora_B.contiguous()
    interp = _dense._interpreting()
    precision = _dense._dot_precision(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    adapter = dict(b_ptr=b, os_ptr=out_scale if out_scale is not None else b,
                   bias_ptr=bias if bias is not None else b, HAS_BIAS=bias is not None,
                   HAS_OUT_SCALE=out_scale is not None, BLOCK_R=BR, R_CHUNK=_dense._r_chunk(BR),
                   UPCAST=interp, DOT_PRECISION=precision,
                   rs_ptr=row_scale if row_scale is not None else b, z_ptr=z if z is not None else y,
                   HAS_ROW_SCALE=row_scale is not None, STORE_Z=z is not None)
    with _dense._device(x):
        if M <= DECODE_MAX_M:
            from .lowrank_4bit_decode import _decode       # (it imports this module)
            t = _decode(x, data, scales, wmeta, lora_A, core, y, scale, dropout_p, seed, act, core_kind, adapter)
            return y, t
        a = lora_A.contiguous()
        t = torch.empty((M, R), dtype=x.dtype, device=x.device)
        u = torch.empty((M, R), dtype=x.dtype, device=x.device) if core_kind != 0 or act != 0 else t
        _dense._t_pass(x, a, core.contiguous() if core is not None else a, core_kind, act, dropout_p, seed, t, u)
        args = dict(x_ptr=x, packed_ptr=data, **scales, u_ptr=u, y_ptr=y,
                    M=M, N=N, K=K, R=R, M_KEY=_dense._pow2(M), stride_xm=x.stride(0), stride_xk=x.stride(1),
                    stride_ym=y.stride(0), stride_yn=y.stride(1), scale=float(scale),
                    GROUP_M=_dense._GROUP_M, **wmeta, **adapter)
        lut = _uses_lut(wmeta["LAYOUT"], wmeta["W_KIND"], x.dtype)
        from . import lowrank_4bit_sm90 as _tma4
        if _tma4.tma_ok(x, data, K, lut):      # sm_90: X and the packed words through TMA
            _tma4.fwd_gemm(args, x)
            return y, t
        if interp:
            fb = dict(BLOCK_M=_dense._interp_block(M), BLOCK_N=_dense._interp_block(N),
                      BLOCK_K=max(32, _dense._interp_block(K)), num_warps=4, num_stages=1)
        elif not _dense._autotuning():
            arch, smem, _ = _dense._limits_of(x)
            fb = _dense._fallback(_gemm_keep(_GEMM_CONFIGS, arch, smem, M, N, BR, x.element_size(),
                                             wmeta["LAYOUT"], store_z=z is not None, lut=lut))
        else:
            fb = {}
        _dense._launch(_lowrank4_fwd_gemm_kernel,
                       lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
                       dict(args, MMA_V2=_mma_v2(x)), fb)
    return y, t


def lowrank_4bit_bwd(grad_y, x, packed, quant_state, T, lora_A, lora_B, core, out_scale, scale, dropout_p,
                     seed, activation, need_x: bool, need_A: bool, need_B: bool, need_core: bool,
                     need_out_scale: bool, need_bias: bool, deterministic: bool = False, row_scale=None):
    """Backward on 2-D tensors: (dX, dA, dB, dcore, dout_scale, dbias), ``None`` where not needed.

    dX = dY W + s·D'(dT A) runs in one kernel over the packed W (see the module docstring); the
    adapter gradients are the dense module's launches, which never read W: dB = s·dYoᵀU, dS, d_o
    and db = Σ dY (and dT when dA needs it) from its pass over dY, dA = s·dTᵀD(X) from its dA
    kernel. At most three launches; every reduction in a fixed order.

    ``row_scale`` c (fp32 [d], DoRA, without core or out_scale): ``grad_y`` is dY of
    Y = c ⊙ Z + b and the op's own output gradient is dZ = c ⊙ dY, never formed: the adapter
    term only sees dZ through (dZ ⊙ o) = dY ⊙ c, so the dense pass runs with c as its out_scale
    (dB, dA, and db = Σ dY unchanged), and the dX kernel scales each dY tile by c as it loads it."""
    _dense._check_dtype(grad_y)
    M, N = grad_y.shape
    weight_args = _weight_args(packed, quant_state, grad_y.device)
    data, scales, wmeta, (d, K) = weight_args
    if d != N:
        raise ValueError(f"grad_y has {N} columns but the 4-bit weight is [d={d}, k={K}]")
    if row_scale is not None:
        if core is not None or out_scale is not None:
            raise ValueError("row_scale (DoRA) takes no core and no out_scale")
        out_scale = row_scale            # the dense kernels read o in fp32
        need_out_scale = False
    # dX through the dense kernels over a transient W; DoRA never (nothing as large as W)
    elif need_x and _buffered(M):
        weight = dequantize_4bit_dense(packed, quant_state, grad_y.dtype, weight_args)
        return lowrank_bwd(grad_y, x, weight, T, lora_A, lora_B, core, out_scale, scale, dropout_p, seed,
                                  activation, need_x, need_A, need_B, need_core, need_out_scale, need_bias,
                                  deterministic=deterministic)
    if need_A and x is None:
        raise ValueError("lowrank_4bit_bwd needs x when need_A is True")
    p = float(dropout_p)
    d_t, d_b, d_core, d_os, d_bias = lowrank_bwd_dy(
        grad_y, T, lora_B, core, out_scale, scale, activation, need_A, need_B, need_core, need_out_scale,
        need_bias)
    d_a = None
    if need_A:
        with _dense._device(grad_y):
            d_a = lowrank_bwd_da(d_t, x, p, seed, float(scale) / (1.0 - p), torch.empty_like(lora_A))
    dx = None
    if need_x:
        R = lora_A.shape[0]
        BR = _dense._block_r(R)
        interp = _dense._interpreting()
        core_kind = 0 if core is None else (1 if core.dim() == 1 else 2)
        a = lora_A.contiguous()
        b = lora_B.contiguous()
        dx = torch.empty((M, K), dtype=grad_y.dtype, device=grad_y.device)
        has_rs = row_scale is not None
        args = dict(dy_ptr=grad_y, packed_ptr=data, **scales, t_ptr=T.contiguous(),
                    core_ptr=core.contiguous() if core is not None else a, b_ptr=b,
                    os_ptr=out_scale if out_scale is not None and not has_rs else b, a_ptr=a, dx_ptr=dx,
                    rs_ptr=row_scale if has_rs else b, HAS_ROW_SCALE=has_rs,
                    M=M, N=K, K=N, R=R, M_KEY=_dense._pow2(M),
                    stride_dym=grad_y.stride(0), stride_dyk=grad_y.stride(1),
                    stride_dxm=dx.stride(0), stride_dxn=dx.stride(1),
                    seed=int(seed), dropout_p=p, adapter_scale=float(scale) / (1.0 - p),
                    ACTIVATION=_dense._ACTIVATIONS[activation], CORE=core_kind,
                    HAS_OUT_SCALE=out_scale is not None and not has_rs, HAS_DROPOUT=p > 0.0, **wmeta, UPCAST=interp,
                    DOT_PRECISION=_dense._dot_precision(grad_y.dtype),
                    BLOCK_R=BR, R_CHUNK=_dense._r_chunk(BR), GROUP_M=_dense._GROUP_M)
        lut = _uses_lut(wmeta["LAYOUT"], wmeta["W_KIND"], grad_y.dtype)
        from . import lowrank_4bit_sm90 as _tma4
        with _dense._device(grad_y):
            if _tma4.tma_dx_ok(grad_y, data, b, K, lut, out_scale is None and not has_rs):
                _tma4.bwd_dx(args, grad_y)      # sm_90: dY, the packed words and B through TMA
                return dx, d_a, d_b, d_core, d_os, d_bias
            if interp:
                fb = dict(BLOCK_M=_dense._interp_block(M), BLOCK_N=max(32, _dense._interp_block(K)),
                          BLOCK_K=_dense._interp_block(N), num_warps=4, num_stages=1)
            elif not _dense._autotuning():
                arch, smem, _ = _dense._limits_of(grad_y)
                fb = _dense._fallback(_gemm_keep(_DX_CONFIGS, arch, smem, M, K, BR, grad_y.element_size(),
                                                 wmeta["LAYOUT"], dx=True, lut=lut, row_scale=has_rs))
            else:
                fb = {}
            _dense._launch(_lowrank4_bwd_dx_kernel,
                           lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),),
                           dict(args, MMA_V2=_mma_v2(grad_y) and not has_rs), fb)
    return dx, d_a, d_b, d_core, d_os, d_bias


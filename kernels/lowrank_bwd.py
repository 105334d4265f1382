"""Backward kernels of the dense low-rank adapter op and their launchers (``fastpeft.kernels.lowrank_bwd``).

Names as in :mod:`fastpeft.kernels.lowrank` (the forward), whose module re-exports the public
launchers. Backward from dY, with dYo = dY ⊙ o, G = dYo B, H = G S | G ⊙ S | G and
dT = H ⊙ σ'(T) (the derivation of every gradient: :func:`lowrank_bwd`).

At most three launches, no fill, every sum in a fixed order (bit-identical across runs):
  * ``_lowrank_bwd_dy_kernel``: one pass over dY with two kinds of program. Row programs (BLOCK_M
    rows each) accumulate G over d in registers, then store dT and their partial of dS = s·Gᵀ Z
    (or s·Σ_rows G ⊙ Z); the last row program to finish sums those partials. Column programs
    (BLOCK_N columns of d each) accumulate P_Z = dYᵀ Z and Σ_rows dY over all of M in registers,
    then write dB = s·o ⊙ (P_Z Sᵀ | P_Z ⊙ S), d_o = s·rowsum(B ⊙ P) and db. U = σ(T)Sᵀ is never
    formed: its core is applied to the [d, r] sum instead;
  * ``_lowrank_bwd_dx_kernel``: dX = dY W whose epilogue adds s·D'(dT A), the mask regenerated
    (on sm_90 with aligned operands, its TMA twin in :mod:`fastpeft.kernels.lowrank_sm90`);
  * ``_lowrank_bwd_da_kernel``: dA = s·dTᵀ D(X), a skinny GEMM split over M: each program stores
    an fp32 partial and the last program of each column block sums them and writes dA.

"The last program" is found with an int32 counter per column block (``_arrive_last``): each
program arrives with an atomic add after its stores, the one that completes the count reduces
and resets the counter to 0. Counters are zeroed once, when first allocated (``_counters``),
so no launch needs a fill. The Triton interpreter runs programs one after another: the last in
grid order reduces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (_ACC_WORDS, _ACTIVATIONS, _DX_CONFIGS, _GROUP_M, _MASK_VALUES, _MIN_BLOCK, _TILE_WORDS,
                      _act_fwd, _act_grad, _arrive_last, _autotuning, _block_r, _check_dtype, _core_tile,
                      _counters, _device, _dot_precision, _elem, _fallback, _gemm_keep, _grouped_pid, _interp_block,
                      _interpreting, _keep, _keep_mask, _op, _per_thread, _pow2, _prune_dx, _r_chunk, _unique,
                      _words)

__all__ = ["lowrank_bwd", "lowrank_bwd_dy", "lowrank_bwd_da"]

# Tiles per architecture, in order of preference (as the forward's, :mod:`fastpeft.kernels._common`).
# One pass over dY (BLOCK_M chosen by the launcher): (BLOCK_N, num_warps, num_stages)
_DY_TILES_SM90 = [(64, 8, 3), (128, 8, 3), (32, 8, 3), (32, 4, 4), (16, 4, 4)]
_DY_TILES_SM80 = [(32, 4, 4), (32, 8, 3), (16, 4, 4)]
# dA = s·dTᵀD(X): (BLOCK_M, BLOCK_K, num_warps, num_stages)
_DA_TILES_SM90 = [(64, 128, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4), (32, 64, 4, 4), (32, 32, 4, 4), (16, 32, 4, 4)]
_DA_TILES_SM80 = [(64, 64, 4, 4), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 4), (32, 32, 4, 4), (16, 32, 4, 4)]
_DY_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bn, w, s in _unique(_DY_TILES_SM90 + _DY_TILES_SM80)]
_DA_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bm, bk, w, s in _unique(_DA_TILES_SM90 + _DA_TILES_SM80)]


# --------------------------------------------------------------------------------------------
# Choosing configs (the dX GEMM's are the forward GEMM's, in _common)
# --------------------------------------------------------------------------------------------

def _dy_keep(configs, arch, smem, block_m, N, block_r, elem):
    """dY pass: which configs fit on ``arch`` for this r and the launcher's BLOCK_M."""
    tiles = _DY_TILES_SM90 if arch == 90 else _DY_TILES_SM80

    def tile_of(c):
        return (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    def ok(c):
        bn, w, s = tile_of(c)
        main = s * (block_m * bn + bn * block_r) * elem + block_m * block_r * elem
        tiles = max(_words(block_m * bn, elem, w), _words(bn * block_r, elem, w))
        # 32-bit registers for G and the partial dYᵀU (fp32) and U together
        live = _per_thread(block_m * block_r + bn * block_r, w) + _per_thread(block_m * block_r * elem // 4, w)
        budget = _ACC_WORDS if arch == 90 else _ACC_WORDS // 2      # sm_80: operand fragments too
        # sm_80, r = 64: the 8-warp BLOCK_N = 32 tile spills 8 bytes as launched (fastpeft inspect)
        spills = arch == 80 and block_r >= 64 and w == 8
        return (main <= smem and tiles <= _TILE_WORDS and live <= budget
                and _per_thread(bn * block_r, w) <= 16 and not spills)

    def size_ok(c):
        return c.kwargs["BLOCK_N"] <= max(16, _pow2(N))

    return _keep(configs, tiles, tile_of, ok, size_ok)


def _da_keep(configs, arch, smem, M, K, block_r, elem, dropout=True):
    """dA: which configs fit on ``arch`` for this r."""
    tiles = _DA_TILES_SM90 if arch == 90 else _DA_TILES_SM80

    def tile_of(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    def ok(c):
        bm, bk, w, s = tile_of(c)
        main = s * (block_r * bm + bm * bk) * elem
        tiles = max(_words(block_r * bm, elem, w), _words(bm * bk, elem, w))
        acc = _per_thread(block_r * bk, w) * (2 if elem == 4 else 1)
        return (main <= smem and tiles <= _TILE_WORDS and acc <= _ACC_WORDS
                and not (dropout and _per_thread(bm * bk, w) > _MASK_VALUES))

    def size_ok(c):
        return c.kwargs["BLOCK_M"] <= max(16, _pow2(M)) and c.kwargs["BLOCK_K"] <= max(16, _pow2(K))

    return _keep(configs, tiles, tile_of, ok, size_ok)


def _prune_dy(configs, named_args, **kwargs):
    args = _common._prune_args(named_args, kwargs)
    arch, smem, _ = _common._limits_of(args["dy_ptr"])
    return _dy_keep(configs, arch, smem, args["BLOCK_M"], args["N"], args["BLOCK_R"], _elem(args))


def _prune_da(configs, named_args, **kwargs):
    args = _common._prune_args(named_args, kwargs)
    arch, smem, _ = _common._limits_of(args["x_ptr"])
    return _da_keep(configs, arch, smem, args["M_KEY"], args["K"], args["BLOCK_R"], _elem(args), args["HAS_DROPOUT"])


# --------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _dy_rows(dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr, dt_ptr, ds_part_ptr, cnt_ptr, dcore_ptr, pid,
             M, N, R, ROW_PROGRAMS, stride_dym, stride_dyn, stride_tm, stride_dtm, scale,
             ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
             COMPUTE_DT: tl.constexpr, COMPUTE_DS: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row program ``pid``: G = dYo B over its BLOCK_M rows (accumulated over d in registers),
    then dT = (G S) ⊙ σ'(T) and this block's dS partial, s·Gᵀ Z | s·Σ_rows G ⊙ Z; the last row
    program sums the dS partials in row-block order into dcore."""
    dtype = dy_ptr.dtype.element_ty
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    mask_mr = mask_m[:, None] & mask_r[None, :]
    t_rows = t_ptr + rm.to(tl.int64)[:, None] * stride_tm
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # rows past M read wrapped addresses: their G and dT are never stored, their Z is 0
    dy_rows = dy_ptr + (rm % M).to(tl.int64)[:, None] * stride_dym
    b_cols = b_ptr + (rr % R)[None, :]
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        dyt = tl.load(dy_rows + rn[None, :] * stride_dyn, mask=mask_n[None, :], other=0.0)
        if HAS_OUT_SCALE:
            osv = tl.load(os_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
            dyo = dyt.to(tl.float32) * osv[None, :]
        else:
            dyo = dyt
        bt = tl.load(b_cols + rn.to(tl.int64)[:, None] * R, mask=mask_n[:, None], other=0.0)
        g = tl.dot(_op(dyo, dtype, UPCAST), _op(bt, dtype, UPCAST), g, input_precision=DOT_PRECISION)
    # T is read back (not kept live across the loop); padded entries give σ(0) = 0
    if COMPUTE_DS:
        if CORE == 2:                    # Gᵀ Z [r, r], fp32 operands (a sum over M with cancellation)
            gt = tl.trans(g)
            for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                rj = j0 + tl.arange(0, R_CHUNK)
                mask_j = mask_m[:, None] & (rj < R)[None, :]
                zj = _act_fwd(tl.load(t_rows + rj[None, :], mask=mask_j, other=0.0).to(tl.float32), ACTIVATION)
                ds = tl.dot(gt, zj, input_precision=DOT_PRECISION)
                tl.store(ds_part_ptr + pid.to(tl.int64) * R * R + rr[:, None] * R + rj[None, :], ds,
                         mask=mask_r[:, None] & (rj < R)[None, :])
        else:                            # Σ_rows G ⊙ Z [r]
            z = _act_fwd(tl.load(t_rows + rr[None, :], mask=mask_mr, other=0.0).to(tl.float32), ACTIVATION)
            tl.store(ds_part_ptr + pid.to(tl.int64) * R + rr, tl.sum(g * z, axis=0), mask=mask_r)
        if _arrive_last(cnt_ptr, ROW_PROGRAMS):
            _sum_core_partials(ds_part_ptr, dcore_ptr, ROW_PROGRAMS, R, scale, CORE, BLOCK_R, R_CHUNK)
    if COMPUTE_DT:
        dt_rows = dt_ptr + rm.to(tl.int64)[:, None] * stride_dtm
        if CORE == 2:                    # H = G S, R_CHUNK output columns at a time
            g_op = _op(g, dtype, UPCAST)
            for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                rj = j0 + tl.arange(0, R_CHUNK)
                mask_j = mask_m[:, None] & (rj < R)[None, :]
                h = tl.dot(g_op, _op(_core_tile(core_ptr, R, rr, rj, False), dtype, UPCAST),
                           input_precision=DOT_PRECISION)
                if ACTIVATION != 0:
                    tj = tl.load(t_rows + rj[None, :], mask=mask_j, other=0.0).to(tl.float32)
                    h = h * _act_grad(tj, ACTIVATION)
                tl.store(dt_rows + rj[None, :], h.to(dt_ptr.dtype.element_ty), mask=mask_j)
        else:
            h = g
            if CORE == 1:
                h = h * tl.load(core_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
            if ACTIVATION != 0:
                tt = tl.load(t_rows + rr[None, :], mask=mask_mr, other=0.0).to(tl.float32)
                h = h * _act_grad(tt, ACTIVATION)
            tl.store(dt_rows + rr[None, :], h.to(dt_ptr.dtype.element_ty), mask=mask_mr)


@triton.jit
def _sum_core_partials(part_ptr, dcore_ptr, NP, R, scale, CORE: tl.constexpr, BLOCK_R: tl.constexpr,
                       R_CHUNK: tl.constexpr):
    """dcore = s·Σ_i part[i] over the NP row-block partials, in order (R_CHUNK columns of a full
    core at a time); the partials are read past L1 (other programs wrote them)."""
    s = tl.to_tensor(scale).to(tl.float32)
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    if CORE == 2:
        for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
            rj = j0 + tl.arange(0, R_CHUNK)
            offs = rr[:, None] * R + rj[None, :]
            mask = mask_r[:, None] & (rj < R)[None, :]
            acc = tl.zeros((BLOCK_R, R_CHUNK), dtype=tl.float32)
            ptrs = part_ptr + offs
            for _ in range(0, NP):
                acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                ptrs += R * R
            tl.store(dcore_ptr + offs, (acc * s).to(dcore_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        ptrs = part_ptr + rr
        for _ in range(0, NP):
            acc += tl.load(ptrs, mask=mask_r, other=0.0, cache_modifier=".cg")
            ptrs += R
        tl.store(dcore_ptr + rr, (acc * s).to(dcore_ptr.dtype.element_ty), mask=mask_r)


@triton.jit
def _dy_cols(dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr, db_ptr, dos_ptr, dbias_ptr, pid_n,
             M, N, R, stride_dym, stride_dyn, stride_tm, scale,
             ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
             COMPUTE_B: tl.constexpr, COMPUTE_OS: tl.constexpr, COMPUTE_DB: tl.constexpr,
             UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
             R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column program ``pid_n``: over every row of dY, for its BLOCK_N columns, P_Z = dYᵀ Z
    [BLOCK_N, r] and Σ_rows dY in registers, in row order; then P = dYᵀ U = P_Z Sᵀ | P_Z ⊙ S | P_Z,
    dB = s·o ⊙ P, d_o = s·rowsum(B ⊙ P) and db = Σ_rows dY, written once in their dtypes."""
    dtype = dy_ptr.dtype.element_ty
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rb = tl.arange(0, BLOCK_M)
    mask_n = rn < N
    mask_r = rr < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dy_cols = dy_ptr + rn[None, :] * stride_dyn
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + rb
        mask_m = rm < M
        dyt = tl.load(dy_cols + rm.to(tl.int64)[:, None] * stride_dym, mask=mask_m[:, None] & mask_n[None, :],
                      other=0.0)
        if COMPUTE_B or COMPUTE_OS:      # Z of padded rows / columns is σ(0) = 0
            tt = tl.load(t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr[None, :],
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            z = _act_fwd(tt.to(tl.float32), ACTIVATION)
            acc = tl.dot(tl.trans(_op(dyt, dtype, UPCAST)), _op(z, dtype, UPCAST), acc,
                         input_precision=DOT_PRECISION)
        if COMPUTE_DB:
            acc_b += tl.sum(dyt.to(tl.float32), axis=0)
    s = tl.to_tensor(scale).to(tl.float32)
    if COMPUTE_B or COMPUTE_OS:
        col = tl.zeros((BLOCK_N,), dtype=tl.float32) + s
        if HAS_OUT_SCALE:
            col = col * tl.load(os_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        if CORE == 2:                    # P = P_Z Sᵀ, R_CHUNK output columns at a time
            d_o = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                rj = j0 + tl.arange(0, R_CHUNK)
                mask = mask_n[:, None] & (rj < R)[None, :]
                offs = rn.to(tl.int64)[:, None] * R + rj[None, :]
                p = tl.dot(acc, _core_tile(core_ptr, R, rr, rj, True).to(tl.float32), input_precision=DOT_PRECISION)
                if COMPUTE_B:
                    tl.store(db_ptr + offs, (p * col[:, None]).to(db_ptr.dtype.element_ty), mask=mask)
                if COMPUTE_OS:
                    d_o += tl.sum(tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32) * p, axis=1)
            if COMPUTE_OS:
                tl.store(dos_ptr + rn, (d_o * s).to(dos_ptr.dtype.element_ty), mask=mask_n)
        else:
            p = acc
            if CORE == 1:
                p = p * tl.load(core_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
            mask = mask_n[:, None] & mask_r[None, :]
            offs = rn.to(tl.int64)[:, None] * R + rr[None, :]
            if COMPUTE_B:
                tl.store(db_ptr + offs, (p * col[:, None]).to(db_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_OS:
                b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(dos_ptr + rn, (tl.sum(b * p, axis=1) * s).to(dos_ptr.dtype.element_ty), mask=mask_n)
    if COMPUTE_DB:
        tl.store(dbias_ptr + rn, acc_b.to(dbias_ptr.dtype.element_ty), mask=mask_n)


@triton.autotune(configs=_DY_CONFIGS, key=["M_KEY", "N", "BLOCK_R", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": _prune_dy})
@triton.jit
def _lowrank_bwd_dy_kernel(
    dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr,
    dt_ptr, ds_part_ptr, cnt_ptr, db_ptr, dos_ptr, dbias_ptr, dcore_ptr,
    M, N, R, M_KEY, ROW_PROGRAMS,
    stride_dym, stride_dyn, stride_tm, stride_dtm, scale,
    ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
    COMPUTE_DT: tl.constexpr, COMPUTE_DS: tl.constexpr, COMPUTE_B: tl.constexpr,
    COMPUTE_OS: tl.constexpr, COMPUTE_DB: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The adapter gradients that need only dY and T, in one launch of two kinds of program.

    Programs [0, ROW_PROGRAMS) each take BLOCK_M rows (:func:`_dy_rows`): dT and the dS
    partials, the last of them summing those (``cnt_ptr``). The programs after them each take
    BLOCK_N columns of d (:func:`_dy_cols`): dB, d_o and db, reduced over all of M in registers.
    Every sum runs in a fixed order: results are bit-identical across runs."""
    pid = tl.program_id(0)
    if pid < ROW_PROGRAMS:
        _dy_rows(dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr, dt_ptr, ds_part_ptr, cnt_ptr, dcore_ptr, pid,
                 M, N, R, ROW_PROGRAMS, stride_dym, stride_dyn, stride_tm, stride_dtm, scale,
                 ACTIVATION, CORE, HAS_OUT_SCALE, COMPUTE_DT, COMPUTE_DS, UPCAST, DOT_PRECISION, BLOCK_R,
                 R_CHUNK, BLOCK_M, BLOCK_N)
    else:
        _dy_cols(dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr, db_ptr, dos_ptr, dbias_ptr, pid - ROW_PROGRAMS,
                 M, N, R, stride_dym, stride_dyn, stride_tm, scale, ACTIVATION, CORE, HAS_OUT_SCALE,
                 COMPUTE_B, COMPUTE_OS, COMPUTE_DB, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)


@triton.jit
def _dx_adapter_init(dt_ptr, a_ptr, rm, rn, M, N, R, seed, dropout_p, adapter_scale,
                     HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dX accumulator's start on a [BLOCK_M, BLOCK_N] tile: s/(1-p)·mask ⊙ (dT A) (R_CHUNK of
    r at a time; dT [M, R] and A [R, N] contiguous; ``adapter_scale`` = s/(1-p)), the mask
    regenerated from the seed."""
    dtype = dt_ptr.dtype.element_ty
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dt_rows = dt_ptr + rm.to(tl.int64)[:, None] * R
    for r0 in tl.range(0, BLOCK_R, R_CHUNK, num_stages=1):   # not pipelined: registers
        rc = r0 + tl.arange(0, R_CHUNK)
        mask_c = rc < R
        dtt = tl.load(dt_rows + rc[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        at = tl.load(a_ptr + rc[:, None] * N + rn[None, :], mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(_op(dtt, dtype, UPCAST), _op(at, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    acc = acc * tl.to_tensor(adapter_scale).to(tl.float32)
    if HAS_DROPOUT:
        acc = tl.where(_keep_mask(seed, rm, rn, tl.to_tensor(dropout_p).to(tl.float32)), acc, 0.0)
    return acc


@triton.autotune(configs=_DX_CONFIGS, key=["M_KEY", "N", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_dx})
@triton.jit(do_not_specialize=["seed"])
def _lowrank_bwd_dx_kernel(
    dy_ptr, w_ptr, dt_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_KEY,
    stride_dym, stride_dyk, stride_wk, stride_wn, stride_dxm, stride_dxn,
    seed, dropout_p, adapter_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX [M, N=k] = s·D'(dT A) + dY W (reduction over K=d): D'(V) = mask ⊙ V / (1-p),
    ``adapter_scale`` = s/(1-p), the mask regenerated from the seed. The adapter term initialises
    the accumulator (one fp32 tile live), then the main loop adds dY W."""
    dtype = dy_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    acc = _dx_adapter_init(dt_ptr, a_ptr, rm, rn, M, N, R, seed, dropout_p, adapter_scale, HAS_DROPOUT, UPCAST,
                           DOT_PRECISION, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)
    # rows past M / N read wrapped addresses and are never stored: the loop masks only along d
    dy_rows = dy_ptr + (rm % M).to(tl.int64)[:, None] * stride_dym
    w_cols = w_ptr + (rn % N)[None, :] * stride_wn                                    # W tile [BK, BN]
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        dyt = tl.load(dy_rows + kk[None, :] * stride_dyk, mask=mask_k[None, :], other=0.0)
        wt = tl.load(w_cols + kk.to(tl.int64)[:, None] * stride_wk, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(_op(dyt, dtype, UPCAST), _op(wt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rn[None, :] * stride_dxn
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_DA_CONFIGS, key=["M_KEY", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_da})
@triton.jit(do_not_specialize=["seed"])
def _lowrank_bwd_da_kernel(
    dt_ptr, x_ptr, part_ptr, cnt_ptr, da_ptr, rs_ptr,
    M, K, R, M_KEY,
    stride_dtm, stride_xm, stride_xk,
    seed, dropout_p, scale,
    HAS_DROPOUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA [r, k] = c ⊙ dTᵀ (mask ⊙ X) for ``scale`` c = s/(1-p) (or the per-row ``rs`` [r] with
    HAS_ROW_SCALE), written once in dA's dtype. Grid axis 1 splits M: each program stores its
    fp32 partial [r, BLOCK_K], and the last program of a column block (``cnt_ptr``, one counter
    per block of k) sums the partials in split order and writes dA; with one split, no partial."""
    dtype = x_ptr.dtype.element_ty
    p = tl.to_tensor(dropout_p).to(tl.float32)
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    split = tl.num_programs(1)
    rows = tl.cdiv(tl.cdiv(M, split), BLOCK_M) * BLOCK_M
    m_start = pid_s * rows
    m_end = tl.minimum(m_start + rows, M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_k = rk < K
    mask_r = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    # dTᵀ tiles [BR, BM] are zero on rows past this split's end (columns past r wrap and are never
    # stored); X rows and columns read wrapped addresses: products 0 or never stored
    dt_cols = dt_ptr + (rr % R)[:, None]
    x_cols = x_ptr + (rk % K)[None, :] * stride_xk
    rb = tl.arange(0, BLOCK_M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + rb
        mask_m = rm < m_end
        dtt = tl.load(dt_cols + rm.to(tl.int64)[None, :] * stride_dtm, mask=mask_m[None, :], other=0.0)
        xt = tl.load(x_cols + (rm % M).to(tl.int64)[:, None] * stride_xm)
        if HAS_DROPOUT:
            xt = tl.where(_keep_mask(seed, rm, rk, p), xt, 0.0)
        acc = tl.dot(_op(dtt, dtype, UPCAST), _op(xt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    offs = rr[:, None] * K + rk[None, :]
    mask = mask_r[:, None] & mask_k[None, :]
    if split > 1:
        tl.store(part_ptr + pid_s.to(tl.int64) * R * K + offs, acc, mask=mask)
        if _arrive_last(cnt_ptr + pid_k, split):
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            ptrs = part_ptr + offs
            for _ in range(0, split):
                acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                ptrs += R * K
            _store_da(acc, da_ptr, rs_ptr, offs, mask, rr, mask_r, scale, HAS_ROW_SCALE)
    else:
        _store_da(acc, da_ptr, rs_ptr, offs, mask, rr, mask_r, scale, HAS_ROW_SCALE)


@triton.jit
def _store_da(acc, da_ptr, rs_ptr, offs, mask, rr, mask_r, scale, HAS_ROW_SCALE: tl.constexpr):
    """dA = c ⊙ acc in dA's dtype: the scalar ``scale``, or the per-row scales ``rs``."""
    if HAS_ROW_SCALE:
        acc = acc * tl.load(rs_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[:, None]
    else:
        acc = acc * tl.to_tensor(scale).to(tl.float32)
    tl.store(da_ptr + offs, acc.to(da_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _dy_block_m(M: int, block_r: int, elem: int) -> int:
    """Rows per step of the pass over dY (fixed by the launcher: it sets the row programs). G
    [BLOCK_M, r] stays in registers across the pass: fewer rows for larger r and fp32."""
    if _interpreting():
        return _interp_block(M)
    bm = 64 if block_r <= 32 else (32 if block_r <= 64 else 16)
    if elem == 4:
        bm = max(16, bm // 2)
    return min(bm, max(16, _pow2(M)))


def lowrank_bwd_dy(grad_y, T, lora_B, core, out_scale, scale, activation, need_dt: bool, need_B: bool,
                   need_core: bool, need_out_scale: bool, need_bias: bool, deterministic: bool = True,
                   d_t=None):
    """The adapter gradients that need only dY and T (2-D; T may be a column slice with unit
    column stride), in one launch: returns (dT, dB, dcore, dout_scale, dbias), ``None`` where not
    needed. dT = (G S) ⊙ σ'(T) [M, r] in dY's dtype, without the scale s (it feeds dX = dY W +
    s·D'(dT A) and dA = s·dTᵀ D(X)), written into ``d_t`` when given ([M, r], unit column
    stride). Every reduction runs in a fixed order (``deterministic`` is always honoured). See
    :func:`lowrank_bwd`."""
    _check_dtype(grad_y)
    M, N = grad_y.shape
    R = lora_B.shape[1]
    BR = _block_r(R)
    dev = grad_y.device
    act = _ACTIVATIONS[activation]
    core_kind = 0 if core is None else (1 if core.dim() == 1 else 2)
    need_core = bool(need_core and core is not None)
    need_out_scale = bool(need_out_scale and out_scale is not None)
    b = lora_B.contiguous()
    core_c = core.contiguous() if core is not None else b
    t = T if T.stride(1) == 1 else T.contiguous()
    interp = _interpreting()
    d_b = d_core = d_os = d_bias = None
    if need_dt and d_t is None:
        d_t = torch.empty((M, R), dtype=grad_y.dtype, device=dev)
    elif not need_dt:
        d_t = None
    if need_B:
        d_b = torch.empty_like(b)
    if need_out_scale:
        d_os = torch.empty_like(out_scale)
    if need_bias:
        d_bias = torch.empty((N,), dtype=grad_y.dtype, device=dev)
    if need_core:
        d_core = torch.empty_like(core_c)
    if M == 0:                           # sums over no rows
        for g in (d_b, d_core, d_os, d_bias):
            if g is not None:
                g.zero_()
        return d_t, d_b, d_core, d_os, d_bias
    rows = need_dt or need_core
    cols = need_B or need_out_scale or need_bias
    if not (rows or cols):
        return d_t, d_b, d_core, d_os, d_bias
    with _device(grad_y):
        bm = _dy_block_m(M, BR, grad_y.element_size())
        row_programs = triton.cdiv(M, bm) if rows else 0
        ds_part = cnt = grad_y
        if need_core:
            ds_part = torch.empty((row_programs, core_c.numel()), dtype=torch.float32, device=dev)
            cnt = _counters(dev, 1)
        placeholder = b
        args = dict(dy_ptr=grad_y, t_ptr=t, core_ptr=core_c, b_ptr=b,
                    os_ptr=out_scale if out_scale is not None else b,
                    dt_ptr=d_t if d_t is not None else placeholder, ds_part_ptr=ds_part, cnt_ptr=cnt,
                    db_ptr=d_b if d_b is not None else placeholder, dos_ptr=d_os if d_os is not None else placeholder,
                    dbias_ptr=d_bias if d_bias is not None else placeholder,
                    dcore_ptr=d_core if d_core is not None else placeholder,
                    M=M, N=N, R=R, M_KEY=_pow2(M), ROW_PROGRAMS=row_programs,
                    stride_dym=grad_y.stride(0), stride_dyn=grad_y.stride(1), stride_tm=t.stride(0),
                    stride_dtm=d_t.stride(0) if d_t is not None else R, scale=float(scale),
                    ACTIVATION=act, CORE=core_kind, HAS_OUT_SCALE=out_scale is not None,
                    COMPUTE_DT=need_dt, COMPUTE_DS=need_core, COMPUTE_B=need_B, COMPUTE_OS=need_out_scale,
                    COMPUTE_DB=need_bias, UPCAST=interp, DOT_PRECISION=_dot_precision(grad_y.dtype),
                    BLOCK_R=BR, R_CHUNK=_r_chunk(BR), BLOCK_M=bm)
        if interp:
            fb = dict(BLOCK_N=_interp_block(N), num_warps=4, num_stages=1)
        elif not _autotuning():
            arch, smem, _ = _common._limits_of(grad_y)
            fb = _fallback(_dy_keep(_DY_CONFIGS, arch, smem, bm, N, BR, grad_y.element_size()))
        else:
            fb = {}
        _common._launch(_lowrank_bwd_dy_kernel,
                lambda meta: (row_programs + (triton.cdiv(N, meta["BLOCK_N"]) if cols else 0),), args, fb)
    return d_t, d_b, d_core, d_os, d_bias


def _da_split(M: int, K: int, x) -> int:
    """Programs along M of the dA kernel: one per row block under the interpreter, else enough
    to fill the device twice over the blocks of k, at least 256 rows each."""
    if _interpreting():
        return triton.cdiv(M, _interp_block(M))
    _, _, sms = _common._limits_of(x)
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(K, 64)), triton.cdiv(M, 256)))


def lowrank_bwd_da(d_t, x, dropout_p: float, seed: int, scale, out, row_scale=None):
    """dA = c ⊙ dTᵀ D(X) into ``out`` [r, k] (its dtype) in one launch, for c = s/(1-p) given
    as ``scale`` (or per row of dA: ``row_scale``, fp32 [r], 1/(1-p) included). ``d_t`` [M, r]
    with unit column stride. Split-M partials are fp32 and summed in a fixed order by the last
    program of each column block (bit-identical across runs)."""
    M, K = x.shape
    R = d_t.shape[1]
    BR = _block_r(R)
    if M == 0:
        return out.zero_()
    p = float(dropout_p)
    interp = _interpreting()
    split = _da_split(M, K, x)
    part = torch.empty((split, R * K), dtype=torch.float32, device=x.device) if split > 1 else out
    cnt = _counters(x.device, triton.cdiv(K, _MIN_BLOCK)) if split > 1 else out
    args = dict(dt_ptr=d_t, x_ptr=x, part_ptr=part, cnt_ptr=cnt, da_ptr=out,
                rs_ptr=row_scale if row_scale is not None else out, M=M, K=K, R=R, M_KEY=_pow2(M),
                stride_dtm=d_t.stride(0), stride_xm=x.stride(0), stride_xk=x.stride(1), seed=int(seed),
                dropout_p=p, scale=float(scale), HAS_DROPOUT=p > 0.0, HAS_ROW_SCALE=row_scale is not None,
                UPCAST=interp, DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=BR)
    if interp:
        fb = dict(BLOCK_M=_interp_block(M), BLOCK_K=_interp_block(K), num_warps=4, num_stages=1)
    elif not _autotuning():
        arch, smem, _ = _common._limits_of(x)
        fb = _fallback(_da_keep(_DA_CONFIGS, arch, smem, M, K, BR, x.element_size(), p > 0.0))
    else:
        fb = {}
    _common._launch(_lowrank_bwd_da_kernel, lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), split), args, fb)
    return out


def lowrank_bwd(grad_y, x, weight, T, lora_A, lora_B, core, out_scale, scale, dropout_p, seed,
                activation, need_x: bool, need_A: bool, need_B: bool, need_core: bool,
                need_out_scale: bool, need_bias: bool, deterministic: bool = True):
    """Backward on 2-D tensors: returns (dX, dA, dB, dcore, dout_scale, dbias), ``None`` where
    not needed. ``x`` may be ``None`` unless ``need_A``. At most three launches: the pass over dY
    (:func:`lowrank_bwd_dy`), dX, dA (:func:`lowrank_bwd_da`); every reduction runs in a fixed
    order, so results are bit-identical across runs (``deterministic`` is always honoured).

    Derivation (module docstring names)::

        dYo = dY ⊙ o;  G = dYo B;  H = G S | G ⊙ S | G;  dT = H ⊙ σ'(T)
        dX = dY W + s·D'(dT A)                  (∂Y/∂X through the base and the adapter)
        dB = s·dYoᵀ U = s·o ⊙ (dYᵀ Z) Sᵀ        (Y ∋ s·(U Bᵀ) ⊙ o, U = Z Sᵀ)
        d_o = s·rowsum(B ⊙ dYᵀU)               (Σ_m dY[m, j]·(U Bᵀ)[m, j])
        dS = s·Gᵀ Z | s·Σ_rows G ⊙ Z            (U = Z Sᵀ | Z ⊙ S)
        dA = s·dTᵀ D(X)                         (T = D(X) Aᵀ)
        db = Σ_rows dY
    """
    _check_dtype(grad_y)
    if need_A and x is None:
        raise ValueError("lowrank_bwd needs x when need_A is True")
    M, N = grad_y.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    BR = _block_r(R)
    dev = grad_y.device
    a = lora_A.contiguous()
    interp = _interpreting()
    p = float(dropout_p)
    s = float(scale)
    dx = d_a = None
    d_t, d_b, d_core, d_os, d_bias = lowrank_bwd_dy(
        grad_y, T, lora_B, core, out_scale, scale, activation, need_x or need_A, need_B, need_core,
        need_out_scale, need_bias)
    with _device(grad_y):
        if need_x:
            dx = torch.empty((M, K), dtype=grad_y.dtype, device=dev)
            args = dict(dy_ptr=grad_y, w_ptr=weight, dt_ptr=d_t, a_ptr=a, dx_ptr=dx,
                        M=M, N=K, K=N, R=R, M_KEY=_pow2(M),
                        stride_dym=grad_y.stride(0), stride_dyk=grad_y.stride(1),
                        stride_wk=weight.stride(0), stride_wn=weight.stride(1),
                        stride_dxm=dx.stride(0), stride_dxn=dx.stride(1),
                        seed=int(seed), dropout_p=p, adapter_scale=s / (1.0 - p),
                        HAS_DROPOUT=p > 0.0, UPCAST=interp, DOT_PRECISION=_dot_precision(grad_y.dtype),
                        BLOCK_R=BR, R_CHUNK=_r_chunk(BR), GROUP_M=_GROUP_M)
            from . import lowrank_sm90
            if lowrank_sm90.tma_ok(grad_y, weight, tf32=False):    # sm_90, aligned: TMA + wgmma
                lowrank_sm90.bwd_dx(args, grad_y)
            else:
                _dx_pointer(args, grad_y, p > 0.0)

        if need_A:
            d_a = lowrank_bwd_da(d_t, x, p, seed, s / (1.0 - p), torch.empty_like(a))
    return dx, d_a, d_b, d_core, d_os, d_bias


def _dx_pointer(args: dict, grad_y, dropout: bool):
    """The dX GEMM with pointer (cp.async) loads: ``args`` of :func:`_lowrank_bwd_dx_kernel`."""
    M, N = args["M"], args["N"]
    if _interpreting():
        fb = dict(BLOCK_M=_interp_block(M), BLOCK_N=_interp_block(N), BLOCK_K=_interp_block(args["K"]),
                  num_warps=4, num_stages=1)
    elif not _autotuning():
        arch, smem, _ = _common._limits_of(grad_y)
        fb = _fallback(_gemm_keep(_DX_CONFIGS, arch, smem, M, N, args["BLOCK_R"], grad_y.element_size(), dx=True,
                                  dropout=dropout))
    else:
        fb = {}
    _common._launch(_lowrank_bwd_dx_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
            args, fb)

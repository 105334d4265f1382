"""Fused Triton kernels of the mixed-batch op (``fastpeft.kernels.lowrank_mixed``): every row of X
runs with its own adapter (or none) over one base weight, dense or 4-bit.

The host sorts the rows by adapter (``order``: the rows of adapter 0, then 1, ..., then the rows
of no adapter) and cuts each adapter's segment into row tiles of BLOCK_M; a tile never spans
two adapters. A table of tiles (adapter slot or -1, first and end position in ``order``; a
program's entry read by ``_tile_rows``) drives the kernels, so every program reads one adapter
(as SGMV does). The adapters are packed, rank padded with zeros to the largest r (R): A
[n, R, k], B [n, d, R], core [n, R] or [n, R, R] (a missing core becomes ones or the identity, a
diagonal one its diagonal matrix where another adapter needs a full core), out_scale [n, d]
(ones where missing), s [n]. Zero padding adds nothing: padded columns of T are 0, and σ(0) = 0
for every activation.

  * ``_mixed_t_kernel``: per adapter tile, T = X[rows] A_iᵀ and U = σ(T) S_iᵀ (the dense
    module's ``_store_u``), in ``order``'s positions, [rows with an adapter, R];
  * ``_mixed_gemm_kernel``: per tile and d-block, Y[rows] = X[rows] Wᵀ + b + s_i·(U B_iᵀ) ⊙ o_i:
    the adapter term and the bias start the accumulator (the dense module's ``_adapter_init``,
    skipped on tiles of no adapter), the main loop adds X Wᵀ with W loaded, or dequantised tile by
    tile in registers (the 4-bit module's ``_w4_tile``): one base GEMM over all rows, Y written
    once.

Backward (:func:`lowrank_mixed_bwd`), from dY and the saved T:
  * ``_mixed_u_kernel``: per adapter tile, U = σ(T) S_iᵀ (when dB or d_o needs it and U ≠ T);
  * ``_mixed_dy_kernel``: per adapter tile, one pass over its dY rows: G = (dY ⊙ o_i) B_i in
    registers, the tile's partials of dYᵀU and dS, and dT = (G S_i) ⊙ σ'(T);
  * ``_mixed_gemm_kernel`` again for dX = dY W + s_i·dT A_i (W read transposed, a 4-bit W
    dequantised tile by tile; A_iᵀ packed as the epilogue's B): one GEMM over all rows, each
    tile's adapter term first;
  * ``_mixed_da_kernel``: dA_i = s_i·dT_iᵀ X_i, one program per (adapter, k-block) over the
    adapter's own rows.
Each adapter's gradients sum its own tiles in a fixed order: deterministic, no atomics.

Dropout on an adapter's input (training): adapter i's rows, in batch order, get the dense
kernels' Philox keep-mask of seed ``seed + i`` (``dropout_keep_mask(seed + i, rows of i, k, p_i)``),
drawn in the T pass's loop over k and again, never stored, in the dX epilogue and the dA pass.
Every accumulation is fp32; under the interpreter dot operands are upcast to fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import _act_fwd, _act_grad, _adapter_init, _core_tile, _keep_mask, _op, _store_u
from .lowrank_4bit import _w4_tile, _weight_args
from .lowrank_bwd import _dy_block_m

__all__ = ["lowrank_mixed_fwd", "lowrank_mixed_bwd", "pack_adapters", "tile_table", "gpu_tiles"]


@triton.jit
def _tile_rows(tiles_ptr, BLOCK_M: tl.constexpr):
    """This program's row tile (grid axis 0) of the tile table: (tile, its adapter slot, -1 for
    none, its BLOCK_M positions in ``order``, which of them it holds, its end position)."""
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    pos = start + tl.arange(0, BLOCK_M)
    return tile, slot, pos, pos < end, end


@triton.jit
def _mixed_t_kernel(
    x_ptr, order_ptr, tiles_ptr, a_ptr, core_ptr, t_ptr, u_ptr, seed_ptr, p_ptr, first_ptr,
    K, R, stride_xm, stride_xk,
    ACTIVATION: tl.constexpr, CORE: tl.constexpr, STORE_U: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """T = D_i(X[rows]) A_iᵀ and U = σ(T) S_iᵀ | σ(T) ⊙ S_i for one tile of adapter i's rows.

    HAS_DROPOUT: D_i keeps element (j, c) of the adapter's j-th row (its rows in batch order,
    j = position - the segment's first, ``first_ptr[slot]``) by the dense kernels' Philox mask
    (:func:`_keep_mask`) of the slot's seed and p (``seed_ptr``, ``p_ptr``), regenerated here and
    in backward, never stored; kept values count 1/(1-p), applied to the r-wide accumulator."""
    dtype = x_ptr.dtype.element_ty
    _, slot, pos, mask_m, end = _tile_rows(tiles_ptr, BLOCK_M)
    slot = slot.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    mask_r = rr < R
    rows = tl.load(order_ptr + pos, mask=mask_m, other=0)           # gathered rows of X
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + slot * R * K + (rr % R)[None, :] * K            # A_iᵀ tile [BK, BR]
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr + slot)
        p = tl.load(p_ptr + slot)
        local = pos - tl.load(first_ptr + slot)                      # row within the adapter's rows
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(_keep_mask(seed, local, kk, p), xt, 0.0)
        at = tl.load(a_cols + kk[:, None], mask=mask_k[:, None], other=0.0)
        acc = tl.dot(_op(xt, dtype, UPCAST), _op(at, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - p))
    offs = pos.to(tl.int64)[:, None] * R + rr[None, :]
    tl.store(t_ptr + offs, acc.to(t_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
    if STORE_U:
        z = tl.where(mask_r[None, :], _act_fwd(acc, ACTIVATION), 0.0)
        if CORE == 2:
            core_i = core_ptr + slot * R * R
        else:
            core_i = core_ptr + slot * R
        _store_u(z, core_i, u_ptr, pos, end, R, CORE, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK)


@triton.jit
def _mixed_gemm_kernel(
    x_ptr, order_ptr, tiles_ptr, w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, u_ptr, b_ptr, os_ptr, scale_ptr, y_ptr,
    seed_ptr, p_ptr, first_ptr,
    N, K, R, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, W4: tl.constexpr, W_T: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    QBLOCK: tl.constexpr,
    QUANT: tl.constexpr, W_KIND: tl.constexpr, LAYOUT: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Y[rows] = s_i·(U B_iᵀ) ⊙ o_i + b + X[rows] Wᵀ for one row tile (adapter i, or none when
    its slot is -1) and one block of d; W dense, or 4-bit (W4) dequantised in registers. W_T
    (backward's dX = dY W + s_i·dT A_i): the reduction runs over W's rows (a dense W's strides
    come swapped; a 4-bit W's [BLOCK_K, BLOCK_N] tile is dequantised as it lies). HAS_DROPOUT
    (dX only, no bias): the adapter term is D_i'(·), the slot's Philox mask over the adapter's
    own rows (``seed_ptr``, ``p_ptr``, ``first_ptr`` as in the T pass), kept values 1/(1-p)."""
    dtype = x_ptr.dtype.element_ty
    _, slot, pos, mask_m, end = _tile_rows(tiles_ptr, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    rk = tl.arange(0, BLOCK_K)
    if slot >= 0:
        s64 = slot.to(tl.int64)
        acc = _adapter_init(u_ptr, b_ptr + s64 * N * R, os_ptr + s64 * N, bias_ptr, pos, rn, end, N, R, R,
                            tl.load(scale_ptr + s64), HAS_BIAS, HAS_OUT_SCALE, UPCAST, DOT_PRECISION,
                            BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            p = tl.load(p_ptr + s64)
            keep = _keep_mask(tl.load(seed_ptr + s64), pos - tl.load(first_ptr + s64), rn, p)
            acc = tl.where(keep, acc * (1.0 / (1.0 - p)), 0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    rows = tl.load(order_ptr + pos, mask=mask_m, other=0)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + (rn % N).to(tl.int64)[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_k[None, :], other=0.0)
        if W4 and W_T:
            wt = _w4_tile(w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, kk, tl.program_id(1) * BLOCK_N, K, N,
                          BLOCK_K, BLOCK_N, QBLOCK, QUANT, W_KIND, LAYOUT, NESTED, BLOCK2, UPCAST, dtype)
        elif W4:
            wt = tl.trans(_w4_tile(w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rn % N, k0, N, K, BLOCK_N,
                                   BLOCK_K, QBLOCK, QUANT, W_KIND, LAYOUT, NESTED, BLOCK2, UPCAST, dtype))
        else:
            wt = tl.load(w_cols + kk[:, None] * stride_wk, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(_op(xt, dtype, UPCAST), _op(wt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------
# Backward kernels: dX reuses _mixed_gemm_kernel with W read transposed (W_T)
# --------------------------------------------------------------------------------------------

@triton.jit
def _mixed_u_kernel(t_ptr, tiles_ptr, core_ptr, u_ptr, R,
                    ACTIVATION: tl.constexpr, CORE: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """U = σ(T) S_iᵀ | σ(T) ⊙ S_i from the saved T for one tile of adapter i's rows."""
    _, slot, pos, mask_m, end = _tile_rows(tiles_ptr, BLOCK_M)
    slot = slot.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mask = mask_m[:, None] & (rr < R)[None, :]
    tt = tl.load(t_ptr + pos.to(tl.int64)[:, None] * R + rr[None, :], mask=mask, other=0.0).to(tl.float32)
    if CORE == 2:
        core_i = core_ptr + slot * R * R
    else:
        core_i = core_ptr + slot * R
    _store_u(_act_fwd(tt, ACTIVATION), core_i, u_ptr, pos, end, R, CORE, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK)


@triton.jit
def _mixed_dy_kernel(
    dy_ptr, order_ptr, tiles_ptr, t_ptr, u_ptr, core_ptr, b_ptr, os_ptr, dt_ptr, p_ptr, ds_ptr,
    N, R, stride_dym, stride_dyn,
    ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
    COMPUTE_DT: tl.constexpr, COMPUTE_P: tl.constexpr, COMPUTE_DS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One pass over the dY rows of one tile of adapter i (gathered through ``order``).

    G = (dY ⊙ o_i) B_i accumulates over d in registers; per d-tile the tile's partial dYᵀU
    [d, R] goes to this tile's slot of the partials (no atomics: the launcher sums each
    adapter's tiles in tile order). After the loop: the tile's dS partial (Gᵀ Z, or Σ_rows G ⊙ Z
    for a diagonal core) and dT = (G S_i) ⊙ σ'(T) at the tile's positions."""
    dtype = dy_ptr.dtype.element_ty
    # the tile's entry read inline, not by _tile_rows: through the call two integer ops of this
    # kernel's SASS swap places (same registers and instruction mix; the others are unchanged)
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    pos = start + tl.arange(0, BLOCK_M)
    mask_m = pos < end
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    mask_mr = mask_m[:, None] & mask_r[None, :]
    t_rows = pos.to(tl.int64)[:, None] * R
    if CORE == 2:
        core_i = core_ptr + slot * R * R
        ds_i = ds_ptr + tile.to(tl.int64) * R * R
    else:
        core_i = core_ptr + slot * R
        ds_i = ds_ptr + tile.to(tl.int64) * R
    if COMPUTE_P:    # U is 0 on padded rows and columns: they add nothing to dYᵀU
        u_op = _op(tl.load(u_ptr + t_rows + rr[None, :], mask=mask_mr, other=0.0), dtype, UPCAST)
    rows = tl.load(order_ptr + pos, mask=mask_m, other=0)
    dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
    b_cols = b_ptr + slot * N * R + (rr % R)[None, :]
    part_p = p_ptr + tile.to(tl.int64) * N * R
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        dyt = tl.load(dy_rows + rn[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if COMPUTE_DT or COMPUTE_DS:     # G += (dY ⊙ o_i) B_i
            if HAS_OUT_SCALE:
                osv = tl.load(os_ptr + slot * N + rn, mask=mask_n, other=0.0).to(tl.float32)
                dyo = dyt.to(tl.float32) * osv[None, :]
            else:
                dyo = dyt
            bt = tl.load(b_cols + rn.to(tl.int64)[:, None] * R, mask=mask_n[:, None], other=0.0)
            g = tl.dot(_op(dyo, dtype, UPCAST), _op(bt, dtype, UPCAST), g, input_precision=DOT_PRECISION)
        if COMPUTE_P:                    # this tile's dYᵀ U [BLOCK_N, R]
            pp = tl.dot(tl.trans(_op(dyt, dtype, UPCAST)), u_op, input_precision=DOT_PRECISION)
            tl.store(part_p + rn.to(tl.int64)[:, None] * R + rr[None, :], pp, mask=mask_n[:, None] & mask_r[None, :])
    _dy_tail(g, t_ptr, t_rows, core_i, ds_i, dt_ptr,
             mask_m, R, ACTIVATION, CORE, COMPUTE_DT, COMPUTE_DS, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK)


@triton.jit
def _dy_tail(g, t_ptr, t_rows, core_ptr, ds_ptr, dt_ptr, mask_m, R, ACTIVATION: tl.constexpr,
             CORE: tl.constexpr, COMPUTE_DT: tl.constexpr, COMPUTE_DS: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr):
    """From G [BLOCK_M, BLOCK_R] (fp32): dS's partial at ``ds_ptr`` (Gᵀ Z [R, R] for a full core,
    Σ_rows G ⊙ Z [R] for a diagonal one; Z = σ(T) read back) and dT = (G S) ⊙ σ'(T) [rows, R];
    R_CHUNK columns at a time where an [R, R] operand would not fit in registers."""
    dtype = dt_ptr.dtype.element_ty
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    mask_mr = mask_m[:, None] & mask_r[None, :]
    if COMPUTE_DS:
        if CORE == 2:
            gt = tl.trans(g)
            for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                rj = j0 + tl.arange(0, R_CHUNK)
                zj = _act_fwd(tl.load(t_ptr + t_rows + rj[None, :], mask=mask_m[:, None] & (rj < R)[None, :],
                                      other=0.0).to(tl.float32), ACTIVATION)
                tl.store(ds_ptr + rr[:, None] * R + rj[None, :], tl.dot(gt, zj, input_precision=DOT_PRECISION),
                         mask=mask_r[:, None] & (rj < R)[None, :])
        else:
            z = _act_fwd(tl.load(t_ptr + t_rows + rr[None, :], mask=mask_mr, other=0.0).to(tl.float32), ACTIVATION)
            tl.store(ds_ptr + rr, tl.sum(g * z, axis=0), mask=mask_r)
    if COMPUTE_DT:
        if CORE == 2:
            g_op = _op(g, dtype, UPCAST)
            for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                rj = j0 + tl.arange(0, R_CHUNK)
                mask_j = mask_m[:, None] & (rj < R)[None, :]
                h = tl.dot(g_op, _op(_core_tile(core_ptr, R, rr, rj, False), dtype, UPCAST),
                           input_precision=DOT_PRECISION)
                if ACTIVATION != 0:
                    h = h * _act_grad(tl.load(t_ptr + t_rows + rj[None, :], mask=mask_j, other=0.0).to(tl.float32),
                                      ACTIVATION)
                tl.store(dt_ptr + t_rows + rj[None, :], h.to(dtype), mask=mask_j)
        else:
            h = g
            if CORE == 1:
                h = h * tl.load(core_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
            if ACTIVATION != 0:
                h = h * _act_grad(tl.load(t_ptr + t_rows + rr[None, :], mask=mask_mr, other=0.0).to(tl.float32),
                                  ACTIVATION)
            tl.store(dt_ptr + t_rows + rr[None, :], h.to(dtype), mask=mask_mr)


@triton.jit
def _mixed_da_kernel(
    dt_ptr, x_ptr, order_ptr, first_ptr, count_ptr, scale_ptr, da_ptr, seed_ptr, p_ptr,
    K, R, stride_xm, stride_xk,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA_i [R, BLOCK_K] = s_i·dT_iᵀ D_i(X_i) over all of adapter i's rows (program (i, k-block)),
    in row order: each gradient is one program's fixed-order sum (deterministic, no partials).
    HAS_DROPOUT: D_i is the T pass's mask, regenerated from the slot's seed and p."""
    dtype = x_ptr.dtype.element_ty
    slot = tl.program_id(0).to(tl.int64)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    first = tl.load(first_ptr + slot)
    end = first + tl.load(count_ptr + slot)
    mask_k = rk < K
    mask_r = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    rb = tl.arange(0, BLOCK_M)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr + slot)
        p = tl.load(p_ptr + slot)
    for m0 in range(first, end, BLOCK_M):
        pos = m0 + rb
        mask_m = pos < end
        dtt = tl.load(dt_ptr + pos.to(tl.int64)[None, :] * R + rr[:, None], mask=mask_r[:, None] & mask_m[None, :],
                      other=0.0)
        rows = tl.load(order_ptr + pos, mask=mask_m, other=0)
        xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(_keep_mask(seed, pos - first, rk, p), xt, 0.0)
        acc = tl.dot(_op(dtt, dtype, UPCAST), _op(xt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(scale_ptr + slot)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - p))
    out = da_ptr + slot * R * K + rr[:, None] * K + rk[None, :]
    tl.store(out, acc.to(da_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def pack_adapters(adapters, d: int, k: int, dtype, device):
    """Stack ``adapters`` (MixedAdapter tuples, all present) rank-padded to the largest r:
    (A [n, R, k], B [n, d, R], core kind 0/1/2 and its pack, out_scale [n, d] or None, s [n]
    fp32, R). See the module docstring for how missing and diagonal cores are filled in."""
    n = len(adapters)
    R = max(a.lora_A.shape[0] for a in adapters)
    kinds = {0 if a.core is None else a.core.dim() for a in adapters}
    core_kind = 2 if 2 in kinds else (1 if 1 in kinds else 0)
    a_pack = torch.zeros((n, R, k), dtype=dtype, device=device)
    b_pack = torch.zeros((n, d, R), dtype=dtype, device=device)
    core_pack = None
    if core_kind == 1:
        core_pack = torch.zeros((n, R), dtype=dtype, device=device)
    elif core_kind == 2:
        core_pack = torch.zeros((n, R, R), dtype=dtype, device=device)
    has_os = any(a.out_scale is not None for a in adapters)
    os_pack = torch.ones((n, d), dtype=dtype, device=device) if has_os else None
    with torch.no_grad():
        for i, a in enumerate(adapters):
            r = a.lora_A.shape[0]
            a_pack[i, :r] = a.lora_A
            b_pack[i, :, :r] = a.lora_B
            if core_kind == 1:
                core_pack[i, :r] = 1.0 if a.core is None else a.core
            elif core_kind == 2:
                if a.core is None:
                    core_pack[i, :r, :r] = torch.eye(r, dtype=dtype, device=device)
                elif a.core.dim() == 1:
                    core_pack[i, :r, :r] = torch.diag(a.core)
                else:
                    core_pack[i, :r, :r] = a.core
            if a.out_scale is not None:
                os_pack[i] = a.out_scale
    scales = torch.tensor([float(a.scale) for a in adapters], dtype=torch.float32, device=device)
    return a_pack, b_pack, core_kind, core_pack, os_pack, scales, R


def tile_table(segments, n_rows: int, n_total: int, block_m: int, device) -> tuple[torch.Tensor, int]:
    """int32 [tiles, 3]: (pack slot, first, end) in ``order``'s positions; the tiles of the
    adapters first (``segments``: (slot, first, count)), then those of every other row (slot -1:
    rows of no adapter, and of adapters absent from this layer). Returns (table, adapter tiles)."""
    tiles = []
    covered = []
    for slot, start, count in segments:
        end = start + count
        tiles += [(slot, s, end) for s in range(start, end, block_m)]
        covered.append((start, end))
    n_adapter_tiles = len(tiles)
    gaps, cursor = [], 0
    for start, end in covered + [(n_total, n_total)]:
        if start > cursor:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
    for start, end in gaps:
        tiles += [(-1, s, end) for s in range(start, end, block_m)]
    table = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(device)
    return table, n_adapter_tiles


def gpu_tiles(max_count: int, w4: bool, block_m=None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on a GPU: row tiles no taller than the
    largest segment (16..64 rows), d-blocks of 64; the static test compiles each of them for sm_80
    and sm_90 without spills (dense 64-row tiles need 8 warps, a 4-bit W tile is formed 32
    columns at a time)."""
    bm = block_m or max(16, min(64, _common._pow2(max_count)))
    if w4:
        return bm, 64, 32, 4, 3
    return bm, 64, 64, 8 if bm >= 64 else 4, 3


def _blocks(max_count: int, N: int, K: int, w4: bool, block_m=None):
    """The tiles of one call; under the interpreter, one block over small dims."""
    if _common._interpreting():
        bm = block_m or min(64, _common._interp_block(max_count))
        return bm, _common._interp_block(N), max(32, _common._interp_block(K)), 4, 1
    return gpu_tiles(max_count, w4, block_m)


def _dropout_args(adapters, counts, seed: int, device):
    """Per pack slot (the adapters with rows, in order): int32 seeds ``seed + i``, fp32 p and the
    int32 first position of the adapter's rows in ``order``; (None, None, None) without dropout."""
    seeds, ps, firsts, start = [], [], [], 0
    for i, (a, count) in enumerate(zip(adapters, counts)):
        if a is not None and count:
            seeds.append((int(seed) + i) & 0x7FFFFFFF)
            ps.append(float(a.dropout_p))
            firsts.append(start)
        start += count
    if not any(p > 0.0 for p in ps):
        return None, None, None
    as_tensor = lambda v, dtype: torch.tensor(v, dtype=dtype).to(device)
    return as_tensor(seeds, torch.int32), as_tensor(ps, torch.float32), as_tensor(firsts, torch.int32)


def lowrank_mixed_fwd(x, weight, bias, order, counts, adapters, quant_state=None, block_m=None, seed: int = 0):
    """Forward of the mixed op on 2-D x [M, k] (see :mod:`fastpeft.ops.lowrank_mixed` for the
    arguments): returns (Y [M, d], [T_i [rows of adapter i, r_i] or None per adapter]). Adapter i
    with dropout_p > 0 drops its input with the Philox mask of seed ``seed + i`` over its own rows.
    ``block_m`` forces the row tile (tests)."""
    _common._check_dtype(x)
    M, K = x.shape
    w4 = quant_state is not None
    if w4:
        data, wscales, wmeta, (N, k) = _weight_args(weight, quant_state, x.device)
        w_arg, stride_wn, stride_wk = data, 0, 0
    else:
        N, k = weight.shape
        data, wmeta = weight, dict(QBLOCK=64, QUANT=0, W_KIND=0, LAYOUT=2, NESTED=False, BLOCK2=256)
        wscales = dict(absmax_ptr=weight, code2_ptr=weight, absmax2_ptr=weight, offset_ptr=weight)
        w_arg, stride_wn, stride_wk = weight, weight.stride(0), weight.stride(1)
    if k != K:
        raise ValueError(f"x has k={K} columns but the weight is [d={N}, k={k}]")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, [None] * len(adapters)
    n_rows = sum(counts)
    segments, present, start = [], [], 0
    for a, count in zip(adapters, counts):
        if a is not None and count:
            segments.append((len(present), start, count))
            present.append(a)
        start += count
    ts = [None] * len(adapters)
    max_count = max([c for *_, c in segments] + [max(M - n_rows, 1)])
    bm, bn, bk, warps, stages = _blocks(max_count, N, K, w4, block_m)
    interp = _common._interpreting()
    precision = _common._dot_precision(x.dtype)
    tiles, n_adapter_tiles = tile_table(segments, n_rows, M, bm, x.device)
    with _common._device(x):
        if present:
            a_pack, b_pack, core_kind, core_pack, os_pack, scales, R = pack_adapters(present, N, K, x.dtype,
                                                                                     x.device)
            activation = present[0].activation
            BR = _common._block_r(R)
            t = torch.empty((n_rows, R), dtype=x.dtype, device=x.device)
            store_u = core_kind != 0 or activation is not None
            u = torch.empty_like(t) if store_u else t
            seeds, ps, firsts = _dropout_args(adapters, counts, seed, x.device)
            _mixed_t_kernel[(n_adapter_tiles,)](
                x, order, tiles, a_pack, core_pack if core_pack is not None else a_pack, t, u,
                seeds if seeds is not None else tiles, ps if ps is not None else scales,
                firsts if firsts is not None else tiles,
                K, R, x.stride(0), x.stride(1), ACTIVATION=_common._ACTIVATIONS[activation], CORE=core_kind,
                STORE_U=store_u, HAS_DROPOUT=seeds is not None, UPCAST=interp, DOT_PRECISION=precision, BLOCK_R=BR,
                R_CHUNK=_common._r_chunk(BR), BLOCK_M=bm, BLOCK_K=bk,
                num_warps=warps, num_stages=stages)
            slot = 0
            for i, (a, count) in enumerate(zip(adapters, counts)):
                if a is not None and count:
                    _, first, _ = segments[slot]
                    ts[i] = t[first:first + count, :a.lora_A.shape[0]]
                    slot += 1
        else:
            u = b_pack = os_pack = scales = y
            R, BR = 1, 16
        _mixed_gemm_kernel[(tiles.shape[0], triton.cdiv(N, bn))](
            x, order, tiles, w_arg, **wscales, bias_ptr=bias if bias is not None else y, u_ptr=u, b_ptr=b_pack,
            os_ptr=os_pack if os_pack is not None else b_pack, scale_ptr=scales, y_ptr=y,
            N=N, K=K, R=R, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=stride_wn, stride_wk=stride_wk,
            stride_ym=y.stride(0), stride_yn=y.stride(1),
            seed_ptr=tiles, p_ptr=y, first_ptr=tiles,
            HAS_BIAS=bias is not None, HAS_OUT_SCALE=os_pack is not None, W4=w4, W_T=False, HAS_DROPOUT=False, **wmeta,
            UPCAST=interp, DOT_PRECISION=precision, BLOCK_R=BR, R_CHUNK=_common._r_chunk(BR),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y, ts


def _dy_rows(block_m: int, block_r: int, elem: int) -> int:
    """Row tile of the pass over dY: G [BLOCK_M, r] stays in registers (the dense pass's rule)."""
    return min(block_m, _dy_block_m(block_m, block_r, elem))


def lowrank_mixed_bwd(grad_y, x, weight, order, counts, adapters, ts, need_dx: bool, needs, quant_state=None,
                      block_m=None, seed: int = 0):
    """Backward of the mixed op (see :mod:`fastpeft.ops.lowrank_mixed`); W dense, or 4-bit with
    ``quant_state`` (dequantised tile by tile in the dX GEMM); adapter i's dropout mask (seed
    ``seed + i``, as the forward drew it) regenerated in the dX epilogue and the dA pass.

    ``ts``: the saved T_i (None for an adapter without rows); ``needs``: per adapter (dA, dB,
    dcore, dout_scale) flags. Returns (dX [M, k] or None, per adapter [dA, dB, dcore, dout_scale]
    or None). With dYo = dY ⊙ o_i, G = dYo B_i and dT = (G S_i) ⊙ σ'(T) on adapter i's rows::

        dX = dY W + s_i·D_i'(dT A_i)    one GEMM over all rows (the forward's GEMM kernel, W read
                                         transposed, A_iᵀ as the epilogue's B, each tile's adapter)
        dA_i = s_i·dT_iᵀ D_i(X_i)       one program per (adapter, k-block), over its own rows
        dB_i = s_i·o_i ⊙ dYᵀU_i,  d_o_i = s_i·rowsum(B_i ⊙ dYᵀU_i),  dS_i = s_i·(Gᵀ Z | Σ G ⊙ Z)

    The pass over dY writes one partial of dYᵀU (and dS) per row tile; each adapter's tiles are
    summed in tile order: every gradient is deterministic."""
    _common._check_dtype(grad_y)
    M, N = grad_y.shape
    w4 = quant_state is not None
    if w4:
        w_arg, wscales, wmeta, (d, K) = _weight_args(weight, quant_state, grad_y.device)
        stride_wn = stride_wk = 0
    else:
        (d, K), w_arg = weight.shape, weight
        wscales = dict(absmax_ptr=weight, code2_ptr=weight, absmax2_ptr=weight, offset_ptr=weight)
        wmeta = dict(QBLOCK=64, QUANT=0, W_KIND=0, LAYOUT=2, NESTED=False, BLOCK2=256)
        stride_wn, stride_wk = weight.stride(1), weight.stride(0)                 # W read transposed
    dev, dtype = grad_y.device, grad_y.dtype
    segments, present, owner, start = [], [], [], 0
    for i, (a, count) in enumerate(zip(adapters, counts)):
        if a is not None and count and ts[i] is not None:
            segments.append((len(present), start, count))
            present.append(a)
            owner.append(i)
        start += count
    n_rows = sum(counts)
    grads: list = [None] * len(adapters)
    dx = torch.empty((M, K), dtype=dtype, device=dev) if need_dx else None
    interp = _common._interpreting()
    precision = _common._dot_precision(dtype)
    max_count = max([c for *_, c in segments] + [max(M - n_rows, 1)])
    bm, bn, bk, warps, stages = _blocks(max_count, K, N, w4, block_m)         # the dX GEMM: N = k, K = d
    tiles, _ = tile_table(segments, n_rows, M, bm, dev)
    u = b_t = scales = d_t = None
    R, BR = 1, 16
    seeds, ps, firsts_d = _dropout_args(adapters, counts, seed, dev)
    with _common._device(grad_y):
        if present:
            a_pack, b_pack, core_kind, core_pack, os_pack, scales, R = pack_adapters(present, d, K, dtype, dev)
            BR, RC = _common._block_r(R), _common._r_chunk(_common._block_r(R))
            act = _common._ACTIVATIONS[present[0].activation]
            t = torch.zeros((n_rows, R), dtype=dtype, device=dev)
            for (_, first, count), i in zip(segments, owner):
                t[first:first + count, :ts[i].shape[1]] = ts[i]
            flags = [needs[i] for i in owner]
            need_a = any(f[0] for f in flags)
            need_p = any(f[1] or f[3] for f in flags)
            need_ds = core_kind != 0 and any(f[2] for f in flags)
            bm_dy = block_m or _dy_rows(bm, BR, grad_y.element_size())
            dy_tiles, n_dy = tile_table(segments, n_rows, n_rows, bm_dy, dev)
            common = dict(UPCAST=interp, DOT_PRECISION=precision, BLOCK_R=BR)
            u = t
            if need_p and (core_kind != 0 or act != 0):                   # U = σ(T)Sᵀ from the saved T
                u = torch.empty_like(t)
                _mixed_u_kernel[(n_dy,)](t, dy_tiles, core_pack if core_pack is not None else t, u, R,
                                         ACTIVATION=act, CORE=core_kind, R_CHUNK=RC, BLOCK_M=bm_dy, num_warps=4,
                                         **common)
            d_t = torch.empty_like(t) if (need_dx or need_a) else t
            f32 = torch.float32
            p_part = torch.empty((n_dy, N, R), dtype=f32, device=dev) if need_p else t.new_empty(1, dtype=f32)
            ds_part = (torch.empty((n_dy, R * R if core_kind == 2 else R), dtype=f32, device=dev) if need_ds
                       else t.new_empty(1, dtype=f32))
            dy_bn = _common._interp_block(N) if interp else 32
            _mixed_dy_kernel[(n_dy,)](
                grad_y, order, dy_tiles, t, u, core_pack if core_pack is not None else t, b_pack,
                os_pack if os_pack is not None else b_pack, d_t, p_part, ds_part, N, R,
                grad_y.stride(0), grad_y.stride(1), ACTIVATION=act, CORE=core_kind,
                HAS_OUT_SCALE=os_pack is not None, COMPUTE_DT=need_dx or need_a, COMPUTE_P=need_p,
                COMPUTE_DS=need_ds, R_CHUNK=RC, BLOCK_M=bm_dy, BLOCK_N=dy_bn, num_warps=4,
                num_stages=1 if interp else 3, **common)
            da_pack = None
            if need_a:
                da_pack = torch.empty((len(present), R, K), dtype=dtype, device=dev)
                firsts = torch.tensor([f for _, f, _ in segments], dtype=torch.int32).to(dev)
                count_t = torch.tensor([c for *_, c in segments], dtype=torch.int32).to(dev)
                da_bm = _common._interp_block(max_count) if interp else 32
                da_bk = max(32, _common._interp_block(K)) if interp else 64
                _mixed_da_kernel[(len(present), triton.cdiv(K, da_bk))](
                    d_t, x, order, firsts, count_t, scales, da_pack, seeds if seeds is not None else firsts,
                    ps if ps is not None else scales, K, R, x.stride(0), x.stride(1), HAS_DROPOUT=seeds is not None,
                    BLOCK_M=da_bm, BLOCK_K=da_bk, num_warps=4, num_stages=1 if interp else 3, **common)
            tile0 = 0
            for slot, ((_, _, count), i) in enumerate(zip(segments, owner)):
                a, (want_a, want_b, want_core, want_os) = present[slot], needs[i]
                r, s = a.lora_A.shape[0], float(a.scale)
                n_t = triton.cdiv(count, bm_dy)
                d_a = d_b = d_core = d_os = None
                if want_a:
                    d_a = da_pack[slot, :r]
                if want_b or want_os:
                    p = p_part[tile0:tile0 + n_t].sum(0)[:, :r]                 # dYᵀU_i, tiles in order
                    if want_b:
                        d_b = (p * s if a.out_scale is None else p * (s * a.out_scale.float())[:, None]).to(dtype)
                    if want_os:
                        d_os = ((a.lora_B.float() * p).sum(1) * s).to(dtype)
                if want_core and a.core is not None:
                    ds = ds_part[tile0:tile0 + n_t].sum(0) * s
                    if core_kind == 2:
                        ds = ds.view(R, R)[:r, :r]
                        ds = ds.diagonal() if a.core.dim() == 1 else ds
                    d_core = ds[:r].to(dtype)
                grads[i] = [d_a, d_b, d_core, d_os]
                tile0 += n_t
            b_t = a_pack.transpose(1, 2).contiguous()                        # A_iᵀ [n, k, R]: the epilogue's B
        if need_dx:
            u_dx = d_t if d_t is not None else dx
            _mixed_gemm_kernel[(tiles.shape[0], triton.cdiv(K, bn))](
                grad_y, order, tiles, w_arg, **wscales, bias_ptr=dx, u_ptr=u_dx, b_ptr=b_t if b_t is not None else dx,
                os_ptr=b_t if b_t is not None else dx, scale_ptr=scales if scales is not None else dx, y_ptr=dx,
                seed_ptr=seeds if seeds is not None else tiles, p_ptr=ps if ps is not None else dx,
                first_ptr=firsts_d if firsts_d is not None else tiles, N=K, K=N, R=R, stride_xm=grad_y.stride(0), stride_xk=grad_y.stride(1),
                stride_wn=stride_wn, stride_wk=stride_wk, stride_ym=dx.stride(0), stride_yn=dx.stride(1),
                HAS_BIAS=False, HAS_OUT_SCALE=False, W4=w4, W_T=True, HAS_DROPOUT=seeds is not None, **wmeta,
                UPCAST=interp, DOT_PRECISION=precision, BLOCK_R=BR, R_CHUNK=_common._r_chunk(BR),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return dx, grads

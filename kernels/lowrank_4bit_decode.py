"""The 4-bit op's forward at M <= 16 in one launch (``fastpeft.kernels.lowrank_4bit_decode``).

Names and the packed W as in :mod:`fastpeft.kernels.lowrank_4bit` (its tile loader ``_w4_tile``
dequantises W here too); :func:`fastpeft.kernels.lowrank_4bit.lowrank_4bit_fwd` calls
:func:`_decode` at M <= ``DECODE_MAX_M``.

``_lowrank4_decode_kernel``, split over d only: each program reads its rows of packed W once (4
bits per weight), computes T = D(X)Aᵀ in the same loop over k, and adds s·(U Bᵀ) ⊙ o + b in its
epilogue (DoRA's row scale and Z store through the dense GEMM's epilogue ``_store_y``); no
partial sums in memory, so the sum order is fixed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import _act_fwd, _core_tile, _keep_mask, _op, _store_y, _words
from .lowrank_4bit import _TILE_WORDS, DECODE_MAX_M, _w4_tile

# decode: (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M is 16. Each k-step forms a W tile and
# loads an Aᵀ tile [BLOCK_K, r] beside it (T is computed in the same loop), so large r takes the
# short-k tiles.
_DECODE_TILES = [(32, 128, 8, 3), (64, 64, 8, 3), (16, 128, 4, 3), (32, 64, 4, 3), (32, 64, 8, 3),
                 (64, 32, 8, 3), (32, 32, 8, 3)]
# decode tiles that spill (8-byte stack) as launched at M = 16 with the byte-permute decode
# (fastpeft inspect, bf16, r = 8 and 16)
_DECODE_SPILLS = {90: {(64, 64, 8, 3)}, 80: {(32, 32, 8, 3)}}

_DECODE_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                   for bn, bk, w, s in _DECODE_TILES]


# --------------------------------------------------------------------------------------------
# Choosing configs
# --------------------------------------------------------------------------------------------

def _decode_keep(configs, arch, smem, N, K, block_r, elem):
    def tile_of(c):
        return (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    def ok(c):
        bn, bk, w, s = tile_of(c)
        main = s * (DECODE_MAX_M * bk * elem + bn * bk // 2 + bk * block_r * elem)
        return (main <= smem and _words(bn * bk, elem, w) <= _TILE_WORDS
                and _words(bk * block_r, elem, w) <= _TILE_WORDS)

    def size_ok(c):
        return c.kwargs["BLOCK_N"] <= max(16, _common._pow2(N)) and c.kwargs["BLOCK_K"] <= max(32, _common._pow2(K))

    return _common._keep(configs, set(_DECODE_TILES) - _DECODE_SPILLS.get(arch, set()), tile_of, ok, size_ok)


def _prune_decode(configs, named_args, **kwargs):
    args = _common._prune_args(named_args, kwargs)
    arch, smem, _ = _common._limits_of(args["x_ptr"])
    return _decode_keep(configs, arch, smem, args["N"], args["K"], args["BLOCK_R"], args["x_ptr"].element_size())


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.autotune(configs=_DECODE_CONFIGS, key=["M", "N", "K", "BLOCK_R", "HAS_DROPOUT", "LAYOUT"],
                 prune_configs_by={"early_config_prune": _prune_decode})
@triton.jit(do_not_specialize=["seed"])
def _lowrank4_decode_kernel(
    x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, a_ptr, core_ptr, b_ptr, os_ptr, bias_ptr,
    t_ptr, y_ptr, rs_ptr, z_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_ym, stride_yn,
    seed, dropout_p, inv_keep, scale,
    ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_OUT_SCALE: tl.constexpr, QBLOCK: tl.constexpr, QUANT: tl.constexpr, W_KIND: tl.constexpr,
    LAYOUT: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ROW_SCALE: tl.constexpr = False,
    STORE_Z: tl.constexpr = False,
):
    """The whole forward for M <= BLOCK_M rows and BLOCK_N columns of Y, in one program:

    * main loop over k: X Wᵀ (every packed byte of these W rows read once, 4 bits per weight)
      and, beside it, T = D(X) Aᵀ [BLOCK_M, r] (every program computes the whole T: r·k values
      of A per program, read from L2 after the first);
    * epilogue: T stored by program 0, U = σ(T)Sᵀ | σ(T) ⊙ S | σ(T) in registers (rounded to x's
      dtype, as the training path stores it), and Y = X Wᵀ + s·(U Bᵀ) ⊙ o + b written once
      (with HAS_ROW_SCALE, DoRA: Y = c ⊙ (X Wᵀ + s·(U Bᵀ) ⊙ o) + b and Z beside it with STORE_Z,
      the GEMM's epilogue ``_store_y``).
    No partial sums in memory: the grid is split over d only, so the sum order is fixed."""
    dtype = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_n = rn < N
    mask_r = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # rows past M and past r read wrapped (valid) addresses and are never stored
    x_rows = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + (rr % R)[None, :] * K                              # Aᵀ tile [BK, BR]
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_k[None, :], other=0.0)
        wt = _w4_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rn % N, k0, N, K, BLOCK_N, BLOCK_K,
                      QBLOCK, QUANT, W_KIND, LAYOUT, NESTED, BLOCK2, UPCAST, dtype)
        x_op = _op(xt, dtype, UPCAST)
        acc = tl.dot(x_op, _op(tl.trans(wt), dtype, UPCAST), acc, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            x_op = _op(tl.where(_keep_mask(seed, rm, kk, tl.to_tensor(dropout_p).to(tl.float32)), xt, 0.0), dtype,
                       UPCAST)
        at = tl.load(a_cols + kk[:, None], mask=mask_k[:, None], other=0.0)
        t = tl.dot(x_op, _op(at, dtype, UPCAST), t, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        t = t * tl.to_tensor(inv_keep).to(tl.float32)
    if pid_n == 0:
        tl.store(t_ptr + rm[:, None] * R + rr[None, :], t.to(t_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_r[None, :])
    # the adapter term s·(U Bᵀ) ⊙ o, U = σ(T)Sᵀ | σ(T) ⊙ S | σ(T)
    z = tl.where(mask_r[None, :], _act_fwd(t, ACTIVATION), 0.0)
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * R
    adp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if CORE == 2:
        z_op = _op(z, dtype, UPCAST)
        for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
            rj = j0 + tl.arange(0, R_CHUNK)
            mask_j = rj < R
            u = tl.dot(z_op, _op(_core_tile(core_ptr, R, rr, rj, True), dtype, UPCAST), input_precision=DOT_PRECISION)
            bt = tl.load(b_cols + rj[:, None], mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            adp = tl.dot(_op(u.to(dtype), dtype, UPCAST), _op(bt, dtype, UPCAST), adp, input_precision=DOT_PRECISION)
    else:
        if CORE == 1:
            z = z * tl.load(core_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
        bt = tl.load(b_cols + rr[:, None], mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        adp = tl.dot(_op(z.to(dtype), dtype, UPCAST), _op(bt, dtype, UPCAST), adp, input_precision=DOT_PRECISION)
    col_scale = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.to_tensor(scale).to(tl.float32)
    if HAS_OUT_SCALE:
        col_scale = col_scale * tl.load(os_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    acc += adp * col_scale[None, :]
    if HAS_BIAS and not HAS_ROW_SCALE:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    _store_y(acc, y_ptr, z_ptr, rs_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS, HAS_ROW_SCALE,
             STORE_Z)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def _decode(x, data, scales, wmeta, lora_A, core, y, scale, dropout_p, seed, act, core_kind, adapter):
    """The forward at M <= 16 in one launch (``_lowrank4_decode_kernel``): writes y, returns T."""
    M, K = x.shape
    N = y.shape[1]
    R = lora_A.shape[0]
    p = float(dropout_p)
    t = torch.empty((M, R), dtype=x.dtype, device=x.device)
    a = lora_A.contiguous()
    args = dict(x_ptr=x, packed_ptr=data, **scales, a_ptr=a, core_ptr=core.contiguous() if core is not None else a,
                t_ptr=t, y_ptr=y, M=M, N=N, K=K, R=R, stride_xm=x.stride(0), stride_xk=x.stride(1),
                stride_ym=y.stride(0), stride_yn=y.stride(1), seed=int(seed), dropout_p=p,
                inv_keep=1.0 / (1.0 - p), scale=float(scale), ACTIVATION=act, CORE=core_kind, HAS_DROPOUT=p > 0.0,
                BLOCK_M=DECODE_MAX_M, **wmeta, **adapter)
    if _common._interpreting():
        fb = dict(BLOCK_N=_common._interp_block(N), BLOCK_K=max(32, _common._interp_block(K)), num_warps=4,
                  num_stages=1)
    elif not _common._autotuning():
        arch, smem, _ = _common._limits_of(x)
        fb = _common._fallback(_decode_keep(_DECODE_CONFIGS, arch, smem, N, K, adapter["BLOCK_R"], x.element_size()))
    else:
        fb = {}
    _common._launch(_lowrank4_decode_kernel, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), args, fb)
    return t

"""Fused Triton kernels of the dense low-rank adapter op (``fastpeft.kernels.lowrank``).

For X [M, k], W [d, k], b [d], A [r, k], B [d, r], core S ([r] diagonal or [r, r]), out_scale
o [d], scale s, activation σ and inverted dropout D (keep probability 1-p, kept values scaled by
1/(1-p))::

    T = D(X) Aᵀ;  Z = σ(T);  U = Z Sᵀ | Z ⊙ S | Z
    Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o

Forward (this module), two kernels:
  * ``_lowrank_fwd_t_kernel`` (:mod:`fastpeft.kernels._common`, shared with the grouped and
    4-bit forwards): one pass over X: T = D(X)Aᵀ (returned, saved by the caller) and
    U = σ(T)Sᵀ ([M, r], a workspace);
  * ``_lowrank_fwd_gemm_kernel``: Y = X Wᵀ whose epilogue adds b and s·(U Bᵀ)⊙o: Y written once
    (on sm_90 with aligned operands, its TMA twin in :mod:`fastpeft.kernels.lowrank_sm90`).

Backward: :mod:`fastpeft.kernels.lowrank_bwd` (the pass over dY, dX, dA; the gradient
derivation with them), its launchers ``lowrank_bwd``, ``lowrank_bwd_dy`` and
``lowrank_bwd_da`` importable from here as well. The building blocks shared with the other
kernel modules (config choice, ``@triton.jit`` helpers, the T pass, launching), the dropout
mask's definition and the autotuning scheme: :mod:`fastpeft.kernels._common`.
``dropout_keep_mask`` writes the kernels' keep-mask (tests and references).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (_ACTIVATIONS, _GEMM_CONFIGS, _GROUP_M, MAX_RANK, _adapter_init, _autotuning,
                      _block_r, _check_dtype, _device, _dot_precision, _fallback, _gemm_keep, _grouped_pid,
                      _interp_block, _interpreting, _keep_mask, _op, _pow2, _prune_gemm, _r_chunk, _store_y)
from .lowrank_bwd import lowrank_bwd, lowrank_bwd_da, lowrank_bwd_dy

__all__ = ["lowrank_fwd", "lowrank_bwd", "lowrank_bwd_dy", "lowrank_bwd_da", "dropout_keep_mask",
           "MAX_RANK"]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.autotune(configs=_GEMM_CONFIGS, key=["M_KEY", "N", "K", "BLOCK_R", "STORE_Z"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _lowrank_fwd_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, os_ptr, y_ptr, rs_ptr, z_ptr,
    M, N, K, R, M_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_um,
    scale,
    HAS_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr = False, STORE_Z: tl.constexpr = False,
):
    """Y = s·(U Bᵀ) ⊙ o + b + X Wᵀ; Y written once. The adapter term (R_CHUNK columns of r at a
    time) and the bias initialise the accumulator, one [BLOCK_M, BLOCK_N] fp32 tile live, then
    the main loop adds X Wᵀ. U [M, R] has row stride ``stride_um`` (a column slice of the U of
    several adapters computed in one T pass).

    With HAS_ROW_SCALE (DoRA): Y = c ⊙ (X Wᵀ + s·(U Bᵀ) ⊙ o) + b for the row scale c [N] (the
    bias added after it), and with STORE_Z the unscaled Z = X Wᵀ + s·(U Bᵀ) ⊙ o written beside Y
    (same strides): the magnitude's gradient needs it."""
    dtype = x_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = _adapter_init(u_ptr, b_ptr, os_ptr, bias_ptr, rm, rn, M, N, R, stride_um, scale,
                        HAS_BIAS and not HAS_ROW_SCALE, HAS_OUT_SCALE, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK,
                        BLOCK_M, BLOCK_N)
    # rows past M / N read wrapped addresses and are never stored: the loop masks only along k
    x_rows = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + (rn % N).to(tl.int64)[None, :] * stride_wn                      # Wᵀ tile
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_k[None, :], other=0.0)
        wt = tl.load(w_cols + kk[:, None] * stride_wk, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(_op(xt, dtype, UPCAST), _op(wt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    _store_y(acc, y_ptr, z_ptr, rs_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS, HAS_ROW_SCALE,
             STORE_Z)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep-mask the kernels use, written as int8 (tests and references)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rm, rk, tl.to_tensor(dropout_p).to(tl.float32))
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def dropout_keep_mask(seed: int, M: int, k: int, dropout_p: float, device) -> torch.Tensor:
    """bool [M, k]: the exact keep-mask of the kernels for ``seed`` (True = kept)."""
    device = torch.device(device)
    out = torch.empty((M, k), dtype=torch.int8, device=device)
    if M == 0 or k == 0:
        return out.bool()
    bm, bk = (_interp_block(M, 256), _interp_block(k, 256)) if _interpreting() else (64, 64)
    with _device(out):
        _dropout_mask_kernel[(triton.cdiv(M, bm), triton.cdiv(k, bk))](
            out, M, k, int(seed), float(dropout_p), BLOCK_M=bm, BLOCK_K=bk)
    return out.bool()


def _fwd_gemm(x, weight, bias, u, b, out_scale, scale: float, y, row_scale=None, z=None):
    """Y = X Wᵀ + bias + s·(U Bᵀ) ⊙ o into ``y`` [M, d]. ``u`` [M, R] may be a column slice (row
    stride ``u.stride(0)``, unit column stride); ``b`` [d, R] contiguous. With ``row_scale`` c
    [d]: Y = c ⊙ (X Wᵀ + s·(U Bᵀ) ⊙ o) + bias, and the unscaled product into ``z`` (y's
    strides) when given."""
    M, K = x.shape
    N = weight.shape[0]
    R = b.shape[1]
    BR = _block_r(R)
    interp = _interpreting()
    args = dict(x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x, u_ptr=u, b_ptr=b,
                os_ptr=out_scale if out_scale is not None else x, y_ptr=y,
                rs_ptr=row_scale if row_scale is not None else x, z_ptr=z if z is not None else y,
                HAS_ROW_SCALE=row_scale is not None, STORE_Z=z is not None,
                M=M, N=N, K=K, R=R, M_KEY=_pow2(M),
                stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0),
                stride_wk=weight.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1),
                stride_um=u.stride(0), scale=float(scale), HAS_BIAS=bias is not None,
                HAS_OUT_SCALE=out_scale is not None, GROUP_M=_GROUP_M, UPCAST=interp,
                DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=BR, R_CHUNK=_r_chunk(BR))
    from . import lowrank_sm90
    if lowrank_sm90.tma_ok(x, weight):          # sm_90, aligned: TMA + wgmma main loop
        return lowrank_sm90.fwd_gemm(args, x)
    if interp:
        fb = dict(BLOCK_M=_interp_block(M), BLOCK_N=_interp_block(N), BLOCK_K=_interp_block(K),
                  num_warps=4, num_stages=1)
    elif not _autotuning():
        arch, smem, _ = _common._limits_of(x)
        fb = _fallback(_gemm_keep(_GEMM_CONFIGS, arch, smem, M, N, BR, x.element_size(), store_z=z is not None))
    else:
        fb = {}
    _common._launch(_lowrank_fwd_gemm_kernel,
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),), args, fb)


def lowrank_fwd(x, weight, bias, lora_A, lora_B, core, out_scale, scale: float, dropout_p: float,
                seed: int, activation, row_scale=None, z=None):
    """Forward on 2-D x [M, k]: returns (Y [M, d], T [M, r]), both in x's dtype; T is the
    pre-activation D(X)Aᵀ that backward needs. ``row_scale``, ``z``: as :func:`_fwd_gemm`."""
    _check_dtype(x)
    M = x.shape[0]
    R = lora_A.shape[0]
    _block_r(R)
    act = _ACTIVATIONS[activation]
    core_kind = 0 if core is None else (1 if core.dim() == 1 else 2)
    a = lora_A.contiguous()
    core_c = core.contiguous() if core is not None else a
    t = torch.empty((M, R), dtype=x.dtype, device=x.device)
    u = torch.empty((M, R), dtype=x.dtype, device=x.device) if core_kind != 0 or act != 0 else t
    y = torch.empty((M, weight.shape[0]), dtype=x.dtype, device=x.device)
    with _device(x):
        _common._t_pass(x, a, core_c, core_kind, act, dropout_p, seed, t, u)
        _fwd_gemm(x, weight, bias, u, lora_B.contiguous(), out_scale, scale, y, row_scale, z)
    return y, t

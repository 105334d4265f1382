"""DoRA's row norms in one pass over W (``fastpeft.kernels.dora``).

For W [d, k] (dense, or 4-bit in bitsandbytes' layout, dequantised tile by tile in registers),
A [r, k], B [d, r] and the scale s::

    n_j² = ‖W_j‖² + 2s·⟨B_j, (W Aᵀ)_j⟩ + s²·⟨(B·AAᵀ)_j, B_j⟩        n = sqrt(max(n², 0))

``_dora_norm_kernel``: one program per BLOCK_N rows of W streams them along k once, accumulating
the skinny product W Aᵀ [BLOCK_N, r] with ``tl.dot`` and ‖W_j‖² beside it, and writes both
(fp32, [d, r] and [d]). The launchers finish n on [d, r] tensors (A Aᵀ is r × r): nothing of
W's size is allocated. fp32 products are exact (``ieee``): the norm sets the scale of the whole
output row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import _op
from .lowrank import lowrank_fwd
from .lowrank_4bit import _w4_tile, _weight_args, lowrank_4bit_fwd

__all__ = ["dora_norm", "dora_norm_4bit", "dora_fwd", "dora_fwd_4bit"]

_WARPS, _STAGES = 8, 2


def _tile(block_r: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): the W tile and the [BLOCK_N, r] accumulator in registers, no spills
    (``fastpeft inspect``: a 64-row tile at r = 64 spills 8 bytes on sm_80 in the 4-bit FP4 case,
    specialised as a launch does; 32 rows from r = 64 up)."""
    return (64, 32) if block_r < 64 else (32, 32)


@triton.jit
def _dora_norm_kernel(
    w_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, a_ptr, wat_ptr, sq_ptr,
    N, K, R, stride_wn, stride_wk,
    IS_4BIT: tl.constexpr, QBLOCK: tl.constexpr, QUANT: tl.constexpr, W_KIND: tl.constexpr,
    LAYOUT: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W Aᵀ [N, R] and ‖W_j‖² [N] (fp32) for BLOCK_N rows, in one pass along k."""
    dtype = a_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    mask_n = rn < N
    mask_r = rr < R
    wat = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)                  # W Aᵀ
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)                            # ‖W_j‖²
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        if IS_4BIT:
            wt = _w4_tile(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rn, k0, N, K, BLOCK_N, BLOCK_K,
                          QBLOCK, QUANT, W_KIND, LAYOUT, NESTED, BLOCK2, UPCAST, dtype)
        else:
            wt = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + kk[None, :] * stride_wk,
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptr + rr[None, :] * K + kk[:, None], mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        wq = _op(wt, dtype, UPCAST)                    # the operand W Aᵀ is taken of (A's dtype)
        wf = wq.to(tl.float32)
        sq += tl.sum(wf * wf, axis=1)
        wat = tl.dot(wq, _op(at, dtype, UPCAST), wat, input_precision=DOT_PRECISION)
    idx = rn.to(tl.int64)[:, None] * R + rr[None, :]
    tl.store(wat_ptr + idx, wat, mask=mask_n[:, None] & mask_r[None, :])
    tl.store(sq_ptr + rn, sq, mask=mask_n)


def _launch(w, packed, scales, meta, a, N, K, stride_wn, stride_wk, is_4bit):
    """(W Aᵀ [N, R], ‖W_j‖² [N]) in fp32 from one pass over W."""
    interp = _common._interpreting()
    R = a.shape[0]
    BR = _common._block_r(R)
    wat = torch.empty((N, R), dtype=torch.float32, device=a.device)
    sq = torch.empty((N,), dtype=torch.float32, device=a.device)
    if N == 0:
        return wat, sq
    if interp:
        bn, bk = _common._interp_block(N), max(32, _common._interp_block(K))
    else:
        bn, bk = _tile(BR)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    with _common._device(a):
        _dora_norm_kernel[(triton.cdiv(N, bn),)](
            w, packed, **scales, a_ptr=a, wat_ptr=wat, sq_ptr=sq, N=N, K=K, R=R, stride_wn=stride_wn,
            stride_wk=stride_wk,
            IS_4BIT=is_4bit, **meta, UPCAST=interp, DOT_PRECISION=precision, BLOCK_R=BR, BLOCK_N=bn,
            BLOCK_K=bk, num_warps=_WARPS, num_stages=_STAGES if not interp else 1)
    return wat, sq


def dora_norm(weight, lora_A, lora_B, scale: float, weight_sq_norm=None):
    """n = ‖W + s·B·A‖ per row, fp32 [d], for a dense W [d, k] (any strides): W Aᵀ and ‖W_j‖²
    from the kernel (``weight_sq_norm`` is not needed), the rest on [d, r] tensors."""
    from fastpeft.ops.dora import _norm_from_parts

    _common._check_dtype(lora_A)
    N, K = weight.shape
    a = lora_A.detach().to(weight.dtype).contiguous()
    w = weight.detach()
    scales = dict(absmax_ptr=a, code2_ptr=a, absmax2_ptr=a, offset_ptr=a)
    wat, sq = _launch(w, a, scales, dict(QBLOCK=64, QUANT=0, W_KIND=0, LAYOUT=0, NESTED=False, BLOCK2=256), a, N, K,
                      w.stride(0), w.stride(1), False)
    return _norm_from_parts(sq, wat, lora_A, lora_B, scale)


def dora_norm_4bit(packed, quant_state, lora_A, lora_B, scale: float, weight_sq_norm=None):
    """n for a 4-bit W (bitsandbytes' layout), dequantised tile by tile in registers."""
    from fastpeft.ops.dora import _norm_from_parts

    _common._check_dtype(lora_A)
    data, scales, meta, (N, K) = _weight_args(packed, quant_state, lora_A.device)
    a = lora_A.detach().contiguous()
    wat, sq = _launch(a, data, scales, meta, a, N, K, 0, 0, True)
    return _norm_from_parts(sq, wat, lora_A, lora_B, scale)


def dora_fwd(x, weight, bias, lora_A, lora_B, row_scale, scale: float, dropout_p: float, seed: int,
             store_z: bool):
    """The DoRA forward on 2-D x [M, k], fused: T = D(X)Aᵀ in one pass over X, then the low-rank
    GEMM whose epilogue applies the row scale c [d] (fp32) to base plus adapter and adds the
    bias after it: Y = c ⊙ (X Wᵀ + s·T Bᵀ) + b, written once. Returns (Y, T, Z): Z = X Wᵀ + s·T Bᵀ
    (written by the same epilogue) when ``store_z``, else ``None``."""
    z = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device) if store_z else None
    y, t = lowrank_fwd(x, weight, bias, lora_A, lora_B, None, None, scale, dropout_p, seed, None,
                              row_scale=row_scale.float().contiguous(), z=z)
    return y, t, z


def dora_fwd_4bit(x, packed, quant_state, bias, lora_A, lora_B, row_scale, scale: float, dropout_p: float,
                  seed: int, store_z: bool):
    """:func:`dora_fwd` over a 4-bit W (QDoRA): the 4-bit op's GEMM (M > 16) or decode kernel
    (M <= 16) with the row scale c in its epilogue, W dequantised in registers. Returns (Y, T, Z)."""
    _common._check_dtype(x)
    z = torch.empty((x.shape[0], quant_state.shape[0]), dtype=x.dtype, device=x.device) if store_z else None
    y, t = lowrank_4bit_fwd(x, packed, quant_state, bias, lora_A, lora_B, None, None, scale, dropout_p, seed, None,
                            row_scale=row_scale.float().contiguous(), z=z)
    return y, t, z

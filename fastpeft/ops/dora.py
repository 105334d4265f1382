"""DoRA (weight-decomposed low-rank adaptation) as the low-rank op plus one output-row scale.

For x flattened to X [M, k], a frozen W [d, k] (dense or 4-bit), A [r, k], B [d, r], the
trainable magnitude m [d] and the scaling s::

    n = ‖W + s·B·A‖ per output row        [d]     detached: a constant in backward
    c = m / n                              [d]     the row scale (0 where n = 0, see below)
    Z = X Wᵀ + s·(D(X) Aᵀ) Bᵀ              [M, d]  the low-rank op without its bias
    Y = c ⊙ Z + b

The norm never forms B·A nor W + s·B·A::

    n_j² = ‖W_j‖² + 2s·⟨B_j, (W Aᵀ)_j⟩ + s²·B_j (A Aᵀ) B_jᵀ

``‖W_j‖²`` is cached by the modules (W is frozen); W Aᵀ [d, r] is one skinny product, A Aᵀ is
r × r. The Triton backend computes W Aᵀ and ‖W_j‖² in one pass over W (``fastpeft.kernels.dora``,
the 4-bit W dequantised in registers there): nothing of W's size is allocated.

Triton backend: c is one more epilogue vector of the low-rank op's fused GEMM
(``fastpeft::dora_fwd``; over a 4-bit W ``fastpeft::dora_4bit_fwd``, the 4-bit GEMM or, at
M <= 16, its one-launch decode kernel): the accumulator X Wᵀ + s·T Bᵀ is scaled by c, the bias
added after, Y written once (and Z beside it while m trains). The torch backend composes the
low-rank op (without bias) with Y = c ⊙ Z + b.

Backward (n a constant; dZ feeds the low-rank op's backward unchanged)::

    dZ = dY ⊙ c                 (broadcast over rows)
    dc = Σ_rows dY ⊙ Z          [d]
    dm = dc / n                 (0 where n = 0)
    db = Σ_rows dY

Dense W: dZ is formed, then the low-rank op's backward. 4-bit W: dZ is never formed; the 4-bit
op's backward takes c (``fastpeft::lowrank_4bit_bwd`` with ``row_scale``): its adapter pass sees
dZ only as dZ ⊙ o = dY ⊙ c (c in the place of the out_scale o, which DoRA does not have), and
its dX kernel scales each dY tile by c as it loads it.

What backward keeps: the low-rank op's contract (T [M, r], the seed, x only when A trains),
plus Z [M, d] when the magnitude trains (the op's own output, held by reference, not a copy),
plus c [d].

Zero-norm rows: where n_j = 0 the row W_j + s·B_j·A is zero, its direction is undefined, and
c_j is taken as 0 (the output row is the bias; m_j gets no gradient). HF PEFT divides by zero
there (NaN or inf); any n_j > 0 is treated exactly as PEFT treats it.

Dropout: D applies to the adapter input only, as in the op. HF PEFT's DoRA, when training with
dropout, applies the dropped input to the base term's correction as well
(Y = X Wᵀ + (c - 1) ⊙ D(X) Wᵀ + c ⊙ s·D(X) Aᵀ Bᵀ + b); both agree in expectation and are equal
without dropout or in eval mode.

Merging: W' = c ⊙ (W + s·B·A) row by row, with n computed from the unmerged W and kept for
``unmerge``: W = W' / c - s·B·A (PEFT's rule).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .lowrank import (_lowrank_bwd, apply_function, autocast_args, lowrank_fwd_torch, seed_tensor,
                      validate_lowrank_args)

__all__ = [
    "DoraLinear4bitFunction",
    "DoraLinearFunction",
    "dora_linear",
    "dora_linear_4bit",
    "dora_norm",
    "dora_norm_torch",
    "dora_row_scale",
    "row_sq_norms",
    "validate_magnitude",
]

OP_NAME = "dora_linear"
_CHUNK_ELEMS = 1 << 22


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in fp32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_sq_norms(weight: Tensor) -> Tensor:
    """‖W_j‖² per row in fp32 [d], a block of rows at a time (never an fp32 copy of W)."""
    d, k = weight.shape
    rows = max(1, min(d, _CHUNK_ELEMS // max(k, 1), max(1, d // 4)))
    acc = _acc(weight.dtype)
    out = torch.empty(d, dtype=acc, device=weight.device)
    w = weight.detach()
    for i in range(0, d, rows):
        out[i:i + rows] = torch.linalg.vector_norm(w[i:i + rows], dim=1, dtype=acc).square()
    return out


def _norm_from_parts(w_sq: Tensor, wat: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """n from ‖W_j‖² [d], W Aᵀ [d, r] (fp32) and the adapter: the module docstring's identity."""
    a = lora_A.detach().to(w_sq.dtype)
    b = lora_B.detach().to(w_sq.dtype)
    aat = a @ a.t()                                                     # A Aᵀ [r, r]
    n_sq = w_sq + (2.0 * scale) * (b * wat).sum(1) + (scale * scale) * ((b @ aat) * b).sum(1)
    return n_sq.clamp_min_(0.0).sqrt_()


@torch.no_grad()
def dora_norm_torch(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                    weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """n = ‖W + s·B·A‖ per row, fp32 [d], from a dense W without forming B·A (torch)."""
    acc = _acc(weight.dtype)
    wat = F.linear(lora_A.detach().to(weight.dtype), weight.detach()).t().to(acc)   # W Aᵀ [d, r]
    w_sq = row_sq_norms(weight) if weight_sq_norm is None else weight_sq_norm.to(acc)
    return _norm_from_parts(w_sq, wat, lora_A, lora_B, scale)


class _TorchBackend:
    @staticmethod
    def dora_fwd(x, weight, bias, lora_A, lora_B, row_scale, scale, dropout_p, seed, store_z):
        """(Y, T, Z or None) on 2-D x: the low-rank op without bias, then Y = c ⊙ Z + b."""
        z, t = lowrank_fwd_torch(x, weight, None, lora_A, lora_B, None, None, scale, dropout_p, seed, None)
        return _scaled(z, row_scale, bias), t, z if store_z else None

    @staticmethod
    def dora_fwd_4bit(x, packed, quant_state, bias, lora_A, lora_B, row_scale, scale, dropout_p, seed, store_z):
        """:meth:`dora_fwd` over a 4-bit W (dequantised to a transient dense W)."""
        from .lowrank_4bit import lowrank_4bit_fwd_torch
        z, t = lowrank_4bit_fwd_torch(x, packed, quant_state, None, lora_A, lora_B, None, None, scale, dropout_p,
                                      seed, None)
        return _scaled(z, row_scale, bias), t, z if store_z else None

    @staticmethod
    def dora_norm(weight, lora_A, lora_B, scale, weight_sq_norm=None):
        return dora_norm_torch(weight, lora_A, lora_B, scale, weight_sq_norm)

    @staticmethod
    def dora_norm_4bit(packed, quant_state, lora_A, lora_B, scale, weight_sq_norm=None):
        from .lowrank_4bit import dequantize_weight
        w = dequantize_weight(packed, quant_state, quant_state.dtype)     # torch: a transient W
        return dora_norm_torch(w, lora_A, lora_B, scale, weight_sq_norm)


_backend.register_impl(OP_NAME, "torch", lambda: _TorchBackend, lambda device: None)
_backend.register_triton(OP_NAME, "dora")


@torch.no_grad()
def dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, *,
              quant_state=None, weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """n = ‖W + s·B·A‖ per output row, fp32 [d], detached, without forming B·A or W + s·B·A.

    ``weight`` is the dense W [d, k], or the packed 4-bit weight with its ``quant_state``.
    ``weight_sq_norm`` (fp32 [d]) is ‖W_j‖² when the caller caches it (the torch backend uses
    it; the Triton kernel computes it in the same pass over W, for free). The backend is the one
    :func:`fastpeft.use_backend` selects; the Triton one reads W once and never allocates
    anything of W's size (4-bit tiles are dequantised in registers).

    >>> import torch, fastpeft
    >>> from fastpeft.ops.dora import dora_norm
    >>> w, a, b = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    >>> torch.allclose(dora_norm(w, a, b, 0.5), torch.linalg.norm(w + 0.5 * b @ a, dim=1))
    True
    """
    backend = _backend.resolve_backend(OP_NAME, lora_A.device)
    impl = _backend.get_impl(OP_NAME, backend)
    if quant_state is not None:
        return impl.dora_norm_4bit(weight, quant_state, lora_A, lora_B, float(scale), weight_sq_norm)
    return impl.dora_norm(weight, lora_A, lora_B, float(scale), weight_sq_norm)


def dora_row_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """c = m / n in fp32, differentiable in m (n a constant); c_j = 0 where n_j = 0."""
    inv = torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return magnitude.to(_acc(magnitude.dtype)) * inv


# --------------------------------------------------------------------------------------------
# The op: the low-rank op with the row scale c in its GEMM epilogue, and its autograd.
# --------------------------------------------------------------------------------------------

def _row_scale_grad(grad_y: Tensor, z: Tensor, dtype: torch.dtype) -> Tensor:
    """dc = Σ_rows dY ⊙ Z [d]: the product in dY's dtype, summed in fp32 (float64 stays), one
    [M, d] temporary (no fp32 copies of dY and Z)."""
    return (grad_y * z).sum(0, dtype=_acc(grad_y.dtype)).to(dtype)


def _dora_fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   row_scale: Tensor, scale: float, dropout_p: float, seed: Tensor, store_z: bool,
                   backend: str) -> list[Tensor]:
    impl = _backend.get_impl(OP_NAME, backend if x.shape[0] else "torch")
    y, t, z = impl.dora_fwd(x, weight, bias, lora_A, lora_B, row_scale, float(scale), float(dropout_p),
                            int(seed), bool(store_z))
    return [y, t, z if z is not None else x.new_empty(0)]


def _dora_fwd_fake(x, weight, bias, lora_A, lora_B, row_scale, scale, dropout_p, seed, store_z, backend):
    M, d = x.shape[0], weight.shape[0]
    return [x.new_empty(M, d), x.new_empty(M, lora_A.shape[0]), x.new_empty((M, d) if store_z else (0,))]


_dora_fwd = _backend.custom_op("fastpeft::dora_fwd", _dora_fwd_impl, _dora_fwd_fake)


class DoraLinearFunction(torch.autograd.Function):
    """Autograd of ``Y = c ⊙ (X Wᵀ + s·(D(X) Aᵀ) Bᵀ) + b`` for a given row scale c [d] (fp32).

    Backward: dZ = dY ⊙ c feeds the low-rank op's backward (``fastpeft::lowrank_bwd``: dX, dA,
    dB as derived in :mod:`fastpeft.ops.lowrank`); dc = Σ_rows dY ⊙ Z; db = Σ_rows dY;
    dW = dZᵀ X. Saved: the low-rank op's contract (x only when A or W trains, T, the seed), c,
    and Z [M, d] only when c needs a gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, row_scale, scale, dropout_p, seed, backend):
        needs = getattr(ctx, "needs_input_grad", None)
        store_z = bool(needs and needs[5])
        x2d = x.reshape(-1, x.shape[-1])
        y, t, z = _dora_fwd(x2d, weight, bias, lora_A, lora_B, row_scale, scale, dropout_p, seed, store_z,
                            backend)
        keep_x = bool(needs and (needs[1] or needs[3]))
        ctx.save_for_backward(x if keep_x else None, weight, lora_A, lora_B, row_scale, t,
                              z if store_z else None, seed)
        ctx.scale, ctx.dropout_p, ctx.backend, ctx.has_bias = scale, dropout_p, backend, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, row_scale, t, z, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_w, need_bias, need_A, need_B, need_c = (
            need[0], need[1], need[2] and ctx.has_bias, need[3], need[4], need[5])
        grad_y = grad_out.reshape(-1, grad_out.shape[-1])
        grads = [None] * 10
        if need_x or need_w or need_A or need_B:
            grad_z = (grad_y * row_scale.to(grad_y.dtype)).contiguous()               # dZ = dY ⊙ c
            x2d = x.reshape(-1, x.shape[-1]) if x is not None else None
            needs = [need_x, need_A, need_B, False, False, False]
            if need_x or need_A or need_B:
                out = _lowrank_bwd(grad_z, x2d if need_A else None, weight, t, lora_A, lora_B, None, None,
                                   ctx.scale, ctx.dropout_p, seed, None, needs, ctx.backend,
                                   torch.are_deterministic_algorithms_enabled())
                dx, d_a, d_b = (g if n else None for g, n in zip(out[:3], needs[:3]))
                if dx is not None:
                    dx = dx.reshape(grad_out.shape[:-1] + (weight.shape[1],))
                grads[0], grads[3], grads[4] = dx, d_a, d_b
            if need_w:
                grads[1] = grad_z.t() @ x2d                                          # dW = dZᵀ X
        if need_c:                                                                    # dc = Σ dY ⊙ Z
            grads[5] = _row_scale_grad(grad_y, z, row_scale.dtype)
        if need_bias:
            grads[2] = grad_y.sum(0)                                                  # db = Σ dY
        return tuple(grads)


def _dora_4bit_fwd_impl(x: Tensor, packed: Tensor, absmax: Tensor, offset: Optional[Tensor],
                        absmax2: Optional[Tensor], code2: Optional[Tensor], shape: list[int],
                        state_dtype: torch.dtype, blocksize: int, quant_type: str, blocksize2: int,
                        dtype2: Optional[torch.dtype], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                        row_scale: Tensor, scale: float, dropout_p: float, seed: Tensor, store_z: bool,
                        backend: str) -> list[Tensor]:
    from .lowrank_4bit import _rebuild_state
    state = _rebuild_state(shape, state_dtype, blocksize, quant_type, blocksize2, dtype2, absmax, offset, absmax2,
                           code2)
    impl = _backend.get_impl(OP_NAME, backend if x.shape[0] else "torch")
    y, t, z = impl.dora_fwd_4bit(x, packed, state, bias, lora_A, lora_B, row_scale, float(scale),
                                 float(dropout_p), int(seed), bool(store_z))
    return [y, t, z if z is not None else x.new_empty(0)]


def _dora_4bit_fwd_fake(x, packed, absmax, offset, absmax2, code2, shape, state_dtype, blocksize, quant_type,
                        blocksize2, dtype2, bias, lora_A, lora_B, row_scale, scale, dropout_p, seed, store_z,
                        backend):
    M, d = x.shape[0], shape[0]
    return [x.new_empty(M, d), x.new_empty(M, lora_A.shape[0]), x.new_empty((M, d) if store_z else (0,))]


_dora_4bit_fwd = _backend.custom_op("fastpeft::dora_4bit_fwd", _dora_4bit_fwd_impl, _dora_4bit_fwd_fake)


class DoraLinear4bitFunction(torch.autograd.Function):
    """Autograd of ``Y = c ⊙ (X Wᵀ + s·(D(X) Aᵀ) Bᵀ) + b`` over a 4-bit W (frozen: no dW).

    Backward: the 4-bit op's backward with the row scale (``fastpeft::lowrank_4bit_bwd``,
    ``row_scale=c``): dX, dA, dB of dZ = dY ⊙ c without forming dZ, db = Σ_rows dY;
    dc = Σ_rows dY ⊙ Z. Saved: the 4-bit op's contract (the packed weight and its quant state's
    tensors by reference, x only when A trains, T, the seed), c, and Z [M, d] only when c needs a
    gradient. ``meta``: ``_state_meta`` of the quant state whose tensors precede it."""

    @staticmethod
    def forward(ctx, x, packed, absmax, offset, absmax2, code2, meta, bias, lora_A, lora_B, row_scale, scale,
                dropout_p, seed, backend):
        needs = getattr(ctx, "needs_input_grad", None)
        store_z = bool(needs and needs[10])
        x2d = x.reshape(-1, x.shape[-1])
        y, t, z = _dora_4bit_fwd(x2d, packed, absmax, offset, absmax2, code2, *meta, bias, lora_A, lora_B,
                                 row_scale, scale, dropout_p, seed, store_z, backend)
        keep_x = bool(needs and needs[8])
        ctx.save_for_backward(x if keep_x else None, packed, lora_A, lora_B, row_scale, t, z if store_z else None,
                              seed, absmax, offset, absmax2, code2)
        ctx.meta = meta
        ctx.scale, ctx.dropout_p, ctx.backend, ctx.has_bias = scale, dropout_p, backend, bias is not None
        return y.reshape(*x.shape[:-1], meta[0][0])

    @staticmethod
    def backward(ctx, grad_out):
        from .lowrank_4bit import _lowrank_4bit_bwd

        x, packed, lora_A, lora_B, row_scale, t, z, seed, *state = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = [need[0], need[8], need[9], False, False, need[7] and ctx.has_bias]
        grad_y = grad_out.reshape(-1, grad_out.shape[-1])
        if grad_y.stride(-1) != 1:
            grad_y = grad_y.contiguous()
        grads = [None] * 15
        if any(needs):
            x2d = x.reshape(-1, x.shape[-1]) if x is not None and needs[1] else None
            out = _lowrank_4bit_bwd(grad_y, x2d, packed, *state, *ctx.meta, t, lora_A, lora_B, None, None, ctx.scale,
                                    ctx.dropout_p, seed, None, needs, ctx.backend,
                                    torch.are_deterministic_algorithms_enabled(), row_scale)
            dx, d_a, d_b, _, _, d_bias = (g if n else None for g, n in zip(out, needs))
            if dx is not None:
                dx = dx.reshape(grad_out.shape[:-1] + (dx.shape[-1],))
            grads[0], grads[7], grads[8], grads[9] = dx, d_bias, d_a, d_b
        if need[10]:                                                                   # dc = Σ dY ⊙ Z
            grads[10] = _row_scale_grad(grad_y, z, row_scale.dtype)
        return tuple(grads)


def validate_magnitude(magnitude, d: int, x: Tensor) -> None:
    """A clear error for a magnitude that is not a floating [d] tensor on x's device."""
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor of shape [d={d}], got {type(magnitude).__name__}")
    if tuple(magnitude.shape) != (d,):
        raise ValueError(f"magnitude must have shape [d={d}] (one entry per output row), "
                         f"got shape {tuple(magnitude.shape)}")
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude must be a floating-point tensor, got dtype {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude is on {magnitude.device} but x is on {x.device}; "
                         "all tensors must be on one device")


def _scaled(z: Tensor, c: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Y = c ⊙ Z + b; autograd keeps Z (by reference) only when c needs a gradient."""
    c = c.to(z.dtype)
    if bias is None:
        return z * c
    return torch.addcmul(bias.to(z.dtype), z, c)


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, *, scale: float = 1.0, dropout_p: float = 0.0,
                seed: Optional[int] = None, weight_sq_norm: Optional[Tensor] = None,
                norm: Optional[Tensor] = None) -> Tensor:
    """``Y = (m / n) ⊙ (x Wᵀ + scale·(D(x) Aᵀ) Bᵀ) + b`` with n = ‖W + scale·B·A‖ per row (DoRA).

    Args:
        x: input ``[..., k]``; weight: ``[d, k]``; bias: ``[d]`` or ``None``.
        lora_A: ``[r, k]``; lora_B: ``[d, r]``; magnitude: ``[d]`` (m, trainable).
        scale, dropout_p, seed: as :func:`fastpeft.lowrank_linear`.
        weight_sq_norm: cached ‖W_j‖² (fp32 ``[d]``), optional.
        norm: n itself (fp32 ``[d]``) when the caller has it, else computed by :func:`dora_norm`.

    n is a constant in backward (DoRA's and PEFT's choice); rows with n = 0 get the scale 0
    (module docstring).

    >>> import torch, fastpeft
    >>> x, w = torch.randn(3, 8), torch.randn(6, 8)
    >>> a, b = torch.randn(2, 8), torch.zeros(6, 2)
    >>> m = torch.linalg.norm(w, dim=1)                # DoRA's initial magnitude
    >>> torch.allclose(fastpeft.dora_linear(x, w, None, a, b, m), x @ w.t(), atol=1e-5)
    True
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    x, weight, bias, lora_A, lora_B = autocast_args(x, weight, bias, lora_A, lora_B)
    validate_lowrank_args(x, weight.shape, weight.dtype, weight.device, bias, lora_A, lora_B, None, None,
                          scale, dropout_p, None, seed)
    validate_magnitude(magnitude, weight.shape[0], x)
    backend = _backend.resolve_backend(OP_NAME, x.device)
    if norm is None:
        norm = dora_norm(weight, lora_A, lora_B, scale, weight_sq_norm=weight_sq_norm)
    row_scale = dora_row_scale(magnitude, norm)
    if row_scale.dtype != torch.float64:
        row_scale = row_scale.float()
    return apply_function(DoraLinearFunction, x, weight, bias, lora_A, lora_B, row_scale, float(scale),
                          float(dropout_p), seed_tensor(seed, float(dropout_p)), backend)


def dora_linear_4bit(x: Tensor, packed: Tensor, quant_state, bias: Optional[Tensor], lora_A: Tensor,
                     lora_B: Tensor, magnitude: Tensor, *, scale: float = 1.0, dropout_p: float = 0.0,
                     seed: Optional[int] = None, weight_sq_norm: Optional[Tensor] = None,
                     norm: Optional[Tensor] = None) -> Tensor:
    """:func:`dora_linear` over a 4-bit W (bitsandbytes' layout): QDoRA. ``quant_state``
    ``None`` takes ``packed.quant_state``. With the Triton backend the norm kernel and the fused
    op dequantise W's tiles in registers, and the row scale is the 4-bit GEMM's (decode kernel's
    at M <= 16) epilogue vector, as in :func:`dora_linear`."""
    from ..quant import validate_4bit
    from .lowrank_4bit import _state_meta, _state_tensors

    if quant_state is None:
        quant_state = getattr(packed, "quant_state", None)
    shape, _ = validate_4bit(packed, quant_state)
    x, bias, lora_A, lora_B = autocast_args(x, bias, lora_A, lora_B)
    validate_lowrank_args(x, shape, None, packed.device, bias, lora_A, lora_B, None, None, scale, dropout_p, None,
                          seed, weight_name="the 4-bit weight (quant_state.shape)")
    validate_magnitude(magnitude, shape[0], x)
    backend = _backend.resolve_backend(OP_NAME, x.device)
    if norm is None:
        norm = dora_norm(packed, lora_A.to(x.dtype), lora_B.to(x.dtype), scale, quant_state=quant_state,
                         weight_sq_norm=weight_sq_norm)
    row_scale = dora_row_scale(magnitude, norm)
    if row_scale.dtype != torch.float64:
        row_scale = row_scale.float()
    return apply_function(DoraLinear4bitFunction, x, packed, *_state_tensors(quant_state), _state_meta(quant_state),
                          bias, lora_A, lora_B, row_scale, float(scale), float(dropout_p),
                          seed_tensor(seed, float(dropout_p)), backend)

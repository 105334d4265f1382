"""The low-rank adapter op over a 4-bit base weight (bitsandbytes' NF4/FP4 layout).

Same math as :mod:`fastpeft.ops.lowrank` with ``W = dequant(packed, quant_state)``::

    Y  = X Wᵀ + b + s·(σ(D(X) Aᵀ) Sᵀ) Bᵀ ⊙ out_scale
    dX = dY W + s·D'(dT A)       (W dequantised again in backward)
    dB, dS, dA, dout_scale, db   exactly as the dense op (they never read W)

W is frozen (4-bit weights do not train), so there is no dW. What backward keeps: the packed
weight and the tensors of its quant state (references to the caller's, no copies), plus what the
dense contract keeps (T [M, r], the seed, and x only when A trains) — never a dense copy of W.
The dense W exists only inside the forward call and inside the backward call (transiently, in
the backends that dequantise to memory) and is freed before they return.

Backends (``fastpeft.use_backend``): ``"torch"`` dequantises W to a transient dense tensor and
runs the dense pure-torch op (any device); ``"triton"`` (:mod:`fastpeft.kernels.lowrank_4bit`)
dequantises tiles of W in registers inside the GEMMs; ``"cuda"`` (``fastpeft._C``, built from
csrc/) runs the small-M forward (M <= 16, no adapter dropout: decoding; fp16/bf16, r <= 64, k a
multiple of the quantisation blocksize) in one launch that computes T, reads W once, 4 bits per
weight, and adds the adapter in its epilogue; its backward is the Triton backend's (the torch one
without Triton). ``"auto"`` takes ``"cuda"`` where it applies, else ``"triton"`` on CUDA tensors
(whose decode kernel is also one launch), else ``"torch"``.

The forward and backward halves are ``torch.library`` custom ops (``fastpeft::lowrank_4bit_fwd``
and ``fastpeft::lowrank_4bit_bwd``) with fake implementations; the quant state crosses them as
its tensors and constants, so ``torch.compile(fullgraph=True)`` traces QLoRA-style models too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..quant import (QuantState, _code_cached, _packed_bytes, dequantize_4bit, dequantize_absmax,
                     nested_fp32, validate_4bit)
from .lowrank import (activation_fn, apply_core, apply_function, autocast_args, lowrank_bwd_torch,
                      lowrank_fwd_torch, seed_tensor, validate_lowrank_args)

__all__ = [
    "LowRankLinear4bitFunction",
    "lowrank_linear_4bit",
    "lowrank_4bit_fwd_torch",
    "lowrank_4bit_bwd_torch",
    "lowrank_4bit_fwd_cuda",
    "dequantize_weight",
    "CUDA_MAX_M",
    "CUDA_MAX_R",
]

OP_NAME = "lowrank_linear_4bit"


def dequantize_weight(packed: Tensor, quant_state, dtype: torch.dtype) -> Tensor:
    """The dense W [d, k] in ``dtype``: bitsandbytes' dequantisation in the state's dtype, then
    cast (as bitsandbytes' matmul_4bit does when the compute dtype differs)."""
    w = dequantize_4bit(packed, quant_state)
    return w if w.dtype == dtype else w.to(dtype)


# --------------------------------------------------------------------------------------------
# Pure-torch backend: dequantise to a transient dense W, then the dense reference op.
# --------------------------------------------------------------------------------------------

def lowrank_4bit_fwd_torch(x, packed, quant_state, bias, lora_A, lora_B, core, out_scale,
                           scale: float, dropout_p: float, seed: int, activation: Optional[str]):
    """Forward on 2-D x [M, k]. Returns (Y [M, d], T [M, r]); W lives only inside this call."""
    w = dequantize_weight(packed, quant_state, x.dtype)
    return lowrank_fwd_torch(x, w, bias, lora_A, lora_B, core, out_scale, scale, dropout_p, seed,
                             activation)


def lowrank_4bit_bwd_torch(grad_y, x, packed, quant_state, t, lora_A, lora_B, core, out_scale,
                           scale: float, dropout_p: float, seed: int, activation: Optional[str],
                           need_x: bool, need_A: bool, need_B: bool, need_core: bool,
                           need_out_scale: bool, need_bias: bool, deterministic: bool = False,
                           row_scale: Optional[Tensor] = None):
    """Backward on 2-D tensors; (dX, dA, dB, dcore, dout_scale, dbias). W is dequantised again
    only when dX is needed (dX = dY W + s·D'(dT A)); no other gradient reads it.

    ``row_scale`` c [d] (DoRA, Y = c ⊙ Z + b): ``grad_y`` is dY; the op's gradients are taken
    of dZ = c ⊙ dY, db of dY."""
    w = dequantize_weight(packed, quant_state, grad_y.dtype) if need_x else None
    if row_scale is not None:
        grads = lowrank_bwd_torch(grad_y * row_scale.to(grad_y.dtype), x, w, t, lora_A, lora_B, core, out_scale,
                                  scale, dropout_p, seed, activation, need_x, need_A, need_B, need_core,
                                  need_out_scale, False)
        return (*grads[:5], grad_y.sum(0) if need_bias else None)
    return lowrank_bwd_torch(grad_y, x, w, t, lora_A, lora_B, core, out_scale, scale, dropout_p,
                             seed, activation, need_x, need_A, need_B, need_core, need_out_scale,
                             need_bias)


class _TorchBackend:
    lowrank_4bit_fwd = staticmethod(lowrank_4bit_fwd_torch)
    lowrank_4bit_bwd = staticmethod(lowrank_4bit_bwd_torch)


# --------------------------------------------------------------------------------------------
# CUDA backend (fastpeft._C): the small-M forward; backward through the Triton (or torch) backend.
# --------------------------------------------------------------------------------------------

CUDA_MAX_M = 16
CUDA_MAX_R = 64
_ACTIVATION_CODE = {None: 0, "relu": 1, "gelu": 2, "silu": 3}


def _cuda_ext():
    from .. import _C
    return _C


def _aligned(t: Tensor, multiple: int = 16) -> Tensor:
    """``t`` contiguous in its last dimension at a ``multiple``-byte aligned address (a copy
    only when it is not; decode inputs are a few rows)."""
    if t.stride(-1) != 1 or t.data_ptr() % multiple or (t.dim() == 2 and (t.stride(0) * t.element_size()) % 16):
        t = t.contiguous()
        if t.data_ptr() % multiple:
            t = t.clone()
    return t


def _cuda_absmax_args(quant_state) -> tuple:
    """(absmax, code2, absmax2, offset, blocksize2) for the kernel: nested statistics as
    bitsandbytes writes them pass as they are and are expanded in registers; a plain fp32
    absmax as it is; any other nested state is expanded once for the call."""
    s2 = quant_state.state2
    if nested_fp32(quant_state):
        return (quant_state.absmax.reshape(-1), s2.code.contiguous(), s2.absmax.reshape(-1),
                quant_state.offset.reshape(1), int(s2.blocksize))
    absmax = dequantize_absmax(quant_state) if s2 is not None else quant_state.absmax.reshape(-1).float()
    return absmax.contiguous(), None, None, None, 0


def lowrank_4bit_fwd_cuda(x, packed, quant_state, bias, lora_A, lora_B, core, out_scale,
                          scale: float, dropout_p: float, seed: int, activation: Optional[str]):
    """Forward on 2-D x [M <= 16, k] without dropout, in one launch of
    ``fastpeft._C.lowrank4_decode``: T = X Aᵀ and U = σ(T)Sᵀ | σ(T) ⊙ S inside the kernel (each
    block computes T from x and A), each packed byte of W read once and decoded in registers
    (nested statistics expanded there), Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o. Returns (Y, T)."""
    if dropout_p != 0.0:
        raise ValueError("the CUDA decode kernel runs without adapter dropout (dropout_p=0)")
    shape, _ = validate_4bit(packed, quant_state)
    d, k = shape
    reason = _cuda_supports(dict(M=x.shape[0], dropout_p=0.0, dtype=x.dtype, k=k, r=lora_A.shape[0],
                                 blocksize=int(quant_state.blocksize)))
    if reason is not None:
        raise ValueError(f"the CUDA decode kernel cannot run this call: {reason}")
    if d == 0:   # no rows of W: nothing for the kernel's blocks to cover, T alone
        return lowrank_4bit_fwd_torch(x, packed, quant_state, bias, lora_A, lora_B, core, out_scale, scale,
                                      0.0, seed, activation)
    absmax, code2, absmax2, offset, blocksize2 = _cuda_absmax_args(quant_state)
    contiguous = (lambda t: None if t is None else t.contiguous())
    y, t = _cuda_ext().lowrank4_decode(
        _aligned(x), _aligned(_packed_bytes(packed.detach()), 4), absmax, code2, absmax2, offset, blocksize2,
        _code_cached(quant_state.quant_type, x.device), int(quant_state.blocksize), d, _aligned(lora_A.contiguous()),
        contiguous(core), _ACTIVATION_CODE[activation], lora_B.contiguous(), contiguous(out_scale), contiguous(bias),
        float(scale))
    return y, t


class _CudaBackend:
    lowrank_4bit_fwd = staticmethod(lowrank_4bit_fwd_cuda)

    @staticmethod
    def lowrank_4bit_bwd(grad_y, *args, **kwargs):
        backend = "triton" if _triton_available(grad_y.device) is None else "torch"
        return _backend.get_impl(OP_NAME, backend).lowrank_4bit_bwd(grad_y, *args, **kwargs)


def _cuda_available(device):
    reason = _backend.cuda_extension_available(device)
    if reason is None and not hasattr(_cuda_ext(), "lowrank4_decode"):
        reason = "fastpeft._C was built without lowrank4_decode; rebuild it"
    return reason


def _cuda_supports(problem: dict) -> Optional[str]:
    """Why the CUDA decode kernel cannot take ``problem`` (``None``: it can). ``problem``: M,
    dropout_p, dtype and, where the caller knows them, k, r and the quantisation blocksize."""
    if problem["M"] > CUDA_MAX_M:
        return f"its kernel is the small-M (decode) forward, M <= {CUDA_MAX_M}; got M={problem['M']}"
    if problem["dropout_p"] > 0.0:
        return "its kernel runs without adapter dropout; got dropout_p > 0"
    if problem["dtype"] not in (torch.float16, torch.bfloat16):
        return f"its kernel takes float16 or bfloat16 x (tensor cores); got {problem['dtype']}"
    r, k, blocksize = problem.get("r"), problem.get("k"), problem.get("blocksize")
    if r is not None and not 1 <= r <= CUDA_MAX_R:
        return f"its kernel takes ranks 1 <= r <= {CUDA_MAX_R}; got r={r}"
    if k is not None and blocksize is not None and (blocksize < 32 or k % blocksize):
        return f"its kernel reads whole quantisation blocks per row: k % blocksize == 0; got k={k}, blocksize={blocksize}"
    return None


_backend.register_impl(OP_NAME, "torch", lambda: _TorchBackend, lambda device: None)
_triton_available = _backend.register_triton(OP_NAME, "lowrank_4bit")
_backend.register_impl(OP_NAME, "cuda", lambda: _CudaBackend, _cuda_available, _cuda_supports)


# --------------------------------------------------------------------------------------------
# Custom ops and autograd. A quant state crosses the op boundary as its tensors (absmax, offset,
# absmax2, code2) and its constants (shape, dtype, blocksize, quant type, nested blocksize and
# dtype), so torch.compile traces models of 4-bit layers without graph breaks.
# --------------------------------------------------------------------------------------------

def _state_tensors(quant_state) -> tuple:
    """The tensors of a quant state that dequantisation reads: (absmax, offset, absmax2, code2)."""
    if quant_state.state2 is None:
        return quant_state.absmax, None, None, None
    s2 = quant_state.state2
    return quant_state.absmax, quant_state.offset, s2.absmax, s2.code


def _state_meta(quant_state) -> tuple:
    """(shape, dtype, blocksize, quant_type, nested blocksize or 0, nested dtype or None)."""
    s2 = quant_state.state2
    return ([int(n) for n in quant_state.shape], quant_state.dtype, int(quant_state.blocksize),
            quant_state.quant_type, 0 if s2 is None else int(s2.blocksize), None if s2 is None else s2.dtype)


def _rebuild_state(shape, dtype, blocksize, quant_type, blocksize2, dtype2, absmax, offset, absmax2,
                   code2) -> QuantState:
    """A light QuantState over the given tensors (no copies)."""
    state2 = None
    if blocksize2:
        state2 = QuantState(absmax=absmax2, code=code2, blocksize=blocksize2, dtype=dtype2)
    return QuantState(absmax=absmax, shape=torch.Size(shape), blocksize=blocksize, quant_type=quant_type,
                      dtype=dtype, offset=offset, state2=state2)


def _lowrank_4bit_fwd_impl(x: Tensor, packed: Tensor, absmax: Tensor, offset: Optional[Tensor],
                           absmax2: Optional[Tensor], code2: Optional[Tensor], shape: list[int],
                           state_dtype: torch.dtype, blocksize: int, quant_type: str, blocksize2: int,
                           dtype2: Optional[torch.dtype], bias: Optional[Tensor], lora_A: Tensor,
                           lora_B: Tensor, core: Optional[Tensor], out_scale: Optional[Tensor],
                           scale: float, dropout_p: float, seed: Tensor, activation: Optional[str],
                           backend: str) -> tuple[Tensor, Tensor]:
    state = _rebuild_state(shape, state_dtype, blocksize, quant_type, blocksize2, dtype2, absmax, offset,
                           absmax2, code2)
    impl = _backend.get_impl(OP_NAME, backend) if x.shape[0] else _TorchBackend
    return impl.lowrank_4bit_fwd(x, packed, state, bias, lora_A, lora_B, core, out_scale, float(scale),
                                 float(dropout_p), int(seed), activation)


def _lowrank_4bit_fwd_fake(x, packed, absmax, offset, absmax2, code2, shape, state_dtype, blocksize,
                           quant_type, blocksize2, dtype2, bias, lora_A, lora_B, core, out_scale, scale,
                           dropout_p, seed, activation, backend):
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


_lowrank_4bit_fwd = _backend.custom_op("fastpeft::lowrank_4bit_fwd", _lowrank_4bit_fwd_impl,
                                       _lowrank_4bit_fwd_fake)


def _lowrank_4bit_bwd_impl(grad_y: Tensor, x: Optional[Tensor], packed: Tensor, absmax: Tensor,
                           offset: Optional[Tensor], absmax2: Optional[Tensor], code2: Optional[Tensor],
                           shape: list[int], state_dtype: torch.dtype, blocksize: int, quant_type: str,
                           blocksize2: int, dtype2: Optional[torch.dtype], t: Tensor, lora_A: Tensor,
                           lora_B: Tensor, core: Optional[Tensor], out_scale: Optional[Tensor],
                           scale: float, dropout_p: float, seed: Tensor, activation: Optional[str],
                           needs: list[bool], backend: str, deterministic: bool,
                           row_scale: Optional[Tensor] = None) -> list[Tensor]:
    state = _rebuild_state(shape, state_dtype, blocksize, quant_type, blocksize2, dtype2, absmax, offset,
                           absmax2, code2)
    impl = _backend.get_impl(OP_NAME, backend) if grad_y.shape[0] else _TorchBackend
    grads = impl.lowrank_4bit_bwd(grad_y, x, packed, state, t, lora_A, lora_B, core, out_scale, float(scale),
                                  float(dropout_p), int(seed), activation, *needs, deterministic=deterministic,
                                  row_scale=row_scale)
    # custom ops return tensors only: an unneeded gradient travels as an empty tensor
    return [g if g is not None else grad_y.new_empty(0) for g in grads]


def _lowrank_4bit_bwd_fake(grad_y, x, packed, absmax, offset, absmax2, code2, shape, state_dtype,
                           blocksize, quant_type, blocksize2, dtype2, t, lora_A, lora_B, core,
                           out_scale, scale, dropout_p, seed, activation, needs, backend,
                           deterministic, row_scale=None):
    tensors = [None, lora_A, lora_B, core, out_scale, None]
    shapes = [(grad_y.shape[0], shape[1])] + [None if v is None else v.shape for v in tensors[1:5]] + [(shape[0],)]
    return [grad_y.new_empty(s if need else (0,), dtype=grad_y.dtype if v is None else v.dtype)
            for s, v, need in zip(shapes, tensors, needs)]


_lowrank_4bit_bwd = _backend.custom_op("fastpeft::lowrank_4bit_bwd", _lowrank_4bit_bwd_impl,
                                       _lowrank_4bit_bwd_fake)


class LowRankLinear4bitFunction(torch.autograd.Function):
    """Autograd of the 4-bit op. ``save_for_backward`` receives the packed weight, the quant
    state's tensors and the dense op's contract (x only if A trains, T, the seed): no dense W.
    ``meta`` is :func:`_state_meta` of the state whose tensors follow it."""

    @staticmethod
    def forward(ctx, x, packed, absmax, offset, absmax2, code2, meta, bias, lora_A, lora_B, core,
                out_scale, scale, dropout_p, seed, activation, backend):
        x2d = x.reshape(-1, x.shape[-1])
        y, t = _lowrank_4bit_fwd(x2d, packed, absmax, offset, absmax2, code2, *meta, bias, lora_A, lora_B,
                                 core, out_scale, scale, dropout_p, seed, activation, backend)
        keep_x = lora_A.requires_grad
        ctx.save_for_backward(x if keep_x else None, packed, lora_A, lora_B, core, out_scale, t, seed,
                              absmax, offset, absmax2, code2)
        ctx.meta = meta
        ctx.scale, ctx.dropout_p, ctx.activation, ctx.backend = scale, dropout_p, activation, backend
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], meta[0][0])

    @staticmethod
    def backward(ctx, grad_out):
        x, packed, lora_A, lora_B, core, out_scale, t, seed, *state = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = [need[0], need[8], need[9], need[10] and core is not None,
                 need[11] and out_scale is not None, need[7] and ctx.has_bias]
        grads = [None] * 17
        if not any(needs):
            return tuple(grads)
        grad_y = grad_out.reshape(-1, grad_out.shape[-1])
        if grad_y.stride(-1) != 1:
            grad_y = grad_y.contiguous()
        x2d = x.reshape(-1, x.shape[-1]) if x is not None and needs[1] else None
        out = _lowrank_4bit_bwd(
            grad_y, x2d, packed, *state, *ctx.meta, t, lora_A, lora_B, core, out_scale, ctx.scale,
            ctx.dropout_p, seed, ctx.activation, needs, ctx.backend, torch.are_deterministic_algorithms_enabled())
        dx, d_a, d_b, d_core, d_os, d_bias = (g if n else None for g, n in zip(out, needs))
        if dx is not None:
            dx = dx.reshape(grad_out.shape[:-1] + (dx.shape[-1],))
        grads[0], grads[7], grads[8], grads[9], grads[10], grads[11] = dx, d_bias, d_a, d_b, d_core, d_os
        return tuple(grads)


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------

def lowrank_linear_4bit(x: Tensor, packed: Tensor, quant_state, bias: Optional[Tensor],
                        lora_A: Tensor, lora_B: Tensor, *, core: Optional[Tensor] = None,
                        out_scale: Optional[Tensor] = None, scale: float = 1.0,
                        dropout_p: float = 0.0, activation: Optional[str] = None,
                        seed: Optional[int] = None) -> Tensor:
    """:func:`fastpeft.lowrank_linear` over a 4-bit base weight in bitsandbytes' layout.

    Args:
        x: input ``[..., k]`` in the compute dtype (fp32/fp16/bf16; W is dequantised to it).
        packed: the packed weight (uint8 ``[(d·k + 1) // 2, 1]`` or a bitsandbytes
            ``Params4bit``; other ``quant_storage`` dtypes are read as bytes).
        quant_state: its QuantState (fastpeft's or bitsandbytes', read as it is); ``None`` takes
            ``packed.quant_state`` (a ``Params4bit``). ``quant_state.shape`` is ``[d, k]``.
        bias, lora_A, lora_B, core, out_scale, scale, dropout_p, activation, seed: as for
            :func:`fastpeft.lowrank_linear`, in x's dtype.

    Returns ``[..., d]`` in x's dtype. Backward dequantises W again; nothing dense of W is saved.

    >>> import torch, fastpeft
    >>> w = torch.randn(8, 16)
    >>> packed, state = fastpeft.quantize_4bit(w)
    >>> x, a, b = torch.randn(3, 16), torch.randn(4, 16), torch.zeros(8, 4)
    >>> y = fastpeft.lowrank_linear_4bit(x, packed, state, None, a, b, scale=2.0)
    >>> torch.equal(y, x @ fastpeft.dequantize_4bit(packed, state).t())
    True
    """
    if quant_state is None:
        quant_state = getattr(packed, "quant_state", None)
    shape, _ = validate_4bit(packed, quant_state)
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape must be the 2-D weight shape [d, k], got {tuple(shape)}")
    x, bias, lora_A, lora_B, core, out_scale = autocast_args(x, bias, lora_A, lora_B, core, out_scale)
    validate_lowrank_args(x, shape, None, packed.device, bias, lora_A, lora_B, core, out_scale,
                          scale, dropout_p, activation, seed, weight_name="the 4-bit weight (quant_state.shape)")
    problem = dict(M=math.prod(x.shape[:-1]), dropout_p=float(dropout_p), dtype=x.dtype, k=int(shape[1]),
                   r=int(lora_A.shape[0]), blocksize=int(quant_state.blocksize))
    backend = _backend.resolve_backend(OP_NAME, x.device, problem=problem)
    seed_t = seed_tensor(seed, float(dropout_p))
    meta = _state_meta(quant_state)
    return apply_function(LowRankLinear4bitFunction, x, packed, *_state_tensors(quant_state), meta, bias, lora_A,
                          lora_B, core, out_scale, float(scale), float(dropout_p), seed_t, activation, backend)

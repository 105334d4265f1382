"""The low-rank adapter op ``Y = X Wᵀ + b + s·((D(X) Aᵀ) Sᵀ) Bᵀ ⊙ out_scale`` and its autograd.

Names (x flattened to X [M, k]; σ the optional activation; D inverted dropout on the adapter
input, its mask regenerated from a seed, never stored)::

    T  = D(X) Aᵀ                 [M, r]   saved for backward (pre-activation)
    Z  = σ(T)                    [M, r]
    U  = Z Sᵀ   (full core)  |  Z ⊙ S (diagonal core)  |  Z (no core)
    Y  = X Wᵀ + b + s·(U Bᵀ) ⊙ out_scale

Backward, from dY [M, d] (each gradient only when needed)::

    dYo = dY ⊙ out_scale;  G = dYo B;  H = G S | G ⊙ S | G;  dT = H ⊙ σ'(T)
    dX  = dY W + s·D'(dT A)                  D' = the same mask and 1/(1-p) factor
    dB  = s·dYoᵀ U                           [d, r]
    dout_scale = s·rowsum(B ⊙ (dYᵀ U))       [d]   since Σ_m dY[m,j]·(U Bᵀ)[m,j]
    dS  = s·Gᵀ Z  (full) | s·Σ_rows G ⊙ Z (diagonal)
    dA  = s·dTᵀ D(X)                         [r, k]
    db  = Σ_rows dY;   dW = dYᵀ X (only if the base weight trains)

What backward keeps (the memory contract): T [M, r] and the seed; the caller's x itself only
when A (or W) trains; never a dropped copy of x or a mask.

The forward and backward halves are ``torch.library`` custom ops (``fastpeft::lowrank_fwd`` and
``fastpeft::lowrank_bwd``) with fake implementations, so ``torch.compile(fullgraph=True)``
traces models built from this op without graph breaks; the backend that runs them is chosen in
the forward pass and reused in backward. Untraced eager calls run the ops' Python implementations
directly (:func:`fastpeft._backend.custom_op`): the custom-op dispatcher alone would cost more
host time than a small layer's kernels.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend

__all__ = [
    "ACTIVATIONS",
    "LowRankLinearFunction",
    "lowrank_linear",
    "lowrank_fwd_torch",
    "lowrank_bwd_torch",
    "lowrank_bwd_r_torch",
    "dropout_keep_mask_torch",
    "validate_lowrank_args",
    "apply_core",
    "activation_fn",
    "apply_function",
]

ACTIVATIONS = (None, "relu", "gelu", "silu")
OP_NAME = "lowrank_linear"


# --------------------------------------------------------------------------------------------
# Pure-torch backend: the reference math and the fallback on every device.
# --------------------------------------------------------------------------------------------

def activation_fn(t: Tensor, activation: Optional[str]) -> Tensor:
    """σ(t) for the supported activations (identity for ``None``)."""
    if activation is None:
        return t
    if activation == "relu":
        return F.relu(t)
    if activation == "gelu":
        return F.gelu(t)
    if activation == "silu":
        return F.silu(t)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _activation_grad(t: Tensor, activation: Optional[str]) -> Optional[Tensor]:
    """σ'(t), or ``None`` for the identity."""
    if activation is None:
        return None
    if activation == "relu":
        return (t > 0).to(t.dtype)
    tf = t if t.dtype == torch.float64 else t.float()  # float64 stays float64
    if activation == "gelu":  # d/dt t·Φ(t) = Φ(t) + t·φ(t)
        cdf = 0.5 * (1.0 + torch.erf(tf * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * tf * tf) * (1.0 / math.sqrt(2.0 * math.pi))
        return (cdf + tf * pdf).to(t.dtype)
    if activation == "silu":  # d/dt t·sig(t) = sig(t)·(1 + t·(1 - sig(t)))
        sig = torch.sigmoid(tf)
        return (sig * (1.0 + tf * (1.0 - sig))).to(t.dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def apply_core(z: Tensor, core: Optional[Tensor]) -> Tensor:
    """U = Z Sᵀ for a full core [r, r], Z ⊙ S for a diagonal core [r], Z without a core."""
    if core is None:
        return z
    if core.dim() == 1:
        return z * core
    return z @ core.t()


def _apply_core_transposed(g: Tensor, core: Optional[Tensor]) -> Tensor:
    """H = G S (the adjoint of :func:`apply_core`)."""
    if core is None:
        return g
    if core.dim() == 1:
        return g * core
    return g @ core


# The torch backend's dropout draws: 16-bit integers from torch's generator seeded with ``seed``,
# two per 32-bit word, ⌈k/2⌉ words per row (random_() fills int32 with [0, 2³¹)). Viewed as int16
# (little-endian), an even column is a word's low half, uniform over all of int16 [-2¹⁵, 2¹⁵),
# and an odd column its high half, uniform over [0, 2¹⁵). With t = round(p·2¹⁵) (at most 2¹⁵ − 1),
# an even column is kept when its draw is at least 2t − 2¹⁵ and an odd one when it is at least t:
# either with probability 1 − t/2¹⁵, decided by one comparison against a per-column threshold
# row, with no pass to mask the halves to a common range. Half the generator calls of torch.rand
# and a quarter of bernoulli_'s (CPU generator calls are serial and dominate the mask's cost).
_DRAW_LEVELS = 1 << 15


@functools.lru_cache(maxsize=64)
def _keep_thresholds(k: int, dropout_p: float, device) -> Tensor:
    """int16 [k]: the draw each column must reach to be kept (2t − 2¹⁵ even, t odd)."""
    threshold = _drop_threshold(dropout_p)
    pair = torch.tensor([2 * threshold - _DRAW_LEVELS, threshold], dtype=torch.int16)
    return pair.repeat((k + 1) // 2)[:k].to(device)


# Per thread: one generator per device, re-seeded before every use (so it carries nothing from one
# mask to the next), and the 0-dim tensor that per-call seeds are drawn into. Building either
# costs as much host time as a small mask's draws.
_per_thread = threading.local()


def _seeded_generator(seed: int, device) -> torch.Generator:
    gens = _per_thread.__dict__
    gen = gens.get(device)
    if gen is None:
        gen = gens[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _dropout_draws(seed: int, m: int, k: int, device) -> Tensor:
    """int16 draws [m, k] (even columns uniform on int16, odd ones on [0, 2¹⁵)) from a generator
    seeded with ``seed``."""
    gen = _seeded_generator(seed, device)
    draws = torch.empty(m, (k + 1) // 2, dtype=torch.int32, device=device).random_(generator=gen).view(torch.int16)
    return draws[:, :k] if k % 2 else draws


def _drop_threshold(dropout_p: float) -> int:
    return min(int(round(dropout_p * _DRAW_LEVELS)), _DRAW_LEVELS - 1)


def dropout_keep_mask_torch(seed: int, m: int, k: int, dropout_p: float, device) -> Tensor:
    """The keep-mask [m, k] (bool) that the torch backend draws for ``seed``: regenerated, never
    stored. Each element is kept with probability 1 − round(p·2¹⁵)/2¹⁵ (see ``_keep_thresholds``)."""
    device = torch.device(device)
    return _dropout_draws(int(seed), m, k, device) >= _keep_thresholds(k, float(dropout_p), device)


def _keep_factor(seed: int, m: int, k: int, dropout_p: float, dtype, device) -> Tensor:
    """The keep-mask of ``seed`` as 0/1 in ``dtype`` [m, k], written by one comparison (the
    1/(1-p) factor is applied to the r-dim side by the callers)."""
    return torch.ge(_dropout_draws(seed, m, k, device), _keep_thresholds(k, dropout_p, device),
                    out=torch.empty(m, k, dtype=dtype, device=device))


def _dropout_scale(seed: int, m: int, k: int, dropout_p: float, dtype, device) -> Tensor:
    """The [m, k] factor of inverted dropout: keep-mask / (1-p), in ``dtype``."""
    return _keep_factor(seed, m, k, dropout_p, dtype, device).mul_(1.0 / (1.0 - dropout_p))


def _dropped(x: Tensor, dropout_p: float, seed: int) -> Tensor:
    """D(X): inverted dropout with the mask of ``seed``."""
    if dropout_p == 0.0:
        return x
    keep = _keep_factor(seed, x.shape[0], x.shape[1], dropout_p, x.dtype, x.device)
    return keep.mul_(x).mul_(1.0 / (1.0 - dropout_p))


@functools.lru_cache(maxsize=16)
def _zero_scalar(dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim zero of ``dtype`` on ``device``: the ignored input of :func:`_mm_scaled`."""
    return torch.zeros((), dtype=dtype, device=device)


def _mm_scaled(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """alpha·(a @ b) in one GEMM (addmm with beta = 0 ignores its input; no separate pass, and no
    scalar op, whose dispatch costs about as much as a [16, 16] product)."""
    if alpha == 1.0:
        return torch.mm(a, b)
    return torch.addmm(_zero_scalar(a.dtype, a.device), a, b, beta=0, alpha=alpha)


def _plain(core, out_scale, activation) -> bool:
    """The LoRA / LoRA-FA form (no core, no output scale, no activation): the lean path."""
    return core is None and out_scale is None and activation is None


def lowrank_fwd_torch(x, weight, bias, lora_A, lora_B, core, out_scale, scale: float,
                      dropout_p: float, seed: int, activation: Optional[str]):
    """Forward on 2-D x [M, k]. Returns (Y [M, d], T [M, r]), both in x's dtype.

    T = (X ⊙ keep) Aᵀ / (1-p): the 0/1 mask multiplies x (one pass over [M, k], in the mask's
    buffer) and the 1/(1-p) factor the r-dim product. Without core, output scale and activation
    the adapter is added inside the last GEMM: Y = X Wᵀ + b, then Y += s·T Bᵀ (addmm).

    T comes before the base GEMM: the large GEMM evicts the CPU's caches, and the first ops
    after it run slower (~100 µs on a small layer), so the mask's draws run before it and only
    the addmm after it."""
    if dropout_p > 0.0:
        m, k = x.shape
        keep = _keep_factor(seed, m, k, dropout_p, x.dtype, x.device)
        t = _mm_scaled(keep.mul_(x), lora_A.t(), 1.0 / (1.0 - dropout_p))      # T = D(X) Aᵀ
        del keep
    else:
        t = F.linear(x, lora_A)                                                # T = X Aᵀ
    y = F.linear(x, weight, bias)
    if _plain(core, out_scale, activation):
        return y.addmm_(t, lora_B.t(), alpha=scale), t                       # Y += s·T Bᵀ
    u = apply_core(activation_fn(t, activation), core)       # U = σ(T) Sᵀ
    delta = u @ lora_B.t()                                   # U Bᵀ
    if out_scale is not None:
        delta = delta * out_scale
    y.add_(delta, alpha=scale)
    return y, t


def lowrank_bwd_r_torch(grad_y, t, lora_B, core, out_scale, scale: float,
                        activation: Optional[str], need_dt: bool, need_B: bool, need_core: bool,
                        need_out_scale: bool):
    """The r-dim chain of backward (2-D): returns (dT, dB, dcore, dout_scale), ``None`` where not
    needed. dT = (G S) ⊙ σ'(T) in dY's dtype, without the scale s (module docstring)."""
    if _plain(core, out_scale, activation) and grad_y.dtype not in (torch.float16, torch.bfloat16):
        d_b = _mm_scaled(grad_y.t(), t, scale) if need_B else None               # dB = s·dYᵀ T
        return (torch.mm(grad_y, lora_B) if need_dt else None), d_b, None, None  # dT = dY B
    d_t = d_b = d_core = d_out_scale = None
    # the r-dim chain runs in fp32 for half inputs (as the kernels accumulate): dS and dout_scale
    # are sums over M with cancellation, and rounding G to 16 bits would cost percents
    acc = torch.float32 if grad_y.dtype in (torch.float16, torch.bfloat16) else grad_y.dtype
    gy = grad_y.to(acc)
    gy_o = gy * out_scale.to(acc) if out_scale is not None else gy     # dYo = dY ⊙ out_scale
    lora_b = lora_B.to(acc)
    z = activation_fn(t.to(acc), activation)
    if need_B or need_out_scale:
        u = apply_core(z, None if core is None else core.to(acc))
        if need_B:
            d_b = torch.mm(gy_o.t(), u).mul_(scale).to(lora_B.dtype)      # dB = s·dYoᵀ U
        if need_out_scale:                                              # s·rowsum(B ⊙ dYᵀU)
            d_out_scale = ((lora_b * (gy.t() @ u)).sum(1) * scale).to(out_scale.dtype)
    if need_dt or need_core:
        g = gy_o @ lora_b                                               # G = dYo B
        if need_core:
            if core.dim() == 1:
                d_core = (g * z).sum(0) * scale                         # dS = s·Σ G ⊙ Z
            else:
                d_core = (g.t() @ z) * scale                            # dS = s·Gᵀ Z
            d_core = d_core.to(core.dtype)
        if need_dt:
            d_t = _apply_core_transposed(g, None if core is None else core.to(acc))  # H = G S
            act_grad = _activation_grad(t.to(acc), activation)
            if act_grad is not None:
                d_t = d_t * act_grad                                    # dT = H ⊙ σ'(T)
            d_t = d_t.to(grad_y.dtype)
    return d_t, d_b, d_core, d_out_scale


def lowrank_bwd_torch(grad_y, x, weight, t, lora_A, lora_B, core, out_scale, scale: float,
                      dropout_p: float, seed: int, activation: Optional[str], need_x: bool,
                      need_A: bool, need_B: bool, need_core: bool, need_out_scale: bool,
                      need_bias: bool):
    """Backward on 2-D tensors. Returns (dX, dA, dB, dcore, dout_scale, dbias), ``None`` where a
    gradient is not needed. See the module docstring for the derivation."""
    dx = d_a = d_bias = None
    need_dt = need_x or need_A
    # dX and dA share the factor c = s/(1-p) of D'(dT A) and dTᵀ D(X): applied once, to dT [M, r]
    # (inside the GEMM dY B on the plain fp32/fp64 path)
    c = scale / (1.0 - dropout_p)
    if _plain(core, out_scale, activation) and grad_y.dtype not in (torch.float16, torch.bfloat16):
        # LoRA / LoRA-FA in fp32/fp64: every r-dim product one scaled GEMM (addmm with beta = 0
        # ignores its input), no other op
        d_core = d_out_scale = None
        zero = _zero_scalar(grad_y.dtype, grad_y.device)
        d_b = torch.addmm(zero, grad_y.t(), t, beta=0, alpha=scale) if need_B else None  # dB = s·dYᵀ T
        d_t = torch.addmm(zero, grad_y, lora_B, beta=0, alpha=c) if need_dt else None    # c·dT = c·dY B
    else:
        d_t, d_b, d_core, d_out_scale = lowrank_bwd_r_torch(
            grad_y, t, lora_B, core, out_scale, scale, activation, need_dt, need_B, need_core,
            need_out_scale)
        if need_dt:
            d_t = d_t.mul(c)
    if need_dt:
        # the 0/1 mask, regenerated once for dX and dA and dropped when backward returns
        keep = None
        if dropout_p > 0.0:
            keep = _keep_factor(seed, grad_y.shape[0], lora_A.shape[1], dropout_p, grad_y.dtype, grad_y.device)
        if need_x:
            adapter = torch.mm(d_t, lora_A)                             # c·dT A
            if keep is not None:
                adapter.mul_(keep)
        if need_A:
            x_dropped = x if keep is None else keep.mul_(x)             # X ⊙ keep, in the mask's buffer
            d_a = torch.mm(d_t.t(), x_dropped)                          # dA = s·dTᵀ D(X)
        if need_x:   # the large GEMM last (see lowrank_fwd_torch)
            dx = adapter.addmm_(grad_y, weight)                         # dX = dY W + s·D'(dT A)
    if need_bias:
        d_bias = grad_y.sum(0)                                          # db = Σ dY
    return dx, d_a, d_b, d_core, d_out_scale, d_bias


# --------------------------------------------------------------------------------------------
# Backends and the custom ops.
# --------------------------------------------------------------------------------------------

class _TorchBackend:
    lowrank_fwd = staticmethod(lowrank_fwd_torch)
    lowrank_bwd = staticmethod(lowrank_bwd_torch)


_backend.register_impl(OP_NAME, "torch", lambda: _TorchBackend, lambda device: None)
_triton_available = _backend.register_triton(OP_NAME, "lowrank")


def _lowrank_fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                      lora_B: Tensor, core: Optional[Tensor], out_scale: Optional[Tensor],
                      scale: float, dropout_p: float, seed: Tensor, activation: Optional[str],
                      backend: str) -> tuple[Tensor, Tensor]:
    impl = _backend.get_impl(OP_NAME, backend)
    if x.shape[0] == 0:  # an empty batch needs no kernel
        impl = _TorchBackend
    return impl.lowrank_fwd(x, weight, bias, lora_A, lora_B, core, out_scale, float(scale),
                            float(dropout_p), int(seed), activation)


def _lowrank_fwd_fake(x, weight, bias, lora_A, lora_B, core, out_scale, scale, dropout_p, seed,
                      activation, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


_lowrank_fwd = _backend.custom_op("fastpeft::lowrank_fwd", _lowrank_fwd_impl, _lowrank_fwd_fake)


def _lowrank_bwd_impl(grad_y: Tensor, x: Optional[Tensor], weight: Tensor, t: Tensor,
                      lora_A: Tensor, lora_B: Tensor, core: Optional[Tensor],
                      out_scale: Optional[Tensor], scale: float, dropout_p: float, seed: Tensor,
                      activation: Optional[str], needs: Sequence[bool], backend: str,
                      deterministic: bool) -> list[Tensor]:
    impl = _backend.get_impl(OP_NAME, backend)
    args = (grad_y, x, weight, t, lora_A, lora_B, core, out_scale, float(scale),
            float(dropout_p), int(seed), activation, *needs)
    if grad_y.shape[0] == 0 or impl is _TorchBackend:
        grads = lowrank_bwd_torch(*args)
    else:
        grads = impl.lowrank_bwd(*args, deterministic=deterministic)
    # custom ops return tensors only: an unneeded gradient travels as an empty tensor
    return [g if g is not None else grad_y.new_empty(0) for g in grads]


def _lowrank_bwd_fake(grad_y, x, weight, t, lora_A, lora_B, core, out_scale, scale, dropout_p, seed,
                      activation, needs, backend, deterministic):
    shapes = [(grad_y.shape[0], weight.shape[1]), lora_A.shape, lora_B.shape,
              core.shape if core is not None else (0,),
              out_scale.shape if out_scale is not None else (0,), (weight.shape[0],)]
    dtypes = [grad_y.dtype, lora_A.dtype, lora_B.dtype,
              core.dtype if core is not None else grad_y.dtype,
              out_scale.dtype if out_scale is not None else grad_y.dtype, grad_y.dtype]
    return [grad_y.new_empty(shape if need else (0,), dtype=dtype)
            for shape, dtype, need in zip(shapes, dtypes, needs)]


_lowrank_bwd = _backend.custom_op("fastpeft::lowrank_bwd", _lowrank_bwd_impl, _lowrank_bwd_fake)


def _save_for_backward(ctx, x, weight, bias, lora_A, lora_B, core, out_scale, scale, dropout_p,
                       seed, activation, backend, t):
    # x is kept only when a gradient needs it (dA = s·dTᵀ D(X), dW = dYᵀ X): the caller's own
    # tensor, never a dropped copy; with A and W frozen nothing of size M×k is kept.
    # The seed: a CPU int64 tensor when traced (so that it is data, not a constant), saved as a
    # tensor; a Python int from eager calls, kept on ctx (no tensor to make, save or read back).
    keep_x = lora_A.requires_grad or weight.requires_grad
    seed_is_int = not isinstance(seed, Tensor)
    ctx.save_for_backward(x if keep_x else None, weight, lora_A, lora_B, core, out_scale, t,
                          None if seed_is_int else seed)
    ctx.seed = seed if seed_is_int else None
    ctx.scale, ctx.dropout_p, ctx.activation, ctx.backend = scale, dropout_p, activation, backend
    ctx.has_bias = bias is not None


def _gradients(ctx, grad_out):
    """(dx, dweight, dbias, dA, dB, dcore, dout_scale) from the saved state, ``None`` where the
    input needs no gradient; x and grad_out may have any leading dims."""
    x, weight, lora_A, lora_B, core, out_scale, t, seed = ctx.saved_tensors
    if seed is None:
        seed = ctx.seed
    need = ctx.needs_input_grad
    need_x, need_w, need_bias = need[0], need[1], need[2] and ctx.has_bias
    need_A, need_B = need[3], need[4]
    need_core, need_os = need[5] and core is not None, need[6] and out_scale is not None
    # 2-D tensors (the common case inside models that flatten tokens) need no reshape
    grad_y = grad_out if grad_out.dim() == 2 else grad_out.reshape(-1, grad_out.shape[-1])
    if grad_y.stride(-1) != 1:
        grad_y = grad_y.contiguous()
    x2d = x if x is None or x.dim() == 2 else x.reshape(-1, x.shape[-1])
    d_w = dx = d_a = d_b = d_core = d_os = d_bias = None
    needs = (need_x, need_A, need_B, need_core, need_os, need_bias)
    if need_x or need_A or need_B or need_core or need_os or need_bias:
        if ctx.backend == "torch" and grad_y.shape[0] and _backend.plain_eager(grad_y):
            # the torch backend in plain eager mode: its function directly, no op boundary
            dx, d_a, d_b, d_core, d_os, d_bias = lowrank_bwd_torch(
                grad_y, x2d if need_A else None, weight, t, lora_A, lora_B, core, out_scale,
                ctx.scale, ctx.dropout_p, int(seed), ctx.activation, *needs)
        else:
            out = _lowrank_bwd(
                grad_y, x2d if need_A else None, weight, t, lora_A, lora_B, core, out_scale,
                ctx.scale, ctx.dropout_p, _seed_as_tensor(seed), ctx.activation, list(needs), ctx.backend,
                torch.are_deterministic_algorithms_enabled())
            dx, d_a, d_b, d_core, d_os, d_bias = (g if n else None for g, n in zip(out, needs))
        if dx is not None and grad_out.dim() != 2:
            dx = dx.reshape(grad_out.shape[:-1] + (weight.shape[1],))
    if need_w:
        d_w = grad_y.t() @ x2d                                            # dW = dYᵀ X
    return dx, d_w, d_bias, d_a, d_b, d_core, d_os


# The forward custom op is differentiable on its own (for users of torch.ops.fastpeft directly)
torch.library.register_autograd(
    "fastpeft::lowrank_fwd",
    lambda ctx, grad_y, grad_t: (*_gradients(ctx, grad_y), None, None, None, None, None),
    setup_context=lambda ctx, inputs, output: _save_for_backward(ctx, *inputs, output[1]))


class LowRankLinearFunction(torch.autograd.Function):
    """Autograd of the op; saves only what the memory contract allows (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, core, out_scale, scale, dropout_p, seed,
                activation, backend):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if backend == "torch" and x2d.shape[0] and _backend.plain_eager(x2d):
            # the torch backend in plain eager mode: its function directly, no op boundary
            y, t = lowrank_fwd_torch(x2d, weight, bias, lora_A, lora_B, core, out_scale, scale,
                                     dropout_p, int(seed), activation)
        else:
            y, t = _lowrank_fwd(x2d, weight, bias, lora_A, lora_B, core, out_scale, scale, dropout_p,
                                _seed_as_tensor(seed), activation, backend)
        _save_for_backward(ctx, x, weight, bias, lora_A, lora_B, core, out_scale, scale,
                           dropout_p, seed, activation, backend, t)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        return (*_gradients(ctx, grad_out), None, None, None, None, None)


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------

def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_same(tensor: Tensor, name: str, dtype, device) -> None:
    if tensor.dtype != dtype:
        raise TypeError(f"{name} dtype {tensor.dtype} must equal x dtype {dtype} "
                        "(cast the adapter, or run under torch.autocast)")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but x is on {device}; "
                         "all tensors must be on one device")


def _check_optional(tensor, name: str, shapes, dtype, device) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
    if tensor.shape not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{name} must have shape {want}, got {_describe(tensor)}")
    _check_same(tensor, name, dtype, device)


def validate_lowrank_args(x, weight_shape, weight_dtype, weight_device, bias, lora_A, lora_B, core,
                          out_scale, scale, dropout_p, activation, seed, weight_name="weight"):
    """Check every argument of the op; raise a ValueError/TypeError that names the argument and
    what was expected. ``weight_*`` describe the dense base weight (or the 4-bit one's shape).

    Every call of the op runs this, so each attribute is read once and the common case (plain
    Python numbers, the optional tensors absent) takes the shortest test."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dtype, device, shape = x.dtype, x.device, x.shape
    if not dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {dtype}")
    if not shape:
        raise ValueError("x must have at least one dimension [..., k], got a scalar")
    if len(weight_shape) != 2:
        raise ValueError(f"{weight_name} must be 2-D [d, k], got shape {tuple(weight_shape)}")
    d, k = weight_shape
    if shape[-1] != k:
        raise ValueError(f"x must have last dimension k={k} to match {weight_name} [d={d}, k={k}], "
                         f"got x of shape {tuple(shape)}")
    if weight_dtype is not None and weight_dtype != dtype:
        raise TypeError(f"{weight_name} dtype {weight_dtype} must equal x dtype {dtype}")
    if weight_device != device:
        raise ValueError(f"{weight_name} is on {weight_device} but x is on {device}; "
                         "all tensors must be on one device")
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    a_shape = lora_A.shape
    if len(a_shape) != 2 or a_shape[1] != k or a_shape[0] < 1:
        raise ValueError(f"lora_A must have shape [r, k={k}] with r >= 1, got {_describe(lora_A)}")
    r = a_shape[0]
    if lora_B.shape != (d, r):
        raise ValueError(f"lora_B must have shape [d={d}, r={r}], got {_describe(lora_B)}")
    if lora_A.dtype != dtype or lora_B.dtype != dtype or lora_A.device != device or lora_B.device != device:
        _check_same(lora_A, "lora_A", dtype, device)
        _check_same(lora_B, "lora_B", dtype, device)
    # the optional tensors (None in LoRA's common case: no per-call work for them)
    if bias is not None:
        _check_optional(bias, "bias", ((d,),), dtype, device)
    if core is not None:
        _check_optional(core, "core", ((r,), (r, r)), dtype, device)
    if out_scale is not None:
        _check_optional(out_scale, "out_scale", ((d,),), dtype, device)
    # torch.compile traces a scale that changed between calls (fastpeft.set_adapter to an adapter
    # of another alpha) as a symbolic float, whose finiteness cannot be asked while tracing
    # (is_compiling first: a symbolic float passes type() as float, and isfinite would break the graph)
    if torch.compiler.is_compiling() or not (type(scale) is float and math.isfinite(scale)):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not (torch.compiler.is_compiling() or math.isfinite(scale)):
            raise TypeError(f"scale must be a finite Python number, got {scale!r}")
    if not (type(dropout_p) is float and 0.0 <= dropout_p < 1.0):
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if seed is not None and type(seed) is not int and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")


def _seed_as_tensor(seed) -> Tensor:
    """The custom ops take the seed as a tensor: an eager call's int becomes one."""
    return seed if isinstance(seed, Tensor) else torch.tensor(seed, dtype=torch.int64)


def seed_int(seed: Optional[int], dropout_p: float) -> int:
    """The dropout seed as a Python int (eager calls): ``seed`` masked to 31 bits, or drawn from
    torch's generator when ``None`` and p > 0 (the same draw as :func:`seed_tensor`)."""
    if seed is None:
        if dropout_p == 0.0:
            return 0
        draw = _per_thread.__dict__.get("seed")
        if draw is None:
            draw = _per_thread.seed = torch.empty((), dtype=torch.int64)
        return draw.random_(0, 2**31 - 1).item()      # torch.randint's draw, without a new tensor
    return seed & 0x7FFFFFFF


def seed_tensor(seed: Optional[int], dropout_p: float) -> Tensor:
    """The dropout seed as a CPU int64 scalar (drawn from torch's generator when ``None``), so
    that torch.compile traces it as data rather than a constant."""
    if seed is None:
        if dropout_p > 0.0:
            return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
        seed = 0
    return torch.tensor(seed & 0x7FFFFFFF, dtype=torch.int64)


def autocast_args(x: Tensor, *tensors):
    """Under torch.autocast, cast the floating tensors to the autocast dtype as F.linear would."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors))


class _NoGraph:
    """The ``ctx`` of an autograd Function's forward run without autograd: keeps nothing."""

    def save_for_backward(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


@functools.lru_cache(maxsize=None)
def _direct_apply(function):
    """``torch._C._FunctionBase.apply`` bound to ``function`` (an autograd Function whose
    ``forward`` takes ``ctx``)."""
    if _has_setup_context(function):
        return function.apply
    return super(torch.autograd.Function, function).apply


def _has_setup_context(function) -> bool:
    return function.setup_context is not torch.autograd.Function.setup_context


def apply_function(function, x: Tensor, *args):
    """``function.apply(x, *args)`` with autocast off (the caller cast the arguments already, as
    F.linear would under autocast), or, when no autograd graph is wanted (grad mode off, or no
    tensor argument requires grad) and nothing traces, ``function.forward`` alone: the
    autograd-Function machinery and its saved tensors cost host time that inference calls, one
    small layer at a time, feel."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return _apply_without_autocast(function, x, *args)
    return _apply_without_autocast(function, x, *args)


def _apply_without_autocast(function, x: Tensor, *args):
    """:func:`apply_function` once autocast is known to be off."""
    if torch.compiler.is_compiling():
        return function.apply(x, *args)
    if torch.is_grad_enabled() and (x.requires_grad or any(
            isinstance(a, Tensor) and a.requires_grad for a in args)):
        if torch._C._are_functorch_transforms_active():
            return function.apply(x, *args)
        # what Function.apply calls once its Python checks pass (no setup_context to bind
        # arguments for, no functorch transform active): they cost as much host time as the
        # C++ apply itself
        return _direct_apply(function)(x, *args)
    return function.forward(_NoGraph(), x, *args)


def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                   lora_B: Tensor, *, core: Optional[Tensor] = None,
                   out_scale: Optional[Tensor] = None, scale: float = 1.0,
                   dropout_p: float = 0.0, activation: Optional[str] = None,
                   seed: Optional[int] = None) -> Tensor:
    """``Y = x Wᵀ + b + scale·(σ(D(x) Aᵀ) coreᵀ) Bᵀ ⊙ out_scale`` with memory-lean autograd.

    Args:
        x: input ``[..., k]``.
        weight: base weight ``[d, k]`` (nn.Linear layout). bias: ``[d]`` or ``None``.
        lora_A: ``[r, k]``. lora_B: ``[d, r]``.
        core: ``None``, a diagonal ``[r]`` (VeRA λ_d, AdaLoRA Λ) or a full ``[r, r]`` (LaMDA).
        out_scale: ``None`` or ``[d]`` (VeRA λ_b).
        scale: the scalar s (alpha / r).
        dropout_p: dropout on the adapter input; the mask is regenerated from ``seed`` in
            backward, never stored. ``seed=None`` draws one from torch's generator.
        activation: ``None``, ``"relu"``, ``"gelu"`` or ``"silu"`` on the r-dim intermediate.

    Returns ``[..., d]`` in x's dtype. The backend is the one chosen by
    :func:`fastpeft.use_backend` (``"auto"`` by default).

    >>> import torch, fastpeft
    >>> x = torch.randn(2, 5, 16)
    >>> w, a, b = torch.randn(8, 16), torch.randn(4, 16), torch.zeros(8, 4)
    >>> torch.equal(fastpeft.lowrank_linear(x, w, None, a, b, scale=2.0), x @ w.t())
    True
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        x, weight, bias, lora_A, lora_B, core, out_scale = autocast_args(
            x, weight, bias, lora_A, lora_B, core, out_scale)
    validate_lowrank_args(x, weight.shape, weight.dtype, weight.device, bias, lora_A, lora_B, core,
                          out_scale, scale, dropout_p, activation, seed)
    problem = None
    if device_type == "cuda":   # what auto's dispatch table is keyed by (fastpeft._dispatch)
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, core, out_scale))
        problem = dict(M=math.prod(x.shape[:-1]), k=weight.shape[1], d=weight.shape[0], r=lora_A.shape[0],
                       dropout_p=float(dropout_p), dtype=x.dtype, grad=grad)
    backend = _backend.resolve_backend(OP_NAME, x.device, problem=problem)
    dropout_p = float(dropout_p)
    # traced: the seed as a tensor (data, not a constant); eager: a Python int (no tensor op)
    seed = seed_tensor(seed, dropout_p) if torch.compiler.is_compiling() else seed_int(seed, dropout_p)
    return (apply_function if autocast else _apply_without_autocast)(
        LowRankLinearFunction, x, weight, bias, lora_A, lora_B, core, out_scale, float(scale), dropout_p,
        seed, activation, backend)

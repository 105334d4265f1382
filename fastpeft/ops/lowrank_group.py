"""Several low-rank projections of one input in one op (q/k/v, gate/up), and its autograd.

For one input x [..., k] (flattened to X [M, k]) and projections i = 1..n, each with its own
W_i [d_i, k], b_i, A_i [r_i, k], B_i [d_i, r_i], core S_i, out_scale o_i and scale s_i, and one
dropout mask D on x (module docstring of :mod:`fastpeft.ops.lowrank` for the single op)::

    T   = D(X) [A_1; …; A_n]ᵀ = [T_1 … T_n]       [M, Σ r_i]   one product, one read of X
    Y_i = X W_iᵀ + b_i + s_i·(σ(T_i) S_iᵀ) B_iᵀ ⊙ o_i

Backward, from the dY_i that reach it (a projection whose output takes no gradient adds
nothing), with dT_i = (G_i S_i) ⊙ σ'(T_i) and G_i = (dY_i ⊙ o_i) B_i as for one projection::

    dX   = Σ_i dY_i W_i + D'(Σ_i s_i·dT_i A_i)    ∂/∂X of every Y_i; D' applied once: the mask is one
    dA_i = s_i·dT_iᵀ D(X)                        rows of [s_1 dT_1 … s_n dT_n]ᵀ D(X): one read of X
    dB_i = s_i·(dY_i ⊙ o_i)ᵀ U_i,  dS_i,  do_i,  db_i = Σ_rows dY_i     from dY_i and T_i alone
    dW_i = dY_iᵀ X                               only if the base weight trains

Dropout: the mask is a property of x, not of a projection: one seed for the group, and the
result equals :func:`fastpeft.lowrank_linear` called per projection with that same seed.

What backward keeps (SPEC section 3): T [M, Σ r_i] and the seed; the caller's x itself only when
some A_i (or W_i) trains; never a dropped copy of x, a mask, or anything else of size M × k.

The halves are ``torch.library`` custom ops (``fastpeft::lowrank_group_fwd`` /
``fastpeft::lowrank_group_bwd``) with fake implementations, so torch.compile traces them.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .lowrank import (_dropout_scale, _dropped, activation_fn, apply_core, apply_function, autocast_args,
                      lowrank_bwd_r_torch, seed_tensor, validate_lowrank_args)

__all__ = [
    "LowRankLinearGroupFunction",
    "lowrank_linear_group",
    "lowrank_group_fwd_torch",
    "lowrank_group_bwd_torch",
]

OP_NAME = "lowrank_linear_group"


# --------------------------------------------------------------------------------------------
# Pure-torch backend: the reference math and the fallback on every device.
# --------------------------------------------------------------------------------------------

def _offsets(lora_As) -> list[int]:
    """Column offsets of each T_i in T (and the total rank last)."""
    offs = [0]
    for a in lora_As:
        offs.append(offs[-1] + a.shape[0])
    return offs


def lowrank_group_fwd_torch(x, weights, biases, lora_As, lora_Bs, cores, out_scales, scales,
                            dropout_p: float, seed: int, activation: Optional[str]):
    """Forward on 2-D x [M, k]: returns ([Y_i [M, d_i]], T [M, Σ r_i]), all in x's dtype."""
    a_cat = torch.cat(list(lora_As)) if len(lora_As) > 1 else lora_As[0]
    t = _dropped(x, dropout_p, seed) @ a_cat.t()             # T = D(X) [A_1; …]ᵀ
    offs = _offsets(lora_As)
    ys = []
    for i, (w, bias, lora_b, core, out_scale) in enumerate(zip(weights, biases, lora_Bs, cores, out_scales)):
        u = apply_core(activation_fn(t[:, offs[i]:offs[i + 1]], activation), core)
        delta = u @ lora_b.t()
        if out_scale is not None:
            delta = delta * out_scale
        y = F.linear(x, w, bias)
        y.add_(delta, alpha=scales[i])
        ys.append(y)
    return ys, t


def lowrank_group_bwd_torch(grad_ys, x, weights, t, lora_As, lora_Bs, cores, out_scales, scales,
                            dropout_p: float, seed: int, activation: Optional[str], need_x: bool,
                            need_As, need_Bs, need_cores, need_out_scales, need_biases,
                            deterministic: bool = False):
    """Backward on 2-D tensors: returns (dX, [dA_i], [dB_i], [dcore_i], [dout_scale_i],
    [dbias_i]), ``None`` where a gradient is not needed or no dY_i reaches it. The derivation is
    in the module docstring."""
    n = len(weights)
    offs = _offsets(lora_As)
    dx = adapter = xd = None
    # the mask, regenerated once for dX and every dA and dropped when backward returns
    drop = None
    if dropout_p > 0.0 and (need_x or any(need_As)):
        m = next(gy.shape[0] for gy in grad_ys if gy is not None)
        drop = _dropout_scale(seed, m, lora_As[0].shape[1], dropout_p, t.dtype, t.device)
    d_as, d_bs, d_cores, d_oss, d_biases = ([None] * n for _ in range(5))
    for i, gy in enumerate(grad_ys):
        if gy is None:
            continue
        need_dt = need_x or need_As[i]
        d_t, d_bs[i], d_cores[i], d_oss[i] = lowrank_bwd_r_torch(
            gy, t[:, offs[i]:offs[i + 1]], lora_Bs[i], cores[i], out_scales[i], scales[i], activation,
            need_dt, need_Bs[i], need_cores[i] and cores[i] is not None,
            need_out_scales[i] and out_scales[i] is not None)
        if need_x:
            dx = gy @ weights[i] if dx is None else dx.addmm_(gy, weights[i])     # Σ dY_i W_i
            term = (d_t @ lora_As[i]) * scales[i]                                 # s_i·dT_i A_i
            adapter = term if adapter is None else adapter.add_(term)
        if need_As[i]:
            if xd is None:
                xd = x if drop is None else x * drop.to(x.dtype)
            d_as[i] = (d_t.t() @ xd) * scales[i]                                  # s_i·dT_iᵀ D(X)
        if need_biases[i]:
            d_biases[i] = gy.sum(0)                                               # Σ dY_i
    if dx is not None:
        if drop is not None:                                                      # D', once
            adapter.mul_(drop)
        dx.add_(adapter)
    return dx, d_as, d_bs, d_cores, d_oss, d_biases


# --------------------------------------------------------------------------------------------
# Backends and the custom ops.
# --------------------------------------------------------------------------------------------

class _TorchBackend:
    lowrank_group_fwd = staticmethod(lowrank_group_fwd_torch)
    lowrank_group_bwd = staticmethod(lowrank_group_bwd_torch)


_backend.register_impl(OP_NAME, "torch", lambda: _TorchBackend, lambda device: None)
_triton_available = _backend.register_triton(OP_NAME, "lowrank_group")


def _lowrank_group_fwd_impl(x: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]],
                            lora_As: List[Tensor], lora_Bs: List[Tensor], cores: List[Optional[Tensor]],
                            out_scales: List[Optional[Tensor]], scales: List[float], dropout_p: float,
                            seed: Tensor, activation: Optional[str], backend: str) -> List[Tensor]:
    impl = _backend.get_impl(OP_NAME, backend)
    if x.shape[0] == 0:  # an empty batch needs no kernel
        impl = _TorchBackend
    ys, t = impl.lowrank_group_fwd(x, weights, biases, lora_As, lora_Bs, cores, out_scales,
                                   [float(s) for s in scales], float(dropout_p), int(seed), activation)
    return [*ys, t]


def _lowrank_group_fwd_fake(x, weights, biases, lora_As, lora_Bs, cores, out_scales, scales, dropout_p,
                            seed, activation, backend):
    rank = sum(a.shape[0] for a in lora_As)
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights] + [x.new_empty(x.shape[0], rank)]


_lowrank_group_fwd = _backend.custom_op("fastpeft::lowrank_group_fwd", _lowrank_group_fwd_impl,
                                        _lowrank_group_fwd_fake)


def _lowrank_group_bwd_impl(grad_ys: List[Optional[Tensor]], x: Optional[Tensor], weights: List[Tensor],
                            t: Tensor, lora_As: List[Tensor], lora_Bs: List[Tensor],
                            cores: List[Optional[Tensor]], out_scales: List[Optional[Tensor]],
                            scales: List[float], dropout_p: float, seed: Tensor,
                            activation: Optional[str], needs: Sequence[bool], backend: str,
                            deterministic: bool) -> List[Tensor]:
    n = len(weights)
    impl = _backend.get_impl(OP_NAME, backend)
    if t.shape[0] == 0:
        impl = _TorchBackend
    need_x, *flags = needs
    per = [flags[j * n:(j + 1) * n] for j in range(5)]
    dx, *lists = impl.lowrank_group_bwd(
        list(grad_ys), x, weights, t, lora_As, lora_Bs, cores, out_scales, [float(s) for s in scales],
        float(dropout_p), int(seed), activation, need_x, *per, deterministic=deterministic)
    # custom ops return tensors only: a gradient not computed travels as an empty tensor
    return [g if g is not None else t.new_empty(0) for g in (dx, *(g for grads in lists for g in grads))]


def _lowrank_group_bwd_fake(grad_ys, x, weights, t, lora_As, lora_Bs, cores, out_scales, scales,
                            dropout_p, seed, activation, needs, backend, deterministic):
    n = len(weights)
    any_grad = any(g is not None for g in grad_ys)
    out = [t.new_empty((t.shape[0], weights[0].shape[1]) if needs[0] and any_grad else (0,))]
    for j, tensors in enumerate((lora_As, lora_Bs, cores, out_scales)):
        for i, tensor in enumerate(tensors):
            need = needs[1 + j * n + i] and tensor is not None and grad_ys[i] is not None
            out.append(tensor.new_empty(tensor.shape) if need else t.new_empty(0))
    for i, w in enumerate(weights):
        need = needs[1 + 4 * n + i] and grad_ys[i] is not None
        out.append(t.new_empty(w.shape[0]) if need else t.new_empty(0))
    return out


_lowrank_group_bwd = _backend.custom_op("fastpeft::lowrank_group_bwd", _lowrank_group_bwd_impl,
                                        _lowrank_group_bwd_fake)


class LowRankLinearGroupFunction(torch.autograd.Function):
    """Autograd of the group op; saves only what the memory contract allows (module docstring).

    ``apply(x, scales, dropout_p, seed, activation, backend, *weights, *biases, *lora_As,
    *lora_Bs, *cores, *out_scales)`` returns one output per projection."""

    @staticmethod
    def forward(ctx, x, scales, dropout_p, seed, activation, backend, *tensors):
        n = len(scales)
        weights, biases, lora_As, lora_Bs, cores, out_scales = (list(tensors[j * n:(j + 1) * n]) for j in range(6))
        x2d = x.reshape(-1, x.shape[-1])
        out = _lowrank_group_fwd(x2d, weights, biases, lora_As, lora_Bs, cores, out_scales, list(scales),
                                 dropout_p, seed, activation, backend)
        # x is kept only when a gradient needs it (dA_i = s_i·dT_iᵀ D(X), dW_i = dY_iᵀ X): the
        # caller's own tensor, never a dropped copy; with every A and W frozen nothing M×k is kept
        keep_x = any(a.requires_grad for a in lora_As) or any(w.requires_grad for w in weights)
        ctx.save_for_backward(x if keep_x else None, out[n], seed, *weights, *lora_As, *lora_Bs,
                              *cores, *out_scales)
        ctx.n, ctx.scales, ctx.dropout_p, ctx.activation, ctx.backend = n, list(scales), dropout_p, activation, backend
        ctx.has_bias = [b is not None for b in biases]
        ctx.set_materialize_grads(False)
        lead = x.shape[:-1]
        return tuple(y.reshape(*lead, y.shape[-1]) for y in out[:n])

    @staticmethod
    def backward(ctx, *grad_outs):
        n = ctx.n
        x, t, seed, *rest = ctx.saved_tensors
        weights, lora_As, lora_Bs, cores, out_scales = (rest[j * n:(j + 1) * n] for j in range(5))
        need = ctx.needs_input_grad
        base = 6
        need_x = need[0]
        need_w = [need[base + i] for i in range(n)]
        need_bias = [need[base + n + i] and ctx.has_bias[i] for i in range(n)]
        need_A = [need[base + 2 * n + i] for i in range(n)]
        need_B = [need[base + 3 * n + i] for i in range(n)]
        need_core = [need[base + 4 * n + i] and cores[i] is not None for i in range(n)]
        need_os = [need[base + 5 * n + i] and out_scales[i] is not None for i in range(n)]
        grad_ys = []
        for g in grad_outs:
            if g is not None:
                g = g.reshape(-1, g.shape[-1])
                if g.stride(-1) != 1:
                    g = g.contiguous()
            grad_ys.append(g)
        x2d = x.reshape(-1, x.shape[-1]) if x is not None else None
        grads = [None] * (base + 6 * n)
        needs = [need_x, *need_A, *need_B, *need_core, *need_os, *need_bias]
        if any(needs):
            out = _lowrank_group_bwd(
                grad_ys, x2d if any(need_A) else None, list(weights), t, list(lora_As), list(lora_Bs),
                list(cores), list(out_scales), ctx.scales, ctx.dropout_p, seed, ctx.activation, needs,
                ctx.backend, torch.are_deterministic_algorithms_enabled())
            if need_x and out[0].numel() > 0:
                grads[0] = out[0].reshape(_dx_shape(grad_outs, weights))
            slots = ([base + 2 * n + i for i in range(n)] + [base + 3 * n + i for i in range(n)]
                     + [base + 4 * n + i for i in range(n)] + [base + 5 * n + i for i in range(n)]
                     + [base + n + i for i in range(n)])
            for slot, flag, g in zip(slots, needs[1:], out[1:]):
                if flag and grad_ys[(slot - base) % n] is not None:
                    grads[slot] = g
        for i in range(n):
            if need_w[i] and grad_ys[i] is not None:
                grads[base + i] = grad_ys[i].t() @ x2d                            # dW_i = dY_iᵀ X
        return tuple(grads)


def _dx_shape(grad_outs, weights):
    """The shape of dX: x's leading dims (from any output gradient) and k."""
    g = next(g for g in grad_outs if g is not None)
    return (*g.shape[:-1], weights[0].shape[1])


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------

def _per_projection(value, n: int, name: str, allow_none_list: bool = True) -> list:
    """``value`` as a list of n entries: a sequence of length n, or ``None`` (n ``None``s)."""
    if value is None and allow_none_list:
        return [None] * n
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple with one entry per projection (n={n}), "
                        f"got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name} must have one entry per projection: length {n} (as weights), "
                         f"got {len(value)}")
    return list(value)


def lowrank_linear_group(x: Tensor, weights: Sequence[Tensor], biases: Optional[Sequence[Optional[Tensor]]],
                         lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor], *,
                         cores: Optional[Sequence[Optional[Tensor]]] = None,
                         out_scales: Optional[Sequence[Optional[Tensor]]] = None,
                         scales: Union[float, Sequence[float]] = 1.0, dropout_p: float = 0.0,
                         activation: Optional[str] = None, seed: Optional[int] = None) -> tuple[Tensor, ...]:
    """Several low-rank projections of the same ``x`` (q/k/v, gate/up) with one pass over x.

    Returns ``(Y_1, …, Y_n)`` with ``Y_i = x W_iᵀ + b_i + s_i·(σ(D(x) A_iᵀ) core_iᵀ) B_iᵀ ⊙ o_i``,
    equal to :func:`fastpeft.lowrank_linear` per projection called with one ``seed``: T for
    every adapter comes from one product with the concatenated A (one read of x), and the
    Triton backend then runs each projection's GEMM with the adapter in its epilogue.

    Args:
        x: input ``[..., k]``, shared by every projection.
        weights: n base weights ``[d_i, k]``. biases: ``None`` or n entries ``[d_i]`` / ``None``.
        lora_As: n ``[r_i, k]``. lora_Bs: n ``[d_i, r_i]`` (each projection its own d and r).
        cores: ``None`` or n entries ``None`` / ``[r_i]`` / ``[r_i, r_i]``.
        out_scales: ``None`` or n entries ``None`` / ``[d_i]``.
        scales: one number for all, or n numbers.
        dropout_p: dropout on the adapter input. The mask belongs to x: one mask for the whole
            group, regenerated from ``seed`` in backward (``None`` draws one).
        activation: ``None``, ``"relu"``, ``"gelu"`` or ``"silu"`` for every adapter.

    Backward: dX sums every projection's contribution; each other gradient only where needed.
    Saved for backward: T ``[M, Σ r_i]`` and the seed, plus x itself only when some A_i trains.

    >>> import torch, fastpeft
    >>> x = torch.randn(2, 5, 16)
    >>> ws = [torch.randn(8, 16), torch.randn(4, 16)]
    >>> As, Bs = [torch.randn(2, 16), torch.randn(3, 16)], [torch.randn(8, 2), torch.randn(4, 3)]
    >>> q, k = fastpeft.lowrank_linear_group(x, ws, None, As, Bs, scales=0.5)
    >>> torch.allclose(k, fastpeft.lowrank_linear(x, ws[1], None, As[1], Bs[1], scale=0.5), atol=1e-5)
    True
    """
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise TypeError("weights must be a non-empty list or tuple of [d_i, k] tensors, got "
                        f"{type(weights).__name__}")
    n = len(weights)
    weights = list(weights)
    biases = _per_projection(biases, n, "biases")
    lora_As = _per_projection(lora_As, n, "lora_As", allow_none_list=False)
    lora_Bs = _per_projection(lora_Bs, n, "lora_Bs", allow_none_list=False)
    cores = _per_projection(cores, n, "cores")
    out_scales = _per_projection(out_scales, n, "out_scales")
    if isinstance(scales, (list, tuple)):
        scales = _per_projection(scales, n, "scales")
    else:
        scales = [scales] * n
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
    tensors = autocast_args(x, *weights, *biases, *lora_As, *lora_Bs, *cores, *out_scales)
    x = tensors[0]
    weights, biases, lora_As, lora_Bs, cores, out_scales = (list(tensors[1 + j * n:1 + (j + 1) * n]) for j in range(6))
    for i in range(n):
        try:
            validate_lowrank_args(x, weights[i].shape, weights[i].dtype, weights[i].device, biases[i],
                                  lora_As[i], lora_Bs[i], cores[i], out_scales[i], scales[i], dropout_p,
                                  activation, seed)
        except (TypeError, ValueError) as err:
            raise type(err)(f"projection {i} (weights[{i}], lora_As[{i}], lora_Bs[{i}], ...): {err}") from None
    backend = _backend.resolve_backend(OP_NAME, x.device)
    seed_t = seed_tensor(seed, float(dropout_p))
    return apply_function(LowRankLinearGroupFunction, x, tuple(float(s) for s in scales), float(dropout_p), seed_t,
                          activation, backend, *weights, *biases, *lora_As, *lora_Bs, *cores, *out_scales)

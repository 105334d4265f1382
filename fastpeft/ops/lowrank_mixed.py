"""Several adapters in one batch: each sample (batch dim 0) runs with its own adapter, or none.

For X [M, k] (x [B, ..., k] flattened; the rows of sample b are its ``M / B`` consecutive rows)
and adapters i = 0..n-1, R_i the rows whose sample uses adapter i::

    Y = X Wᵀ + b                                            one base GEMM over all M rows
    Y[R_i] += s_i·(σ_i(D_i(X[R_i]) A_iᵀ) S_iᵀ) B_iᵀ ⊙ o_i    per adapter, over its rows only

The base GEMM runs once over all rows in batch order. Adapters of one rank, activation and core
kind without dropout (the usual serving batch) then run together: their samples are gathered once
into an [n, S, ...] grid (each adapter's padded to the largest count S; :meth:`MixedRows.stacked`,
cached for every layer of a model), T and the delta are two ``bmm`` over the stacked A and B, and
one scatter-add whose factor is the shared scale writes the delta into Y; the gathered X and the
delta share one workspace. Otherwise each adapter reads its own samples' rows (a view when they
are consecutive in the batch, else whole samples gathered) and adds its term into them a sample
at a time. Either way the host work per call is a fixed handful of calls, not PEFT's per-adapter
boolean masks, gathers, scaling and write-backs. Adapters may differ in rank, core (none,
diagonal, full) and out_scale.

Backward, per adapter i with dY_i = dY[R_i] and its saved T_i = D_i(X[R_i]) A_iᵀ::

    dX = dY W;   dX[R_i] += s_i·D_i'(dT_i A_i)         dT_i = (dY_i ⊙ o_i) B_i S_i ⊙ σ_i'(T_i)
    dA_i = s_i·dT_iᵀ D_i(X[R_i]);   dB_i, dS_i, do_i: the one-adapter r-chain on (dY_i, T_i)
    db = Σ_rows dY

so every adapter's gradient is a sum over its own rows only. What backward keeps is the
one-adapter contract: each T_i and a seed (adapter i's dropout mask is regenerated from
``seed + i``); the caller's x itself only when some A (or W) trains; for a 4-bit W the packed
weight, dequantised again for dX.

Backends: ``"torch"`` (the reference, and the CPU implementation; its dropout masks come from
torch's generator) and ``"triton"`` (:mod:`fastpeft.kernels.lowrank_mixed`): forward, the T pass
and the base GEMM's epilogue gather each row tile's adapter, dense and 4-bit W, dropout by the
kernels' Philox mask of ``seed + i`` over adapter i's rows; backward, the pass over dY per
adapter tile, dX = dY W + s_i·D_i'(dT_i A_i) in one GEMM (W dense or 4-bit) and dA_i from the
adapter's own rows (deterministic), the mask regenerated. The torch backend's backward is the
code above, from the saved T_i and its own regenerated masks.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .lowrank import (_dropped, _dropout_scale, activation_fn, apply_core, apply_function, autocast_args,
                      lowrank_bwd_r_torch, seed_tensor, validate_lowrank_args)

__all__ = ["MixedAdapter", "MixedRows", "LowRankMixedFunction", "lowrank_linear_mixed",
           "lowrank_mixed_fwd_torch"]

OP_NAME = "lowrank_linear_mixed"


class MixedAdapter(NamedTuple):
    """One adapter of a mixed batch: its tensors (in x's dtype) and how it runs."""
    lora_A: Tensor
    lora_B: Tensor
    core: Optional[Tensor] = None
    out_scale: Optional[Tensor] = None
    scale: float = 1.0
    dropout_p: float = 0.0
    activation: Optional[str] = None


class MixedRows:
    """Which adapter each sample uses (``-1``: none), and the row orders derived from it.

    ``rows(rows_per_sample, device)`` gives (``order`` [M] int64: the rows of adapter 0, then
    adapter 1, ..., then the rows of no adapter, each group in batch order; ``counts``: rows per
    adapter), for the kernels; ``sample_order(device)`` gives the same order over samples
    (``None`` when the batch is already in that order: nothing to permute), for the torch
    implementation. Both are cached per device, so every layer of a model shares one computation.
    """

    def __init__(self, sample_adapter: Sequence[int], n_adapters: int):
        ids = [int(i) for i in sample_adapter]
        bad = [i for i in ids if not -1 <= i < n_adapters]
        if bad:
            raise ValueError(f"sample_adapter entries must be in [-1, {n_adapters - 1}], got {bad[:5]}")
        self.sample_adapter = tuple(ids)
        self.n_adapters = n_adapters
        groups: list[list[int]] = [[] for _ in range(n_adapters + 1)]      # the last: no adapter
        for b, i in enumerate(ids):
            groups[i].append(b)
        self.samples_of = groups[:n_adapters]
        self.base_samples = groups[n_adapters]
        self._samples = [b for group in groups for b in group]
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.sample_adapter)

    def rows(self, rows_per_sample: int, device) -> tuple[Tensor, list[int]]:
        key = ("rows", rows_per_sample, torch.device(device))
        if key not in self._cache:
            order = torch.tensor(self._samples, dtype=torch.int64)
            order = (order[:, None] * rows_per_sample + torch.arange(rows_per_sample)).reshape(-1)
            counts = [len(group) * rows_per_sample for group in self.samples_of]
            self._cache[key] = (order.to(device), counts)
        return self._cache[key]

    def selections(self, device) -> list:
        """Per adapter: ``None`` (no samples), a slice (consecutive samples) or an int64 index of
        its samples on ``device``."""
        key = ("selections", torch.device(device))
        if key not in self._cache:
            out = []
            for group in self.samples_of:
                if not group:
                    out.append(None)
                elif group == list(range(group[0], group[0] + len(group))):
                    out.append(slice(group[0], group[0] + len(group)))
                else:
                    out.append(torch.tensor(group, dtype=torch.int64, device=device))
            self._cache[key] = out
        return self._cache[key]

    def stacked(self, adapters: tuple, device) -> Optional[tuple[Tensor, Tensor, int, bool]]:
        """The samples of ``adapters`` (indexes with samples) in one [n, S] grid, each adapter's
        padded to S, the largest count: (gather: int64 [n·S] sample of each slot, a padding slot
        repeating the adapter's first; scatter: the same with padding slots sent to sample B,
        a row past the batch; S; whether any slot pads). ``None`` when padding would add more
        than half the adapters' samples (a loop over adapters then costs less)."""
        key = ("stacked", adapters, torch.device(device))
        if key not in self._cache:
            groups = [self.samples_of[i] for i in adapters]
            S = max(len(g) for g in groups)
            real = sum(len(g) for g in groups)
            if len(groups) * S > real + real // 2:
                self._cache[key] = None
            else:
                gather = [g + [g[0]] * (S - len(g)) for g in groups]
                scatter = [g + [len(self)] * (S - len(g)) for g in groups]
                as_index = lambda rows: torch.tensor([b for g in rows for b in g], dtype=torch.int64, device=device)
                self._cache[key] = (as_index(gather), as_index(scatter), S, len(groups) * S > real)
        return self._cache[key]


# --------------------------------------------------------------------------------------------
# Pure-torch implementation
# --------------------------------------------------------------------------------------------

def _seed_of(seed: int, i: int) -> int:
    return (int(seed) + i) & 0x7FFFFFFF


def _base_weight(weight, quant_state, dtype):
    if quant_state is None:
        return weight
    from .lowrank_4bit import dequantize_weight
    return dequantize_weight(weight, quant_state, dtype)


def _rows_of(t2d: Tensor, sel, batch: int) -> Tensor:
    """The rows of samples ``sel`` of a 2-D [M, n] tensor holding ``batch`` samples of consecutive
    rows: a view for a slice, else whole samples gathered (index_select: contiguous blocks)."""
    if isinstance(sel, slice):
        return t2d.reshape(batch, -1)[sel].view(-1, t2d.shape[1])
    return t2d.reshape(batch, -1).index_select(0, sel).view(-1, t2d.shape[1])


def _add_samples(per_sample: Tensor, index: Tensor, value: Tensor, alpha: float) -> None:
    """``per_sample[index] += alpha·value`` in place, whole samples ([S, ·] rows) at a time."""
    if per_sample.device.type == "cpu":
        per_sample.index_add_(0, index, value, alpha=alpha)
    else:       # index_put_ has a deterministic mode on CUDA, index_add_ has not
        per_sample.index_put_((index,), value if alpha == 1.0 else value.mul(alpha), accumulate=True)


def _add_rows(t2d: Tensor, sel, value: Tensor, alpha: float, batch: int) -> None:
    """``t2d[rows of sel] += alpha·value`` in place: whole samples at a time (a long vector add
    per sample, so the scatter stays fast on a CPU)."""
    per_sample = t2d.view(batch, -1)
    if isinstance(sel, slice):
        per_sample[sel].add_(value.view(sel.stop - sel.start, -1), alpha=alpha)
    else:
        _add_samples(per_sample, sel, value.view(len(sel), -1), alpha)


def _stackable(adapters) -> bool:
    """Whether adapters run as one batched product: one rank, activation and core kind, out_scales
    all present or all absent, no dropout."""
    first = adapters[0]
    kind = lambda a: (a.lora_A.shape[0], a.activation, None if a.core is None else a.core.dim(),
                      a.out_scale is None, a.dropout_p == 0.0)
    return first.dropout_p == 0.0 and all(kind(a) == kind(first) for a in adapters)


def _linear_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], extra_rows: int) -> tuple[Tensor, Tensor]:
    """``X Wᵀ + b`` written into the first M rows of an [M + extra_rows, d] buffer: (Y, buffer)."""
    if not extra_rows:
        y = F.linear(x, weight, bias)
        return y, y
    buf = x.new_empty((x.shape[0] + extra_rows, weight.shape[0]))
    y = buf[:x.shape[0]]
    if bias is None:
        torch.mm(x, weight.t(), out=y)
    else:
        torch.addmm(bias, x, weight.t(), out=y)
    return y, buf


_SCRATCH = threading.local()
SCRATCH_BYTES = 16 << 20


def _workspace(numel: int, like: Tensor) -> Tensor:
    """A scratch vector of ``numel`` elements in ``like``'s dtype. On a CPU, up to
    :data:`SCRATCH_BYTES` of it are kept per thread from one call to the next: a fresh buffer of
    megabytes comes back from the allocator as fresh pages, whose faults (the kernel zeroing
    them) cost more than the adapter's products at serving sizes. Nothing that a call returns or
    saves lives in it."""
    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or nbytes > SCRATCH_BYTES or torch.compiler.is_compiling():
        return like.new_empty(numel)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != like.dtype or buf.numel() < numel:
        buf = _SCRATCH.buf = like.new_empty(max(numel, SCRATCH_BYTES // like.element_size() // 4))
    return buf[:numel]


def _fwd_stacked(x, w, bias, plan: MixedRows, adapters, live, grid):
    """The adapters ``live`` as batched products over their samples' rows, gathered into one
    [n, S·L, k] grid (``grid``: :meth:`MixedRows.stacked`): T = X_g Aᵀ and the delta by two
    ``bmm``, then one scatter-add into Y (the scale folded into it when the adapters share one)."""
    gather, scatter, S, pads = grid
    batch, n = len(plan), len(live)
    rows = x.shape[0] // batch
    y, buf = _linear_into(x, w, bias, rows if pads else 0)
    group = [adapters[i] for i in live]
    first = group[0]
    k, d, r = x.shape[1], w.shape[0], first.lora_A.shape[0]
    grid_rows = n * S * rows
    # one workspace: the gathered X, then (once read) the delta; the stacked A and B after it
    work = _workspace(grid_rows * max(k, d) + n * r * (k + d), x)
    a_stack = torch.stack([a.lora_A for a in group], out=work[-n * r * (k + d):-n * r * d].view(n, r, k))
    b_stack = torch.stack([a.lora_B for a in group], out=work[-n * r * d:].view(n, d, r))
    xg = torch.index_select(x.view(batch, -1), 0, gather, out=work[:grid_rows * k].view(n * S, rows * k))
    t = torch.bmm(xg.view(n, S * rows, k), a_stack.transpose(1, 2))               # T = X_g Aᵀ
    u = activation_fn(t, first.activation)
    if first.core is not None:
        core = torch.stack([a.core for a in group])
        u = u * core[:, None, :] if core.dim() == 2 else torch.bmm(u, core.transpose(1, 2))
    scales = [a.scale for a in group]
    alpha = scales[0]                                   # one scale: folded into the scatter-add
    if len(set(scales)) > 1:
        alpha, u = 1.0, u * torch.tensor(scales, dtype=u.dtype, device=u.device)[:, None, None]
    delta = torch.bmm(u, b_stack.transpose(1, 2), out=work[:grid_rows * d].view(n, S * rows, d))
    if first.out_scale is not None:
        delta.mul_(torch.stack([a.out_scale for a in group])[:, None, :])
    _add_samples(buf.view(-1, rows * buf.shape[1]), scatter, delta.view(n * S, -1), alpha)
    ts: list = [None] * len(adapters)
    for j, i in enumerate(live):
        ts[i] = t[j, :len(plan.samples_of[i]) * rows]
    return y, ts


def lowrank_mixed_fwd_torch(x, weight, bias, plan: MixedRows, adapters, quant_state, seed: int):
    """Forward on 2-D x [M, k] (``len(plan)`` samples of M / len(plan) rows each): (Y [M, d],
    [T_i of each adapter with rows, else None]). One base GEMM over all rows. Adapters of one
    rank and kind without dropout run as batched products over their samples gathered into one
    grid (:func:`_fwd_stacked`); otherwise each adapter reads its own samples' rows (a view when
    they are consecutive) and adds its term into them."""
    w = _base_weight(weight, quant_state, x.dtype)
    live = tuple(i for i, a in enumerate(adapters) if a is not None and plan.samples_of[i])
    if len(live) > 1 and _stackable([adapters[i] for i in live]):
        grid = plan.stacked(live, x.device)
        if grid is not None:
            return _fwd_stacked(x, w, bias, plan, adapters, live, grid)
    y = F.linear(x, w, bias)                                             # one base GEMM
    batch = len(plan)
    ts: list = [None] * len(adapters)
    selections = plan.selections(x.device)
    for i in live:
        a, sel = adapters[i], selections[i]
        xi = _dropped(_rows_of(x, sel, batch), a.dropout_p, _seed_of(seed, i))
        t = xi @ a.lora_A.t()                                            # T_i = D_i(X_i) A_iᵀ
        u = apply_core(activation_fn(t, a.activation), a.core)
        if isinstance(sel, slice) and a.out_scale is None:               # in place on a view
            _rows_of(y, sel, batch).addmm_(u, a.lora_B.t(), alpha=a.scale)
        else:
            delta = u @ a.lora_B.t()
            if a.out_scale is not None:
                delta.mul_(a.out_scale)
            _add_rows(y, sel, delta, a.scale, batch)                     # += s_i·(U_i B_iᵀ) ⊙ o_i
        ts[i] = t
    return y, ts


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

_FIELDS = 4   # lora_A, lora_B, core, out_scale per adapter in the flat argument list


class LowRankMixedFunction(torch.autograd.Function):
    """Autograd of the mixed op (module docstring); ``meta`` = (the :class:`MixedRows` plan,
    [(scale, dropout_p, activation) or None per adapter], quant_state, seed, backend)."""

    @staticmethod
    def forward(ctx, x, weight, bias, meta, *flat):
        plan, specs, quant_state, seed, backend = meta
        adapters = _adapters(specs, flat)
        x2d = x.reshape(-1, x.shape[-1])
        if backend == "triton":
            from ..kernels.lowrank_mixed import lowrank_mixed_fwd
            order, counts = plan.rows(x2d.shape[0] // len(plan), x.device)
            y, ts = lowrank_mixed_fwd(x2d, weight, bias, order, counts, adapters, quant_state, seed=seed)
        else:
            y, ts = lowrank_mixed_fwd_torch(x2d, weight, bias, plan, adapters, quant_state, seed)
        keep_x = weight.requires_grad or any(a is not None and a.lora_A.requires_grad for a in adapters)
        present = [i for i, t in enumerate(ts) if t is not None]
        ctx.save_for_backward(x if keep_x else None, weight, *flat, *(ts[i] for i in present))
        ctx.meta, ctx.present, ctx.has_bias = meta, present, bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        plan, specs, quant_state, seed, backend = ctx.meta
        saved = ctx.saved_tensors
        x, weight = saved[:2]
        flat = saved[2:2 + _FIELDS * len(specs)]
        ts = dict(zip(ctx.present, saved[2 + _FIELDS * len(specs):]))
        adapters = _adapters(specs, flat)
        need = ctx.needs_input_grad
        need_x, need_w, need_bias = need[0], need[1], need[2] and ctx.has_bias
        grad_y = grad_out.reshape(-1, grad_out.shape[-1])
        x2d = None if x is None else x.reshape(-1, x.shape[-1])
        dx = d_w = d_bias = None
        grads = [None] * len(flat)
        if need_w:
            d_w = grad_y.t() @ x2d                                               # dW = dYᵀ X
        if need_bias:
            d_bias = grad_y.sum(0)                                               # db = Σ dY
        if backend == "triton":                                                  # the kernels
            dx, per_adapter = _bwd_triton(ctx, grad_y, x2d, weight, quant_state, adapters, ts, need_x)
            for i, g in enumerate(per_adapter):
                if g is not None:
                    grads[_FIELDS * i:_FIELDS * (i + 1)] = g
            if dx is not None:
                dx = dx.reshape(grad_out.shape[:-1] + (dx.shape[-1],))
            return (dx, d_w, d_bias, None, *grads)
        if need_x:
            dx = grad_y @ _base_weight(weight, quant_state, grad_y.dtype)        # dY W
        batch = len(plan)
        for i, sel in enumerate(plan.selections(grad_y.device)):
            if i not in ts:
                continue
            a, base = adapters[i], _FIELDS * i
            need_a, need_b = need[4 + base], need[5 + base]
            need_core = need[6 + base] and a.core is not None
            need_os = need[7 + base] and a.out_scale is not None
            gy = _rows_of(grad_y, sel, batch)
            d_t, d_b, d_core, d_os = lowrank_bwd_r_torch(
                gy, ts[i], a.lora_B, a.core, a.out_scale, a.scale, a.activation,
                need_x or need_a, need_b, need_core, need_os)
            drop = None
            if a.dropout_p > 0.0 and (need_x or need_a):                         # D_i, regenerated
                drop = _dropout_scale(_seed_of(seed, i), gy.shape[0], a.lora_A.shape[1], a.dropout_p,
                                      d_t.dtype, grad_y.device)
            if need_x:                                                           # += s_i·D_i'(dT_i A_i)
                part = d_t @ a.lora_A
                _add_rows(dx, sel, part if drop is None else part.mul_(drop), a.scale, batch)
            if need_a:
                xi = _rows_of(x2d, sel, batch)
                xi = xi if drop is None else xi * drop.to(xi.dtype)
                grads[base] = (d_t.t() @ xi) * a.scale                          # dA_i = s_i·dT_iᵀ D_i(X_i)
            grads[base + 1], grads[base + 2], grads[base + 3] = d_b, d_core, d_os
        if dx is not None:
            dx = dx.reshape(grad_out.shape[:-1] + (dx.shape[-1],))
        return (dx, d_w, d_bias, None, *grads)


def _bwd_triton(ctx, grad_y, x2d, weight, quant_state, adapters, ts: dict, need_x: bool):
    """dX and each adapter's (dA, dB, dcore, dout_scale) by the Triton kernels
    (:func:`fastpeft.kernels.lowrank_mixed.lowrank_mixed_bwd`)."""
    from ..kernels.lowrank_mixed import lowrank_mixed_bwd

    plan, need = ctx.meta[0], ctx.needs_input_grad
    order, counts = plan.rows(grad_y.shape[0] // len(plan), grad_y.device)
    needs = [(need[4 + _FIELDS * i], need[5 + _FIELDS * i], need[6 + _FIELDS * i], need[7 + _FIELDS * i])
             for i in range(len(adapters))]
    return lowrank_mixed_bwd(grad_y.contiguous(), x2d, weight, order, counts, adapters,
                             [ts.get(i) for i in range(len(adapters))], need_x, needs, quant_state,
                             seed=ctx.meta[3])


def _adapters(specs, flat):
    out = []
    for i, spec in enumerate(specs):
        if spec is None:
            out.append(None)
            continue
        a, b, core, out_scale = flat[_FIELDS * i:_FIELDS * (i + 1)]
        out.append(MixedAdapter(a, b, core, out_scale, *spec))
    return out


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

_backend.register_impl(OP_NAME, "torch", lambda: None, lambda device: None)
_backend.register_triton(OP_NAME, "lowrank_mixed")


def _triton_supports(adapters) -> Optional[str]:
    acts = {a.activation for a in adapters if a is not None}
    if len(acts) > 1:
        return f"the adapters of one mixed batch must share one activation for the Triton kernels, got {acts}"
    return None


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def lowrank_linear_mixed(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         adapters: Sequence[Optional[MixedAdapter]],
                         sample_adapter: Union[Sequence[int], MixedRows], *, quant_state=None,
                         seed: Optional[int] = None, check_adapters: bool = True) -> Tensor:
    """``y[b] = x[b] Wᵀ + bias + (adapter sample_adapter[b] applied to x[b])`` for every sample b.

    Args:
        x: input ``[B, ..., k]``; batch dim 0 holds the samples.
        weight: base weight ``[d, k]``, or the packed 4-bit weight with ``quant_state``.
        bias: ``[d]`` or ``None``.
        adapters: :class:`MixedAdapter` tuples (``None`` for an adapter that this layer lacks:
            its samples get the base alone), tensors in x's dtype; ranks, cores and out_scales
            may differ.
        sample_adapter: B indexes into ``adapters`` (``-1``: no adapter), or a
            :class:`MixedRows` built from them (reused by every layer of a model).
        seed: dropout seed (adapter i uses ``seed + i``); drawn when ``None``.
        check_adapters: ``False`` skips the per-adapter shape checks (fastpeft's layers pass
            adapters whose shapes were checked when they were added; dtypes are checked always).

    Returns ``[B, ..., d]`` in x's dtype; each sample equals running it alone with its adapter.

    >>> import torch, fastpeft
    >>> from fastpeft.ops.lowrank_mixed import MixedAdapter, lowrank_linear_mixed
    >>> x, w = torch.randn(3, 5, 16), torch.randn(8, 16)
    >>> a1 = MixedAdapter(torch.randn(4, 16), torch.randn(8, 4), scale=2.0)
    >>> a2 = MixedAdapter(torch.randn(2, 16), torch.randn(8, 2))
    >>> y = lowrank_linear_mixed(x, w, None, [a1, a2], [1, -1, 0])
    >>> torch.allclose(y[1], x[1] @ w.t())
    True
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension and features [B, ..., k], got shape {tuple(x.shape)}")
    adapters = list(adapters)
    if not isinstance(sample_adapter, MixedRows):
        sample_adapter = MixedRows(sample_adapter, len(adapters))
    elif sample_adapter.n_adapters != len(adapters):
        raise ValueError(f"sample_adapter indexes {sample_adapter.n_adapters} adapters but "
                         f"{len(adapters)} were given")
    if len(sample_adapter) != x.shape[0]:
        raise ValueError(f"sample_adapter must name one adapter per sample: got {len(sample_adapter)} "
                         f"for a batch of {x.shape[0]} (x of shape {tuple(x.shape)})")
    if quant_state is not None:
        shape, wdtype = tuple(quant_state.shape), None
    else:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        shape, wdtype = tuple(weight.shape), weight.dtype
    flat, specs = [], []
    autocast = quant_state is None and torch.is_autocast_enabled(x.device.type)
    x_ = autocast_args(x)[0] if autocast else x
    for i, a in enumerate(adapters):
        if a is None:
            flat += [None] * _FIELDS
            specs.append(None)
            continue
        if not isinstance(a, MixedAdapter):
            raise TypeError(f"adapters[{i}] must be a MixedAdapter or None, got {type(a).__name__}")
        lora_a, lora_b, core, out_scale = a.lora_A, a.lora_B, a.core, a.out_scale
        if autocast:
            _, lora_a, lora_b, core, out_scale = autocast_args(x, lora_a, lora_b, core, out_scale)
        if check_adapters:
            validate_lowrank_args(x_, shape, wdtype, weight.device, bias, lora_a, lora_b, core, out_scale,
                                  a.scale, a.dropout_p, a.activation, None)
        elif (lora_a.dtype != x_.dtype or lora_b.dtype != x_.dtype or (core is not None and core.dtype != x_.dtype)
              or (out_scale is not None and out_scale.dtype != x_.dtype)):
            raise TypeError(f"adapters[{i}]'s tensors must have x's dtype {x_.dtype}")
        flat += [lora_a, lora_b, core, out_scale]
        specs.append((float(a.scale), float(a.dropout_p), a.activation))
    if quant_state is None:
        x, weight, bias = autocast_args(x, weight, bias)
    if x.shape[-1] != shape[1]:
        raise ValueError(f"x must have last dimension k={shape[1]} to match the weight [d={shape[0]}, "
                         f"k={shape[1]}], got x of shape {tuple(x.shape)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    dropout = any(s is not None and s[1] > 0.0 for s in specs)
    seed = int(seed_tensor(seed, 0.5 if dropout else 0.0))
    backend = _resolve(x.device, _triton_supports(adapters))
    meta = (sample_adapter, specs, quant_state, seed, backend)
    return apply_function(LowRankMixedFunction, x, weight, bias, meta, *flat)


def _resolve(device, reason: Optional[str]) -> str:
    """The backend: the requested one (``"auto"``: Triton on CUDA where it supports the call)."""
    requested = _backend.get_backend()
    if requested == "auto":
        if device.type != "cuda" or reason is not None:
            return "torch"
        return _backend.resolve_backend(OP_NAME, device, "auto")
    backend = _backend.resolve_backend(OP_NAME, device, requested)
    if backend == "triton" and reason is not None:
        raise RuntimeError(f"backend 'triton' cannot run {OP_NAME}: {reason}")
    return backend

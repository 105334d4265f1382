"""Triton launchers for several low-rank projections of one input (``fastpeft.kernels.lowrank_group``).

For X [M, k] and projections i = 1..n (q/k/v, gate/up) with W_i [d_i, k], A_i [r_i, k],
B_i [d_i, r_i], core S_i, out_scale o_i, scale s_i, and one dropout mask D on X::

    T = D(X) [A_1; …; A_n]ᵀ = [T_1 … T_n];   U = σ(T) blockdiag(S_1, …, S_n)ᵀ = [U_1 … U_n]
    Y_i = X W_iᵀ + b_i + s_i·(U_i B_iᵀ) ⊙ o_i

Forward: ONE launch of the dense module's T kernel (``_lowrank_fwd_t_kernel``) over X with the
concatenated A (r = Σ r_i, padded to a power of two >= 16) and the block-diagonal core (identity
blocks for adapters without a core; a [Σ r_i] vector when every core is diagonal or absent),
then each projection's GEMM with the adapter epilogue (``_lowrank_fwd_gemm_kernel``) reading its
column slice of U. Groups with Σ r_i > MAX_RANK run one T pass per run of adapters that fits.

Backward, from the dY_i that reach it (dT_i = (G_i S_i) ⊙ σ'(T_i), G_i = (dY_i ⊙ o_i) B_i):
  * per projection, the dense module's pass over dY_i (one launch): dT_i written into its column
    slice of one [M, Σ r_i] dT, dB_i, dS_i, do_i, db_i;
  * ``_lowrank_group_bwd_dx_kernel``: dX = D'(Σ_i s_i·dT_i A_i) + Σ_i dY_i W_i in one GEMM
    (up to :data:`MAX_PAIRS` (dY_i, W_i) pairs in its main loop, further ones added by plain
    GEMMs; the adapter term, with the concatenated dT and A, initialises the accumulator): dX
    written once. Not autotuned: the first tile the dense dX kernel's prune rule keeps;
  * dA_i = s_i·dT_iᵀ D(X): the dense module's dA kernel over [dT_1 … dT_n] (one launch, one read
    of X for every adapter, per-row scales s_i/(1-p) where they differ) writing one [Σ r_i, k] dA
    whose row blocks are the dA_i; its split-M partials are summed in a fixed order in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common, lowrank
from ._common import _grouped_pid, _keep_mask, _op
from .lowrank_bwd import lowrank_bwd_da, lowrank_bwd_dy

__all__ = ["lowrank_group_fwd", "lowrank_group_bwd", "MAX_PAIRS"]

MAX_PAIRS = 4
_R_CHUNK = 16


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _dx_add_dy_w(acc, dy_ptr, w_ptr, rm, rn, M, N, K, stride_dym, stride_wk, dtype: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += dY W for one projection: dY [M, K=d] and W [K=d, N=k], unit inner strides. Rows
    past M and columns past N read wrapped addresses (never stored): the loop masks only along d."""
    rk = tl.arange(0, BLOCK_K)
    dy_rows = dy_ptr + (rm % M).to(tl.int64)[:, None] * stride_dym
    w_cols = w_ptr + (rn % N)[None, :]
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        dyt = tl.load(dy_rows + kk[None, :], mask=mask_k[None, :], other=0.0)
        wt = tl.load(w_cols + kk.to(tl.int64)[:, None] * stride_wk, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(_op(dyt, dtype, UPCAST), _op(wt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    return acc


def _dx_keep(configs, arch: int, smem: int, M: int, K: int, R: int, elem: int, dropout: bool):
    """The dX GEMM's tiles that fit: the dense dX kernel's rule (the adapter prologue is
    r-chunked, so R counts only through the sm_80 register rule). On sm_90 the pairs loop keeps
    every pair's pointers, sizes and strides live, and a 4-warp 64×64 tile with BLOCK_K = 64
    spills there (the static checks read it in the SASS): such tiles are left out on sm_90."""
    keep = _common._gemm_keep(configs, arch, smem, M, K, max(16, min(_common.MAX_RANK, _common._pow2(R))), elem,
                        dx=True, dropout=dropout)
    if arch == 90:
        fits = [c for c in keep if not (c.num_warps == 4 and c.kwargs["BLOCK_K"] >= 64
                                        and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 64 * 64)]
        keep = fits or keep
    return keep


def _prune_dx(configs, named_args, **kwargs):
    args = _common._prune_args(named_args, kwargs)
    arch, smem, _ = _common._limits_of(args["dt_ptr"])
    return _dx_keep(configs, arch, smem, args["M_KEY"], args["N"], args["R"], args["dt_ptr"].element_size(),
                    args["HAS_DROPOUT"])


@triton.autotune(configs=_common._DX_CONFIGS,
                 key=["M_KEY", "N", "D0", "D1", "D2", "D3", "R", "N_PAIRS", "HAS_COL_SCALE", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_dx})
@triton.jit(do_not_specialize=["seed"])
def _lowrank_group_bwd_dx_kernel(
    dy0_ptr, w0_ptr, dy1_ptr, w1_ptr, dy2_ptr, w2_ptr, dy3_ptr, w3_ptr,
    dt_ptr, a_ptr, cs_ptr, dx_ptr,
    M, N, D0, D1, D2, D3, R, M_KEY,
    stride_dy0, stride_dy1, stride_dy2, stride_dy3, stride_w0, stride_w1, stride_w2, stride_w3,
    stride_dxm,
    seed, dropout_p, adapter_scale,
    N_PAIRS: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX [M, N=k] = c·D'(dT (cs ⊙ A)) + Σ_{j < N_PAIRS} dY_j W_j.

    dT [M, R] and A [R, N] are the concatenated dT_i and A_i; ``cs`` [R] the per-column scales
    s_i (HAS_COL_SCALE; else every s_i equals ``adapter_scale``·(1-p)); c = ``adapter_scale``;
    D'(V) = mask ⊙ V with the mask regenerated from the seed (1/(1-p) is in c). The adapter term
    (R_CHUNK columns of R at a time, any R) initialises the accumulator, then one main loop per
    pair adds dY_j W_j: one fp32 tile live, dX written once."""
    dtype = dt_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dt_rows = dt_ptr + rm.to(tl.int64)[:, None] * R
    for r0 in tl.range(0, R, R_CHUNK, num_stages=1):   # not pipelined: registers
        rc = r0 + tl.arange(0, R_CHUNK)
        mask_c = rc < R
        dtt = tl.load(dt_rows + rc[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        if HAS_COL_SCALE:
            dtt = dtt.to(tl.float32) * tl.load(cs_ptr + rc, mask=mask_c, other=0.0)[None, :]
        at = tl.load(a_ptr + rc.to(tl.int64)[:, None] * N + rn[None, :],
                     mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(_op(dtt, dtype, UPCAST), _op(at, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    acc = acc * tl.to_tensor(adapter_scale).to(tl.float32)
    if HAS_DROPOUT:
        acc = tl.where(_keep_mask(seed, rm, rn, tl.to_tensor(dropout_p).to(tl.float32)), acc, 0.0)
    # one dY_j W_j main loop at a time, the pair chosen at run time (one loop in the code, so
    # the address set-up of every pair is not hoisted and kept live: no spills)
    for j in range(0, N_PAIRS):
        dy_ptr, w_ptr, D, stride_dym, stride_wk = dy0_ptr, w0_ptr, D0, stride_dy0, stride_w0
        if j == 1:
            dy_ptr, w_ptr, D, stride_dym, stride_wk = dy1_ptr, w1_ptr, D1, stride_dy1, stride_w1
        if j == 2:
            dy_ptr, w_ptr, D, stride_dym, stride_wk = dy2_ptr, w2_ptr, D2, stride_dy2, stride_w2
        if j == 3:
            dy_ptr, w_ptr, D, stride_dym, stride_wk = dy3_ptr, w3_ptr, D3, stride_dy3, stride_w3
        acc = _dx_add_dy_w(acc, dy_ptr, w_ptr, rm, rn, M, N, D, stride_dym, stride_wk, dtype, UPCAST,
                           DOT_PRECISION, BLOCK_K)
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rn[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _offsets(ranks) -> list[int]:
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    return offs


def _runs(ranks) -> list[tuple[int, int]]:
    """Consecutive runs [i0, i1) of adapters whose total rank fits one T pass (<= MAX_RANK)."""
    if not ranks:
        return []
    runs, start, total = [], 0, 0
    for i, r in enumerate(ranks):
        _common._block_r(r)                        # a clear error for r > MAX_RANK
        if total + r > _common.MAX_RANK:
            runs.append((start, i))
            start, total = i, 0
        total += r
    runs.append((start, len(ranks)))
    return runs


def _run_core(cores, ranks, like):
    """(kind, tensor) of the concatenated adapters' core: 0 none; 1 a [Σ r] vector (diagonal
    cores, ones where an adapter has none); 2 the block-diagonal [Σ r, Σ r] matrix (identity
    blocks where an adapter has no core, diag(S_i) for a diagonal one)."""
    if all(c is None for c in cores):
        return 0, like
    kw = dict(dtype=like.dtype, device=like.device)
    if all(c is None or c.dim() == 1 for c in cores):
        return 1, torch.cat([c if c is not None else torch.ones(r, **kw) for c, r in zip(cores, ranks)])
    blocks = [torch.eye(r, **kw) if c is None else (torch.diag(c) if c.dim() == 1 else c)
              for c, r in zip(cores, ranks)]
    return 2, torch.block_diag(*blocks).contiguous()


def lowrank_group_fwd(x, weights, biases, lora_As, lora_Bs, cores, out_scales, scales, dropout_p: float,
                      seed: int, activation):
    """Forward on 2-D x [M, k]: returns ([Y_i [M, d_i]], T [M, Σ r_i]), all in x's dtype; T is
    the pre-activation D(X)Aᵀ of every adapter, side by side."""
    _common._check_dtype(x)
    M = x.shape[0]
    ranks = [a.shape[0] for a in lora_As]
    offs = _offsets(ranks)
    act = _common._ACTIVATIONS[activation]
    runs = _runs(ranks)
    kw = dict(dtype=x.dtype, device=x.device)
    t = torch.empty((M, offs[-1]), **kw)
    ys = [torch.empty((M, w.shape[0]), **kw) for w in weights]
    with _common._device(x):
        for i0, i1 in runs:
            c0, c1 = offs[i0], offs[i1]
            a = torch.cat(lora_As[i0:i1]).contiguous() if i1 - i0 > 1 else lora_As[i0].contiguous()
            core_kind, core_c = _run_core(cores[i0:i1], ranks[i0:i1], a)
            t_run = t if len(runs) == 1 else torch.empty((M, c1 - c0), **kw)
            u = torch.empty((M, c1 - c0), **kw) if core_kind != 0 or act != 0 else t_run
            _common._t_pass(x, a, core_c, core_kind, act, dropout_p, seed, t_run, u)     # one read of X
            for i in range(i0, i1):
                lowrank._fwd_gemm(x, weights[i], biases[i], u[:, offs[i] - c0:offs[i + 1] - c0],
                            lora_Bs[i].contiguous(), out_scales[i], scales[i], ys[i])
            if t_run is not t:
                t[:, c0:c1] = t_run
    return ys, t


def _group_dx(pairs, d_t, a, scales, ranks, dropout_p: float, seed: int, M: int, K: int):
    """dX = D'(Σ_i s_i·dT_i A_i) + Σ_j dY_j W_j (see the kernel). ``pairs``: (dY_j, W_j);
    ``d_t`` [M, Σ r_i] and ``a`` [Σ r_i, k] concatenated, ``scales``/``ranks`` per adapter."""
    p = float(dropout_p)
    R = d_t.shape[1]
    dtype, dev = d_t.dtype, d_t.device
    equal = len(set(scales)) == 1
    if equal:            # s applied to the fp32 accumulator, as in the single-projection kernel
        cs, adapter_scale = d_t, scales[0] / (1.0 - p)
    else:
        cs = torch.cat([torch.full((r,), s, dtype=torch.float32, device=dev) for s, r in zip(scales, ranks)])
        adapter_scale = 1.0 / (1.0 - p)
    dx = torch.empty((M, K), dtype=dtype, device=dev)
    head, tail = pairs[:MAX_PAIRS], pairs[MAX_PAIRS:]
    dys = [dy for dy, _ in head] + [d_t] * (MAX_PAIRS - len(head))       # unused slots
    ws = [w.contiguous() for _, w in head] + [a] * (MAX_PAIRS - len(head))
    interp = _common._interpreting()
    if interp:
        fb = dict(BLOCK_M=_common._interp_block(M), BLOCK_N=_common._interp_block(K),
                  BLOCK_K=_common._interp_block(max(dy.shape[1] for dy, _ in head)), num_warps=4, num_stages=1)
    elif not _common._autotuning():
        arch, smem, _ = _common._limits_of(d_t)
        fb = _common._fallback(_dx_keep(_common._DX_CONFIGS, arch, smem, M, K, R, d_t.element_size(), p > 0.0))
    else:
        fb = {}
    args = dict(dt_ptr=d_t, a_ptr=a, cs_ptr=cs, dx_ptr=dx, M=M, N=K, R=R, M_KEY=_common._pow2(M),
                stride_dxm=dx.stride(0), seed=int(seed), dropout_p=p, adapter_scale=float(adapter_scale),
                N_PAIRS=len(head), HAS_COL_SCALE=not equal, HAS_DROPOUT=p > 0.0, UPCAST=interp,
                DOT_PRECISION=_common._dot_precision(dtype), R_CHUNK=_R_CHUNK, GROUP_M=_common._GROUP_M)
    for j, (dy, w) in enumerate(zip(dys, ws)):
        args.update({f"dy{j}_ptr": dy, f"w{j}_ptr": w, f"D{j}": dy.shape[1], f"stride_dy{j}": dy.stride(0),
                     f"stride_w{j}": w.stride(0)})
    _common._launch(_lowrank_group_bwd_dx_kernel,
              lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),), args, fb)
    for dy, w in tail:                       # more than MAX_PAIRS projections: plain GEMMs
        dx.addmm_(dy, w)
    return dx


def lowrank_group_bwd(grad_ys, x, weights, t, lora_As, lora_Bs, cores, out_scales, scales,
                      dropout_p: float, seed: int, activation, need_x: bool, need_As, need_Bs,
                      need_cores, need_out_scales, need_biases, deterministic: bool = False):
    """Backward on 2-D tensors: returns (dX, [dA_i], [dB_i], [dcore_i], [dout_scale_i],
    [dbias_i]), ``None`` where not needed or where no dY_i reaches it (``grad_ys[i] is None``).

    Derivation (module docstring names)::

        dX   = Σ_i dY_i W_i + D'(Σ_i s_i·dT_i A_i)     (every Y_i reads X; one mask)
        dA_i = s_i·dT_iᵀ D(X)                          (T_i = D(X) A_iᵀ)
        dB_i, dS_i, do_i, db_i                          (the single op's, from dY_i and T_i)
    """
    n = len(weights)
    ranks = [a.shape[0] for a in lora_As]
    offs = _offsets(ranks)
    M = t.shape[0]
    p = float(dropout_p)
    dx = None
    d_ts, d_as, d_bs, d_cores, d_oss, d_biases = ([None] * n for _ in range(6))
    live = [i for i in range(n) if grad_ys[i] is not None]
    # dT of every live adapter side by side, each pass over dY_i writing its column slice
    want_t = [i for i in live if need_x or need_As[i]]
    cols = dict(zip(want_t, _offsets([ranks[i] for i in want_t])))
    d_t_all = torch.empty((M, sum(ranks[i] for i in want_t)), dtype=t.dtype, device=t.device) if want_t else None
    for i in live:
        d_t_i = d_t_all[:, cols[i]:cols[i] + ranks[i]] if i in cols else None
        d_ts[i], d_bs[i], d_cores[i], d_oss[i], d_biases[i] = lowrank_bwd_dy(
            grad_ys[i], t[:, offs[i]:offs[i + 1]], lora_Bs[i], cores[i], out_scales[i], scales[i], activation,
            i in cols, need_Bs[i], need_cores[i], need_out_scales[i], need_biases[i], d_t=d_t_i)
    with _common._device(t):
        if need_x and live:
            a = torch.cat([lora_As[i] for i in live]) if len(live) > 1 else lora_As[live[0]].contiguous()
            dx = _group_dx([(grad_ys[i], weights[i]) for i in live], d_t_all, a, [scales[i] for i in live],
                           [ranks[i] for i in live], p, seed, M, weights[live[0]].shape[1])
        want_a = [i for i in live if need_As[i]]
        for i0, i1 in _runs([ranks[i] for i in want_a]):       # one read of X per run of adapters
            run = want_a[i0:i1]
            c0, c1 = cols[run[0]], cols[run[-1]] + ranks[run[-1]]
            if c1 - c0 == sum(ranks[i] for i in run):         # adjacent in d_t_all
                d_t = d_t_all[:, c0:c1]
            else:
                d_t = torch.cat([d_ts[i] for i in run], 1)
            run_scales = [scales[i] / (1.0 - p) for i in run]
            row_scale = None
            if len(set(run_scales)) > 1:
                row_scale = torch.tensor([s for i, s in zip(run, run_scales) for _ in range(ranks[i])],
                                         dtype=torch.float32, device=t.device)
            out = torch.empty((d_t.shape[1], x.shape[1]), dtype=lora_As[run[0]].dtype, device=t.device)
            lowrank_bwd_da(d_t, x, p, seed, run_scales[0], out, row_scale)
            col = 0
            for i in run:                                      # row views of the one dA
                d_as[i] = out[col:col + ranks[i]].to(lora_As[i].dtype)
                col += ranks[i]
    return dx, d_as, d_bs, d_cores, d_oss, d_biases

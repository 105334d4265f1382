"""Fused Triton kernels of the dense low-rank adapter op (``fastpeft.kernels.lowrank``).

For X [M, k], W [d, k], b [d], A [r, k], B [d, r], core S ([r] diagonal or [r, r]), out_scale
o [d], scale s, activation σ and inverted dropout D (keep probability 1-p, kept values scaled by
1/(1-p))::

    T = D(X) Aᵀ;  Z = σ(T);  U = Z Sᵀ | Z ⊙ S | Z
    Y = X Wᵀ + b + s·(U Bᵀ) ⊙ o

Forward, two kernels:
  * ``_lowrank_fwd_t_kernel``: one pass over X: T = D(X)Aᵀ (returned, saved by the caller) and
    U = σ(T)Sᵀ ([M, r], a workspace);
  * ``_lowrank_fwd_gemm_kernel``: Y = X Wᵀ whose epilogue adds b and s·(U Bᵀ)⊙o: Y written once
    (on sm_90 with aligned operands, its TMA twin in :mod:`fastpeft.kernels.lowrank_sm90`).

Backward from dY, with dYo = dY ⊙ o, G = dYo B, H = G S | G ⊙ S | G and dT = H ⊙ σ'(T); at
most three launches, no fill, every sum in a fixed order (bit-identical across runs):
  * ``_lowrank_bwd_dy_kernel``: one pass over dY with two kinds of program. Row programs (BLOCK_M
    rows each) accumulate G over d in registers, then store dT and their partial of dS = s·Gᵀ Z
    (or s·Σ_rows G ⊙ Z); the last row program to finish sums those partials. Column programs
    (BLOCK_N columns of d each) accumulate P_Z = dYᵀ Z and Σ_rows dY over all of M in registers,
    then write dB = s·o ⊙ (P_Z Sᵀ | P_Z ⊙ S), d_o = s·rowsum(B ⊙ P) and db. U = σ(T)Sᵀ is never
    formed: its core is applied to the [d, r] sum instead;
  * ``_lowrank_bwd_dx_kernel``: dX = dY W whose epilogue adds s·D'(dT A), the mask regenerated
    (on sm_90 with aligned operands, its TMA twin);
  * ``_lowrank_bwd_da_kernel``: dA = s·dTᵀ D(X), a skinny GEMM split over M: each program stores
    an fp32 partial and the last program of each column block sums them and writes dA.

"The last program" is found with an int32 counter per column block (:func:`_arrive_last`): each
program arrives with an atomic add after its stores, the one that completes the count reduces
and resets the counter to 0. Counters are zeroed once, when first allocated (:func:`_counters`),
so no launch needs a fill. The Triton interpreter runs programs one after another: the last in
grid order reduces.

Dropout: element (m, c) of X is kept iff ``u >= p`` for the uniform ``u`` that is word ``c % 4``
of Philox4x32-10 with key ``seed`` and counter ``(c // 4, m mod 2³², m >> 32, 0)``: one Philox
call yields the mask of four columns (:func:`_keep_mask`). The mask is regenerated in every kernel that
needs it, never stored. Every accumulation is fp32. r is padded to ``BLOCK_R = max(16,
next_pow2(r))`` (``tl.dot`` needs dims >= 16); r up to :data:`MAX_RANK`. Products with an
[r, r] core and the r-wide GEMM prologues run ``R_CHUNK`` columns of r at a time, so no r-sized
operand sits whole in registers.

Autotuning: every kernel with tiles declares its configs (tile lists per architecture below) and
a prune function that keeps, for the device and r, the tiles whose register and shared-memory
budgets hold (the static tests compile each of them for sm_80 and sm_90 and check the SASS).
``FASTPEFT_AUTOTUNE=0``, and always the Triton interpreter, use one heuristic config instead.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._aot import SMEM_LIMIT

__all__ = ["lowrank_fwd", "lowrank_bwd", "lowrank_bwd_dy", "lowrank_bwd_da", "dropout_keep_mask",
           "MAX_RANK"]

MAX_RANK = 128
_ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "silu": 3}
_GROUP_M = 8

# Tiles per architecture, in order of preference (the first that fits is the heuristic choice
# when autotuning is off). The prune functions below keep, per r and dtype, the tiles whose
# loaded tiles and accumulators fit in registers (the static tests compile every one of them and
# check the SASS for spills). GEMM: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
_GEMM_TILES_SM90 = [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4),
                    (64, 64, 32, 4, 3), (32, 64, 64, 4, 4), (32, 64, 32, 4, 3), (16, 64, 64, 4, 4)]
_GEMM_TILES_SM80 = [(128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 64, 64, 4, 4),
                    (64, 64, 32, 4, 3), (32, 64, 64, 4, 4), (32, 64, 32, 4, 3), (16, 64, 64, 4, 4)]
# dX GEMM: its prologue also draws the dropout mask of a whole output tile
_DX_TILES_SM90 = _GEMM_TILES_SM90
_DX_TILES_SM80 = [(128, 128, 32, 8, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 3), (32, 64, 64, 4, 4),
                  (32, 64, 32, 4, 3), (16, 64, 64, 4, 4)]
# T = D(X)Aᵀ: (BLOCK_M, BLOCK_K, num_warps, num_stages)
_T_TILES_SM90 = [(64, 64, 4, 4), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4), (32, 64, 4, 3), (16, 32, 4, 4), (16, 16, 4, 4)]
_T_TILES_SM80 = [(64, 64, 4, 4), (128, 64, 8, 3), (64, 32, 4, 4), (32, 64, 4, 3), (16, 32, 4, 4), (16, 16, 4, 4)]
# one pass over dY (BLOCK_M chosen by the launcher): (BLOCK_N, num_warps, num_stages)
_DY_TILES_SM90 = [(64, 8, 3), (128, 8, 3), (32, 8, 3), (32, 4, 4), (16, 4, 4)]
_DY_TILES_SM80 = [(32, 4, 4), (32, 8, 3), (16, 4, 4)]
# dA = s·dTᵀD(X): (BLOCK_M, BLOCK_K, num_warps, num_stages)
_DA_TILES_SM90 = [(64, 128, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4), (32, 64, 4, 4), (32, 32, 4, 4), (16, 32, 4, 4)]
_DA_TILES_SM80 = [(64, 64, 4, 4), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 4), (32, 32, 4, 4), (16, 32, 4, 4)]


def _unique(tiles):
    return list(dict.fromkeys(tiles))


_GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bm, bn, bk, w, s in _unique(_GEMM_TILES_SM90 + _GEMM_TILES_SM80)]
_DX_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in _unique(_DX_TILES_SM90 + _DX_TILES_SM80)]
# dX tiles that spill with the dropout epilogue, as `fastpeft inspect` reads them in the SASS
# (bf16, sm_90: 64×128×64 w8s3 takes 255 registers and 97 LDL / 82 STL); pruned when p > 0
_DX_DROPOUT_SPILLS = {90: {(64, 128, 64, 8, 3)}, 80: set()}
# register budgets a thread (32-bit words): one loaded tile, fp32 accumulators, a Philox-masked tile
_TILE_WORDS, _ACC_WORDS, _MASK_VALUES, _DX_MASK_VALUES = 32, 64, 16, 32
_T_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
              for bm, bk, w, s in _unique(_T_TILES_SM90 + _T_TILES_SM80)]
_DY_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bn, w, s in _unique(_DY_TILES_SM90 + _DY_TILES_SM80)]
_DA_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bm, bk, w, s in _unique(_DA_TILES_SM90 + _DA_TILES_SM80)]


# --------------------------------------------------------------------------------------------
# Choosing configs (pure functions of the architecture and the problem, so the static tests
# can replay what the prune functions keep on a GPU they do not have).
# --------------------------------------------------------------------------------------------

def _arch_of(major: int) -> int:
    return 90 if major >= 9 else 80


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _per_thread(elems: int, num_warps: int) -> int:
    return elems // (num_warps * 32)


def _words(elems: int, elem: int, num_warps: int) -> int:
    """Registers a thread for ``elems`` values, counted in 16-bit-value units (fp32 counts 2)."""
    return _per_thread(elems, num_warps) * (2 if elem == 4 else 1)


def _wgmma_rows_ok(arch: int, block_m: int, m_key: int) -> bool:
    """sm_90's wgmma takes 64 rows per warpgroup: a tile of fewer rows falls back to mma.sync,
    so it is kept there only for M < 64 (``m_key``: M rounded up to a power of 2)."""
    return arch != 90 or block_m >= 64 or m_key < 64


def _keep(configs, tiles, tile_of, ok, size_ok):
    """Configs of this arch that fit (``ok``), preferring those not oversized for the problem."""
    mine = [c for c in configs if tile_of(c) in tiles and ok(c)]
    sized = [c for c in mine if size_ok(c)]
    if sized or not mine:
        return sized
    return [min(mine, key=lambda c: sum(c.kwargs.values()))]


def _gemm_tile(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


def _gemm_keep(configs, arch, smem, M, N, block_r, elem, dx=False, dropout=True, store_z=False):
    """Y and dX GEMMs (the r-wide prologue runs R_CHUNK columns at a time, so r does not matter).
    ``store_z``: the DoRA epilogue writes Z and Y from one accumulator, which fits in registers
    only at up to 32 accumulator values per thread."""
    if dx:
        tiles = _DX_TILES_SM90 if arch == 90 else _DX_TILES_SM80
    else:
        tiles = _GEMM_TILES_SM90 if arch == 90 else _GEMM_TILES_SM80

    def ok(c):
        bm, bn, bk, w, s = _gemm_tile(c)
        main = s * (bm * bk + bk * bn) * elem
        tiles = max(_words(bm * bk, elem, w), _words(bk * bn, elem, w))
        acc = _per_thread(bm * bn, w) * (2 if elem == 4 else 1)
        masked = dx and dropout and (_per_thread(bm * bn, w) > _DX_MASK_VALUES
                                     or (bm, bn, bk, w, s) in _DX_DROPOUT_SPILLS[arch])
        # mma.sync (sm_80) holds its operand fragments in registers: with an r >= 64 prologue the
        # accumulator gets half the budget (sm_90's wgmma reads them from shared memory)
        budget = _ACC_WORDS // 2 if arch == 80 and block_r >= 64 else _ACC_WORDS
        return (main <= smem and tiles <= _TILE_WORDS and acc <= budget and not masked
                and _z_fits(store_z, bm, bn, w))

    def size_ok(c):
        bm = c.kwargs["BLOCK_M"]
        return bm <= max(16, _pow2(M)) and c.kwargs["BLOCK_N"] <= max(16, _pow2(N)) and _wgmma_rows_ok(arch, bm, _pow2(M))

    return _keep(configs, tiles, _gemm_tile, ok, size_ok)


def _z_fits(store_z: bool, block_m: int, block_n: int, num_warps: int) -> bool:
    """The row-scale epilogue writing Z and Y from one accumulator (DoRA while m trains) keeps it
    and the two stores' addresses in registers only at up to 32 accumulator values per thread."""
    return not store_z or _per_thread(block_m * block_n, num_warps) <= 32


def _t_keep(configs, arch, smem, M, block_r, elem, dropout=True):
    """T pass: which configs fit on ``arch`` for this r."""
    tiles = _T_TILES_SM90 if arch == 90 else _T_TILES_SM80

    def tile_of(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    def ok(c):
        bm, bk, w, s = tile_of(c)
        main = s * (bm * bk + bk * block_r) * elem
        tiles = max(_words(bm * bk, elem, w), _words(bk * block_r, elem, w))
        acc = _per_thread(bm * block_r, w) * (2 if elem == 4 else 1)
        # sm_80's mma.sync holds operand fragments in registers: at r >= 64 the accumulator gets
        # half the budget (inspect: 128x64 w8s3 at BLOCK_R = 128 spills 4 STL.64 otherwise)
        budget = _ACC_WORDS // 2 if arch == 80 and block_r >= 64 else _ACC_WORDS
        return (main <= smem and tiles <= _TILE_WORDS and acc <= budget
                and not (dropout and _per_thread(bm * bk, w) > _MASK_VALUES))

    def size_ok(c):
        bm = c.kwargs["BLOCK_M"]
        return bm <= max(16, _pow2(M)) and _wgmma_rows_ok(arch, bm, _pow2(M))

    return _keep(configs, tiles, tile_of, ok, size_ok)


def _dy_keep(configs, arch, smem, block_m, N, block_r, elem):
    """dY pass: which configs fit on ``arch`` for this r and the launcher's BLOCK_M."""
    tiles = _DY_TILES_SM90 if arch == 90 else _DY_TILES_SM80

    def tile_of(c):
        return (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    def ok(c):
        bn, w, s = tile_of(c)
        main = s * (block_m * bn + bn * block_r) * elem + block_m * block_r * elem
        tiles = max(_words(block_m * bn, elem, w), _words(bn * block_r, elem, w))
        # 32-bit registers for G and the partial dYᵀU (fp32) and U together
        live = _per_thread(block_m * block_r + bn * block_r, w) + _per_thread(block_m * block_r * elem // 4, w)
        budget = _ACC_WORDS if arch == 90 else _ACC_WORDS // 2      # sm_80: operand fragments too
        # sm_80, r = 64: the 8-warp BLOCK_N = 32 tile spills 8 bytes as launched (fastpeft inspect)
        spills = arch == 80 and block_r >= 64 and w == 8
        return (main <= smem and tiles <= _TILE_WORDS and live <= budget
                and _per_thread(bn * block_r, w) <= 16 and not spills)

    def size_ok(c):
        return c.kwargs["BLOCK_N"] <= max(16, _pow2(N))

    return _keep(configs, tiles, tile_of, ok, size_ok)


def _da_keep(configs, arch, smem, M, K, block_r, elem, dropout=True):
    """dA: which configs fit on ``arch`` for this r."""
    tiles = _DA_TILES_SM90 if arch == 90 else _DA_TILES_SM80

    def tile_of(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    def ok(c):
        bm, bk, w, s = tile_of(c)
        main = s * (block_r * bm + bm * bk) * elem
        tiles = max(_words(block_r * bm, elem, w), _words(bm * bk, elem, w))
        acc = _per_thread(block_r * bk, w) * (2 if elem == 4 else 1)
        return (main <= smem and tiles <= _TILE_WORDS and acc <= _ACC_WORDS
                and not (dropout and _per_thread(bm * bk, w) > _MASK_VALUES))

    def size_ok(c):
        return c.kwargs["BLOCK_M"] <= max(16, _pow2(M)) and c.kwargs["BLOCK_K"] <= max(16, _pow2(K))

    return _keep(configs, tiles, tile_of, ok, size_ok)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int, int]:
    """(arch list, shared memory per block, SM count) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or SMEM_LIMIT[_arch_of(props.major)]
    return _arch_of(props.major), int(smem), int(props.multi_processor_count)


def _limits_of(tensor) -> tuple[int, int, int]:
    return _device_limits(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())


def _elem(args) -> int:
    return args["x_ptr"].element_size() if "x_ptr" in args else args["dy_ptr"].element_size()


def _prune_args(named_args, kwargs) -> dict:
    """A prune function's view of the launch arguments. Every non-tensor argument a prune
    function reads must be in its kernel's autotune key (a static test checks it): otherwise a
    config chosen for one value would be reused for another the prune treats differently."""
    return {**named_args, **kwargs}


def _prune_gemm(configs, named_args, **kwargs):
    args = _prune_args(named_args, kwargs)
    arch, smem, _ = _limits_of(args["x_ptr"])
    return _gemm_keep(configs, arch, smem, args["M_KEY"], args["N"], args["BLOCK_R"], _elem(args),
                      store_z=bool(args.get("STORE_Z", False)))


def _prune_dx(configs, named_args, **kwargs):
    args = _prune_args(named_args, kwargs)
    arch, smem, _ = _limits_of(args["dy_ptr"])
    return _gemm_keep(configs, arch, smem, args["M_KEY"], args["N"], args["BLOCK_R"], _elem(args), dx=True,
                      dropout=args["HAS_DROPOUT"])


def _prune_t(configs, named_args, **kwargs):
    args = _prune_args(named_args, kwargs)
    arch, smem, _ = _limits_of(args["x_ptr"])
    return _t_keep(configs, arch, smem, args["M_KEY"], args["BLOCK_R"], _elem(args), args["HAS_DROPOUT"])


def _prune_dy(configs, named_args, **kwargs):
    args = _prune_args(named_args, kwargs)
    arch, smem, _ = _limits_of(args["dy_ptr"])
    return _dy_keep(configs, arch, smem, args["BLOCK_M"], args["N"], args["BLOCK_R"], _elem(args))


def _prune_da(configs, named_args, **kwargs):
    args = _prune_args(named_args, kwargs)
    arch, smem, _ = _limits_of(args["x_ptr"])
    return _da_keep(configs, arch, smem, args["M_KEY"], args["K"], args["BLOCK_R"], _elem(args), args["HAS_DROPOUT"])


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _op(v, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """A dot operand: in ``dtype`` (tensor cores), or fp32 under the interpreter (whose bf16
    arithmetic is wrong)."""
    if UPCAST:
        out = v.to(tl.float32)
    else:
        out = v.to(dtype)
    return out


@triton.jit
def _act_fwd(t, ACTIVATION: tl.constexpr):
    """σ(t) on fp32: 0 identity, 1 relu, 2 gelu (erf), 3 silu."""
    if ACTIVATION == 1:
        z = tl.maximum(t, 0.0)
    elif ACTIVATION == 2:
        z = 0.5 * t * (1.0 + tl.erf(t * 0.7071067811865476))
    elif ACTIVATION == 3:
        z = t * tl.sigmoid(t)
    else:
        z = t
    return z


@triton.jit
def _act_grad(t, ACTIVATION: tl.constexpr):
    """σ'(t) on fp32: relu 1[t>0]; gelu Φ(t) + t·φ(t); silu sig(t)·(1 + t·(1 - sig(t)))."""
    if ACTIVATION == 1:
        g = tl.where(t > 0.0, 1.0, 0.0)
    elif ACTIVATION == 2:
        g = 0.5 * (1.0 + tl.erf(t * 0.7071067811865476)) + t * tl.exp(-0.5 * t * t) * 0.3989422804014327
    elif ACTIVATION == 3:
        sg = tl.sigmoid(t)
        g = sg * (1.0 + t * (1.0 - sg))
    else:
        g = t * 0.0 + 1.0
    return g


@triton.jit
def _keep_mask(seed, rows, cols, dropout_p):
    """Keep-mask [len(rows), len(cols)] for a run of columns that starts at a multiple of 4 (every
    tile's does). One Philox call per 4 columns, all four of its words used: element (m, c) is
    kept iff word c % 4 of Philox(key = seed, counter = (c // 4, m mod 2³², m >> 32, 0)), as a
    uniform in [0, 1), is >= p."""
    BLOCK_N: tl.constexpr = cols.shape[0]
    group = tl.max(tl.reshape(cols // 4, (BLOCK_N // 4, 4)), axis=1).to(tl.uint32)     # c // 4, once
    r64 = rows.to(tl.int64)
    zero = group[None, :] * 0
    lo = r64.to(tl.uint32)[:, None] + zero
    hi = (r64 >> 32).to(tl.uint32)[:, None] + zero
    w0, w1, w2, w3 = tl.philox(seed, group[None, :] + lo * 0, lo, hi, zero + lo * 0)
    # interleave to columns 4g, 4g+1, 4g+2, 4g+3 = w0, w1, w2, w3
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (rows.shape[0], BLOCK_N))
    return tl.uint_to_uniform_float(words) >= dropout_p


@triton.jit
def _grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index → (tile row, tile column), GROUP_M row tiles at a time (L2 reuse of W)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % group_m
    pid_n = (tile % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id → (tile row, tile column) in :func:`_grouped_tile`'s order."""
    return _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _core_tile(core_ptr, R, rows, cols, TRANSPOSED: tl.constexpr):
    """S[rows, cols] (or Sᵀ[rows, cols] = S[cols, rows]) of a contiguous [R, R] core, 0 outside."""
    mask = (rows < R)[:, None] & (cols < R)[None, :]
    if TRANSPOSED:
        tile = tl.load(core_ptr + cols[None, :] * R + rows[:, None], mask=mask, other=0.0)
    else:
        tile = tl.load(core_ptr + rows[:, None] * R + cols[None, :], mask=mask, other=0.0)
    return tile


@triton.jit
def _store_u(z, core_ptr, u_ptr, rm, M, R, CORE: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr):
    """U = Z Sᵀ | Z ⊙ S | Z for the rows ``rm`` (z: fp32 [BLOCK_M, BLOCK_R], 0 on padding). A full
    core is applied R_CHUNK output columns at a time (the [r, r] operand never whole in registers)."""
    dtype = u_ptr.dtype.element_ty
    rr = tl.arange(0, BLOCK_R)
    rows = rm.to(tl.int64)[:, None] * R
    mask_m = (rm < M)[:, None]
    if CORE == 2:
        z_op = _op(z, dtype, UPCAST)
        for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
            rj = j0 + tl.arange(0, R_CHUNK)
            u = tl.dot(z_op, _op(_core_tile(core_ptr, R, rr, rj, True), dtype, UPCAST),
                       input_precision=DOT_PRECISION)
            tl.store(u_ptr + rows + rj[None, :], u.to(dtype), mask=mask_m & (rj < R)[None, :])
    else:
        if CORE == 1:
            z = z * tl.load(core_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
        tl.store(u_ptr + rows + rr[None, :], z.to(dtype), mask=mask_m & (rr < R)[None, :])


# --------------------------------------------------------------------------------------------
# Forward kernels
# --------------------------------------------------------------------------------------------

@triton.autotune(configs=_T_CONFIGS, key=["M_KEY", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_t})
@triton.jit(do_not_specialize=["seed"])
def _lowrank_fwd_t_kernel(
    x_ptr, a_ptr, core_ptr, t_ptr, u_ptr,
    M, K, R, M_KEY,
    stride_xm, stride_xk,
    seed, dropout_p, inv_keep,
    ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_U: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """T = D(X)Aᵀ = (mask ⊙ X)Aᵀ / (1-p) and U = σ(T)Sᵀ | σ(T) ⊙ S for BLOCK_M rows."""
    dtype = x_ptr.dtype.element_ty
    p = tl.to_tensor(dropout_p).to(tl.float32)
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_r = rr < R
    # rows past M and past r read wrapped (valid) addresses and are never stored; the loop masks
    # only along k, and keeps [rows, 1] / [1, cols] base pointers, not whole tiles of pointers
    x_rows = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + (rr % R)[None, :] * K                              # Aᵀ tile [BK, BR]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(_keep_mask(seed, rm, kk, p), xt, 0.0)
        at = tl.load(a_cols + kk[:, None], mask=mask_k[:, None], other=0.0)
        acc = tl.dot(_op(xt, dtype, UPCAST), _op(at, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * tl.to_tensor(inv_keep).to(tl.float32)
    out_offs = rm.to(tl.int64)[:, None] * R + rr[None, :]
    tl.store(t_ptr + out_offs, acc.to(t_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
    if STORE_U:
        z = tl.where(mask_r[None, :], _act_fwd(acc, ACTIVATION), 0.0)   # padded columns: 0
        _store_u(z, core_ptr, u_ptr, rm, M, R, CORE, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK)


@triton.jit
def _adapter_init(u_ptr, b_ptr, os_ptr, bias_ptr, rm, rn, M, N, R, stride_um, scale,
                  HAS_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The accumulator's start: s·(U Bᵀ) ⊙ o + b on a [BLOCK_M, BLOCK_N] tile (R_CHUNK of r at a
    time; U [M, R] with row stride ``stride_um``)."""
    dtype = u_ptr.dtype.element_ty
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u_rows = u_ptr + rm.to(tl.int64)[:, None] * stride_um
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * R
    for r0 in tl.range(0, BLOCK_R, R_CHUNK, num_stages=1):
        rc = r0 + tl.arange(0, R_CHUNK)
        mask_c = rc < R
        u = tl.load(u_rows + rc[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        bt = tl.load(b_cols + rc[:, None], mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(_op(u, dtype, UPCAST), _op(bt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    col_scale = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.to_tensor(scale).to(tl.float32)
    if HAS_OUT_SCALE:
        col_scale = col_scale * tl.load(os_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * col_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _store_y(acc, y_ptr, z_ptr, rs_ptr, bias_ptr, rm, rn, M, N, stride_ym, stride_yn, HAS_BIAS: tl.constexpr,
             HAS_ROW_SCALE: tl.constexpr, STORE_Z: tl.constexpr):
    """The forward GEMMs' epilogue: the accumulator [BLOCK_M, BLOCK_N] (fp32) written to Y.

    Without HAS_ROW_SCALE the accumulator already holds the bias. With it (DoRA) the accumulator
    is Z = X Wᵀ + s·(U Bᵀ) ⊙ o without bias: Z is written beside Y when STORE_Z (z_ptr, Y's
    strides), then Y = c ⊙ Z + b with the row scale c [N] (fp32) and the bias added after it."""
    mask_n = rn < N
    mask = (rm < M)[:, None] & mask_n[None, :]
    offs = rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    if HAS_ROW_SCALE:
        if STORE_Z:
            tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=mask)
        acc = acc * tl.load(rs_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


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


# --------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _arrive_last(cnt_ptr, arrivals):
    """Whether this program is the last of ``arrivals`` programs to reach the int32 counter at
    ``cnt_ptr``; that program resets it to 0, so counters (allocated zeroed once) are 0 again when
    the launch ends and no launch needs a fill. The barrier orders every store of the program
    before its arrival (an acq_rel atomic at GPU scope), so the last one reads every partial."""
    tl.debug_barrier()
    old = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    last = old == arrivals - 1
    if last:
        tl.store(cnt_ptr, 0)
    return last


@triton.jit
def _dy_rows(dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr, dt_ptr, ds_part_ptr, cnt_ptr, dcore_ptr, pid,
             M, N, R, ROW_PROGRAMS, stride_dym, stride_dyn, stride_tm, stride_dtm, scale,
             ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
             COMPUTE_DT: tl.constexpr, COMPUTE_DS: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row program ``pid``: G = dYo B over its BLOCK_M rows (accumulated over d in registers),
    then dT = (G S) ⊙ σ'(T) and this block's dS partial, s·Gᵀ Z | s·Σ_rows G ⊙ Z; the last row
    program sums the dS partials in row-block order into dcore."""
    dtype = dy_ptr.dtype.element_ty
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    mask_mr = mask_m[:, None] & mask_r[None, :]
    t_rows = t_ptr + rm.to(tl.int64)[:, None] * stride_tm
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # rows past M read wrapped addresses: their G and dT are never stored, their Z is 0
    dy_rows = dy_ptr + (rm % M).to(tl.int64)[:, None] * stride_dym
    b_cols = b_ptr + (rr % R)[None, :]
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        dyt = tl.load(dy_rows + rn[None, :] * stride_dyn, mask=mask_n[None, :], other=0.0)
        if HAS_OUT_SCALE:
            osv = tl.load(os_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
            dyo = dyt.to(tl.float32) * osv[None, :]
        else:
            dyo = dyt
        bt = tl.load(b_cols + rn.to(tl.int64)[:, None] * R, mask=mask_n[:, None], other=0.0)
        g = tl.dot(_op(dyo, dtype, UPCAST), _op(bt, dtype, UPCAST), g, input_precision=DOT_PRECISION)
    # T is read back (not kept live across the loop); padded entries give σ(0) = 0
    if COMPUTE_DS:
        if CORE == 2:                    # Gᵀ Z [r, r], fp32 operands (a sum over M with cancellation)
            gt = tl.trans(g)
            for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                rj = j0 + tl.arange(0, R_CHUNK)
                mask_j = mask_m[:, None] & (rj < R)[None, :]
                zj = _act_fwd(tl.load(t_rows + rj[None, :], mask=mask_j, other=0.0).to(tl.float32), ACTIVATION)
                ds = tl.dot(gt, zj, input_precision=DOT_PRECISION)
                tl.store(ds_part_ptr + pid.to(tl.int64) * R * R + rr[:, None] * R + rj[None, :], ds,
                         mask=mask_r[:, None] & (rj < R)[None, :])
        else:                            # Σ_rows G ⊙ Z [r]
            z = _act_fwd(tl.load(t_rows + rr[None, :], mask=mask_mr, other=0.0).to(tl.float32), ACTIVATION)
            tl.store(ds_part_ptr + pid.to(tl.int64) * R + rr, tl.sum(g * z, axis=0), mask=mask_r)
        if _arrive_last(cnt_ptr, ROW_PROGRAMS):
            _sum_core_partials(ds_part_ptr, dcore_ptr, ROW_PROGRAMS, R, scale, CORE, BLOCK_R, R_CHUNK)
    if COMPUTE_DT:
        dt_rows = dt_ptr + rm.to(tl.int64)[:, None] * stride_dtm
        if CORE == 2:                    # H = G S, R_CHUNK output columns at a time
            g_op = _op(g, dtype, UPCAST)
            for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                rj = j0 + tl.arange(0, R_CHUNK)
                mask_j = mask_m[:, None] & (rj < R)[None, :]
                h = tl.dot(g_op, _op(_core_tile(core_ptr, R, rr, rj, False), dtype, UPCAST),
                           input_precision=DOT_PRECISION)
                if ACTIVATION != 0:
                    tj = tl.load(t_rows + rj[None, :], mask=mask_j, other=0.0).to(tl.float32)
                    h = h * _act_grad(tj, ACTIVATION)
                tl.store(dt_rows + rj[None, :], h.to(dt_ptr.dtype.element_ty), mask=mask_j)
        else:
            h = g
            if CORE == 1:
                h = h * tl.load(core_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
            if ACTIVATION != 0:
                tt = tl.load(t_rows + rr[None, :], mask=mask_mr, other=0.0).to(tl.float32)
                h = h * _act_grad(tt, ACTIVATION)
            tl.store(dt_rows + rr[None, :], h.to(dt_ptr.dtype.element_ty), mask=mask_mr)


@triton.jit
def _sum_core_partials(part_ptr, dcore_ptr, NP, R, scale, CORE: tl.constexpr, BLOCK_R: tl.constexpr,
                       R_CHUNK: tl.constexpr):
    """dcore = s·Σ_i part[i] over the NP row-block partials, in order (R_CHUNK columns of a full
    core at a time); the partials are read past L1 (other programs wrote them)."""
    s = tl.to_tensor(scale).to(tl.float32)
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    if CORE == 2:
        for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
            rj = j0 + tl.arange(0, R_CHUNK)
            offs = rr[:, None] * R + rj[None, :]
            mask = mask_r[:, None] & (rj < R)[None, :]
            acc = tl.zeros((BLOCK_R, R_CHUNK), dtype=tl.float32)
            ptrs = part_ptr + offs
            for _ in range(0, NP):
                acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                ptrs += R * R
            tl.store(dcore_ptr + offs, (acc * s).to(dcore_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        ptrs = part_ptr + rr
        for _ in range(0, NP):
            acc += tl.load(ptrs, mask=mask_r, other=0.0, cache_modifier=".cg")
            ptrs += R
        tl.store(dcore_ptr + rr, (acc * s).to(dcore_ptr.dtype.element_ty), mask=mask_r)


@triton.jit
def _dy_cols(dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr, db_ptr, dos_ptr, dbias_ptr, pid_n,
             M, N, R, stride_dym, stride_dyn, stride_tm, scale,
             ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
             COMPUTE_B: tl.constexpr, COMPUTE_OS: tl.constexpr, COMPUTE_DB: tl.constexpr,
             UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
             R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column program ``pid_n``: over every row of dY, for its BLOCK_N columns, P_Z = dYᵀ Z
    [BLOCK_N, r] and Σ_rows dY in registers, in row order; then P = dYᵀ U = P_Z Sᵀ | P_Z ⊙ S | P_Z,
    dB = s·o ⊙ P, d_o = s·rowsum(B ⊙ P) and db = Σ_rows dY, written once in their dtypes."""
    dtype = dy_ptr.dtype.element_ty
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rb = tl.arange(0, BLOCK_M)
    mask_n = rn < N
    mask_r = rr < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dy_cols = dy_ptr + rn[None, :] * stride_dyn
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + rb
        mask_m = rm < M
        dyt = tl.load(dy_cols + rm.to(tl.int64)[:, None] * stride_dym, mask=mask_m[:, None] & mask_n[None, :],
                      other=0.0)
        if COMPUTE_B or COMPUTE_OS:      # Z of padded rows / columns is σ(0) = 0
            tt = tl.load(t_ptr + rm.to(tl.int64)[:, None] * stride_tm + rr[None, :],
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            z = _act_fwd(tt.to(tl.float32), ACTIVATION)
            acc = tl.dot(tl.trans(_op(dyt, dtype, UPCAST)), _op(z, dtype, UPCAST), acc,
                         input_precision=DOT_PRECISION)
        if COMPUTE_DB:
            acc_b += tl.sum(dyt.to(tl.float32), axis=0)
    s = tl.to_tensor(scale).to(tl.float32)
    if COMPUTE_B or COMPUTE_OS:
        col = tl.zeros((BLOCK_N,), dtype=tl.float32) + s
        if HAS_OUT_SCALE:
            col = col * tl.load(os_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        if CORE == 2:                    # P = P_Z Sᵀ, R_CHUNK output columns at a time
            d_o = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j0 in tl.static_range(0, BLOCK_R, R_CHUNK):
                rj = j0 + tl.arange(0, R_CHUNK)
                mask = mask_n[:, None] & (rj < R)[None, :]
                offs = rn.to(tl.int64)[:, None] * R + rj[None, :]
                p = tl.dot(acc, _core_tile(core_ptr, R, rr, rj, True).to(tl.float32), input_precision=DOT_PRECISION)
                if COMPUTE_B:
                    tl.store(db_ptr + offs, (p * col[:, None]).to(db_ptr.dtype.element_ty), mask=mask)
                if COMPUTE_OS:
                    d_o += tl.sum(tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32) * p, axis=1)
            if COMPUTE_OS:
                tl.store(dos_ptr + rn, (d_o * s).to(dos_ptr.dtype.element_ty), mask=mask_n)
        else:
            p = acc
            if CORE == 1:
                p = p * tl.load(core_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
            mask = mask_n[:, None] & mask_r[None, :]
            offs = rn.to(tl.int64)[:, None] * R + rr[None, :]
            if COMPUTE_B:
                tl.store(db_ptr + offs, (p * col[:, None]).to(db_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_OS:
                b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(dos_ptr + rn, (tl.sum(b * p, axis=1) * s).to(dos_ptr.dtype.element_ty), mask=mask_n)
    if COMPUTE_DB:
        tl.store(dbias_ptr + rn, acc_b.to(dbias_ptr.dtype.element_ty), mask=mask_n)


@triton.autotune(configs=_DY_CONFIGS, key=["M_KEY", "N", "BLOCK_R", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": _prune_dy})
@triton.jit
def _lowrank_bwd_dy_kernel(
    dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr,
    dt_ptr, ds_part_ptr, cnt_ptr, db_ptr, dos_ptr, dbias_ptr, dcore_ptr,
    M, N, R, M_KEY, ROW_PROGRAMS,
    stride_dym, stride_dyn, stride_tm, stride_dtm, scale,
    ACTIVATION: tl.constexpr, CORE: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
    COMPUTE_DT: tl.constexpr, COMPUTE_DS: tl.constexpr, COMPUTE_B: tl.constexpr,
    COMPUTE_OS: tl.constexpr, COMPUTE_DB: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The adapter gradients that need only dY and T, in one launch of two kinds of program.

    Programs [0, ROW_PROGRAMS) each take BLOCK_M rows (:func:`_dy_rows`): dT and the dS
    partials, the last of them summing those (``cnt_ptr``). The programs after them each take
    BLOCK_N columns of d (:func:`_dy_cols`): dB, d_o and db, reduced over all of M in registers.
    Every sum runs in a fixed order: results are bit-identical across runs."""
    pid = tl.program_id(0)
    if pid < ROW_PROGRAMS:
        _dy_rows(dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr, dt_ptr, ds_part_ptr, cnt_ptr, dcore_ptr, pid,
                 M, N, R, ROW_PROGRAMS, stride_dym, stride_dyn, stride_tm, stride_dtm, scale,
                 ACTIVATION, CORE, HAS_OUT_SCALE, COMPUTE_DT, COMPUTE_DS, UPCAST, DOT_PRECISION, BLOCK_R,
                 R_CHUNK, BLOCK_M, BLOCK_N)
    else:
        _dy_cols(dy_ptr, t_ptr, core_ptr, b_ptr, os_ptr, db_ptr, dos_ptr, dbias_ptr, pid - ROW_PROGRAMS,
                 M, N, R, stride_dym, stride_dyn, stride_tm, scale, ACTIVATION, CORE, HAS_OUT_SCALE,
                 COMPUTE_B, COMPUTE_OS, COMPUTE_DB, UPCAST, DOT_PRECISION, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)


@triton.jit
def _dx_adapter_init(dt_ptr, a_ptr, rm, rn, M, N, R, seed, dropout_p, adapter_scale,
                     HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dX accumulator's start on a [BLOCK_M, BLOCK_N] tile: s/(1-p)·mask ⊙ (dT A) (R_CHUNK of
    r at a time; dT [M, R] and A [R, N] contiguous; ``adapter_scale`` = s/(1-p)), the mask
    regenerated from the seed."""
    dtype = dt_ptr.dtype.element_ty
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dt_rows = dt_ptr + rm.to(tl.int64)[:, None] * R
    for r0 in tl.range(0, BLOCK_R, R_CHUNK, num_stages=1):   # not pipelined: registers
        rc = r0 + tl.arange(0, R_CHUNK)
        mask_c = rc < R
        dtt = tl.load(dt_rows + rc[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        at = tl.load(a_ptr + rc[:, None] * N + rn[None, :], mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(_op(dtt, dtype, UPCAST), _op(at, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    acc = acc * tl.to_tensor(adapter_scale).to(tl.float32)
    if HAS_DROPOUT:
        acc = tl.where(_keep_mask(seed, rm, rn, tl.to_tensor(dropout_p).to(tl.float32)), acc, 0.0)
    return acc


@triton.autotune(configs=_DX_CONFIGS, key=["M_KEY", "N", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_dx})
@triton.jit(do_not_specialize=["seed"])
def _lowrank_bwd_dx_kernel(
    dy_ptr, w_ptr, dt_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_KEY,
    stride_dym, stride_dyk, stride_wk, stride_wn, stride_dxm, stride_dxn,
    seed, dropout_p, adapter_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX [M, N=k] = s·D'(dT A) + dY W (reduction over K=d): D'(V) = mask ⊙ V / (1-p),
    ``adapter_scale`` = s/(1-p), the mask regenerated from the seed. The adapter term initialises
    the accumulator (one fp32 tile live), then the main loop adds dY W."""
    dtype = dy_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    acc = _dx_adapter_init(dt_ptr, a_ptr, rm, rn, M, N, R, seed, dropout_p, adapter_scale, HAS_DROPOUT, UPCAST,
                           DOT_PRECISION, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N)
    # rows past M / N read wrapped addresses and are never stored: the loop masks only along d
    dy_rows = dy_ptr + (rm % M).to(tl.int64)[:, None] * stride_dym
    w_cols = w_ptr + (rn % N)[None, :] * stride_wn                                    # W tile [BK, BN]
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        dyt = tl.load(dy_rows + kk[None, :] * stride_dyk, mask=mask_k[None, :], other=0.0)
        wt = tl.load(w_cols + kk.to(tl.int64)[:, None] * stride_wk, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(_op(dyt, dtype, UPCAST), _op(wt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rn[None, :] * stride_dxn
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_DA_CONFIGS, key=["M_KEY", "K", "BLOCK_R", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_da})
@triton.jit(do_not_specialize=["seed"])
def _lowrank_bwd_da_kernel(
    dt_ptr, x_ptr, part_ptr, cnt_ptr, da_ptr, rs_ptr,
    M, K, R, M_KEY,
    stride_dtm, stride_xm, stride_xk,
    seed, dropout_p, scale,
    HAS_DROPOUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA [r, k] = c ⊙ dTᵀ (mask ⊙ X) for ``scale`` c = s/(1-p) (or the per-row ``rs`` [r] with
    HAS_ROW_SCALE), written once in dA's dtype. Grid axis 1 splits M: each program stores its
    fp32 partial [r, BLOCK_K], and the last program of a column block (``cnt_ptr``, one counter
    per block of k) sums the partials in split order and writes dA; with one split, no partial."""
    dtype = x_ptr.dtype.element_ty
    p = tl.to_tensor(dropout_p).to(tl.float32)
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    split = tl.num_programs(1)
    rows = tl.cdiv(tl.cdiv(M, split), BLOCK_M) * BLOCK_M
    m_start = pid_s * rows
    m_end = tl.minimum(m_start + rows, M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_k = rk < K
    mask_r = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    # dTᵀ tiles [BR, BM] are zero on rows past this split's end (columns past r wrap and are never
    # stored); X rows and columns read wrapped addresses: products 0 or never stored
    dt_cols = dt_ptr + (rr % R)[:, None]
    x_cols = x_ptr + (rk % K)[None, :] * stride_xk
    rb = tl.arange(0, BLOCK_M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + rb
        mask_m = rm < m_end
        dtt = tl.load(dt_cols + rm.to(tl.int64)[None, :] * stride_dtm, mask=mask_m[None, :], other=0.0)
        xt = tl.load(x_cols + (rm % M).to(tl.int64)[:, None] * stride_xm)
        if HAS_DROPOUT:
            xt = tl.where(_keep_mask(seed, rm, rk, p), xt, 0.0)
        acc = tl.dot(_op(dtt, dtype, UPCAST), _op(xt, dtype, UPCAST), acc, input_precision=DOT_PRECISION)
    offs = rr[:, None] * K + rk[None, :]
    mask = mask_r[:, None] & mask_k[None, :]
    if split > 1:
        tl.store(part_ptr + pid_s.to(tl.int64) * R * K + offs, acc, mask=mask)
        if _arrive_last(cnt_ptr + pid_k, split):
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            ptrs = part_ptr + offs
            for _ in range(0, split):
                acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                ptrs += R * K
            _store_da(acc, da_ptr, rs_ptr, offs, mask, rr, mask_r, scale, HAS_ROW_SCALE)
    else:
        _store_da(acc, da_ptr, rs_ptr, offs, mask, rr, mask_r, scale, HAS_ROW_SCALE)


@triton.jit
def _store_da(acc, da_ptr, rs_ptr, offs, mask, rr, mask_r, scale, HAS_ROW_SCALE: tl.constexpr):
    """dA = c ⊙ acc in dA's dtype: the scalar ``scale``, or the per-row scales ``rs``."""
    if HAS_ROW_SCALE:
        acc = acc * tl.load(rs_ptr + rr, mask=mask_r, other=0.0).to(tl.float32)[:, None]
    else:
        acc = acc * tl.to_tensor(scale).to(tl.float32)
    tl.store(da_ptr + offs, acc.to(da_ptr.dtype.element_ty), mask=mask)


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

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _autotuning() -> bool:
    return not _interpreting() and os.environ.get("FASTPEFT_AUTOTUNE", "1") != "0"


def _dot_precision(dtype) -> str:
    """fp32 inputs: exact fp32 products unless torch allows TF32 for matmuls (as F.linear)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_r(r: int) -> int:
    if r > MAX_RANK:
        raise ValueError(f"the Triton low-rank kernels support r <= {MAX_RANK}, got r={r}; "
                         "use fastpeft.use_backend('torch') for larger ranks")
    return max(16, _pow2(r))


def _r_chunk(block_r: int) -> int:
    """Columns of r per step where an [r, r] or [r, tile] operand would not fit in registers."""
    return min(block_r, 16)


# Largest block a launcher takes under the interpreter (cost grows with programs × steps, so
# small dims run as one block); tests lower it to run several tiles and split partials.
INTERPRET_BLOCK_CAP = 128


def _interp_block(n: int, cap: int | None = None) -> int:
    """Under the interpreter: one block over small dims, at most ``cap`` (default
    :data:`INTERPRET_BLOCK_CAP`)."""
    return min(INTERPRET_BLOCK_CAP if cap is None else cap, max(16, _pow2(n)))


def _launch(kernel, grid, args: dict, fallback: dict):
    """Autotuned launch, or (autotuning off, and always under the interpreter) the heuristic
    ``fallback`` meta-parameters (with ``num_warps``/``num_stages``) on the bare kernel."""
    if _autotuning():
        kernel[grid](**args)
    else:
        kernel.fn[grid](**args, **fallback)


def _fallback(configs) -> dict:
    c = configs[0]
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _check_dtype(x):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton low-rank kernels take float32, float16 or bfloat16, got {x.dtype}")


class _device:
    """The tensors' CUDA device as the current one while launching (no-op on CPU)."""

    def __init__(self, t):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False


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


def _t_pass(x, a, core_c, core_kind: int, act: int, dropout_p: float, seed: int, t, u):
    """One pass over X [M, k]: T = D(X)Aᵀ into ``t`` [M, R] and, when ``u`` is not ``t``,
    U = σ(T)Sᵀ | σ(T) ⊙ S into ``u`` (both contiguous). ``a`` [R, k] contiguous; ``core_c`` the
    contiguous core of kind ``core_kind`` (0 none, 1 [R], 2 [R, R]), any tensor when 0."""
    M, K = x.shape
    R = a.shape[0]
    BR = _block_r(R)
    interp = _interpreting()
    p = float(dropout_p)
    args = dict(x_ptr=x, a_ptr=a, core_ptr=core_c, t_ptr=t, u_ptr=u, M=M, K=K, R=R, M_KEY=_pow2(M),
                stride_xm=x.stride(0), stride_xk=x.stride(1), seed=int(seed), dropout_p=p,
                inv_keep=1.0 / (1.0 - p), ACTIVATION=act, CORE=core_kind, HAS_DROPOUT=p > 0.0,
                STORE_U=u is not t, UPCAST=interp, DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=BR,
                R_CHUNK=_r_chunk(BR))
    if interp:
        fb = dict(BLOCK_M=_interp_block(M), BLOCK_K=_interp_block(K), num_warps=4, num_stages=1)
    elif not _autotuning():
        arch, smem, _ = _limits_of(x)
        fb = _fallback(_t_keep(_T_CONFIGS, arch, smem, M, BR, x.element_size(), p > 0.0))
    else:
        fb = {}
    _launch(_lowrank_fwd_t_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),), args, fb)


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
        arch, smem, _ = _limits_of(x)
        fb = _fallback(_gemm_keep(_GEMM_CONFIGS, arch, smem, M, N, BR, x.element_size(), store_z=z is not None))
    else:
        fb = {}
    _launch(_lowrank_fwd_gemm_kernel,
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
        _t_pass(x, a, core_c, core_kind, act, dropout_p, seed, t, u)
        _fwd_gemm(x, weight, bias, u, lora_B.contiguous(), out_scale, scale, y, row_scale, z)
    return y, t


def _dy_block_m(M: int, block_r: int, elem: int) -> int:
    """Rows per step of the pass over dY (fixed by the launcher: it sets the row programs). G
    [BLOCK_M, r] stays in registers across the pass: fewer rows for larger r and fp32."""
    if _interpreting():
        return _interp_block(M)
    bm = 64 if block_r <= 32 else (32 if block_r <= 64 else 16)
    if elem == 4:
        bm = max(16, bm // 2)
    return min(bm, max(16, _pow2(M)))


# One int32 counter per column block for the last-program reductions, zeroed once when first
# allocated and left at 0 by every launch (:func:`_arrive_last`), so no launch needs a fill.
_COUNTERS: dict = {}
_MIN_BLOCK = 16                          # the smallest column block of any config


class _Allocating:
    """Set while a workspace is allocated (and zeroed) for the first time: ``fastpeft inspect``
    counts what runs then as once-only, not per step."""
    active = False


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters for launches on ``device``'s current stream (launches
    on one stream run in order, so they share one array; each leaves it at 0)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        _Allocating.active = True
        try:
            buf = torch.zeros(max(_pow2(n), 1024), dtype=torch.int32, device=device)
        finally:
            _Allocating.active = False
        _COUNTERS[key] = buf
    return buf


def lowrank_bwd_dy(grad_y, T, lora_B, core, out_scale, scale, activation, need_dt: bool, need_B: bool,
                   need_core: bool, need_out_scale: bool, need_bias: bool, deterministic: bool = True,
                   d_t=None):
    """The adapter gradients that need only dY and T (2-D; T may be a column slice with unit
    column stride), in one launch: returns (dT, dB, dcore, dout_scale, dbias), ``None`` where not
    needed. dT = (G S) ⊙ σ'(T) [M, r] in dY's dtype, without the scale s (it feeds dX = dY W +
    s·D'(dT A) and dA = s·dTᵀ D(X)), written into ``d_t`` when given ([M, r], unit column
    stride). Every reduction runs in a fixed order (``deterministic`` is always honoured). See
    :func:`lowrank_bwd`."""
    _check_dtype(grad_y)
    M, N = grad_y.shape
    R = lora_B.shape[1]
    BR = _block_r(R)
    dev = grad_y.device
    act = _ACTIVATIONS[activation]
    core_kind = 0 if core is None else (1 if core.dim() == 1 else 2)
    need_core = bool(need_core and core is not None)
    need_out_scale = bool(need_out_scale and out_scale is not None)
    b = lora_B.contiguous()
    core_c = core.contiguous() if core is not None else b
    t = T if T.stride(1) == 1 else T.contiguous()
    interp = _interpreting()
    d_b = d_core = d_os = d_bias = None
    if need_dt and d_t is None:
        d_t = torch.empty((M, R), dtype=grad_y.dtype, device=dev)
    elif not need_dt:
        d_t = None
    if need_B:
        d_b = torch.empty_like(b)
    if need_out_scale:
        d_os = torch.empty_like(out_scale)
    if need_bias:
        d_bias = torch.empty((N,), dtype=grad_y.dtype, device=dev)
    if need_core:
        d_core = torch.empty_like(core_c)
    if M == 0:                           # sums over no rows
        for g in (d_b, d_core, d_os, d_bias):
            if g is not None:
                g.zero_()
        return d_t, d_b, d_core, d_os, d_bias
    rows = need_dt or need_core
    cols = need_B or need_out_scale or need_bias
    if not (rows or cols):
        return d_t, d_b, d_core, d_os, d_bias
    with _device(grad_y):
        bm = _dy_block_m(M, BR, grad_y.element_size())
        row_programs = triton.cdiv(M, bm) if rows else 0
        ds_part = cnt = grad_y
        if need_core:
            ds_part = torch.empty((row_programs, core_c.numel()), dtype=torch.float32, device=dev)
            cnt = _counters(dev, 1)
        placeholder = b
        args = dict(dy_ptr=grad_y, t_ptr=t, core_ptr=core_c, b_ptr=b,
                    os_ptr=out_scale if out_scale is not None else b,
                    dt_ptr=d_t if d_t is not None else placeholder, ds_part_ptr=ds_part, cnt_ptr=cnt,
                    db_ptr=d_b if d_b is not None else placeholder, dos_ptr=d_os if d_os is not None else placeholder,
                    dbias_ptr=d_bias if d_bias is not None else placeholder,
                    dcore_ptr=d_core if d_core is not None else placeholder,
                    M=M, N=N, R=R, M_KEY=_pow2(M), ROW_PROGRAMS=row_programs,
                    stride_dym=grad_y.stride(0), stride_dyn=grad_y.stride(1), stride_tm=t.stride(0),
                    stride_dtm=d_t.stride(0) if d_t is not None else R, scale=float(scale),
                    ACTIVATION=act, CORE=core_kind, HAS_OUT_SCALE=out_scale is not None,
                    COMPUTE_DT=need_dt, COMPUTE_DS=need_core, COMPUTE_B=need_B, COMPUTE_OS=need_out_scale,
                    COMPUTE_DB=need_bias, UPCAST=interp, DOT_PRECISION=_dot_precision(grad_y.dtype),
                    BLOCK_R=BR, R_CHUNK=_r_chunk(BR), BLOCK_M=bm)
        if interp:
            fb = dict(BLOCK_N=_interp_block(N), num_warps=4, num_stages=1)
        elif not _autotuning():
            arch, smem, _ = _limits_of(grad_y)
            fb = _fallback(_dy_keep(_DY_CONFIGS, arch, smem, bm, N, BR, grad_y.element_size()))
        else:
            fb = {}
        _launch(_lowrank_bwd_dy_kernel,
                lambda meta: (row_programs + (triton.cdiv(N, meta["BLOCK_N"]) if cols else 0),), args, fb)
    return d_t, d_b, d_core, d_os, d_bias


def _da_split(M: int, K: int, x) -> int:
    """Programs along M of the dA kernel: one per row block under the interpreter, else enough
    to fill the device twice over the blocks of k, at least 256 rows each."""
    if _interpreting():
        return triton.cdiv(M, _interp_block(M))
    _, _, sms = _limits_of(x)
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(K, 64)), triton.cdiv(M, 256)))


def lowrank_bwd_da(d_t, x, dropout_p: float, seed: int, scale, out, row_scale=None):
    """dA = c ⊙ dTᵀ D(X) into ``out`` [r, k] (its dtype) in one launch, for c = s/(1-p) given
    as ``scale`` (or per row of dA: ``row_scale``, fp32 [r], 1/(1-p) included). ``d_t`` [M, r]
    with unit column stride. Split-M partials are fp32 and summed in a fixed order by the last
    program of each column block (bit-identical across runs)."""
    M, K = x.shape
    R = d_t.shape[1]
    BR = _block_r(R)
    if M == 0:
        return out.zero_()
    p = float(dropout_p)
    interp = _interpreting()
    split = _da_split(M, K, x)
    part = torch.empty((split, R * K), dtype=torch.float32, device=x.device) if split > 1 else out
    cnt = _counters(x.device, triton.cdiv(K, _MIN_BLOCK)) if split > 1 else out
    args = dict(dt_ptr=d_t, x_ptr=x, part_ptr=part, cnt_ptr=cnt, da_ptr=out,
                rs_ptr=row_scale if row_scale is not None else out, M=M, K=K, R=R, M_KEY=_pow2(M),
                stride_dtm=d_t.stride(0), stride_xm=x.stride(0), stride_xk=x.stride(1), seed=int(seed),
                dropout_p=p, scale=float(scale), HAS_DROPOUT=p > 0.0, HAS_ROW_SCALE=row_scale is not None,
                UPCAST=interp, DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=BR)
    if interp:
        fb = dict(BLOCK_M=_interp_block(M), BLOCK_K=_interp_block(K), num_warps=4, num_stages=1)
    elif not _autotuning():
        arch, smem, _ = _limits_of(x)
        fb = _fallback(_da_keep(_DA_CONFIGS, arch, smem, M, K, BR, x.element_size(), p > 0.0))
    else:
        fb = {}
    _launch(_lowrank_bwd_da_kernel, lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), split), args, fb)
    return out


def lowrank_bwd(grad_y, x, weight, T, lora_A, lora_B, core, out_scale, scale, dropout_p, seed,
                activation, need_x: bool, need_A: bool, need_B: bool, need_core: bool,
                need_out_scale: bool, need_bias: bool, deterministic: bool = True):
    """Backward on 2-D tensors: returns (dX, dA, dB, dcore, dout_scale, dbias), ``None`` where
    not needed. ``x`` may be ``None`` unless ``need_A``. At most three launches: the pass over dY
    (:func:`lowrank_bwd_dy`), dX, dA (:func:`lowrank_bwd_da`); every reduction runs in a fixed
    order, so results are bit-identical across runs (``deterministic`` is always honoured).

    Derivation (module docstring names)::

        dYo = dY ⊙ o;  G = dYo B;  H = G S | G ⊙ S | G;  dT = H ⊙ σ'(T)
        dX = dY W + s·D'(dT A)                  (∂Y/∂X through the base and the adapter)
        dB = s·dYoᵀ U = s·o ⊙ (dYᵀ Z) Sᵀ        (Y ∋ s·(U Bᵀ) ⊙ o, U = Z Sᵀ)
        d_o = s·rowsum(B ⊙ dYᵀU)               (Σ_m dY[m, j]·(U Bᵀ)[m, j])
        dS = s·Gᵀ Z | s·Σ_rows G ⊙ Z            (U = Z Sᵀ | Z ⊙ S)
        dA = s·dTᵀ D(X)                         (T = D(X) Aᵀ)
        db = Σ_rows dY
    """
    _check_dtype(grad_y)
    if need_A and x is None:
        raise ValueError("lowrank_bwd needs x when need_A is True")
    M, N = grad_y.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    BR = _block_r(R)
    dev = grad_y.device
    a = lora_A.contiguous()
    interp = _interpreting()
    p = float(dropout_p)
    s = float(scale)
    dx = d_a = None
    d_t, d_b, d_core, d_os, d_bias = lowrank_bwd_dy(
        grad_y, T, lora_B, core, out_scale, scale, activation, need_x or need_A, need_B, need_core,
        need_out_scale, need_bias)
    with _device(grad_y):
        if need_x:
            dx = torch.empty((M, K), dtype=grad_y.dtype, device=dev)
            args = dict(dy_ptr=grad_y, w_ptr=weight, dt_ptr=d_t, a_ptr=a, dx_ptr=dx,
                        M=M, N=K, K=N, R=R, M_KEY=_pow2(M),
                        stride_dym=grad_y.stride(0), stride_dyk=grad_y.stride(1),
                        stride_wk=weight.stride(0), stride_wn=weight.stride(1),
                        stride_dxm=dx.stride(0), stride_dxn=dx.stride(1),
                        seed=int(seed), dropout_p=p, adapter_scale=s / (1.0 - p),
                        HAS_DROPOUT=p > 0.0, UPCAST=interp, DOT_PRECISION=_dot_precision(grad_y.dtype),
                        BLOCK_R=BR, R_CHUNK=_r_chunk(BR), GROUP_M=_GROUP_M)
            from . import lowrank_sm90
            if lowrank_sm90.tma_ok(grad_y, weight, tf32=False):    # sm_90, aligned: TMA + wgmma
                lowrank_sm90.bwd_dx(args, grad_y)
            else:
                _dx_pointer(args, grad_y, p > 0.0)

        if need_A:
            d_a = lowrank_bwd_da(d_t, x, p, seed, s / (1.0 - p), torch.empty_like(a))
    return dx, d_a, d_b, d_core, d_os, d_bias


def _dx_pointer(args: dict, grad_y, dropout: bool):
    """The dX GEMM with pointer (cp.async) loads: ``args`` of :func:`_lowrank_bwd_dx_kernel`."""
    M, N = args["M"], args["N"]
    if _interpreting():
        fb = dict(BLOCK_M=_interp_block(M), BLOCK_N=_interp_block(N), BLOCK_K=_interp_block(args["K"]),
                  num_warps=4, num_stages=1)
    elif not _autotuning():
        arch, smem, _ = _limits_of(grad_y)
        fb = _fallback(_gemm_keep(_DX_CONFIGS, arch, smem, M, N, args["BLOCK_R"], grad_y.element_size(), dx=True,
                                  dropout=dropout))
    else:
        fb = {}
    _launch(_lowrank_bwd_dx_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
            args, fb)

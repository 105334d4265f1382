"""Building blocks shared by the Triton kernel modules (``fastpeft.kernels._common``).

Names as in :mod:`fastpeft.kernels.lowrank`: X [M, k], A [r, k], B [d, r], core S ([r] or
[r, r]), T = D(X)Aᵀ, Z = σ(T), U = Z Sᵀ | Z ⊙ S | Z. The dense (:mod:`~fastpeft.kernels.lowrank`,
:mod:`~fastpeft.kernels.lowrank_bwd`), sm_90 (:mod:`~fastpeft.kernels.lowrank_sm90`), grouped,
mixed-batch, DoRA and 4-bit modules take from here:

* choosing configs: the architecture's budgets (``_arch_of``, ``_device_limits``, ``_limits_of``),
  register counting (``_per_thread``, ``_words``), ``_keep`` (the configs that fit, preferring
  those not oversized for the problem), the tile lists, ``_gemm_keep`` and prune functions of the
  dense GEMMs (forward Y and backward dX, also the grouped dX) and of the T pass;
* ``@triton.jit`` helpers: dot operands (``_op``), σ and σ' (``_act_fwd``, ``_act_grad``), the
  Philox dropout mask (``_keep_mask``), the grouped tile order (``_grouped_tile``,
  ``_grouped_pid``), core tiles and U (``_core_tile``, ``_store_u``), the forward GEMMs'
  accumulator start and epilogue (``_adapter_init``, ``_store_y``) and the last-program
  reduction's counter (``_arrive_last``);
* the T pass, T = D(X)Aᵀ and U in one pass over X: ``_lowrank_fwd_t_kernel`` and its launcher
  ``_t_pass``, used by the dense, grouped and 4-bit forwards;
* launching: ``_interpreting``, ``_autotuning``, ``_dot_precision``, ``_block_r`` (r padded to
  ``BLOCK_R = max(16, next_pow2(r))``, up to :data:`MAX_RANK`), ``_r_chunk``, ``_interp_block``
  (``INTERPRET_BLOCK_CAP``), ``_launch`` / ``_fallback``, ``_check_dtype``, ``_device`` and the
  zeroed-once int32 counters of the last-program reductions (``_counters``).

``_launch``, ``_limits_of``, ``_prune_args`` and ``INTERPRET_BLOCK_CAP`` are looked up in this
module when called (``_common._launch(...)`` in the other modules), so that replacing them here
(the tests' recorders, ``fastpeft inspect``'s stand-in device) reaches every kernel module.

Dropout: element (m, c) of X is kept iff ``u >= p`` for the uniform ``u`` that is word ``c % 4``
of Philox4x32-10 with key ``seed`` and counter ``(c // 4, m mod 2³², m >> 32, 0)``: one Philox
call yields the mask of four columns (:func:`_keep_mask`). The mask is regenerated in every
kernel that needs it, never stored. Every accumulation is fp32; ``tl.dot`` needs dims >= 16,
hence the padding of r. Products with an [r, r] core and the r-wide GEMM prologues run
``R_CHUNK`` columns of r at a time, so no r-sized operand sits whole in registers.

Autotuning: every kernel with tiles declares its configs (tile lists per architecture) and a
prune function that keeps, for the device and r, the tiles whose register and shared-memory
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
# The T pass; the forward GEMMs' accumulator start and epilogue; the last-program counter
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


# --------------------------------------------------------------------------------------------
# Launching
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

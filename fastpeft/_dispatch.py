"""The dispatch table: which implementation ``"auto"`` runs for a dense low-rank problem on a GPU.

On CUDA tensors the dense op has two implementations worth choosing between: the fused Triton
kernels and the composed path (the ``"torch"`` backend: cuBLAS's base GEMM plus small adapter
GEMMs). Which is faster depends on the GPU and the problem, so ``"auto"`` looks the problem up
in a table shipped with the package (``fastpeft/dispatch.json``), keyed by

    (op, arch, dtype, M bucket, k, d, r, dropout on/off)

with, per row, the measured time of each implementation for the forward alone (calls without an
autograd graph) and for forward + backward (training calls), and the faster of each. The M
buckets end at :data:`M_BUCKETS` (``M <= 16``, ``17..64``, ..., ``> 16384``).

A problem without a measured row follows the static prediction (:func:`static_choice`), from the
floors and predictions of bench/NOTES.md (M = 8192, k = d = 4096, bf16; one pass over X or Y,
64 MiB, costs 20 µs on an H100, 14 µs on an H200; base GEMM floor 279 µs, forward + backward
558 µs; fused kernels predicted at 1.12-1.25x F.linear forward and 1.2-1.35x the base step):

- ``M <= 1024``: the composed path. The weight's read (or the launches' host time) dominates;
  the passes over X and Y that fusion saves are at most a few MB and stay in L2, while the
  pointer-based Triton main loop is predicted at 85-92 % of cuBLAS.
- ``M > 1024`` in a training call, or with dropout: the fused kernels. The composed backward
  casts dY to fp32 for the r-dim chain and reads that copy twice (dB, G), and writes dT A as an
  [M, k] tensor that the base dX GEMM reads and rewrites: with the forward's three, about 14
  extra passes over [M, k] / [M, d] tensors (the fused step: 3), 1.35-1.50x the base step
  against 1.2-1.35x fused. Dropout adds about 8 passes in each direction (the mask is drawn as
  int32 words, masked, compared into an [M, k] 0/1 tensor and multiplied into X).
- ``M > 1024``, forward only, no dropout: the composed path's 3 extra passes (X again for T,
  Y read and written by the adapter's addmm) come to 1.15-1.21x F.linear. On sm_90 with 16-bit
  operands whose rows are 16-byte multiples (k and d multiples of 8), the fused forward runs the
  TMA/wgmma main loop (:mod:`fastpeft.kernels.lowrank_sm90`), predicted at 1.05-1.10x: the fused
  kernels. Elsewhere (sm_80, fp32, odd k or d) the pointer main loop's 1.12-1.25x overlaps the
  composed range: a tie goes to cuBLAS, which ``auto`` must never be slower than.

``fastpeft bench --update-dispatch`` rewrites the table from a GPU run
(:mod:`fastpeft.benchmark.dispatch`). ``FASTPEFT_DISPATCH_TABLE`` names another table file
(tests, or a table measured on one's own GPU); it is read at the first lookup, and each problem's
answer is remembered (a few µs of host time per call would matter when decoding). A table that
cannot be read or is malformed is never fatal to a model: ``auto`` warns once, naming the file
and the fault, and follows the static prediction.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch

__all__ = ["TABLE_ENV", "TABLE_OPS", "M_BUCKETS", "OPEN_BUCKET", "DEFAULT_TABLE", "FORMAT", "MODES",
           "KEY_FIELDS", "table_path", "m_bucket", "row_key", "static_choice", "choose", "device_arch",
           "load_table", "read_table", "validate_table", "clear_cache"]

TABLE_ENV = "FASTPEFT_DISPATCH_TABLE"
DEFAULT_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch.json")
FORMAT = 1
# upper ends of the M buckets (the last one is open): 1..16, 17..64, ..., 4097..16384, > 16384
M_BUCKETS = (16, 64, 256, 1024, 4096, 16384)
OPEN_BUCKET = "inf"
STATIC_MAX_M_COMPOSED = 1024      # static prediction: composed path up to this M
MODES = ("fwd", "fwd+bwd")        # forward-only calls, training calls
BACKENDS = ("triton", "torch")
TABLE_OPS = {"lowrank_linear": "dense"}   # backend op name -> the table's (and the benchmark's) op
KEY_FIELDS = ("op", "arch", "dtype", "M_bucket", "k", "d", "r", "dropout")


def table_path() -> str:
    """The table file ``auto`` reads: ``$FASTPEFT_DISPATCH_TABLE``, else the shipped one."""
    return os.environ.get(TABLE_ENV) or DEFAULT_TABLE


def m_bucket(M: int):
    """The bucket of ``M`` (tokens per call): the bucket's upper end, or ``"inf"`` above 16384."""
    for end in M_BUCKETS:   # a plain loop (not bisect): torch.compile traces it
        if M <= end:
            return end
    return OPEN_BUCKET


def row_key(op: str, arch: str, dtype: str, M_bucket, k: int, d: int, r: int, dropout: bool) -> tuple:
    return (op, arch, dtype, M_bucket, int(k), int(d), int(r), bool(dropout))


def static_choice(problem: dict, arch: Optional[str] = None) -> str:
    """The predicted faster implementation, ``"triton"`` or ``"torch"``, for ``problem`` on a GPU
    of compute capability ``arch`` (``"sm_90"``; None: an unknown one) (module docstring)."""
    return _static(m_bucket(problem["M"]), problem["dropout_p"] > 0.0, bool(problem.get("grad", False)),
                   _tma_forward(arch, _dtype_name(problem["dtype"]), int(problem["k"]), int(problem["d"])))


def _tma_forward(arch: Optional[str], dtype: str, k: int, d: int) -> bool:
    """Whether the fused forward GEMM takes the sm_90 TMA main loop (16-bit, 16-byte rows)."""
    return arch == "sm_90" and dtype in ("float16", "bfloat16") and k % 8 == 0 and d % 8 == 0


def _static(bucket, dropout: bool, grad: bool, tma_forward: bool = False) -> str:
    if bucket != OPEN_BUCKET and bucket <= STATIC_MAX_M_COMPOSED:   # a bucket boundary: M <= 1024
        return "torch"
    return "triton" if dropout or grad or tma_forward else "torch"


# -- the table file -----------------------------------------------------------------------------

def _check_row(i: int, row) -> None:
    where = f"rows[{i}]"
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not an object")
    missing = [f for f in KEY_FIELDS if f not in row]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    for f in ("op", "arch", "dtype"):
        if not isinstance(row[f], str):
            raise ValueError(f"{where}.{f} must be a string, got {row[f]!r}")
    for f in ("k", "d", "r"):
        if isinstance(row[f], bool) or not isinstance(row[f], int) or row[f] < 1:
            raise ValueError(f"{where}.{f} must be a positive integer, got {row[f]!r}")
    if row["M_bucket"] != OPEN_BUCKET and row["M_bucket"] not in M_BUCKETS:
        raise ValueError(f"{where}.M_bucket must be one of {list(M_BUCKETS) + [OPEN_BUCKET]}, "
                         f"got {row['M_bucket']!r}")
    if not isinstance(row["dropout"], bool):
        raise ValueError(f"{where}.dropout must be true or false, got {row['dropout']!r}")
    modes = [m for m in MODES if m in row]
    if not modes:
        raise ValueError(f"{where} has no measured mode ({' or '.join(MODES)})")
    for mode in modes:
        entry = row[mode]
        if not isinstance(entry, dict) or entry.get("backend") not in BACKENDS:
            raise ValueError(f"{where}.{mode} must be an object whose backend is one of {BACKENDS}")


def validate_table(data) -> dict:
    """The lookup dict ``{row_key: row}`` of a parsed table; ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("the table is not a JSON object")
    if data.get("format") != FORMAT:
        raise ValueError(f"format must be {FORMAT}, got {data.get('format')!r}")
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise ValueError("rows must be a list")
    lookup = {}
    for i, row in enumerate(rows):
        _check_row(i, row)
        key = row_key(*(row[f] for f in KEY_FIELDS))
        if key in lookup:
            raise ValueError(f"rows[{i}] repeats the problem of an earlier row")
        lookup[key] = row
    return lookup


def read_table(path: str) -> tuple[dict, dict]:
    """(the parsed file, its lookup dict); ValueError naming ``path`` and the fault."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise ValueError(f"dispatch table {path} cannot be read ({err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"dispatch table {path} is not valid JSON ({err})") from None
    try:
        return data, validate_table(data)
    except ValueError as err:
        raise ValueError(f"dispatch table {path} is malformed: {err}") from None


_cache: dict[str, dict] = {}


def load_table(path: Optional[str] = None) -> dict:
    """The lookup dict of the table at ``path`` (default :func:`table_path`), read once and
    cached; a table that cannot be used warns once and gives an empty dict (the static
    prediction everywhere)."""
    path = path or table_path()
    lookup = _cache.get(path)
    if lookup is None:
        try:
            lookup = read_table(path)[1]
        except ValueError as err:
            warnings.warn(f"{err}; backend 'auto' follows the static prediction "
                          "(fastpeft bench --update-dispatch rewrites the table)", RuntimeWarning, stacklevel=3)
            lookup = {}
        _cache[path] = lookup
    return lookup


def clear_cache() -> None:
    """Forget the tables read and the choices made so far (after rewriting a table, or changing
    ``FASTPEFT_DISPATCH_TABLE`` in a running process)."""
    _cache.clear()
    _arch_cache.clear()
    _choices.clear()


# -- lookup -------------------------------------------------------------------------------------

_arch_cache: dict = {}


def device_arch(device: torch.device) -> str:
    """``"sm_XY"`` of a CUDA device (cached per device index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = _arch_cache.get(index)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(index)
        arch = _arch_cache[index] = f"sm_{major}{minor}"
    return arch


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def choose(op: str, device: torch.device, problem: dict) -> str:
    """``"triton"`` or ``"torch"`` for ``problem`` (a dict with M, k, d, r, dropout_p, dtype and
    grad, whether the call records an autograd graph) on the CUDA ``device``: the table's
    measured choice for the call's mode (the other mode's when only that one was measured),
    else the static prediction. Answers are remembered per problem (:func:`clear_cache`)."""
    return _choose(op, device.index, problem["dtype"], m_bucket(problem["M"]), int(problem["k"]),
                   int(problem["d"]), int(problem["r"]), problem["dropout_p"] > 0.0, bool(problem.get("grad", False)))


_choices: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def _choose(*key) -> str:
    # torch.compile calls this while tracing and keeps its answer (it reads a file, and the key
    # is made of constants: M enters through its bucket, on which the compiled graph guards)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _lookup(*key)
    return choice


def _lookup(op: str, index, dtype, bucket, k: int, d: int, r: int, dropout: bool, grad: bool) -> str:
    arch = device_arch(torch.device("cuda", index) if index is not None else torch.device("cuda"))
    row = load_table().get(row_key(TABLE_OPS[op], arch, _dtype_name(dtype), bucket, k, d, r, dropout))
    if row is not None:
        mode = "fwd+bwd" if grad else "fwd"
        entry = row.get(mode) or row.get(MODES[1 - MODES.index(mode)])
        return entry["backend"]
    return _static(bucket, dropout, grad, _tma_forward(arch, _dtype_name(dtype), k, d))

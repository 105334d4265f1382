"""4-bit NF4 / FP4 block quantisation in bitsandbytes' exact layout, in pure torch.

The format (SPEC section 5), for a weight ``W`` with ``n = W.numel()`` elements:

* ``W`` is flattened and cut into blocks of ``blocksize`` consecutive elements (the last block
  may be short); each block has one fp32 ``absmax = max |w|`` over the block;
* every element is replaced by the index (0..15) of the nearest entry of a 16-entry code table
  (NF4 or FP4) to ``w / absmax``; two indexes share one byte, the first (even) element in the
  high nibble; the packed tensor is ``uint8 [(n + 1) // 2, 1]`` (or another dtype's view of the
  same bytes, bitsandbytes' ``quant_storage``);
* nested (double) quantisation of the statistics (``compress_statistics=True``): with
  ``offset = mean(absmax)``, the centred ``absmax - offset`` is quantised in blocks of 256 to
  uint8 indexes into bitsandbytes' signed 8-bit dynamic map ``code2`` with one fp32 ``absmax2``
  per 256 blocks, so that ``absmax[i] = code2[q[i]] * absmax2[i // 256] + offset``;
* dequantisation is ``w = code[q] * absmax`` computed in fp32, then rounded to the state's dtype;
  FP4 index 8 (sign bit set, magnitude 0) gives -0, as bitsandbytes' CUDA kernels compute it
  (``0 · absmax · sign``), although its table holds +0 there.

:func:`dequantize_4bit` equals ``bitsandbytes.functional.dequantize_4bit`` bit for bit and reads
bitsandbytes' ``QuantState`` and ``Params4bit`` objects as they are (duck-typed on the
attributes ``absmax, blocksize, code, dtype, nested, offset, quant_type, shape, state2``).
:func:`quantize_4bit` reproduces the bytes and statistics of bitsandbytes' CPU quantiser and
returns a ``bitsandbytes.functional.QuantState`` when bitsandbytes can be imported, else a
:class:`QuantState` of this module with the same attributes. bitsandbytes is never needed.

>>> import torch, fastpeft
>>> w = torch.randn(6, 123)
>>> packed, state = fastpeft.quantize_4bit(w, quant_type="nf4", blocksize=64)
>>> packed.shape, packed.dtype
(torch.Size([369, 1]), torch.uint8)
>>> w4 = fastpeft.dequantize_4bit(packed, state)
>>> w4.shape, bool(((w4 - w).abs() <= 0.2 * w.abs().max()).all())
(torch.Size([6, 123]), True)
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "QuantState",
    "dequantize_4bit",
    "dequantize_absmax",
    "dynamic_map",
    "four_bit_code",
    "nested_fp32",
    "quantize_4bit",
    "validate_4bit",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# dtypes bitsandbytes stores packed bytes in (``quant_storage``); the bytes are what counts
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
_NESTED_BLOCKSIZE = 256  # blocks of absmax per absmax2 in nested quantisation

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA), in index order.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in bit-pattern order, before
# normalisation by the largest magnitude (12): index bit 3 is the sign.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
            0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# Ascending order of the FP4 table; of its two zeros the quantiser writes index 0 for x <= 0
# near zero and index 8 for small positive x (as bitsandbytes' CPU quantiser does).
_FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


# -- tables --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _code_cached(quant_type: str, device: torch.device) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    code = torch.tensor(_FP4_RAW, dtype=torch.float32, device=device)
    return code / code.abs().max()


def four_bit_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 code table of ``quant_type`` (``"nf4"`` or ``"fp4"``), a new tensor,
    equal to ``bitsandbytes.functional.get_4bit_type(quant_type)``."""
    _check_quant_type(quant_type, "quant_type")
    return _code_cached(quant_type, torch.device(device or "cpu")).clone()


@functools.lru_cache(maxsize=None)
def _dynamic_map_cached(device: torch.device) -> torch.Tensor:
    # bitsandbytes' signed dynamic map with 7 exponent bits and 8 bits in all: for exponent
    # e = 0..6 the midpoints of 2**e + 1 linearly spaced points in [0.1, 1], scaled by
    # 10**(e - 6), with both signs; then 0 and 1; sorted (256 entries, all distinct).
    values: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (e - 6)) * mids).tolist()
        values += (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed 8-bit dynamic map (256 fp32 entries in [-0.993, 1]) used for nested absmax,
    a new tensor, equal to ``bitsandbytes.functional.create_dynamic_map()``."""
    return _dynamic_map_cached(torch.device(device or "cpu")).clone()


# -- state ---------------------------------------------------------------------------------------

@dataclass(eq=False)
class QuantState:
    """The quantisation state of one 4-bit tensor, attribute for attribute as bitsandbytes'
    ``bitsandbytes.functional.QuantState`` (used when bitsandbytes is not installed).

    ``absmax``: fp32 [blocks], or uint8 [blocks] when nested; ``shape``: the dense shape;
    ``code``: the 16-entry table (or the 256-entry dynamic map in ``state2``); ``blocksize``;
    ``quant_type``: ``"nf4"`` / ``"fp4"`` (None in ``state2``); ``dtype``: the dense dtype;
    ``offset``: fp32 scalar tensor (nested only); ``state2``: the state of the absmax (nested only).
    """

    absmax: torch.Tensor
    shape: torch.Size | None = None
    code: torch.Tensor | None = None
    blocksize: int | None = None
    quant_type: str | None = None
    dtype: torch.dtype | None = None
    offset: torch.Tensor | None = None
    state2: "QuantState | None" = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def to(self, device) -> None:
        """Move the state's tensors to ``device`` in place (as bitsandbytes' ``QuantState.to``)."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes serialises it (``packed=True``: tensors only, the rest as a
        JSON byte tensor under ``quant_state.bitsandbytes__<quant_type>``, fit for safetensors)."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": float(self.offset.item()),
            })
        if not packed or self.quant_type is None:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        out["quant_state.bitsandbytes__" + self.quant_type] = torch.tensor(
            list(json.dumps(rest).encode("utf-8")), dtype=torch.uint8)
        return out

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> "QuantState":
        """Inverse of :meth:`as_dict` (packed or not; key prefixes are ignored)."""
        d = dict(qs_dict)
        for key in [k for k in d if "bitsandbytes__" in k]:
            d.update(json.loads(bytes(d.pop(key).tolist()).decode("utf-8")))
        d = {k.split(".")[-1]: v for k, v in d.items()}
        for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if key not in d:
                raise ValueError(f"qs_dict: missing the entry {key!r} of a 4-bit quant state")
        offset = state2 = None
        if "nested_absmax" in d:
            offset = torch.tensor(float(d["nested_offset"]), device=device)
            state2 = cls(absmax=d["nested_absmax"].to(device), blocksize=d["nested_blocksize"],
                         code=d["nested_quant_map"].to(device), dtype=getattr(torch, d["nested_dtype"]))
        return cls(absmax=d["absmax"].to(device), shape=torch.Size(d["shape"]) if d["shape"] is not None else None,
                   code=d["quant_map"].to(device), blocksize=d["blocksize"], quant_type=d["quant_type"],
                   dtype=getattr(torch, d["dtype"]), offset=offset, state2=state2)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=None)
def _state_class():
    """bitsandbytes' QuantState when bitsandbytes imports, else ours."""
    try:
        from bitsandbytes.functional import QuantState as BnbQuantState
    except Exception:  # not installed, or installed without a usable native library
        return QuantState
    return BnbQuantState


# -- validation ----------------------------------------------------------------------------------

def _check_quant_type(quant_type, name: str) -> None:
    if not isinstance(quant_type, str) or quant_type not in QUANT_TYPES:
        raise ValueError(f"{name} must be 'nf4' or 'fp4', got {quant_type!r}")


def _check_blocksize(blocksize, name: str) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")


def _numel(shape) -> int:
    n = 1
    for size in shape:   # a plain loop: torch.compile traces it (a generator it cannot)
        n *= int(size)
    return n


def _get(state, attr: str, where: str):
    try:
        return getattr(state, attr)
    except AttributeError:
        raise TypeError(f"{where} has no attribute {attr!r}: expected a 4-bit QuantState "
                        f"(fastpeft's or bitsandbytes'), got {type(state).__name__}") from None


def validate_4bit(packed: torch.Tensor, quant_state) -> tuple[torch.Size, int]:
    """Check that ``packed`` and ``quant_state`` describe one 4-bit tensor; return its dense
    shape and element count. Raises ValueError (TypeError for wrong kinds of object) naming the
    argument and what was expected."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if quant_state is None:
        raise ValueError("quant_state is required (or pass a bitsandbytes Params4bit, which carries one)")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("quant_state is in bitsandbytes' CPU inference packing (packing_format_for_cpu), "
                         "not the 4-bit layout; convert it back first (LowRankLinear4bit.from_bnb does)")
    quant_type = _get(quant_state, "quant_type", "quant_state")
    _check_quant_type(quant_type, "quant_state.quant_type")
    blocksize = _get(quant_state, "blocksize", "quant_state")
    _check_blocksize(blocksize, "quant_state.blocksize")
    dtype = _get(quant_state, "dtype", "quant_state")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype must be one of float32/float16/bfloat16, got {dtype}")
    shape = _get(quant_state, "shape", "quant_state")
    if shape is None or not all([isinstance(s, int) and s >= 0 for s in tuple(shape)]):
        raise ValueError(f"quant_state.shape must be the dense tensor's shape, got {shape!r}")
    shape = torch.Size(shape)
    n = _numel(shape)
    if packed.dtype not in _STORAGE_DTYPES:
        raise ValueError(f"packed must hold the packed bytes as uint8 (or a quant_storage dtype "
                         f"{[_dtype_name(d) for d in _STORAGE_DTYPES]}), got {packed.dtype}")
    nbytes = packed.numel() * packed.element_size()
    if nbytes != (n + 1) // 2:
        raise ValueError(
            f"packed has {nbytes} bytes ({packed.dtype} {tuple(packed.shape)}) but quant_state.shape "
            f"{tuple(shape)} needs (numel + 1) // 2 = {(n + 1) // 2}: packed and quant_state do not "
            f"belong to the same tensor" + (" (a dense weight was passed as packed?)" if packed.is_floating_point() else ""))
    if packed.dtype != torch.uint8 and not packed.is_contiguous():
        raise ValueError(f"packed in storage dtype {packed.dtype} must be contiguous")
    device = packed.device
    blocks = -(-n // blocksize)
    absmax = _get(quant_state, "absmax", "quant_state")
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"quant_state.absmax must be a tensor, got {type(absmax).__name__}")
    state2 = _get(quant_state, "state2", "quant_state")
    nested = state2 is not None
    if nested:
        if absmax.dtype != torch.uint8:
            raise ValueError(f"quant_state.absmax of a nested state must be uint8 codes, got {absmax.dtype}")
        offset = _get(quant_state, "offset", "quant_state")
        if not isinstance(offset, torch.Tensor) or offset.numel() != 1:
            raise ValueError(f"quant_state.offset of a nested state must be a one-element tensor, got {offset!r}")
        absmax2 = _get(state2, "absmax", "quant_state.state2")
        code2 = _get(state2, "code", "quant_state.state2")
        bs2 = _get(state2, "blocksize", "quant_state.state2")
        if isinstance(bs2, bool) or not isinstance(bs2, int) or bs2 <= 0:
            raise ValueError(f"quant_state.state2.blocksize must be a positive int, got {bs2!r}")
        if not isinstance(code2, torch.Tensor) or code2.numel() != 256 or not code2.is_floating_point():
            raise ValueError("quant_state.state2.code must be the 256-entry float dynamic map, got "
                             f"{None if code2 is None else (code2.dtype, tuple(code2.shape))}")
        if not isinstance(absmax2, torch.Tensor) or not absmax2.is_floating_point():
            raise ValueError("quant_state.state2.absmax must be a float tensor")
        if absmax2.numel() != -(-blocks // bs2):
            raise ValueError(
                f"quant_state.state2.absmax has {absmax2.numel()} entries but {blocks} blocks in groups of "
                f"{bs2} need {-(-blocks // bs2)}: the state belongs to another tensor")
        tensors = (("quant_state.offset", offset), ("quant_state.state2.absmax", absmax2),
                   ("quant_state.state2.code", code2))
    else:
        if not absmax.is_floating_point():
            raise ValueError(f"quant_state.absmax must be float (or uint8 with state2 for a nested state), got {absmax.dtype}")
        tensors = ()
    if absmax.numel() != blocks:
        raise ValueError(
            f"quant_state.absmax has {absmax.numel()} entries but quant_state.shape {tuple(shape)} in "
            f"blocks of {blocksize} needs {blocks}: the state belongs to another tensor")
    for name, t in (("quant_state.absmax", absmax),) + tensors:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but packed is on {device}; move both to one device")
    return shape, n


# -- dequantisation ------------------------------------------------------------------------------

def dequantize_absmax(quant_state) -> torch.Tensor:
    """The fp32 per-block absmax of ``quant_state`` (``code2[q] * absmax2[i // 256] + offset``
    when nested, rounded to fp32 after each operation as bitsandbytes does)."""
    absmax = quant_state.absmax
    if quant_state.state2 is None:
        return absmax.float()
    s2 = quant_state.state2
    nb = absmax.numel()
    bs2 = int(s2.blocksize)
    vals = s2.code.float().index_select(0, absmax.reshape(-1).int())
    groups = -(-nb // bs2)
    if groups * bs2 != nb:
        vals = torch.nn.functional.pad(vals, (0, groups * bs2 - nb))
    vals = (vals.view(groups, bs2) * s2.absmax.float().reshape(groups, 1)).reshape(-1)[:nb]
    vals = vals.to(s2.dtype if s2.dtype is not None else torch.float32)
    return (vals + quant_state.offset.to(vals.dtype)).float()


def nested_fp32(quant_state) -> bool:
    """Whether ``quant_state`` holds nested statistics as bitsandbytes writes them (uint8 codes,
    an fp32 second level and an fp32 offset): the form the kernels expand in registers,
    ``code2[q]·absmax2[i // blocksize2] + offset``, instead of reading an expanded copy."""
    s2 = quant_state.state2
    return not (s2 is None or quant_state.absmax.dtype != torch.uint8 or s2.absmax.dtype != torch.float32
                or s2.code.dtype != torch.float32 or s2.dtype not in (None, torch.float32)
                or quant_state.offset is None or quant_state.offset.dtype != torch.float32)


@functools.lru_cache(maxsize=None)
def _byte_table_cached(quant_type: str, device: torch.device) -> torch.Tensor:
    # [256, 2]: the two values of every byte (high nibble first); FP4 index 8 is -0 (module docstring)
    code = _code_cached(quant_type, device).clone()
    if quant_type == "fp4":
        code[8] = -0.0
    b = torch.arange(256, device=device)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1)


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def dequantize_4bit(packed: torch.Tensor, quant_state=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise a packed 4-bit tensor: bit for bit ``bitsandbytes.functional.dequantize_4bit``.

    ``packed``: the packed bytes (uint8 ``[(n + 1) // 2, 1]``, or the same bytes in another
    ``quant_storage`` dtype), or a bitsandbytes ``Params4bit`` (its ``quant_state`` is used when
    ``quant_state`` is None). ``quant_state``: a fastpeft or bitsandbytes ``QuantState``, read
    as it is. ``out``: optional tensor of ``quant_state.shape`` and ``quant_state.dtype`` on the
    same device to write into. Returns a tensor of ``quant_state.shape`` and ``quant_state.dtype``
    (bitsandbytes transposes the result of a ``[1, m]``-shaped packed tensor; this never does).
    Runs on any device, never modifies ``packed`` or ``quant_state``.
    """
    if quant_state is None:
        quant_state = getattr(packed, "quant_state", None)
    shape, n = validate_4bit(packed, quant_state)
    dtype = quant_state.dtype
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != dtype or out.device != packed.device:
            got = (tuple(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a {dtype} tensor of shape {tuple(shape)} on {packed.device}, got {got}")
    blocksize = int(quant_state.blocksize)
    absmax = dequantize_absmax(quant_state)
    table = _byte_table_cached(quant_state.quant_type, packed.device)
    with torch.no_grad():
        # index_select: a gather, several times faster than advanced indexing on the CPU
        vals = table.index_select(0, _packed_bytes(packed.detach()).int()).reshape(-1)  # 2 * nbytes >= n
        blocks = absmax.numel()
        if vals.numel() < blocks * blocksize:
            vals = torch.nn.functional.pad(vals, (0, blocks * blocksize - vals.numel()))
        vals = (vals[: blocks * blocksize].view(blocks, blocksize) * absmax.view(blocks, 1)).reshape(-1)[:n]
        if out is None:
            return vals.to(dtype).reshape(shape)
        out.view(-1).copy_(vals) if out.is_contiguous() else out.copy_(vals.reshape(shape))
        return out


# -- quantisation --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _bounds_cached(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cached(quant_type, device)
    order = (torch.arange(16, device=device) if quant_type == "nf4"
             else torch.tensor(_FP4_ORDER, device=device))
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    return mids, order


def _quantize_codes(flat: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit indexes (int64, padded to even length) and fp32 absmax of a flat fp32 tensor."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # full blocks scale by the reciprocal, the short last block divides; an all-zero last block
    # records absmax 1e-38 (bitsandbytes' CPU quantiser)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        am = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    mids, order = _bounds_cached(quant_type, flat.device)
    q = torch.bucketize(scaled, mids)  # first sorted entry whose upper midpoint is >= x
    if quant_type != "nf4":
        q = order[q]
    return q, absmax


@functools.lru_cache(maxsize=None)
def _dynamic_lut_cached(device: torch.device) -> torch.Tensor:
    # the nearest dynamic-map entry (the lower one on ties) to each of 65536 grid points of
    # [-1, 1]: g_j = j / 65535 * 2 - 1
    code = _dynamic_map_cached(device)
    g = (torch.arange(65536, dtype=torch.float64, device=device) / 65535 * 2 - 1).float()
    left = (torch.searchsorted(code, g, right=True) - 1).clamp_(0, 255)
    right = (left + 1).clamp(max=255)
    closer = ((g - code[right]).abs() < (g - code[left]).abs()) & (left < 255)
    return torch.where(closer, right, left).to(torch.uint8)


def _quantize_blockwise_8bit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU blockwise 8-bit quantiser on a flat fp32 tensor: per block
    ``absmax2 = max |x|``; ``v = x / absmax2`` (fp32) goes to grid point
    ``j = trunc(((v + 1) * 0.5) * 65535 + 0.5)`` of [-1, 1] and takes the dynamic-map index
    nearest to that grid point."""
    n = x.numel()
    groups = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, groups * blocksize - n)) if groups * blocksize != n else x
    # padding with 0 never raises a block's max |x|
    absmax2 = padded.view(groups, blocksize).abs().amax(dim=1)
    v = (padded.view(groups, blocksize) / absmax2.view(groups, 1)).reshape(-1)[:n]
    # a block of zeros gives 0 / 0: bitsandbytes' search lands on grid point 0 there
    v = torch.nan_to_num(v, nan=-1.0).clamp_(-1.0, 1.0)
    j = (((v + 1) * 0.5) * 65535 + 0.5).to(torch.int64)  # truncation; v + 1 >= 0
    return _dynamic_lut_cached(x.device)[j], absmax2, _dynamic_map_cached(x.device).clone()


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  compress_statistics: bool = True, quant_storage: torch.dtype = torch.uint8):
    """Quantise ``w`` (fp32/fp16/bf16, any shape, any device) to 4 bits in bitsandbytes' layout.

    Returns ``(packed, quant_state)``: ``packed`` uint8 ``[(n + 1) // 2, 1]`` (viewed as
    ``quant_storage`` if another dtype, as bitsandbytes does) and a QuantState (bitsandbytes'
    class when it imports, else :class:`QuantState`) with ``shape = w.shape``, ``dtype =
    w.dtype``. The bytes, absmax and nested statistics equal those of bitsandbytes'
    ``quantize_4bit`` on CPU. ``w`` is not modified.

    Note the defaults: NF4 with nested statistics (QLoRA's and transformers' choice), not
    bitsandbytes' function defaults (FP4, no nesting).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"w must have at least one element, got shape {tuple(w.shape)}")
    _check_quant_type(quant_type, "quant_type")
    _check_blocksize(blocksize, "blocksize")
    if not isinstance(compress_statistics, bool):
        raise ValueError(f"compress_statistics must be True or False, got {compress_statistics!r}")
    if not isinstance(quant_storage, torch.dtype) or quant_storage not in _STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {[_dtype_name(d) for d in _STORAGE_DTYPES]}, got {quant_storage!r}")
    n = w.numel()
    nbytes = (n + 1) // 2
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if nbytes % itemsize:
        raise ValueError(f"quant_storage {quant_storage} needs the {nbytes} packed bytes of w "
                         f"(shape {tuple(w.shape)}) to be a multiple of {itemsize}")
    with torch.no_grad():
        q, absmax = _quantize_codes(w.detach().reshape(-1).float(), blocksize, quant_type)
        q8 = q.to(torch.uint8)
        packed = ((q8[0::2] << 4) | q8[1::2]).unsqueeze(1)
        if quant_storage != torch.uint8:
            packed = packed.reshape(-1).view(quant_storage).unsqueeze(1)
        cls = _state_class()
        code = _code_cached(quant_type, w.device).clone()
        if compress_statistics:
            offset = absmax.mean()
            qabsmax, absmax2, code2 = _quantize_blockwise_8bit(absmax - offset, _NESTED_BLOCKSIZE)
            state2 = cls(absmax=absmax2, code=code2, blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32)
            state = cls(absmax=qabsmax, shape=w.shape, code=code, blocksize=blocksize,
                        quant_type=quant_type, dtype=w.dtype, offset=offset, state2=state2)
        else:
            state = cls(absmax=absmax, shape=w.shape, code=code, blocksize=blocksize,
                        quant_type=quant_type, dtype=w.dtype)
    return packed, state

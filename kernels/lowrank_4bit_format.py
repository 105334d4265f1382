"""The bitsandbytes 4-bit weight format, as the 4-bit kernels read it (``fastpeft.kernels.lowrank_4bit_format``).

W [d, k] packed by bitsandbytes: element i = n·k + c of the flattened W is the code index in
nibble ``i & 1`` (0 = high) of byte ``i >> 1``, scaled by the fp32 ``absmax[i // QBLOCK]``, or,
with nested statistics, by ``code2[q]·absmax2[i // QBLOCK // BLOCK2] + offset`` for the uint8
``q = absmax[i // QBLOCK]``. Here:

* the ``@triton.jit`` pieces of the select-tree dequantisation (``_code_value``: code[q] by a
  tree of selects on the index bits; ``_absmax``: a block's scale, nested statistics expanded in
  registers bit-exact with bitsandbytes; ``_to_w_dtype``: the rounding to the quant state's
  dtype), used by the tile loader ``_w4_tile`` of :mod:`fastpeft.kernels.lowrank_4bit`;
* the host side: a packed weight and its quant state as launch arguments (``_weight_args``:
  the bytes, the absmax pointers, the constexprs QBLOCK, QUANT, W_KIND, LAYOUT, NESTED, BLOCK2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_W_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_QUANT = {"nf4": 0, "fp4": 1}

# --------------------------------------------------------------------------------------------
# Device helpers: code values and scales by selects (every layout, the interpreter)
# --------------------------------------------------------------------------------------------

@triton.jit
def _to_w_dtype(v, W_KIND: tl.constexpr):
    """Round fp32 values to the quant state's dtype (0 fp32, 1 fp16, 2 bf16), as bitsandbytes'
    dequantisation does before the compute-dtype cast."""
    if W_KIND == 1:
        out = v.to(tl.float16)
    elif W_KIND == 2:
        out = v.to(tl.bfloat16)
    else:
        out = v
    return out


@triton.jit
def _pick(q, bit: tl.constexpr, a, b):
    """b where bit ``bit`` of q is set, else a."""
    return tl.where((q & bit) != 0, b, a)


@triton.jit
def _code_value(q, QUANT: tl.constexpr):
    """code[q] (fp32) for 4-bit indexes q, by a tree of selects on the index bits (no table
    lookups): QUANT 0 = NF4, 1 = FP4 (bit 3 the sign, the low 3 bits the magnitude)."""
    if QUANT == 0:
        v = _pick(q, 8,
                  _pick(q, 4, _pick(q, 2, _pick(q, 1, -1.0, -0.6961928009986877),
                                    _pick(q, 1, -0.5250730514526367, -0.39491748809814453)),
                        _pick(q, 2, _pick(q, 1, -0.28444138169288635, -0.18477343022823334),
                              _pick(q, 1, -0.09105003625154495, 0.0))),
                  _pick(q, 4, _pick(q, 2, _pick(q, 1, 0.07958029955625534, 0.16093020141124725),
                                    _pick(q, 1, 0.24611230194568634, 0.33791524171829224)),
                        _pick(q, 2, _pick(q, 1, 0.44070982933044434, 0.5626170039176941),
                              _pick(q, 1, 0.7229568362236023, 1.0))))
    else:
        mag = _pick(q, 4, _pick(q, 2, _pick(q, 1, 0.0, 0.0052083334885537624),
                                _pick(q, 1, 0.6666666865348816, 1.0)),
                    _pick(q, 2, _pick(q, 1, 0.3333333432674408, 0.5),
                          _pick(q, 1, 0.1666666716337204, 0.25)))
        v = _pick(q, 8, mag, -mag)
    return v


@triton.jit
def _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, idx, mask, NESTED: tl.constexpr,
            BLOCK2: tl.constexpr, INTERPRETED: tl.constexpr):
    """The fp32 absmax of blocks ``idx`` (0 where ``mask`` is off): ``absmax[idx]``, or for nested
    statistics ``code2[q]·absmax2[idx // BLOCK2] + offset`` with the uint8 ``q = absmax[idx]``,
    formed here in registers (no expanded copy in memory). bitsandbytes rounds the product and the
    sum to fp32 one after the other; ``mul.rn`` (libdevice ``mul_rn``) is an explicitly rounded
    multiply that the compiler never contracts with the add into an FMA, so the result is the
    same bit for bit. The interpreter (``INTERPRETED``, numpy) rounds every operation anyway."""
    if NESTED:
        q = tl.load(absmax_ptr + idx, mask=mask, other=0).to(tl.int32)
        c = tl.load(code2_ptr + q)                                    # q < 256: always in the table
        a2 = tl.load(absmax2_ptr + idx // BLOCK2, mask=mask, other=0.0)
        if INTERPRETED:
            prod = c * a2
        else:
            prod = libdevice.mul_rn(c, a2)
        out = tl.where(mask, prod + tl.load(offset_ptr), 0.0)
    else:
        out = tl.load(absmax_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return out


# --------------------------------------------------------------------------------------------
# Launch arguments of a packed weight
# --------------------------------------------------------------------------------------------

def _scale_args(quant_state) -> tuple[dict, dict]:
    """(the absmax pointers, their constexprs) for :func:`_w4_tile`: nested statistics as
    bitsandbytes writes them go in as they are (uint8 codes, the 256-entry code2 table, absmax2
    and the offset) and are expanded in registers, nothing allocated; a plain absmax as it is;
    any other nested state (a second level in another dtype) is expanded once by
    ``fastpeft.quant.dequantize_absmax`` for the call."""
    from fastpeft.quant import dequantize_absmax, nested_fp32

    if nested_fp32(quant_state):
        s2 = quant_state.state2
        ptrs = dict(absmax_ptr=quant_state.absmax.reshape(-1), code2_ptr=s2.code.contiguous(),
                    absmax2_ptr=s2.absmax.reshape(-1), offset_ptr=quant_state.offset.reshape(1))
        return ptrs, dict(NESTED=True, BLOCK2=int(s2.blocksize))
    absmax = quant_state.absmax.reshape(-1) if quant_state.state2 is None else dequantize_absmax(quant_state)
    return (dict(absmax_ptr=absmax, code2_ptr=absmax, absmax2_ptr=absmax, offset_ptr=absmax),
            dict(NESTED=False, BLOCK2=256))


def _weight_args(packed, quant_state, device):
    """(flat uint8 bytes, the absmax pointers of :func:`_scale_args`, the weight's constexprs,
    (d, k))."""
    from fastpeft.quant import _packed_bytes, validate_4bit

    shape, _ = validate_4bit(packed, quant_state)
    d, k = shape
    data = _packed_bytes(packed.detach())
    scales, scale_meta = _scale_args(quant_state)
    qblock = int(quant_state.blocksize)
    meta = dict(QBLOCK=qblock, QUANT=_QUANT[quant_state.quant_type], W_KIND=_W_KIND[quant_state.dtype],
                LAYOUT=_layout(k, qblock, data.data_ptr() % 4 == 0), **scale_meta)
    return data, scales, meta, (d, k)


def _layout(k: int, qblock: int, aligned: bool = True) -> int:
    """2: every row holds whole blocks (the packed bytes 4-byte aligned: the compiled tile loads
    32-bit words); 1: rows start on a byte; 0: k odd."""
    return 2 if k % qblock == 0 and aligned else (1 if k % 2 == 0 else 0)

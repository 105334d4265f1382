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
  the bytes, the absmax pointers, the constexprs QBLOCK, QUANT, W_KIND, LAYOUT, NESTED, BLOCK2);
* the byte-permute dequantisation's PTX (``lut_table_asm``: the 16 values of a (row, block) as
  two byte planes; ``lut_lookup_asm``: one word of 8 nibbles into its 8 values) and the code
  tables it is built from, used by the byte-permute tile loaders of the 4-bit kernels.
"""

from __future__ import annotations

import struct

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


# --------------------------------------------------------------------------------------------
# Dequantisation by byte permutes (PTX, compiled code only; the interpreter takes the select tree)
# --------------------------------------------------------------------------------------------
#
# Where every row of W holds whole quant blocks, all weights of one (row, block) share one
# absmax a, so the 16 values bitsandbytes can produce there are known up front:
# v[q] = round(code[q] · a) (the fp32 product rounded to the output dtype, as bitsandbytes rounds
# it). ``_LUT_TABLE_ASM`` forms them once per (row, block) and splits the 16 16-bit values into
# a low-byte plane and a high-byte plane, 4 registers each (register j: entries 4j..4j+3).
# ``_LUT_LOOKUP_ASM`` then turns one 32-bit word of packed W (8 nibbles) into its 8 values with
# ``prmt.b32``, which picks each byte of its result from 8 bytes by a 4-bit selector: per 4
# nibbles, two permutes per plane look up entries 0-7 and 8-15 by the low 3 index bits, a third
# picks between them by bit 3, and two more interleave the planes into 16-bit values. The
# values are then exactly those of the table: bit for bit bitsandbytes' dequantisation.

# the fp32 code tables in index order (bitsandbytes' get_4bit_type; FP4: raw / 12, index 8 = +0).
# bitsandbytes' CUDA kernels (and its scalar CPU kernel) form an FP4 value as mag·absmax·sign, so
# index 8 (sign set, magnitude 0) dequantises to -0: the byte-permute tables use -0 there too.
_NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
_FP4_MAG = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25)
_FP4_CODE = _FP4_MAG + (0.0,) + tuple(-v for v in _FP4_MAG[1:])
_FP4_SIGNED = _FP4_MAG + tuple(-v for v in _FP4_MAG)            # index 8 = -0


def _f32_hex(v: float) -> str:
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", v))[0]


def lut_table_asm(quant: int, out_fp16: bool) -> str:
    """PTX: absmax (fp32 bits in ``$8``) -> the 8 table registers ``$0..$7`` (low-byte plane of
    entries 0-3, 4-7, 8-11, 12-15, then the high-byte plane) of v[q] = round(code[q]·absmax) in
    fp16 (``out_fp16``) or bf16; ``quant`` 0 = NF4, 1 = FP4."""
    code = _FP4_SIGNED if quant else _NF4_CODE
    kind = "f16x2" if out_fp16 else "bf16x2"
    lines = ["{", ".reg .f32 a, p<16>;", ".reg .b32 w<8>;", "mov.b32 a, $8;"]
    lines += [f"mul.rn.f32 p{q}, a, {_f32_hex(c)};" for q, c in enumerate(code)]
    lines += [f"cvt.rn.{kind}.f32 w{j}, p{2 * j + 1}, p{2 * j};" for j in range(8)]
    lines += [f"prmt.b32 ${j}, w{2 * j}, w{2 * j + 1}, 0x6420;" for j in range(4)]
    lines += [f"prmt.b32 ${4 + j}, w{2 * j}, w{2 * j + 1}, 0x7531;" for j in range(4)]
    return "\n".join(lines + ["}"])


def lut_lookup_asm() -> str:
    """PTX: one word of packed W (``$8``; byte j holds elements 2j (high nibble) and 2j+1) and the
    table registers (``$9..$16``) -> the 8 values as 16-bit outputs, output m holding element
    m with its 3 bits reversed (0, 4, 2, 6, 1, 5, 3, 7: the order a tree of three ``tl.join``
    turns back into 0..7)."""
    lines = ["{", ".reg .b32 s, g, al, bl, l, ah, bh, h, o0, o1;",
             "and.b32 s, $8, 0x77777777;",              # the low 3 bits of each index
             "shr.b32 g, $8, 1;",                       # bit 3 of nibble i -> bit 2 of selector i
             "and.b32 g, g, 0x44444444;",
             "or.b32 g, g, 0x32103210;"]                # selector i: byte i of the 0-7 or the 8-15 lookup
    bitrev = (0, 4, 2, 6, 1, 5, 3, 7)
    out = {e: m for m, e in enumerate(bitrev)}
    for grp in range(2):                               # nibbles 4·grp .. 4·grp + 3
        if grp:
            lines += ["shr.b32 s, s, 16;", "shr.b32 g, g, 16;"]
        lines += ["prmt.b32 al, $9, $10, s;", "prmt.b32 bl, $11, $12, s;", "prmt.b32 l, al, bl, g;",
                  "prmt.b32 ah, $13, $14, s;", "prmt.b32 bh, $15, $16, s;", "prmt.b32 h, ah, bh, g;",
                  # nibble 2j+1 is element 2j, nibble 2j is element 2j+1 (high nibble first)
                  "prmt.b32 o0, l, h, 0x4051;", "prmt.b32 o1, l, h, 0x6273;"]
        e = 4 * grp
        lines += [f"mov.b32 {{${out[e]}, ${out[e + 1]}}}, o0;", f"mov.b32 {{${out[e + 2]}, ${out[e + 3]}}}, o1;"]
    return "\n".join(lines + ["}"])


_LUT_LOOKUP_ASM = tl.constexpr(lut_lookup_asm())
_LUT_TABLE_NF4_F16 = tl.constexpr(lut_table_asm(0, True))
_LUT_TABLE_NF4_BF16 = tl.constexpr(lut_table_asm(0, False))
_LUT_TABLE_FP4_F16 = tl.constexpr(lut_table_asm(1, True))
_LUT_TABLE_FP4_BF16 = tl.constexpr(lut_table_asm(1, False))

"""The 4-bit tile's byte-permute (PRMT) dequantisation, checked on CPU.

The PTX of :func:`fastpeft.kernels.lowrank_4bit.lut_table_asm` and ``lut_lookup_asm`` cannot run
under the interpreter. A small numpy emulator of the instructions they use (``prmt.b32`` with its
sign-replicate bit, ``mul.rn.f32``, ``cvt.rn.{bf16x2,f16x2}.f32``, ``and/or/shr.b32``, ``mov.b32``
packing) executes the very strings the kernels compile, and the results are compared bit for bit
with ``bitsandbytes.functional.dequantize_4bit`` over all 256 byte values, both quant types, fp16
and bf16, for scales that reach fp16's overflow and underflow. The Triton code around the asm
(word loads, per-block scales, the join order) runs under the interpreter with the emulator
standing in for the asm, through the real ``_w4_tile_lut``.
"""

import re

import numpy as np
import pytest
import torch

import fastpeft
from fastpeft.kernels import lowrank_4bit as L4

pytest.importorskip("triton")


# -- a numpy emulator of the PTX subset ----------------------------------------------------------

def _prmt(a, b, c):
    """prmt.b32 d, a, b, c (default mode): byte i of d is byte (c >> 4i) & 7 of {b, a}, or its
    sign bit replicated when selector bit 3 is set."""
    pool = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a, dtype=np.uint32)
    for i in range(4):
        sel = (c >> np.uint32(4 * i)) & np.uint32(0xF)
        byte = ((pool >> ((sel & np.uint32(7)).astype(np.uint64) * np.uint64(8))) & np.uint64(0xFF)).astype(np.uint32)
        byte = np.where((sel & np.uint32(8)) != 0, np.where(byte & np.uint32(0x80), np.uint32(0xFF), np.uint32(0)), byte)
        out |= byte.astype(np.uint32) << np.uint32(8 * i)
    return out


def _f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _half_bits(values, fp16):
    """fp32 -> fp16 / bf16 bits, round to nearest even (as cvt.rn)."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return t.to(torch.float16 if fp16 else torch.bfloat16).view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)


def run_ptx(asm, inputs, n_out):
    """Run ``asm`` on uint32 arrays ``inputs`` ($n_out, ...); returns the n_out outputs (uint32)."""
    regs = {f"${n_out + i}": np.asarray(v, dtype=np.uint32) for i, v in enumerate(inputs)}
    shape = next(iter(regs.values())).shape

    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if tok.startswith("0f"):
            return np.full(shape, int(tok[2:], 16), dtype=np.uint32)
        return np.full(shape, int(tok, 0), dtype=np.uint32)

    for line in asm.split("\n"):
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        m = re.match(r"\{(.*)\},\s*(\S+)$", rest)
        if op == "mov.b32" and m:                            # unpack a word into two 16-bit halves
            lo, hi = (t.strip() for t in m.group(1).split(","))
            word = val(m.group(2))
            regs[lo], regs[hi] = word & np.uint32(0xFFFF), word >> np.uint32(16)
            continue
        dst, *srcs = (t.strip() for t in rest.split(","))
        args = [val(t) for t in srcs]
        if op == "mov.b32":
            res = args[0]
        elif op == "and.b32":
            res = args[0] & args[1]
        elif op == "or.b32":
            res = args[0] | args[1]
        elif op == "shr.b32":
            res = args[0] >> args[1]
        elif op == "prmt.b32":
            res = _prmt(*args)
        elif op == "mul.rn.f32":
            res = (_f32(args[0]) * _f32(args[1])).view(np.uint32)
        elif op in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):
            fp16 = op == "cvt.rn.f16x2.f32"
            res = (_half_bits(_f32(args[0]), fp16) << np.uint32(16)) | _half_bits(_f32(args[1]), fp16)
        else:
            raise AssertionError(f"the emulator does not know {op!r}")
        regs[dst] = np.asarray(res, dtype=np.uint32)
    return [regs[f"${i}"] for i in range(n_out)]


def lut_dequant(words, absmax, quant, fp16):
    """The 8 values of each word (elements in order) by the kernels' two asm blocks, joined as
    ``_w4_tile_lut`` joins them: 16-bit patterns [n_words, 8]."""
    tables = run_ptx(L4.lut_table_asm(quant, fp16), [np.asarray(absmax, dtype=np.float32).view(np.uint32)], 8)
    v = run_ptx(L4.lut_lookup_asm(), [words] + tables, 8)

    def join(a, b):
        return np.stack([a, b], axis=-1)

    tree = join(join(join(v[0], v[1]), join(v[2], v[3])), join(join(v[4], v[5]), join(v[6], v[7])))
    return tree.reshape(len(words), 8)


def test_prmt_emulator_follows_the_ptx_definition():
    a, b = np.array([0x33221100], np.uint32), np.array([0x77665544], np.uint32)
    assert _prmt(a, b, np.array([0x3210], np.uint32))[0] == 0x33221100
    assert _prmt(a, b, np.array([0x7654], np.uint32))[0] == 0x77665544
    assert _prmt(a, b, np.array([0x0415], np.uint32))[0] == 0x00441155
    # bit 3: the selected byte's sign replicated (byte 0 = 0x80 -> 0xff, byte 7 = 0x77 -> 0x00)
    assert _prmt(np.array([0x80], np.uint32), b, np.array([0x00F8], np.uint32))[0] == 0x808000FF
    assert _prmt(a, b, np.array([0x000F], np.uint32))[0] == 0x00000000


# -- bit for bit against bitsandbytes --------------------------------------------------------------

SCALES = (1.0, 0.0173, 3.75, 1e-30, 7e-6, 6.5e4, 1e5, 0.0)  # fp16 underflow, subnormals, overflow


def _bnb_reference(data, absmax, quant_type, state_dtype, out_dtype):
    """bitsandbytes' dequantisation of the bytes ``data`` (one block of 64 per absmax), cast to
    ``out_dtype``, as 16-bit patterns."""
    F = pytest.importorskip("bitsandbytes.functional")
    n = 2 * data.numel()
    state = F.QuantState(absmax=absmax, shape=torch.Size([n // 64, 64]), code=F.get_4bit_type(quant_type, device="cpu"),
                         blocksize=64, quant_type=quant_type, dtype=state_dtype)
    ref = F.dequantize_4bit(data.reshape(-1, 1), quant_state=state).to(out_dtype).reshape(-1)
    if quant_type == "fp4":
        # FP4 index 8 (sign set, magnitude 0): bitsandbytes' CUDA kernels and its scalar CPU
        # kernel return 0·absmax·(-1) = -0, its table-driven CPU paths +0 (whichever this
        # machine's CPU takes): the reference is the CUDA kernels' -0, the value must be a zero
        nibbles = torch.stack([data >> 4, data & 15], dim=-1).reshape(-1)
        at8 = nibbles == 8
        assert torch.all(ref[at8] == 0)
        ref = torch.where(at8, torch.tensor(-0.0, dtype=out_dtype), ref)
    return ref.view(torch.int16).numpy().astype(np.uint16)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("state_dtype", ["fp32", "same"])
def test_prmt_dequantisation_is_bit_exact_with_bitsandbytes(quant_type, out_dtype, state_dtype):
    """Every scale of SCALES and 8 random ones, each over all 256 byte values (8 blocks of 64
    weights): the asm's 16-bit patterns equal bitsandbytes' dequantize_4bit cast to the output
    dtype, zeros' signs included (FP4 index 8 is -0, as bitsandbytes' CUDA kernels give it)."""
    quant = L4._QUANT[quant_type]
    fp16 = out_dtype == torch.float16
    gen = torch.Generator().manual_seed(quant * 2 + fp16)
    scales = torch.tensor(SCALES + tuple((torch.rand(8, generator=gen) * 4).tolist()), dtype=torch.float32)
    data = torch.arange(256, dtype=torch.uint8).repeat(len(scales))
    absmax = scales.repeat_interleave(8)                                            # 32 bytes a block
    sd = torch.float32 if state_dtype == "fp32" else out_dtype                      # absmax is fp32 either way
    ref = _bnb_reference(data, absmax, quant_type, sd, out_dtype)
    words = data.numpy().view(np.uint32)                                            # 8 weights a word
    block_scale = np.repeat(absmax.numpy(), 8)                                      # 8 words a block
    got = lut_dequant(words, block_scale, quant, fp16).reshape(-1).astype(np.uint16)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, (f"{bad.size} of {ref.size} differ, first at {bad[0]}: got {got[bad[0]]:#06x}, "
                           f"bitsandbytes {ref[bad[0]]:#06x} (byte {int(data[bad[0] // 2])}, "
                           f"absmax {float(absmax[bad[0] // 64])})")


def test_code_tables_are_bitsandbytes():
    from fastpeft.quant import four_bit_code

    F = pytest.importorskip("bitsandbytes.functional")
    for quant_type, table in (("nf4", L4._NF4_CODE), ("fp4", L4._FP4_CODE)):
        code = torch.tensor(table, dtype=torch.float32)
        ref = F.get_4bit_type(quant_type, device="cpu").float()
        assert torch.equal(code.view(torch.int32), ref.view(torch.int32)), quant_type
        assert torch.equal(code.view(torch.int32), four_bit_code(quant_type).view(torch.int32)), quant_type


# -- the Triton code around the asm, under the interpreter ------------------------------------------

def _emulated_inline_asm(self, asm, constraints, values, types, is_pure, pack):
    """InterpreterBuilder.create_inline_asm for the two asm blocks: the emulator above."""
    from triton.runtime.interpreter import TensorHandle

    assert pack == 1
    n_out = constraints.count("=")
    arrays = np.broadcast_arrays(*[v.data for v in values])
    outs = run_ptx(asm, [a.astype(np.int64).astype(np.uint32) if a.dtype != np.float32 else a.view(np.uint32)
                         for a in arrays], n_out)

    class _Call:
        def get_result(self, i):
            dtype = types[i].element_ty if hasattr(types[i], "element_ty") else types[i]
            bits = {"int16": (np.uint16, np.int16), "int32": (np.uint32, np.int32)}[dtype.name]
            return TensorHandle(outs[i].astype(bits[0]).view(bits[1]), dtype)

    return _Call()


@pytest.fixture
def emulated_asm(monkeypatch):
    from triton.runtime import interpreter
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_inline_asm", _emulated_inline_asm)


def _tile_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, N, K,
               QBLOCK: tl.constexpr, QUANT: tl.constexpr, NESTED: tl.constexpr, BLOCK2: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        w = L4._w4_tile_lut(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rn, k0, N, K, BLOCK_N,
                            BLOCK_K, QBLOCK, QUANT, out_ptr.dtype.element_ty, NESTED, BLOCK2, True)
        tl.store(out_ptr + rn[:, None] * K + rk[None, :], w, mask=(rn < N)[:, None] & (rk < K)[None, :])

    return kernel


@pytest.mark.skipif(not L4._dense._interpreting(), reason="runs the tile under the Triton interpreter")
@pytest.mark.parametrize("quant_type,nested,dtype", [("nf4", True, torch.bfloat16), ("fp4", False, torch.float16),
                                                     ("nf4", False, torch.float16), ("fp4", True, torch.bfloat16)])
@pytest.mark.parametrize("k,blocksize,block_k", [(192, 64, 32), (256, 64, 128), (128, 32, 64)],
                         ids=["k192-in-block", "k256-two-blocks", "k128-bs32"])
def test_lut_tile_under_the_interpreter_equals_bitsandbytes(emulated_asm, quant_type, nested, dtype, k, blocksize,
                                                             block_k):
    """``_w4_tile_lut`` (word loads, the scale of each row and block, nested statistics, the
    join order, the masks of a partial last tile) with the asm emulated: W bit for bit as
    fastpeft.dequantize_4bit(...).to(dtype), at 37 rows (a partial row tile)."""
    gen = torch.Generator().manual_seed(k + blocksize)
    w = torch.randn(37, k, generator=gen)
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    data, scales, meta, (d, kk) = L4._weight_args(packed, state, None)
    assert meta["LAYOUT"] == 2 and meta["NESTED"] == nested
    out = torch.full((d, kk), float("nan"), dtype=dtype)
    grid = (triton_cdiv(d, 16), triton_cdiv(kk, block_k))
    _tile_kernel()[grid](data, **scales, out_ptr=out, N=d, K=kk, QBLOCK=meta["QBLOCK"], QUANT=meta["QUANT"],
                         NESTED=meta["NESTED"], BLOCK2=meta["BLOCK2"], BLOCK_N=16, BLOCK_K=block_k)
    ref = fastpeft.dequantize_4bit(packed, state).to(dtype)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def triton_cdiv(a, b):
    return (a + b - 1) // b

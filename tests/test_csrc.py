"""The CUDA C++ sources in csrc/ (``fastpeft._C``), checked without a GPU where possible.

* Every .cu compiles with nvcc for sm_80 and sm_90, and ptxas reports no local-memory spills
  (no stack frame) for any kernel.
* The torch binding (.cpp) passes g++ -fsyntax-only against torch's headers (the CPU wheel ships
  the c10/cuda headers but not c10/cuda/impl/cuda_cmake_macros.h, which the test supplies).
* The decode kernel's binary (sm_80, sm_90): no local memory, PRMT nibble decoding and tensor-core
  products in its span loop, instructions per weight bounded, the nested absmax a multiply then an
  add (never an FFMA).
* The decode kernel's code (``csrc/lowrank_4bit_decode.cuh``) built for the host and run with
  each warp's 32 lanes side by side (tests/csrc/decode_emulator.cpp) matches the float64
  reference (Y and T): M = 1..16, r = 1..64, d not a multiple of a block's rows, one or several
  spans per quantisation block, fp16 and bf16, NF4 and FP4, nested or not, every core and
  activation; the table decoder matches the code table for every nibble; the nested absmax
  equals bitsandbytes' bit for bit; the launcher refuses what it cannot run (k not a multiple of
  the blocksize, fp32, r > 64, M > 16).
* With a GPU and ``fastpeft._C`` built: the public op dispatches to the "cuda" backend for M <= 16
  and matches the float64 reference, backward included.

Tests skip (with the reason) without nvcc / g++. Compilation takes about a minute of CPU.
"""

import ctypes
import math
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import fastpeft
from fastpeft import _backend
from fastpeft.ops import lowrank_4bit as op4
from helpers import reference_lowrank, rel_err

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
CPP_SOURCES = sorted(CSRC.glob("*.cpp"))
ARCHS = (80, 90)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = Path(home) / "bin" / "nvcc"
    return str(path) if path.exists() else None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")


def _cuda_include() -> str:
    """The toolkit's include directory (cuda_fp16.h, cuda_runtime_api.h), as nvcc itself uses it
    (nvcc may be a wrapper script outside the toolkit)."""
    out = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True)
    for path in re.findall(r'INCLUDES="-I([^"]+)"', out.stdout + out.stderr):
        if (Path(path) / "cuda_fp16.h").exists():
            return path
    return str(Path(NVCC).resolve().parents[1] / "include")


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_without_spills(source, arch, tmp_path):
    out = subprocess.run(
        [NVCC, "-c", "-O3", "-std=c++17", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}",
         "-Xptxas", "-v", "-I", str(CSRC), str(source), "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    report = out.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    assert kernels, f"no kernel in {source.name}: {report[-2000:]}"
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(frames) >= len(kernels), report[-2000:]
    bad = [(k, f) for k, f in zip(kernels, frames) if any(int(v) for v in f)]
    assert not bad, f"local memory (stack frame, spill stores, spill loads) in {bad[:3]}"


# The decode kernel's binary: sm_80 and sm_90 cubins, read with Triton's bundled cuobjdump.
_KERNEL = re.compile(r"lowrank4_decode_kernelI(6__half|13__nv_bfloat16)Li(\d)ELi(\d)E")
W_TILES = 2          # csrc/lowrank_4bit_decode.cuh kTiles: 16-row W tiles per block
W_PER_SPAN = 32      # weights of W per lane and span: kTiles × 2 rows × 8 nibbles


def _sass_of(arch: int, tmp_path: Path) -> dict[str, str]:
    """{kernel: SASS} of csrc/lowrank_4bit_decode.cu compiled for sm_<arch> as setup.py builds it."""
    from fastpeft.kernels import _aot
    cubin = tmp_path / f"decode_sm{arch}.cubin"
    out = subprocess.run([NVCC, "-cubin", "-O3", "-std=c++17", "--use_fast_math", f"-arch=sm_{arch}", "-I", str(CSRC),
                          str(CSRC / "lowrank_4bit_decode.cu"), "-o", str(cubin)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    sass = _aot.cuobjdump(cubin.read_bytes())
    parts = re.split(r"\n\s*Function : ", sass)[1:]
    return {p.split()[0]: p for p in parts}


def _span_loop(instrs) -> list[str]:
    """The opcodes of the innermost loop holding tensor-core instructions (the span loop)."""
    loops = []
    for addr, opcode, operands in instrs:
        target = re.match(r"\s*(0x[0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < addr:
            body = [op for a, op, _ in instrs if int(target.group(1), 16) <= a <= addr]
            if any(op.startswith("HMMA") for op in body):
                loops.append(body)
    assert loops, "no loop with tensor-core instructions"
    return min(loops, key=len)


def _reader(instrs, start: int):
    """(index, opcode, destination) of the first instruction after ``start`` that reads the
    register ``instrs[start]`` writes, or None when it is overwritten first."""
    reg = instrs[start][2].split(",")[0].strip()
    pattern = re.compile(rf"\b{reg}\b")
    for i in range(start + 1, len(instrs)):
        opcode, operands = instrs[i][1], instrs[i][2]
        dest, _, srcs = operands.partition(",")
        if pattern.search(srcs):
            return i, opcode, dest.strip()
        if pattern.search(dest):
            return None
    return None


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_decode_binary_properties(arch, tmp_path):
    """Every instantiation of the decode kernel: no local memory; its span loop decodes nibbles
    with PRMT and runs the products on tensor cores, at <= 4 instructions per weight for M <= 8,
    r <= 16 (the adapter's T = X Aᵀ adds about 0.5 per weight per 16 of r); the nested absmax
    is a multiply then an add (the code2 value read from shared memory goes into an FMUL whose
    result goes into an FADD: never an FFMA)."""
    from fastpeft.kernels.inspect import _instructions
    sass = _sass_of(arch, tmp_path)
    kernels = {name: text for name, text in sass.items() if _KERNEL.search(name)}
    assert len(kernels) == 16, sorted(sass)
    report = []
    for name, text in kernels.items():
        _, mg, rt = _KERNEL.search(name).groups()
        mg, rt = int(mg), int(rt)
        instrs = _instructions(text)
        ops = [op.split(".")[0] for _, op, _ in instrs]
        assert "LDL" not in ops and "STL" not in ops, f"{name}: local memory"
        body = _span_loop(instrs)
        hmma = sum(op.startswith("HMMA") for op in body)
        spans = hmma / ((W_TILES + rt) * 2 * mg)
        assert spans == int(spans) and spans >= 1, f"{name}: {hmma} HMMA in the span loop"
        per_weight = len(body) / (W_PER_SPAN * spans)
        assert sum(op.startswith("PRMT") for op in body) == 16 * 2 * W_TILES * spans, f"{name}: PRMT count"
        report.append(f"MG={mg} RT={rt}: {per_weight:.2f}")
        assert per_weight <= (4.0 if (mg, rt) == (1, 1) else 7.0), f"{name}: {per_weight:.2f} instructions per weight"
        # the nested absmax: between the first two barriers (the main loop) shared memory holds
        # only code2; each value read goes into an FMUL, whose result goes into an FADD
        bars = [i for i, (_, op, _) in enumerate(instrs) if op.startswith("BAR")]
        lds = [i for i in range(bars[0], bars[1]) if instrs[i][1].startswith("LDS")]
        assert len(lds) >= 2 * W_TILES, f"{name}: {len(lds)} code2 reads in the main loop"
        for i in lds:
            mul = _reader(instrs, i)
            assert mul and mul[1].startswith("FMUL"), f"{name}: code2[q] feeds {mul}, not an FMUL"
            add = _reader(instrs, mul[0])
            assert add and add[1].startswith("FADD"), f"{name}: code2[q]·absmax2 feeds {add}, not an FADD"
    print(f"sm_{arch} span loop, instructions per weight:", ", ".join(sorted(set(report))))


def _torch_include_flags(tmp_path: Path) -> list[str]:
    inc = Path(torch.__file__).parent / "include"
    flags = ["-I", str(inc), "-I", str(inc / "torch" / "csrc" / "api" / "include")]
    if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags += ["-I", str(tmp_path / "stub")]
    return flags


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("source", CPP_SOURCES, ids=lambda p: p.name)
def test_binding_compiles_against_torch_headers(source, tmp_path):
    if not (Path(torch.__file__).parent / "include" / "c10" / "cuda" / "CUDAStream.h").exists():
        pytest.skip("this torch wheel ships no c10/cuda headers")
    out = subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
         *_torch_include_flags(tmp_path), "-I", sysconfig.get_paths()["include"], "-I", str(_cuda_include()),
         "-I", str(CSRC), str(source)],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


# --------------------------------------------------------------------------------------------
# The kernel's code on the host
# --------------------------------------------------------------------------------------------

class Decode4Args(ctypes.Structure):
    """csrc/lowrank_4bit_decode.h ``Decode4Args``, field for field."""
    _fields_ = [("dtype", ctypes.c_int), ("x", ctypes.c_void_p), ("stride_xm", ctypes.c_int64),
                ("packed", ctypes.c_void_p), ("absmax", ctypes.c_void_p), ("code2", ctypes.c_void_p),
                ("absmax2", ctypes.c_void_p), ("offset", ctypes.c_void_p), ("blocksize2", ctypes.c_int),
                ("code", ctypes.c_void_p), ("blocksize", ctypes.c_int), ("lora_a", ctypes.c_void_p),
                ("core", ctypes.c_void_p), ("core_kind", ctypes.c_int), ("activation", ctypes.c_int),
                ("lora_b", ctypes.c_void_p), ("out_scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("scale", ctypes.c_float), ("y", ctypes.c_void_p), ("stride_ym", ctypes.c_int64),
                ("t", ctypes.c_void_p), ("M", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int),
                ("R", ctypes.c_int)]


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ACTIVATION = {None: 0, "relu": 1, "gelu": 2, "silu": 3}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if NVCC is None or shutil.which("g++") is None:
        pytest.skip("the host build of the kernel code needs g++ and the CUDA headers (cuda_fp16.h)")
    lib = tmp_path_factory.mktemp("emu") / "decode_emulator.so"
    # no FMA contraction: the nested absmax is a multiply then an add, each rounded (as on the GPU)
    out = subprocess.run(["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-I", str(CSRC),
                          "-I", str(_cuda_include()), str(ROOT / "tests" / "csrc" / "decode_emulator.cpp"),
                          "-o", str(lib)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    dll = ctypes.CDLL(str(lib))
    dll.fastpeft_decode_emulate.argtypes = [ctypes.POINTER(Decode4Args), ctypes.POINTER(ctypes.c_char_p)]
    dll.fastpeft_decode_emulate.restype = ctypes.c_int
    dll.fastpeft_decode8.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p]
    dll.fastpeft_block_absmax.argtypes = [ctypes.POINTER(Decode4Args), ctypes.c_int, ctypes.c_int64, ctypes.c_void_p]
    return dll


def _ptr(t):
    return None if t is None else t.data_ptr()


def _args(c, scale, y=None, t=None):
    """Decode4Args of a case (the tensors stay owned by ``c``)."""
    from fastpeft.quant import _code_cached, _packed_bytes, nested_fp32
    state, x = c["state"], c["x"]
    d, k = state.shape
    c["data"] = _packed_bytes(c["packed"])
    c["code"] = _code_cached(state.quant_type, torch.device("cpu"))
    nested = nested_fp32(state)
    c["absmax"] = state.absmax.reshape(-1).contiguous()
    code2 = absmax2 = offset = None
    if nested:
        code2, absmax2, offset = state.state2.code.contiguous(), state.state2.absmax.contiguous(), state.offset.reshape(1)
        c["nested"] = (code2, absmax2, offset)
    core = c.get("core")
    return Decode4Args(_DTYPE_CODE[x.dtype], _ptr(x), x.stride(0), _ptr(c["data"]), _ptr(c["absmax"]), _ptr(code2),
                       _ptr(absmax2), _ptr(offset), int(state.state2.blocksize) if nested else 0, _ptr(c["code"]),
                       state.blocksize, _ptr(c["lora_a"]), _ptr(core), 0 if core is None else (1 if core.dim() == 1 else 2),
                       _ACTIVATION[c.get("activation")], _ptr(c["lora_b"]), _ptr(c["out_scale"]), _ptr(c["bias"]),
                       scale, _ptr(y), 0 if y is None else y.stride(0), _ptr(t), x.shape[0], d, k,
                       c["lora_a"].shape[0])


def _emulate(dll, c, scale):
    """The kernel's arithmetic on CPU tensors: (y, T), or the launcher's refusal as ValueError."""
    M, d, r = c["x"].shape[0], c["state"].shape[0], c["lora_a"].shape[0]
    y = torch.full((M, d), float("nan"), dtype=c["x"].dtype)
    t = torch.full((M, r), float("nan"), dtype=c["x"].dtype)
    args = _args(c, scale, y, t)
    reason = ctypes.c_char_p()
    if dll.fastpeft_decode_emulate(ctypes.byref(args), ctypes.byref(reason)):
        raise ValueError(reason.value.decode())
    return y, t


def _case(M, k, d, r, dtype, quant_type, blocksize, nested, seed=0, with_os=True, with_bias=True, core=None,
          activation=None):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * sc)
    packed, state = fastpeft.quantize_4bit(rnd(d, k, sc=k ** -0.5).to(dtype), quant_type=quant_type,
                                           blocksize=blocksize, compress_statistics=nested)
    c = dict(x=rnd(M, k).to(dtype), packed=packed, state=state, lora_a=rnd(r, k, sc=k ** -0.5).to(dtype),
             lora_b=rnd(d, r, sc=r ** -0.5).to(dtype), out_scale=rnd(d).to(dtype) if with_os else None,
             bias=rnd(d).to(dtype) if with_bias else None, activation=activation)
    if core == "diag":
        c["core"] = rnd(r).to(dtype)
    elif core == "full":
        c["core"] = rnd(r, r, sc=r ** -0.5).to(dtype)
    return c


def _reference(c, scale):
    """float64 (Y, T) with W dequantised as the dense reference holds it."""
    w = fastpeft.dequantize_4bit(c["packed"], c["state"]).to(c["x"].dtype).double()
    y = reference_lowrank(c["x"], w, c["bias"], c["lora_a"], c["lora_b"], core=c.get("core"),
                          out_scale=c["out_scale"], scale=scale, activation=c.get("activation"))
    return y, c["x"].double() @ c["lora_a"].double().t()


# (M, k, d, r, blocksize): one span per block and several; d not a multiple of the 32 rows of a
# block; r below, at and between multiples of 16; M = 1, a single 8-row group, two groups
EMU_SHAPES = [(1, 128, 77, 12, 64), (3, 256, 40, 16, 32), (16, 64, 77, 64, 32), (8, 384, 33, 33, 128),
              (9, 512, 13, 5, 256), (5, 4096, 16, 1, 4096)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "M{}-k{}-d{}-r{}-bs{}".format(*s))
def test_emulated_kernel_matches_reference(emulator, shape, dtype):
    M, k, d, r, bs = shape
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        c = _case(M, k, d, r, dtype, quant_type, bs, nested, seed=k + M)
        y, t = _emulate(emulator, c, 0.7)
        y_ref, t_ref = _reference(c, 0.7)
        err = rel_err(y, y_ref)
        assert err <= TOL[dtype], f"{quant_type} nested={nested}: y relative error {err:.2e} > {TOL[dtype]:.0e}"
        assert rel_err(t, t_ref) <= TOL[dtype], f"{quant_type} nested={nested}: T"


@pytest.mark.parametrize("core,activation", [("diag", "relu"), ("full", "silu"), ("full", "gelu"), (None, "silu")],
                         ids=str)
def test_emulated_kernel_core_activation_and_no_bias(emulator, core, activation):
    """The epilogue's U = σ(T)Sᵀ | σ(T) ⊙ S (rounded to x's dtype), without bias or out_scale."""
    for dtype, M in ((torch.bfloat16, 12), (torch.float16, 1)):
        c = _case(M, 192, 50, 24, dtype, "nf4", 64, True, seed=M, with_os=False, with_bias=False, core=core,
                  activation=activation)
        y, t = _emulate(emulator, c, 1.5)
        y_ref, t_ref = _reference(c, 1.5)
        assert rel_err(y, y_ref) <= TOL[dtype], f"{dtype} M={M}: y relative error {rel_err(y, y_ref):.2e}"
        assert rel_err(t, t_ref) <= TOL[dtype]


def test_emulated_kernel_mixed_state_dtype(emulator):
    """A quant state whose dtype differs from x (an fp32 state, bf16 x; a bf16 state, fp16 x)."""
    for x_dtype, w_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)):
        c = _case(4, 96 * 2, 40, 8, w_dtype, "nf4", 64, True, with_os=False, with_bias=False)
        for key in ("x", "lora_a", "lora_b"):
            c[key] = c[key].to(x_dtype)
        y, _ = _emulate(emulator, c, 1.5)
        assert rel_err(y, _reference(c, 1.5)[0]) <= TOL[x_dtype]


def test_emulated_kernel_strided_x(emulator):
    """x with a row stride (a multiple of 8 elements, 16-byte aligned rows)."""
    c = _case(6, 64, 30, 4, torch.float16, "fp4", 32, False)
    x = torch.zeros(6, 72, dtype=torch.float16)[:, :64]
    x.copy_(c["x"])
    c["x"] = x
    y, _ = _emulate(emulator, c, 0.7)
    assert rel_err(y, _reference(c, 0.7)[0]) <= TOL[torch.float16]


@pytest.mark.parametrize("change,reason", [
    (dict(k=123), "multiple of the blocksize"), (dict(k=96), "multiple of the blocksize"),
    (dict(dtype=torch.float32), "float16 or bfloat16"), (dict(r=65), "r must be"), (dict(M=17), "M must be")],
    ids=lambda v: str(v))
def test_emulated_launcher_refuses_what_it_cannot_run(emulator, change, reason):
    p = dict(M=2, k=128, d=8, r=4, dtype=torch.float16)
    p.update(change)
    c = _case(p["M"], p["k"], p["d"], p["r"], p["dtype"], "nf4", 64, True)
    with pytest.raises(ValueError, match=reason):
        _emulate(emulator, c, 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_table_decoder_matches_the_code_table(emulator, quant_type, dtype):
    """decode8 (the __byte_perm lookup over two byte planes) on every code at every nibble of a
    word: pair j holds element 2j (the high nibble of byte j) in its low half."""
    from fastpeft.quant import _code_cached
    code = _code_cached(quant_type, torch.device("cpu"))
    want = code.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    out = (ctypes.c_uint32 * 4)()
    gen = torch.Generator().manual_seed(1)
    words = [q * 0x11111111 for q in range(16)] + torch.randint(0, 2**32, (200,), generator=gen).tolist()
    for word in words:
        emulator.fastpeft_decode8(_DTYPE_CODE[dtype], code.data_ptr(), word, out)
        for e in range(8):
            byte = (word >> (8 * (e // 2))) & 0xFF
            q = byte >> 4 if e % 2 == 0 else byte & 15
            got = (out[e // 2] >> (16 * (e % 2))) & 0xFFFF
            assert got == want[q].item(), f"word {word:#010x} element {e}: {got:#06x} != code[{q}] {want[q].item():#06x}"


def test_nested_absmax_is_bitexact(emulator):
    """block_absmax (code2[q]·absmax2[i / blocksize2] + offset, multiply then add) equals
    fastpeft.quant.dequantize_absmax (bitsandbytes' arithmetic) bit for bit."""
    from fastpeft.quant import dequantize_absmax
    packed, state = fastpeft.quantize_4bit(torch.randn(300, 256) * 3.0, blocksize=64, compress_statistics=True)
    c = dict(state=state, packed=packed, x=torch.zeros(1, 256, dtype=torch.float16),
             lora_a=torch.zeros(1, 256, dtype=torch.float16), lora_b=torch.zeros(300, 1, dtype=torch.float16),
             out_scale=None, bias=None)
    args = _args(c, 1.0)
    n = state.absmax.numel()
    out = torch.empty(n, dtype=torch.float32)
    emulator.fastpeft_block_absmax(ctypes.byref(args), int(math.log2(state.state2.blocksize)), n, out.data_ptr())
    assert n > state.state2.blocksize            # several second-level blocks
    assert torch.equal(out, dequantize_absmax(state))


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

def test_cuda_backend_covers_small_m_without_dropout_only():
    ok = dict(M=16, dropout_p=0.0, dtype=torch.bfloat16, k=4096, r=64, blocksize=64)
    assert op4._cuda_supports(ok) is None
    assert op4._cuda_supports(dict(M=1, dropout_p=0.0, dtype=torch.float16)) is None   # sizes not known yet
    assert "M <= 16" in op4._cuda_supports({**ok, "M": 17})
    assert "dropout" in op4._cuda_supports({**ok, "dropout_p": 0.1})
    assert "float16 or bfloat16" in op4._cuda_supports({**ok, "dtype": torch.float32})
    assert "r <= 64" in op4._cuda_supports({**ok, "r": 65})
    assert "k % blocksize" in op4._cuda_supports({**ok, "k": 4000})


def test_auto_falls_back_where_the_cuda_kernel_cannot_run(monkeypatch):
    """With fastpeft._C present, "auto" takes the CUDA kernel where it applies and the Triton
    decode kernel (one launch too) where it does not."""
    monkeypatch.setitem(_backend._IMPLS, (op4.OP_NAME, "cuda"),
                        _backend._Impl(lambda: None, lambda device: None, op4._cuda_supports))
    monkeypatch.setitem(_backend._IMPLS, (op4.OP_NAME, "triton"), _backend._Impl(lambda: None, lambda device: None))
    cuda = torch.device("cuda")
    problem = dict(M=1, dropout_p=0.0, dtype=torch.bfloat16, k=4096, r=16, blocksize=64)
    assert _backend.resolve_backend(op4.OP_NAME, cuda, "auto", problem) == "cuda"
    for change in (dict(k=4000), dict(dtype=torch.float32), dict(M=17), dict(dropout_p=0.1), dict(r=128)):
        assert _backend.resolve_backend(op4.OP_NAME, cuda, "auto", {**problem, **change}) == "triton", change


def test_cuda_backend_refuses_clearly_where_it_cannot_run():
    packed, state = fastpeft.quantize_4bit(torch.randn(8, 16))
    x, a, b = torch.randn(2, 16), torch.randn(4, 16), torch.zeros(8, 4)
    with fastpeft.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        fastpeft.lowrank_linear_4bit(x, packed, state, None, a, b)


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from fastpeft import _C
    except ImportError:
        return False
    return hasattr(_C, "lowrank4_decode")


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and fastpeft._C (FASTPEFT_BUILD_CUDA=1)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k,r", [(128, 12), (256, 64), (4096, 16)], ids=lambda v: str(v))
def test_cuda_backend_matches_reference(k, r, dtype, monkeypatch):
    from fastpeft import _C
    calls = []
    real = _C.lowrank4_decode
    monkeypatch.setattr(_C, "lowrank4_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    d = 77
    for M in range(1, 17):
        gen = torch.Generator().manual_seed(M * k)
        rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * sc).to("cuda", dtype)
        packed, state = fastpeft.quantize_4bit(rnd(d, k, sc=k ** -0.5), quant_type=("nf4", "fp4")[M % 2],
                                               blocksize=64, compress_statistics=M % 3 == 0)
        x, bias, o = rnd(M, k).requires_grad_(), rnd(d), rnd(d)
        a, b, core = rnd(r, k, sc=k ** -0.5), rnd(d, r, sc=r ** -0.5).requires_grad_(), rnd(r, r, sc=r ** -0.5)
        problem = dict(M=M, dropout_p=0.0, dtype=dtype, k=k, r=r, blocksize=64)
        assert _backend.resolve_backend(op4.OP_NAME, x.device, problem=problem) == "cuda"
        y = fastpeft.lowrank_linear_4bit(x, packed, state, bias, a, b, core=core, out_scale=o, scale=0.7,
                                         activation="silu")
        w = fastpeft.dequantize_4bit(packed, state).to(dtype).double()
        x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        ref = reference_lowrank(x64, w, bias, a, b64, core=core, out_scale=o, scale=0.7, activation="silu")
        assert rel_err(y, ref) <= TOL[dtype], f"M={M}: y relative error {rel_err(y, ref):.2e}"
        gy = torch.randn_like(y)
        y.backward(gy)
        ref.backward(gy.double())
        assert rel_err(x.grad, x64.grad) <= 2 * TOL[dtype], f"M={M}: dx"
        assert rel_err(b.grad, b64.grad) <= 2 * TOL[dtype], f"M={M}: dB"
        with torch.no_grad():   # the same call without autograd, under a CUDA graph
            y_eager = fastpeft.lowrank_linear_4bit(x.detach(), packed, state, bias, a, b.detach(), core=core,
                                                   out_scale=o, scale=0.7, activation="silu")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y_graph = fastpeft.lowrank_linear_4bit(x.detach(), packed, state, bias, a, b.detach(), core=core,
                                                       out_scale=o, scale=0.7, activation="silu")
            graph.replay()
            assert torch.equal(y_graph, y_eager), f"M={M}: graph replay differs"
    assert len(calls) >= 16

"""The CUDA C++ sources in csrc/ (``fastpeft._C``), checked without a GPU where possible.

* Every .cu compiles with nvcc for sm_80 and sm_90, and ptxas reports no local-memory spills
  (no stack frame) for any kernel.
* The torch binding (.cpp) passes g++ -fsyntax-only against torch's headers (the CPU wheel ships
  the c10/cuda headers but not c10/cuda/impl/cuda_cmake_macros.h, which the test supplies).
* The decode kernel's per-thread code (``csrc/lowrank_4bit_decode.cuh``) built for the host and
  run lane by lane (tests/csrc/decode_emulator.cpp) matches the float64 reference: odd k (the
  per-element path), k a multiple of 8 (the word path), k not a multiple of the blocksize,
  M = 1..16, every dtype, NF4 and FP4, nested or not.
* With a GPU and ``fastpeft._C`` built: the public op dispatches to the "cuda" backend for M <= 16
  and matches the float64 reference, backward included.

Tests skip (with the reason) without nvcc / g++. Compilation takes about a minute of CPU.
"""

import ctypes
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
# The kernel's per-thread code on the host
# --------------------------------------------------------------------------------------------

class Decode4Args(ctypes.Structure):
    """csrc/lowrank_4bit_decode.h ``Decode4Args``, field for field."""
    _fields_ = [("dtype", ctypes.c_int), ("x", ctypes.c_void_p), ("stride_xm", ctypes.c_int64),
                ("packed", ctypes.c_void_p), ("absmax", ctypes.c_void_p), ("code", ctypes.c_void_p),
                ("w_dtype", ctypes.c_int), ("blocksize", ctypes.c_int), ("u", ctypes.c_void_p),
                ("lora_b", ctypes.c_void_p), ("out_scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("scale", ctypes.c_float), ("y", ctypes.c_void_p), ("stride_ym", ctypes.c_int64),
                ("M", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("R", ctypes.c_int)]


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if NVCC is None or shutil.which("g++") is None:
        pytest.skip("the host build of the kernel code needs g++ and the CUDA headers (cuda_fp16.h)")
    lib = tmp_path_factory.mktemp("emu") / "decode_emulator.so"
    out = subprocess.run(["g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-I", str(CSRC), "-I", str(_cuda_include()),
                          str(ROOT / "tests" / "csrc" / "decode_emulator.cpp"), "-o", str(lib)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    dll = ctypes.CDLL(str(lib))
    dll.fastpeft_decode_emulate.argtypes = [ctypes.POINTER(Decode4Args), ctypes.POINTER(ctypes.c_int)]
    dll.fastpeft_decode_emulate.restype = ctypes.c_int
    return dll


def _ptr(t):
    return None if t is None else t.data_ptr()


def _emulate(dll, x, packed, state, u, lora_b, out_scale, bias, scale):
    """The kernel's arithmetic on CPU tensors; returns (y, whether the word/vector path ran)."""
    from fastpeft.quant import _code_cached, _packed_bytes, dequantize_absmax
    d = state.shape[0]
    M, K = x.shape
    data, absmax = _packed_bytes(packed), dequantize_absmax(state).contiguous()
    code = _code_cached(state.quant_type, torch.device("cpu"))
    y = torch.full((M, d), float("nan"), dtype=x.dtype)
    args = Decode4Args(_DTYPE_CODE[x.dtype], _ptr(x), x.stride(0), _ptr(data), _ptr(absmax), _ptr(code),
                       _DTYPE_CODE[state.dtype], state.blocksize, _ptr(u), _ptr(lora_b), _ptr(out_scale),
                       _ptr(bias), scale, _ptr(y), y.stride(0), M, d, K, u.shape[1])
    vec = ctypes.c_int(-1)
    assert dll.fastpeft_decode_emulate(ctypes.byref(args), ctypes.byref(vec)) == 0
    return y, bool(vec.value)


def _case(M, k, d, r, dtype, quant_type, blocksize, nested, w_dtype=None, seed=0, with_os=True, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * sc)
    w = rnd(d, k, sc=k ** -0.5).to(w_dtype or dtype)
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    return dict(x=rnd(M, k).to(dtype), packed=packed, state=state, u=rnd(M, r).to(dtype),
                lora_b=rnd(d, r, sc=r ** -0.5).to(dtype), out_scale=rnd(d).to(dtype) if with_os else None,
                bias=rnd(d).to(dtype) if with_bias else None)


def _reference(c, scale):
    """float64: X Wᵀ + b + s·(U Bᵀ) ⊙ o with W dequantised as the dense reference holds it."""
    w = fastpeft.dequantize_4bit(c["packed"], c["state"]).to(c["x"].dtype).double()
    y = c["x"].double() @ w.t() + scale * (c["u"].double() @ c["lora_b"].double().t()) * (
        1.0 if c["out_scale"] is None else c["out_scale"].double())
    return y if c["bias"] is None else y + c["bias"].double()


# (M, k, d, r, blocksize): odd k, k % 8 == 0 with k % blocksize != 0, k a multiple of 8 and of
# the blocksize, k even but not a multiple of 8, a blocksize larger than k
EMU_SHAPES = [(1, 123, 77, 12, 64), (3, 200, 77, 12, 64), (16, 128, 77, 12, 32), (8, 36, 77, 12, 64),
              (5, 1040, 13, 12, 4096), (16, 123, 77, 12, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "M{}-k{}-d{}-r{}-bs{}".format(*s))
def test_emulated_kernel_matches_reference(emulator, shape, dtype):
    M, k, d, r, bs = shape
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        c = _case(M, k, d, r, dtype, quant_type, bs, nested, seed=k + M)
        y, vec = _emulate(emulator, c["x"], c["packed"], c["state"], c["u"], c["lora_b"], c["out_scale"],
                          c["bias"], 0.7)
        assert vec == (k % 8 == 0)
        err = rel_err(y, _reference(c, 0.7))
        assert err <= TOL[dtype], f"{quant_type} nested={nested}: relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float16)], ids=str)
def test_emulated_kernel_rounds_like_bitsandbytes(emulator, x_dtype, w_dtype):
    """A quant state whose dtype differs from x: W is rounded to the state's dtype, then to x's."""
    c = _case(4, 96, 40, 8, x_dtype, "nf4", 64, True, w_dtype=w_dtype, with_os=False, with_bias=False)
    y, _ = _emulate(emulator, c["x"], c["packed"], c["state"], c["u"], c["lora_b"], None, None, 1.5)
    assert rel_err(y, _reference(c, 1.5)) <= TOL[x_dtype]


def test_emulated_kernel_unaligned_and_strided_x(emulator):
    """x not 16-byte aligned, or with a row stride: the per-element path, same result."""
    c = _case(6, 64, 30, 4, torch.float16, "fp4", 32, False)
    base = torch.zeros(6 * 72 + 1, dtype=torch.float16)
    x = base[1:].view(6, 72)[:, :64]
    x.copy_(c["x"])
    y, vec = _emulate(emulator, x, c["packed"], c["state"], c["u"], c["lora_b"], c["out_scale"], c["bias"], 0.7)
    assert not vec
    assert rel_err(y, _reference(c, 0.7)) <= TOL[torch.float16]


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

def test_cuda_backend_covers_small_m_without_dropout_only():
    ok = dict(M=16, dropout_p=0.0, dtype=torch.bfloat16)
    assert op4._cuda_supports(ok) is None
    assert "M <= 16" in op4._cuda_supports({**ok, "M": 17})
    assert "dropout" in op4._cuda_supports({**ok, "dropout_p": 0.1})
    assert "float32, float16 or bfloat16" in op4._cuda_supports({**ok, "dtype": torch.float64})


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [123, 128, 200], ids=lambda k: f"k{k}")
def test_cuda_backend_matches_reference(k, dtype, monkeypatch):
    from fastpeft import _C
    calls = []
    real = _C.lowrank4_decode
    monkeypatch.setattr(_C, "lowrank4_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    d, r = 77, 12
    for M in range(1, 17):
        gen = torch.Generator().manual_seed(M * k)
        rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * sc).to("cuda", dtype)
        packed, state = fastpeft.quantize_4bit(rnd(d, k, sc=k ** -0.5), quant_type=("nf4", "fp4")[M % 2],
                                               blocksize=64, compress_statistics=M % 3 == 0)
        x, bias, o = rnd(M, k).requires_grad_(), rnd(d), rnd(d)
        a, b, core = rnd(r, k, sc=k ** -0.5), rnd(d, r, sc=r ** -0.5).requires_grad_(), rnd(r, r, sc=r ** -0.5)
        assert _backend.resolve_backend(op4.OP_NAME, x.device, problem=dict(M=M, dropout_p=0.0, dtype=dtype)) == "cuda"
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
    assert len(calls) == 16

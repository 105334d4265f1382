"""The Triton kernels of the 4-bit op (``fastpeft.kernels.lowrank_4bit``) against the float64
reference: dequantise (bitsandbytes-exact), then the dense op in float64; output and every
gradient. Without a GPU they run under the Triton interpreter on CPU tensors, with tiny odd shapes
(one block per dim). M <= 16 takes the decode kernel, larger M the dequantising GEMM; odd k takes
the per-element path, even k the byte-pair path, k a multiple of the blocksize one scale per row
and block."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import fastpeft  # noqa: E402
from fastpeft.kernels import lowrank as L  # noqa: E402
from fastpeft.kernels import lowrank_4bit as L4  # noqa: E402
from helpers import reference_lowrank, saved_tensors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 2e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
SEED = 1234


def rel_err(actual, expected) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel(actual, expected, tol, name):
    assert actual is not None, f"{name}: missing"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def make_case(M, k, d, r, dtype, core_kind, with_os, quant_type, blocksize, nested, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * sc).to(DEVICE, dtype)
    w = rnd(d, k, sc=k ** -0.5)
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    core = None if core_kind is None else (rnd(r) if core_kind == "diag" else rnd(r, r, sc=r ** -0.5))
    return dict(x=rnd(M, k), packed=packed, state=state, bias=rnd(d), lora_A=rnd(r, k, sc=k ** -0.5),
                lora_B=rnd(d, r, sc=r ** -0.5), core=core, out_scale=rnd(d) if with_os else None)


def run_and_check(c, dtype, dropout_p, activation, train_a=True, deterministic=False):
    names = ("bias", "lora_A", "lora_B", "core", "out_scale")
    x = c["x"].clone().requires_grad_()
    leaves = {n: None if c[n] is None else c[n].clone().requires_grad_(train_a or n != "lora_A") for n in names}
    with fastpeft.use_backend("triton"):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            y = fastpeft.lowrank_linear_4bit(x, c["packed"], c["state"], leaves["bias"], leaves["lora_A"],
                                             leaves["lora_B"], core=leaves["core"], out_scale=leaves["out_scale"],
                                             scale=0.7, dropout_p=dropout_p, activation=activation, seed=SEED)
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE, dtype)
            y.backward(gy)
        finally:
            torch.use_deterministic_algorithms(False)
    w = fastpeft.dequantize_4bit(c["packed"], c["state"]).to(dtype)
    M, k = c["x"].shape
    keep = L.dropout_keep_mask(SEED, M, k, dropout_p, DEVICE) if dropout_p else None
    ref_leaves = {n: None if v is None else v.detach().double().requires_grad_(v.requires_grad) for n, v in leaves.items()}
    x64 = c["x"].double().requires_grad_()
    ref = reference_lowrank(x64, w.double(), ref_leaves["bias"], ref_leaves["lora_A"], ref_leaves["lora_B"],
                            core=ref_leaves["core"], out_scale=ref_leaves["out_scale"], scale=0.7,
                            keep_mask=keep, dropout_p=dropout_p, activation=activation)
    ref.backward(gy.double())
    tol_y, tol_g = TOL[dtype]
    assert y.dtype == dtype
    assert_rel(y, ref, tol_y, "y")
    assert_rel(x.grad, x64.grad, tol_g, "dx")
    for n, leaf in leaves.items():
        if leaf is not None and leaf.requires_grad:
            assert_rel(leaf.grad, ref_leaves[n].grad, tol_g, f"d{n}")


# (M, k, d, r): decode (M <= 16) and GEMM; even and odd k; d not a multiple of any block
SHAPES = [(1, 64, 40, 4), (7, 37, 24, 3), (16, 96, 33, 8), (19, 45, 30, 5), (40, 64, 72, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-k{}-d{}-r{}".format(*s))
def test_plain_lora(shape, dtype):
    M, k, d, r = shape
    c = make_case(M, k, d, r, dtype, None, False, "nf4", 64, True, seed=M + k)
    run_and_check(c, dtype, 0.0, None)


@pytest.mark.parametrize("case", [
    # (shape, dtype, core, out_scale, activation, dropout, quant_type, blocksize, nested, A trains)
    ((5, 40, 24, 4), torch.float32, "full", False, "gelu", 0.0, "nf4", 32, False, False),
    ((21, 33, 20, 3), torch.float32, "diag", True, None, 0.2, "fp4", 64, True, True),
    ((20, 64, 48, 8), torch.bfloat16, None, False, "silu", 0.1, "nf4", 128, True, True),
    ((3, 70, 30, 2), torch.float16, "full", True, "relu", 0.1, "fp4", 32, True, False),
    ((24, 36, 17, 4), torch.float16, "full", False, None, 0.0, "nf4", 256, False, True),
    # k a multiple of the blocksize, tiles spanning several blocks (one scale per row and block)
    ((3, 256, 20, 4), torch.float32, None, False, None, 0.0, "nf4", 32, True, True),
    ((20, 256, 24, 4), torch.bfloat16, "diag", True, None, 0.1, "fp4", 32, False, True),
], ids=lambda c: "M{}-k{}-d{}-r{}".format(*c[0]) + f"-{str(c[1])[6:]}-{c[2]}-os{int(c[3])}-{c[4]}-p{c[5]}-{c[6]}-bs{c[7]}")
def test_presets(case):
    (M, k, d, r), dtype, core, with_os, act, p, qt, bs, nested, train_a = case
    c = make_case(M, k, d, r, dtype, core, with_os, qt, bs, nested, seed=k)
    run_and_check(c, dtype, p, act, train_a=train_a)


def test_deterministic_mode_is_bit_identical():
    c = make_case(18, 40, 24, 4, torch.float32, "full", True, "nf4", 64, True)
    run_and_check(c, torch.float32, 0.1, "gelu", deterministic=True)
    grads = []
    x = c["x"].clone().requires_grad_()
    a = c["lora_A"].clone().requires_grad_()
    for _ in range(2):
        x.grad = a.grad = None
        with fastpeft.use_backend("triton"):
            y = fastpeft.lowrank_linear_4bit(x, c["packed"], c["state"], c["bias"], a, c["lora_B"], seed=5,
                                             dropout_p=0.1)
            y.sum().backward()
        grads.append((y.detach().clone(), x.grad.clone(), a.grad.clone()))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_saves_no_dense_weight():
    M, k, d, r = 20, 64, 48, 4
    c = make_case(M, k, d, r, torch.float32, None, False, "nf4", 64, True)
    x = c["x"].clone().requires_grad_()
    a, b = c["lora_A"].clone().requires_grad_(), c["lora_B"].clone().requires_grad_()
    with fastpeft.use_backend("triton"), saved_tensors() as saved:
        y = fastpeft.lowrank_linear_4bit(x, c["packed"], c["state"], None, a, b)
    y.sum().backward()
    assert [tuple(t.shape) for t in saved.tensors if t.is_floating_point() and t.numel() >= d * k] == []
    assert c["packed"].data_ptr() in {t.data_ptr() for t in saved.tensors}
    assert x.data_ptr() in {t.data_ptr() for t in saved.tensors}   # A trains: the caller's x itself


def test_launchers_directly():
    """The launchers on 2-D tensors, without autograd (the forward returns T as the dense one)."""
    c = make_case(9, 48, 20, 4, torch.float32, "diag", False, "fp4", 64, False)
    y, t = L4.lowrank_4bit_fwd(c["x"], c["packed"], c["state"], c["bias"], c["lora_A"], c["lora_B"], c["core"],
                               None, 1.5, 0.0, 0, None)
    torch.testing.assert_close(t, c["x"] @ c["lora_A"].t(), rtol=1e-5, atol=1e-5)
    w = fastpeft.dequantize_4bit(c["packed"], c["state"])
    ref = torch.nn.functional.linear(c["x"], w, c["bias"]) + 1.5 * ((t * c["core"]) @ c["lora_B"].t())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x has k=47 columns but the 4-bit weight is"):
        L4.lowrank_4bit_fwd(c["x"][:, :47], c["packed"], c["state"], None, c["lora_A"][:, :47], c["lora_B"],
                            None, None, 1.0, 0.0, 0, None)


def test_rank_limit_points_to_the_torch_backend():
    c = make_case(4, 16, 200, 130, torch.float32, None, False, "nf4", 64, False)
    with fastpeft.use_backend("triton"), pytest.raises(ValueError, match="r <= 128"):
        fastpeft.lowrank_linear_4bit(c["x"][:, :16], c["packed"], c["state"], None, c["lora_A"], c["lora_B"])


# -- the transient dense buffer (FASTPEFT_4BIT_BUFFER_MIN_M) ---------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("k,blocksize", [(123, 64), (100, 64), (256, 32), (64, 128)],
                         ids=["k123-odd", "k100-even", "k256-blocks", "k64-bs128"])
def test_dense_dequantisation_equals_bitsandbytes_layout(quant_type, nested, k, blocksize):
    """The buffer kernel gives fastpeft.dequantize_4bit(...).to(dtype) bit for bit: every layout
    (k odd, k even, k a multiple of the blocksize), every state and output dtype. The interpreter
    truncates fp32 -> bf16 instead of rounding, so there a bf16 value may be one ulp off."""
    gen = torch.Generator().manual_seed(k + blocksize)
    for state_dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(37, k, generator=gen).to(DEVICE, state_dtype)
        packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize,
                                               compress_statistics=nested)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ref = fastpeft.dequantize_4bit(packed, state).to(dtype)
            got = L4.dequantize_4bit_dense(packed, state, dtype)
            assert got.dtype == dtype and got.shape == (37, k) and got.device == ref.device
            if DEVICE == "cpu" and torch.bfloat16 in (state_dtype, dtype):
                ulp = ref.float().abs() * 2.0 ** -7
                assert ((got.float() - ref.float()).abs() <= ulp).all()
            else:
                assert torch.equal(got, ref), f"state {state_dtype}, out {dtype}"
    with pytest.raises(TypeError, match="dtype must be"):
        L4.dequantize_4bit_dense(packed, state, torch.float64)


@pytest.mark.parametrize("M,buffered", [(16, False), (17, False), (20, True)])
def test_buffer_dispatch_by_M(monkeypatch, M, buffered):
    """With FASTPEFT_4BIT_BUFFER_MIN_M=18, M >= 18 dequantises W into a buffer for forward and
    for dX (the dense kernels then run), smaller M keeps W in registers; output and every
    gradient match float64 either way, and backward never keeps a dense W."""
    monkeypatch.setenv(L4.BUFFER_MIN_M_ENV, "18")
    calls = []
    real = L4.dequantize_4bit_dense
    monkeypatch.setattr(L4, "dequantize_4bit_dense", lambda *a: calls.append(a[2]) or real(*a))
    c = make_case(M, 45, 30, 5, torch.float32, "full", True, "nf4", 64, True, seed=M)
    run_and_check(c, torch.float32, 0.1, "gelu")
    assert calls == ([torch.float32] * 2 if buffered else [])
    x = c["x"].clone().requires_grad_()
    with fastpeft.use_backend("triton"), saved_tensors() as saved:
        y = fastpeft.lowrank_linear_4bit(x, c["packed"], c["state"], None, c["lora_A"], c["lora_B"])
    y.sum().backward()
    assert [tuple(t.shape) for t in saved.tensors if t.is_floating_point() and t.numel() >= 30 * 45] == []


@pytest.mark.parametrize("value", ["-3", "many", "1.5"])
def test_buffer_setting_is_checked(monkeypatch, value):
    monkeypatch.setenv(L4.BUFFER_MIN_M_ENV, value)
    c = make_case(20, 32, 24, 4, torch.float32, None, False, "nf4", 64, False)
    with fastpeft.use_backend("triton"), pytest.raises(ValueError, match=L4.BUFFER_MIN_M_ENV):
        fastpeft.lowrank_linear_4bit(c["x"], c["packed"], c["state"], None, c["lora_A"], c["lora_B"])


def test_buffer_is_the_default_from_the_crossover(monkeypatch):
    """Unset, the buffer starts at BUFFER_MIN_M_DEFAULT; 0 turns it off; a value overrides it."""
    monkeypatch.delenv(L4.BUFFER_MIN_M_ENV, raising=False)
    assert L4.buffer_min_m() == L4.BUFFER_MIN_M_DEFAULT > L4.DECODE_MAX_M
    assert not L4._buffered(L4.BUFFER_MIN_M_DEFAULT - 1) and L4._buffered(L4.BUFFER_MIN_M_DEFAULT)
    monkeypatch.setenv(L4.BUFFER_MIN_M_ENV, "")
    assert L4.buffer_min_m() == L4.BUFFER_MIN_M_DEFAULT
    monkeypatch.setenv(L4.BUFFER_MIN_M_ENV, "0")
    assert L4.buffer_min_m() is None and not L4._buffered(10 ** 6)
    monkeypatch.setenv(L4.BUFFER_MIN_M_ENV, "1")
    assert not L4._buffered(L4.DECODE_MAX_M) and L4._buffered(L4.DECODE_MAX_M + 1)


def test_default_buffer_is_transient_and_never_saved(monkeypatch):
    """At the default crossover (lowered here to M = 20 so the interpreter stays quick) forward
    and dX go through the buffer; backward saves no dense W, and every buffer is freed when its
    call returns (no reference outlives it)."""
    import weakref
    monkeypatch.delenv(L4.BUFFER_MIN_M_ENV, raising=False)
    monkeypatch.setattr(L4, "BUFFER_MIN_M_DEFAULT", 20)
    buffers = []
    real = L4.dequantize_4bit_dense

    def spy(*args):
        w = real(*args)
        buffers.append(weakref.ref(w))
        return w

    monkeypatch.setattr(L4, "dequantize_4bit_dense", spy)
    c = make_case(21, 45, 30, 5, torch.float32, "full", True, "nf4", 64, True, seed=3)
    x = c["x"].clone().requires_grad_()
    with fastpeft.use_backend("triton"), saved_tensors() as saved:
        y = fastpeft.lowrank_linear_4bit(x, c["packed"], c["state"], None, c["lora_A"], c["lora_B"], core=c["core"])
    assert len(buffers) == 1 and buffers[0]() is None
    assert [tuple(t.shape) for t in saved.tensors if t.is_floating_point() and t.numel() >= 30 * 45] == []
    y.sum().backward()
    assert len(buffers) == 2 and buffers[1]() is None
    assert x.grad is not None and torch.isfinite(x.grad).all()


_NESTED_SASS_SCRIPT = """
import json, sys, torch
from dataclasses import asdict
from fastpeft.kernels import _aot, lowrank_4bit as L4
from fastpeft.kernels.inspect import Problem, _quant_state, _stand_in_device

jobs = []
for arch in (80, 90):
    for k in (4096, 4000, 4001):            # the three tile layouts: whole blocks, k even, k odd
        packed, state = _quant_state(Problem(op="4bit", k=k, d=64))
        with _stand_in_device(arch), _aot.capture(arch) as captured:
            L4.dequantize_4bit_dense(packed, state, torch.bfloat16)
        jobs += [asdict(j) for j in captured]
json.dump(jobs, sys.stdout)
"""


def test_byte_permute_tiles_per_architecture():
    """The larger byte-permute tiles are offered per architecture (the static tests check each for
    spills): sm_80's GEMM leaves out 128x128x128 (255 registers and spills there); its dX offers
    128x128x64 and 64x128x64 only at r <= 16 without DoRA's row scale (G [BLOCK_M, r] and, with
    the row scale, the fp32 dY tile live beside the mma.sync accumulators); sm_90 keeps its own."""
    from fastpeft.kernels import _aot

    def tiles(arch, dx, block_r=16, row_scale=False):
        kept = L4._gemm_keep(L4._DX_CONFIGS if dx else L4._GEMM_CONFIGS, arch, _aot.SMEM_LIMIT[arch], 8192, 4096,
                             block_r, 2, 2, dx=dx, lut=True, row_scale=row_scale)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept]

    assert tiles(80, False)[0] == (128, 128, 64) and (128, 128, 128) not in tiles(80, False)
    assert tiles(90, False)[:2] == [(128, 128, 64), (128, 128, 128)]
    assert tiles(80, True)[:2] == [(128, 128, 64), (64, 128, 64)]
    assert not {(128, 128, 64), (64, 128, 64)} & set(tiles(80, True, block_r=32) + tiles(80, True, row_scale=True))
    assert tiles(90, True, block_r=64)[0] == (64, 128, 64)


@pytest.mark.slow
def test_nested_absmax_is_not_contracted_into_an_fma_on_the_gpu():
    """On a GPU the nested absmax code2[q]·absmax2 + offset must round the product before the add
    (as bitsandbytes does); an FMA rounds once and can differ in the last bit. The kernels form it
    in registers with an explicitly rounded multiply: compiled for sm_80 and sm_90 as a launch
    specialises it, the dequantisation kernel (the same tile code as the GEMMs) holds an FMUL
    and an FADD and no FFMA, in every layout."""
    import json
    import subprocess
    import sys
    from fastpeft.kernels import _aot

    res = subprocess.run([sys.executable, "-c", _NESTED_SASS_SCRIPT], capture_output=True, text=True,
                         env=_aot.clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = [_aot.AotJob(**j) for j in json.loads(res.stdout)]
    assert len(jobs) == 6 and all(j.constexprs["NESTED"] for j in jobs)
    assert {j.constexprs["LAYOUT"] for j in jobs} == {0, 1, 2}
    for job, result in zip(jobs, _aot.compile_kernels(jobs)):
        assert not result.error, result.error
        name = f"sm_{job.arch} layout {job.constexprs['LAYOUT']}"
        assert "FADD" in result.sass and "FMUL" in result.sass, name
        assert "FFMA" not in result.sass, f"{name}: the absmax product is contracted into an FMA"


@pytest.mark.slow
def test_a_decode_call_is_one_launch():
    """A decode call (M <= 16, no grad) of the Triton backend is one kernel launch and no torch
    kernel: T, U, the adapter term, the bias and the nested absmax all inside
    ``_lowrank4_decode_kernel``. The launches are captured as ``fastpeft inspect`` does (in a
    process that does not interpret Triton), for sm_80 and sm_90, LoRA and the presets with a
    core, an activation and an out_scale, k a multiple of the blocksize and not."""
    from fastpeft.kernels.inspect import Problem, capture_problems

    problems = [Problem(op="4bit", arch=arch, k=k, d=192, M=M, r=r, dropout=0.0, method=method)
                for arch in (80, 90) for M, k, r, method in [(1, 256, 8, "lora"), (16, 200, 24, "lamda"),
                                                           (5, 256, 4, "vera"), (16, 250, 64, "adalora")]]
    for problem, (jobs, torch_ops) in zip(problems, capture_problems(problems)):
        assert {j.name for j in jobs} == {"_lowrank4_decode_kernel"}, problem.describe()
        assert len({j.launch for j in jobs}) == 1, problem.describe()
        assert torch_ops == [], f"{problem.describe()}: {torch_ops}"

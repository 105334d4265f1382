"""The Triton kernels of the mixed-batch op (``fastpeft.kernels.lowrank_mixed``) against the float64
torch reference: odd shapes (k=123, d=77, r=12 beside other ranks), adapters of every core kind and
with or without out_scale, rows of no adapter and of an adapter a layer lacks, segments cut into
several row tiles, dense and 4-bit (NF4 / FP4, every layout) weights. Without a GPU they run under
the Triton interpreter on CPU tensors."""

import os

import pytest
import torch
import torch.nn as nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import fastpeft  # noqa: E402
from fastpeft import AdapterConfig  # noqa: E402
from fastpeft.kernels import lowrank_mixed as LM  # noqa: E402
from fastpeft.ops.lowrank_mixed import MixedAdapter, MixedRows, lowrank_mixed_fwd_torch  # noqa: E402
from helpers import assert_close_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _adapters(d, k, dtype, gen, activation=None):
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * sc).to(DEVICE, dtype)
    return [MixedAdapter(rnd(12, k, sc=k ** -0.5), rnd(d, 12, sc=12 ** -0.5), rnd(12, 12, sc=12 ** -0.5), None,
                         0.5, 0.0, activation),
            MixedAdapter(rnd(5, k, sc=k ** -0.5), rnd(d, 5), rnd(5), rnd(d), 1.5, 0.0, activation),
            None,                                                  # an adapter this layer lacks
            MixedAdapter(rnd(3, k, sc=k ** -0.5), rnd(d, 3), None, None, 2.0, 0.0, activation)]


def _double(adapters):
    return [None if a is None else a._replace(**{f: None if getattr(a, f) is None else getattr(a, f).double()
                                                 for f in ("lora_A", "lora_B", "core", "out_scale")})
            for a in adapters]


SAMPLES = [0, 1, -1, 2, 3, 0, 3, 1, 0, -1, 0]     # 4 adapters (index 2 absent), rows of none


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("block_m", [16, 64], ids=["tiles16", "tiles64"])
def test_dense_against_float64(dtype, bias, block_m):
    gen = torch.Generator().manual_seed(0)
    d, k, rows_per_sample = 77, 123, 5                 # adapter 0: 4 samples = 20 rows: 2 tiles of 16
    x = torch.randn(len(SAMPLES) * rows_per_sample, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(d, k, generator=gen) * k ** -0.5).to(DEVICE, dtype)
    b = torch.randn(d, generator=gen).to(DEVICE, dtype) if bias else None
    adapters = _adapters(d, k, dtype, gen, activation="gelu" if dtype == torch.float32 else None)
    order, counts, _ = MixedRows(SAMPLES, len(adapters)).rows(rows_per_sample, DEVICE)
    y, ts = LM.lowrank_mixed_fwd(x, w, b, order, counts, adapters, block_m=block_m)
    y64, ts64 = lowrank_mixed_fwd_torch(x.double(), w.double(), None if b is None else b.double(), order, counts,
                                        _double(adapters), None, 0)
    assert_close_rel(y, y64, TOL[dtype], "Y")
    for i, (t, t64) in enumerate(zip(ts, ts64)):
        assert (t is None) == (t64 is None)
        if t is not None:
            assert_close_rel(t, t64, TOL[dtype], f"T of adapter {i}")


@pytest.mark.parametrize("quant_type,k", [("nf4", 123), ("fp4", 128), ("nf4", 96)])
def test_4bit_against_float64(quant_type, k):
    gen = torch.Generator().manual_seed(1)
    d, rows_per_sample = 37, 2
    x = torch.randn(len(SAMPLES) * rows_per_sample, k, generator=gen).to(DEVICE)
    w = torch.randn(d, k, generator=gen).to(DEVICE) * k ** -0.5
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=64, compress_statistics=True)
    b = torch.randn(d, generator=gen).to(DEVICE)
    adapters = _adapters(d, k, torch.float32, gen)
    order, counts, _ = MixedRows(SAMPLES, len(adapters)).rows(rows_per_sample, DEVICE)
    y, _ = LM.lowrank_mixed_fwd(x, packed, b, order, counts, adapters, state, block_m=16)
    dense = fastpeft.dequantize_4bit(packed, state).double()
    y64, _ = lowrank_mixed_fwd_torch(x.double(), dense, b.double(), order, counts, _double(adapters), None, 0)
    assert_close_rel(y, y64, 1e-5, "Y")


def test_tile_table_covers_every_row_once():
    table, n_adapter = LM.tile_table([(0, 0, 40), (1, 50, 3)], 60, 70, 16, "cpu")
    assert n_adapter == 4
    covered = []
    for slot, start, end in table.tolist():
        covered += list(range(start, min(start + 16, end)))
        assert slot in (0, 1) if start < 40 or 50 <= start < 53 else slot == -1
    assert sorted(covered) == list(range(70))


def test_through_the_model_equals_the_torch_backend():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 16)).to(DEVICE)
    fastpeft.inject(model, AdapterConfig(method="lora", r=4))
    fastpeft.add_adapter(model, AdapterConfig(method="vera", r=6), "v")
    fastpeft.add_adapter(model, AdapterConfig(method="lamda", r=3, target_modules=["2"]), "l")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    names = ["l", "v", "default", "__base__", "l", "default"]
    x = torch.randn(len(names), 5, 40, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        xb = x.clone().requires_grad_()
        with fastpeft.use_backend(backend), fastpeft.mixed_batch(model, names):
            y = model(xb)
        y.square().sum().backward()
        results[backend] = (y, xb.grad, model[2].lora_slots["l"].lora_core.grad.clone())
        model.zero_grad()
    for a, b, what in zip(results["triton"], results["torch"], ("Y", "dX", "dS of 'l'")):
        assert_close_rel(a, b, 1e-5, what)


def test_triton_refuses_dropout_clearly():
    model = fastpeft.inject(nn.Sequential(nn.Linear(16, 16)).to(DEVICE), AdapterConfig(r=2, dropout=0.1))
    model.train()
    with fastpeft.use_backend("triton"), fastpeft.mixed_batch(model, ["default", "__base__"]):
        with pytest.raises(RuntimeError, match="dropout .* torch backend"):
            model(torch.randn(2, 16, device=DEVICE))


def _static_jobs():
    from fastpeft.kernels._aot import AotJob

    jobs = []
    for arch, w4, br, rows in [(a, w, b, m) for a in (80, 90) for w in (False, True)
                               for b, m in ((16, 16), (16, 64), (64, 64))]:
        bm, bn, bk, warps, stages = LM.gpu_tiles(rows, w4)
        gemm = dict(x_ptr="*bf16", order_ptr="*i64", tiles_ptr="*i32", w_ptr="*u8" if w4 else "*bf16",
                    absmax_ptr="*fp32" if w4 else "*bf16", bias_ptr="*bf16", u_ptr="*bf16", b_ptr="*bf16",
                    os_ptr="*bf16", scale_ptr="*fp32", y_ptr="*bf16", N="i32", K="i32", R="i32",
                    stride_xm="i32", stride_wn="i32", stride_ym="i32")
        consts = dict(stride_xk=1, stride_wk=1, stride_yn=1, HAS_BIAS=True, HAS_OUT_SCALE=True, W4=w4, QBLOCK=64,
                      QUANT=0, W_KIND=2, LAYOUT=2, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=br, R_CHUNK=16,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        jobs.append(AotJob(LM.__name__, "_mixed_gemm_kernel", gemm, consts, arch, warps, stages))
        if not w4:
            t_sig = dict(x_ptr="*bf16", order_ptr="*i64", tiles_ptr="*i32", a_ptr="*bf16", core_ptr="*bf16",
                         t_ptr="*bf16", u_ptr="*bf16", K="i32", R="i32", stride_xm="i32")
            t_consts = dict(stride_xk=1, ACTIVATION=2, CORE=2, STORE_U=True, UPCAST=False, DOT_PRECISION="tf32",
                            BLOCK_R=br, R_CHUNK=16, BLOCK_M=bm, BLOCK_K=bk)
            jobs.append(AotJob(LM.__name__, "_mixed_t_kernel", t_sig, t_consts, arch, 4, stages))
    return jobs


@pytest.mark.slow
def test_gpu_tiles_compile_for_sm80_and_sm90_without_spills():
    """What the interpreter cannot check: the GPU tiles compile, fit, use tensor cores, and keep
    every value in registers (bf16, every feature on, r padded to 16 and 64)."""
    from fastpeft.kernels import _aot

    jobs = _static_jobs()
    for job, res in zip(jobs, _aot.compile_kernels(jobs)):
        what = f"{job.attr} sm_{job.arch} BLOCK_M={job.constexprs['BLOCK_M']} BLOCK_R={job.constexprs['BLOCK_R']}"
        assert not res.error, f"{what}: {res.error}"
        assert 0 <= res.shared <= _aot.SMEM_LIMIT[job.arch], f"{what}: {res.shared} bytes of shared memory"
        assert not res.spills and res.resources.get("STACK", 0) == 0, f"{what}: spills {res.spills[:3]}"
        assert res.uses_tensor_cores, f"{what}: no tensor-core instructions"

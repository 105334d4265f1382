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
    plan = MixedRows(SAMPLES, len(adapters))
    order, counts = plan.rows(rows_per_sample, DEVICE)
    y, ts = LM.lowrank_mixed_fwd(x, w, b, order, counts, adapters, block_m=block_m)
    y64, ts64 = lowrank_mixed_fwd_torch(x.double(), w.double(), None if b is None else b.double(), plan,
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
    plan = MixedRows(SAMPLES, len(adapters))
    order, counts = plan.rows(rows_per_sample, DEVICE)
    y, _ = LM.lowrank_mixed_fwd(x, packed, b, order, counts, adapters, state, block_m=16)
    dense = fastpeft.dequantize_4bit(packed, state).double()
    y64, _ = lowrank_mixed_fwd_torch(x.double(), dense, b.double(), plan, _double(adapters), None, 0)
    assert_close_rel(y, y64, 1e-5, "Y")


def test_tile_table_covers_every_row_once():
    table, n_adapter = LM.tile_table([(0, 0, 40), (1, 50, 3)], 60, 70, 16, "cpu")
    assert n_adapter == 4
    covered = []
    for slot, start, end in table.tolist():
        covered += list(range(start, min(start + 16, end)))
        assert slot in (0, 1) if start < 40 or 50 <= start < 53 else slot == -1
    assert sorted(covered) == list(range(70))


def test_through_the_model_equals_the_torch_backend(monkeypatch):
    """lora, lora_fa, vera and lamda adapters in one batch with base rows: the Triton forward and
    backward give the torch backend's output, dX and every parameter's gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 16)).to(DEVICE)
    fastpeft.inject(model, AdapterConfig(method="lora", r=4))
    fastpeft.add_adapter(model, AdapterConfig(method="vera", r=6), "v")
    fastpeft.add_adapter(model, AdapterConfig(method="lamda", r=3, target_modules=["2"]), "l")
    fastpeft.add_adapter(model, AdapterConfig(method="lora_fa", r=5), "f")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    names = ["l", "v", "default", "__base__", "f", "l", "default"]
    x = torch.randn(len(names), 5, 40, device=DEVICE)
    calls = []
    bwd = LM.lowrank_mixed_bwd
    monkeypatch.setattr(LM, "lowrank_mixed_bwd", lambda *a, **k: calls.append(1) or bwd(*a, **k))
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for backend in ("torch", "triton"):
        xb = x.clone().requires_grad_()
        with fastpeft.use_backend(backend), fastpeft.mixed_batch(model, names):
            y = model(xb)
        y.square().sum().backward()
        results[backend] = [y, xb.grad] + [p.grad.clone() for p in params]
        model.zero_grad()
    assert len(calls) == 2                               # both layers' backward ran the kernels
    for i, (a, b) in enumerate(zip(results["triton"], results["torch"])):
        assert_close_rel(a, b, 1e-5, ["Y", "dX"][i] if i < 2 else f"gradient of parameter {i - 2}")


def _dropout_reference(x, w, b, plan, adapters, seed, rows_per_sample):
    """Float64 Y and T_i with adapter i's rows (in batch order) dropped by the kernels' Philox
    mask of seed + i: ``dropout_keep_mask(seed + i, rows of i, k, p_i)``."""
    from fastpeft.kernels.lowrank import dropout_keep_mask

    y = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    ts = [None] * len(adapters)
    for i, a in enumerate(adapters):
        samples = plan.samples_of[i]
        if a is None or not samples:
            continue
        rows = torch.tensor([s * rows_per_sample + j for s in samples for j in range(rows_per_sample)])
        xi = x.double()[rows]
        if a.dropout_p > 0:
            keep = dropout_keep_mask(seed + i, len(rows), x.shape[1], a.dropout_p, x.device).cpu()
            assert 0 < keep.double().mean() < 1
            xi = xi * keep.double() / (1 - a.dropout_p)
        t = xi @ a.lora_A.double().t()
        z = torch.nn.functional.gelu(t) if a.activation == "gelu" else t
        if a.core is not None:
            z = z * a.core.double() if a.core.dim() == 1 else z @ a.core.double().t()
        delta = z @ a.lora_B.double().t()
        if a.out_scale is not None:
            delta = delta * a.out_scale.double()
        y[rows] += a.scale * delta
        ts[i] = t
    return y, ts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("block_m", [16, 64], ids=["tiles16", "tiles64"])
def test_dropout_against_float64_philox_mask(dtype, block_m):
    """Per-adapter p (0.3, 0, -, 0.5): each adapter's rows dropped by the dense kernels' mask of its
    own seed, counted from its first row; segments of several row tiles."""
    gen = torch.Generator().manual_seed(5)
    d, k, rows_per_sample, seed = 77, 123, 5, 1234
    x = torch.randn(len(SAMPLES) * rows_per_sample, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(d, k, generator=gen) * k ** -0.5).to(DEVICE, dtype)
    b = torch.randn(d, generator=gen).to(DEVICE, dtype)
    adapters = _adapters(d, k, dtype, gen, activation="gelu" if dtype == torch.float32 else None)
    adapters = [None if a is None else a._replace(dropout_p=p) for a, p in zip(adapters, (0.3, 0.0, 0.0, 0.5))]
    plan = MixedRows(SAMPLES, len(adapters))
    order, counts = plan.rows(rows_per_sample, DEVICE)
    y, ts = LM.lowrank_mixed_fwd(x, w, b, order, counts, adapters, block_m=block_m, seed=seed)
    y64, ts64 = _dropout_reference(x, w, b, plan, adapters, seed, rows_per_sample)
    assert_close_rel(y, y64, TOL[dtype], "Y")
    for i, (t, t64) in enumerate(zip(ts, ts64)):
        assert (t is None) == (t64 is None)
        if t is not None:
            assert_close_rel(t, t64, TOL[dtype], f"T of adapter {i}")
    y_other, _ = LM.lowrank_mixed_fwd(x, w, b, order, counts, adapters, block_m=block_m, seed=seed + 7)
    assert not torch.equal(y_other, y)                     # another seed, another mask


def test_dropout_4bit_against_float64_philox_mask():
    gen = torch.Generator().manual_seed(8)
    d, k, rows_per_sample, seed = 37, 123, 2, 4321
    x = torch.randn(len(SAMPLES) * rows_per_sample, k, generator=gen).to(DEVICE)
    w = torch.randn(d, k, generator=gen).to(DEVICE) * k ** -0.5
    packed, state = fastpeft.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    b = torch.randn(d, generator=gen).to(DEVICE)
    adapters = [None if a is None else a._replace(dropout_p=p)
                for a, p in zip(_adapters(d, k, torch.float32, gen), (0.2, 0.6, 0.0, 0.0))]
    plan = MixedRows(SAMPLES, len(adapters))
    order, counts = plan.rows(rows_per_sample, DEVICE)
    y, _ = LM.lowrank_mixed_fwd(x, packed, b, order, counts, adapters, state, block_m=16, seed=seed)
    y64, _ = _dropout_reference(x, fastpeft.dequantize_4bit(packed, state), b, plan, adapters, seed, rows_per_sample)
    assert_close_rel(y, y64, 1e-5, "Y")


def test_dropout_gradients_through_the_op_against_float64(monkeypatch):
    """The Triton forward with dropout and the Triton backward that regenerates its Philox masks
    (dX epilogue, dA pass; 16-row tiles, 32-wide blocks): every gradient against float64 autograd
    with the same masks."""
    from fastpeft.kernels import _common
    from fastpeft.ops.lowrank_mixed import lowrank_linear_mixed

    monkeypatch.setattr(_common, "INTERPRET_BLOCK_CAP", 16)
    assert _common._interp_block(1 << 20) == 16        # the launchers read the cap there
    calls = []
    bwd = LM.lowrank_mixed_bwd
    monkeypatch.setattr(LM, "lowrank_mixed_bwd", lambda *a, **k: calls.append(1) or bwd(*a, **k))
    gen = torch.Generator().manual_seed(6)
    d, k, rows_per_sample, seed = 77, 123, 5, 99
    base = _adapters(d, k, torch.float32, gen, activation="gelu")
    base = [None if a is None else a._replace(dropout_p=p) for a, p in zip(base, (0.25, 0.0, 0.0, 0.4))]
    x0 = torch.randn(len(SAMPLES), rows_per_sample, k, generator=gen).to(DEVICE)
    w = (torch.randn(d, k, generator=gen) * k ** -0.5).to(DEVICE)
    b0 = torch.randn(d, generator=gen).to(DEVICE)
    fields = ("lora_A", "lora_B", "core", "out_scale")
    leaves = lambda a, dtype: None if a is None else a._replace(**{
        f: None if getattr(a, f) is None else getattr(a, f).detach().to(dtype).requires_grad_() for f in fields})
    ads, ads64 = [leaves(a, torch.float32) for a in base], [leaves(a, torch.float64) for a in base]
    x, x64 = x0.clone().requires_grad_(), x0.double().requires_grad_()
    bias, bias64 = b0.clone().requires_grad_(), b0.double().requires_grad_()
    with fastpeft.use_backend("triton"):
        y = lowrank_linear_mixed(x, w, bias, ads, SAMPLES, seed=seed)
    plan = MixedRows(SAMPLES, len(ads))
    y64, _ = _dropout_reference(x64.reshape(-1, k), w, bias64, plan, ads64, seed, rows_per_sample)
    assert_close_rel(y, y64.reshape(y.shape), 1e-5, "Y")
    g = torch.randn(y.shape, generator=gen).to(DEVICE)
    y.backward(g)
    y64.backward(g.double().reshape(y64.shape))
    assert_close_rel(x.grad, x64.grad, 1e-5, "dX")
    assert_close_rel(bias.grad, bias64.grad, 1e-5, "db")
    for i, (a, r) in enumerate(zip(ads, ads64)):
        for f in fields:
            if a is not None and getattr(a, f) is not None:
                assert_close_rel(getattr(a, f).grad, getattr(r, f).grad, 1e-5, f"d{f} of adapter {i}")
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation,block_m", [(None, 16), ("gelu", 16), (None, 64)], ids=["tiles16", "gelu", "tiles64"])
def test_backward_against_float64(dtype, activation, block_m):
    """Every gradient of the Triton backward (full, diagonal and no core, out_scale, an absent
    adapter, rows of no adapter, segments of several tiles) against float64 autograd."""
    gen = torch.Generator().manual_seed(11)
    d, k, rows_per_sample = 77, 123, 3
    x = torch.randn(len(SAMPLES) * rows_per_sample, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(d, k, generator=gen) * k ** -0.5).to(DEVICE, dtype)
    b = torch.randn(d, generator=gen).to(DEVICE, dtype)
    adapters = _adapters(d, k, dtype, gen, activation=activation)
    plan = MixedRows(SAMPLES, len(adapters))
    order, counts = plan.rows(rows_per_sample, DEVICE)
    y, ts = LM.lowrank_mixed_fwd(x, w, b, order, counts, adapters, block_m=block_m)
    g = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    needs = [(True, True, True, True)] * len(adapters)
    dx, grads = LM.lowrank_mixed_bwd(g, x, w, order, counts, adapters, ts, True, needs, block_m=block_m)
    fields = ("lora_A", "lora_B", "core", "out_scale")
    ads64 = [None if a is None else a._replace(**{
        f: None if getattr(a, f) is None else getattr(a, f).detach().double().requires_grad_() for f in fields})
        for a in adapters]
    x64 = x.double().requires_grad_()
    y64, _ = _dropout_reference(x64, w, b, plan, ads64, 0, rows_per_sample)
    y64.backward(g.double())
    tol = TOL[dtype] * (1 if dtype == torch.float32 else 2)
    assert_close_rel(dx, x64.grad, tol, "dX")
    for i, (a, got) in enumerate(zip(ads64, grads)):
        assert (got is None) == (a is None)
        if a is None:
            continue
        for f, gr in zip(fields, got):
            if getattr(a, f) is not None:
                assert_close_rel(gr, getattr(a, f).grad, tol, f"d{f} of adapter {i}")


@pytest.mark.parametrize("quant_type,k", [("nf4", 128), ("fp4", 96), ("nf4", 123)])   # layouts 2, 1, 0
def test_backward_4bit_against_float64(quant_type, k, monkeypatch):
    """dX through the 4-bit W (dequantised tile by tile, read transposed; 32-wide blocks, so
    several over k and d) and the adapter gradients against float64 autograd on the dequantised
    weight."""
    from fastpeft.kernels import _common

    monkeypatch.setattr(_common, "INTERPRET_BLOCK_CAP", 32)
    assert _common._interp_block(1 << 20) == 32        # the launchers read the cap there
    gen = torch.Generator().manual_seed(14)
    d, rows_per_sample = 37, 2
    x = torch.randn(len(SAMPLES) * rows_per_sample, k, generator=gen).to(DEVICE)
    w = torch.randn(d, k, generator=gen).to(DEVICE) * k ** -0.5
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=64, compress_statistics=True)
    adapters = _adapters(d, k, torch.float32, gen, activation="gelu")
    plan = MixedRows(SAMPLES, len(adapters))
    order, counts = plan.rows(rows_per_sample, DEVICE)
    _, ts = LM.lowrank_mixed_fwd(x, packed, None, order, counts, adapters, state, block_m=16)
    g = torch.randn(x.shape[0], d, generator=gen).to(DEVICE)
    needs = [(True, True, True, True)] * len(adapters)
    dx, grads = LM.lowrank_mixed_bwd(g, x, packed, order, counts, adapters, ts, True, needs, state, block_m=16)
    fields = ("lora_A", "lora_B", "core", "out_scale")
    ads64 = [None if a is None else a._replace(**{
        f: None if getattr(a, f) is None else getattr(a, f).detach().double().requires_grad_() for f in fields})
        for a in adapters]
    x64 = x.double().requires_grad_()
    y64, _ = _dropout_reference(x64, fastpeft.dequantize_4bit(packed, state), None, plan, ads64, 0, rows_per_sample)
    y64.backward(g.double())
    assert_close_rel(dx, x64.grad, 1e-5, "dX")
    for i, (a, got) in enumerate(zip(ads64, grads)):
        if a is not None:
            for f, gr in zip(fields, got):
                if getattr(a, f) is not None:
                    assert_close_rel(gr, getattr(a, f).grad, 1e-5, f"d{f} of adapter {i}")


def test_4bit_through_the_op_equals_the_torch_backend():
    from fastpeft.ops.lowrank_mixed import lowrank_linear_mixed

    gen = torch.Generator().manual_seed(15)
    d, k = 29, 64
    w = torch.randn(d, k, generator=gen).to(DEVICE) * k ** -0.5
    packed, state = fastpeft.quantize_4bit(w, quant_type="nf4", blocksize=64)
    x0 = torch.randn(len(SAMPLES), 3, k, generator=gen).to(DEVICE)
    base = _adapters(d, k, torch.float32, gen)
    results = {}
    for backend in ("torch", "triton"):
        ads = [None if a is None else a._replace(lora_A=a.lora_A.clone().requires_grad_(),
                                                 lora_B=a.lora_B.clone().requires_grad_()) for a in base]
        x = x0.clone().requires_grad_()
        with fastpeft.use_backend(backend):
            y = lowrank_linear_mixed(x, packed, None, ads, SAMPLES, quant_state=state)
        y.square().sum().backward()
        results[backend] = [y, x.grad] + [t.grad for a in ads if a is not None for t in (a.lora_A, a.lora_B)]
    for i, (a, b) in enumerate(zip(results["triton"], results["torch"])):
        assert_close_rel(a, b, 1e-5, f"output {i}")


def test_backward_of_rows_without_adapters():
    """A batch whose rows run the base alone (a layer without the active adapter): dX = dY W."""
    from fastpeft.ops.lowrank_mixed import lowrank_linear_mixed

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 4, 37, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(21, 37, generator=gen).to(DEVICE)
    with fastpeft.use_backend("triton"):
        y = lowrank_linear_mixed(x, w, None, [], [-1, -1, -1])
    g = torch.randn(y.shape, generator=gen).to(DEVICE)
    y.backward(g)
    assert_close_rel(x.grad, (g.double() @ w.double()), 1e-5, "dX")


def test_backward_is_deterministic_and_skips_what_is_not_needed():
    gen = torch.Generator().manual_seed(12)
    d, k, rows_per_sample = 40, 33, 4
    x = torch.randn(len(SAMPLES) * rows_per_sample, k, generator=gen).to(DEVICE)
    w = torch.randn(d, k, generator=gen).to(DEVICE)
    adapters = _adapters(d, k, torch.float32, gen)
    order, counts = MixedRows(SAMPLES, len(adapters)).rows(rows_per_sample, DEVICE)
    _, ts = LM.lowrank_mixed_fwd(x, w, None, order, counts, adapters, block_m=16)
    g = torch.randn(x.shape[0], d, generator=gen).to(DEVICE)
    needs = [(False, True, False, False)] * len(adapters)
    first = LM.lowrank_mixed_bwd(g, x, w, order, counts, adapters, ts, False, needs, block_m=16)
    again = LM.lowrank_mixed_bwd(g, x, w, order, counts, adapters, ts, False, needs, block_m=16)
    assert first[0] is None and again[0] is None
    for one, two in zip(first[1], again[1]):
        assert (one is None) == (two is None)
        if one is not None:
            assert one[0] is None and one[2] is None and one[3] is None
            assert torch.equal(one[1], two[1])


_CAPTURE_SCRIPT = """
import json, sys, torch
import fastpeft
from dataclasses import asdict
from fastpeft.kernels import _aot, lowrank_mixed as LM
from fastpeft.kernels.inspect import _stand_in_device
from fastpeft.ops.lowrank_mixed import MixedAdapter, MixedRows

d = k = 4096
bf = torch.bfloat16
def adapter(r, core, out_scale):
    return MixedAdapter(torch.empty(r, k, dtype=bf), torch.empty(d, r, dtype=bf),
                        None if core is None else torch.empty(*core, dtype=bf),
                        torch.empty(d, dtype=bf) if out_scale else None, 0.5, 0.0, "gelu")
packed, state = fastpeft.quantize_4bit(torch.randn(256, 256), quant_type="nf4", blocksize=64)
jobs = []
for arch in (80, 90):
    for r, rows_per_sample in ((12, 3), (12, 64), (64, 64)):
        adapters = [adapter(r, (r, r), True), adapter(5, (5,), False), None, adapter(3, None, False)]
        order, counts = MixedRows([0, 1, -1, 3, 0, 3, 1, 0], len(adapters)).rows(rows_per_sample, "cpu")
        x = torch.empty(8 * rows_per_sample, k, dtype=bf)
        with _stand_in_device(arch), _aot.capture(arch) as captured:
            w = torch.empty(d, k, dtype=bf)
            _, ts = LM.lowrank_mixed_fwd(x, w, torch.empty(d, dtype=bf), order, counts, adapters)
            LM.lowrank_mixed_bwd(torch.empty(x.shape[0], d, dtype=bf), x, w, order, counts, adapters, ts, True,
                                 [(True, True, True, True)] * len(adapters))
            LM.lowrank_mixed_fwd(x[:, :256], packed, None, order, counts,
                                 [None if a is None else a._replace(lora_A=a.lora_A[:, :256], lora_B=a.lora_B[:256],
                                  out_scale=None if a.out_scale is None else a.out_scale[:256]) for a in adapters],
                                 state)
            a256 = [None if a is None else a._replace(lora_A=a.lora_A[:, :256], lora_B=a.lora_B[:256],
                    out_scale=None if a.out_scale is None else a.out_scale[:256]) for a in adapters]
            _, ts4 = LM.lowrank_mixed_fwd(x[:, :256], packed, None, order, counts, a256, state)
            LM.lowrank_mixed_bwd(torch.empty(x.shape[0], 256, dtype=bf), x[:, :256], packed, order, counts, a256,
                                 ts4, True, [(True, True, True, True)] * len(adapters), state)
            dropped = [None if a is None else a._replace(dropout_p=0.1) for a in adapters]
            _, tsd = LM.lowrank_mixed_fwd(x, w, None, order, counts, dropped, seed=7)       # dropout in the T pass
            LM.lowrank_mixed_bwd(torch.empty(x.shape[0], d, dtype=bf), x, w, order, counts, dropped, tsd, True,
                                 [(True, True, True, True)] * len(adapters), seed=7)   # ... and in dX and dA
        jobs += [asdict(j) for j in captured]
json.dump(jobs, sys.stdout)
"""


def _static_jobs():
    """The launches of the mixed forward (dense and 4-bit, r padded to 16 and 64, segments of 24
    and 512 rows, with and without dropout) and backward (dense and 4-bit) on stand-in tensors, as
    Triton specialises them for sm_80 and sm_90."""
    import json
    import subprocess
    import sys
    from fastpeft.kernels._aot import AotJob, clean_env

    res = subprocess.run([sys.executable, "-c", _CAPTURE_SCRIPT], capture_output=True, text=True, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return [AotJob(**j) for j in json.loads(res.stdout)]


@pytest.mark.slow
def test_gpu_tiles_compile_for_sm80_and_sm90_without_spills():
    """What the interpreter cannot check: the GPU tiles compile, fit, use tensor cores, and keep
    every value in registers (bf16, every feature on, r padded to 16 and 64), specialised as a
    launch specialises them."""
    from fastpeft.kernels import _aot

    jobs = _static_jobs()
    assert {j.name for j in jobs} >= {"_mixed_t_kernel", "_mixed_gemm_kernel"} and {j.arch for j in jobs} == {80, 90}
    assert {j.name for j in jobs if j.constexprs.get("HAS_DROPOUT")} == {"_mixed_t_kernel", "_mixed_gemm_kernel",
                                                                         "_mixed_da_kernel"}
    assert {j.name for j in jobs} >= {"_mixed_u_kernel", "_mixed_dy_kernel", "_mixed_da_kernel"}
    for job, res in zip(jobs, _aot.compile_kernels(jobs)):
        what = f"{job.name} sm_{job.arch} BLOCK_M={job.constexprs.get('BLOCK_M')} BLOCK_R={job.constexprs.get('BLOCK_R')}"
        assert not res.error, f"{what}: {res.error}"
        assert 0 <= res.shared <= _aot.SMEM_LIMIT[job.arch], f"{what}: {res.shared} bytes of shared memory"
        assert not res.spills and res.resources.get("STACK", 0) == 0, f"{what}: spills {res.spills[:3]}"
        if job.name.startswith("_mixed"):       # (the 4-bit weight's nested-absmax expansion has no GEMM)
            assert res.uses_tensor_cores, f"{what}: no tensor-core instructions"

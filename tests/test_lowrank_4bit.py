"""The 4-bit op ``fastpeft.lowrank_linear_4bit`` and ``fastpeft.LowRankLinear4bit`` on the torch
backend: output and every gradient against the float64 reference (dequantise, then the dense
reference), the memory contract (no dense W saved), bitsandbytes interop, bad input."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.config import METHODS
from fastpeft.ops.lowrank import dropout_keep_mask_torch
from helpers import TOLERANCES, assert_close_rel, reference_lowrank, saved_tensors

try:
    import bitsandbytes
    import bitsandbytes.functional as BF
except Exception:  # pragma: no cover - depends on the environment
    bitsandbytes = BF = None

needs_bnb = pytest.mark.skipif(bitsandbytes is None, reason="bitsandbytes is not installed")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _torch_backend():
    with fastpeft.use_backend("torch"):
        yield


def _make(lead, k, d, r, dtype, core_kind, with_os, with_bias, quant_type="nf4", blocksize=64,
          nested=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    w = (rnd(d, k) / k ** 0.5).to(dtype)
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize,
                                           compress_statistics=nested)
    t = lambda v: None if v is None else v.to(dtype)
    x = t(rnd(*lead, k))
    core = {None: None, "diag": rnd(r), "full": rnd(r, r) / r ** 0.5}[core_kind]
    return dict(x=x, packed=packed, state=state, bias=t(rnd(d)) if with_bias else None,
                lora_A=t(rnd(r, k) / k ** 0.5), lora_B=t(rnd(d, r) / r ** 0.5), core=t(core),
                out_scale=t(rnd(d)) if with_os else None)


def _check_against_reference(p, dtype, scale, dropout_p, activation, train_a=True, seed=1234):
    x = p["x"].clone().requires_grad_()
    grads_of = {"lora_A": train_a, "lora_B": True, "core": p["core"] is not None,
                "out_scale": p["out_scale"] is not None, "bias": p["bias"] is not None}
    leaves = {n: (p[n].clone().requires_grad_(g) if p[n] is not None else None) for n, g in grads_of.items()}
    y = fastpeft.lowrank_linear_4bit(x, p["packed"], p["state"], leaves["bias"], leaves["lora_A"],
                                     leaves["lora_B"], core=leaves["core"], out_scale=leaves["out_scale"],
                                     scale=scale, dropout_p=dropout_p, activation=activation, seed=seed)
    # the oracle: bitsandbytes-exact dequantisation, then the dense op in float64
    w = fastpeft.dequantize_4bit(p["packed"], p["state"]).to(dtype)
    x2d = p["x"].reshape(-1, p["x"].shape[-1])
    keep = dropout_keep_mask_torch(seed, *x2d.shape, dropout_p, x.device) if dropout_p else None
    x64 = p["x"].double().requires_grad_()
    ref_leaves = {n: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
                  for n, v in leaves.items()}
    ref = reference_lowrank(x64, w.double(), ref_leaves["bias"], ref_leaves["lora_A"], ref_leaves["lora_B"],
                            core=ref_leaves["core"], out_scale=ref_leaves["out_scale"], scale=scale,
                            keep_mask=keep, dropout_p=dropout_p, activation=activation)
    tol_out, tol_grad = TOLERANCES[dtype]
    assert y.dtype == dtype
    assert_close_rel(y, ref, tol_out, "y")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y.backward(gy.to(dtype))
    ref.backward(gy)
    assert_close_rel(x.grad, x64.grad, tol_grad, "dx")
    for name, leaf in leaves.items():
        if leaf is not None and leaf.requires_grad:
            assert leaf.grad is not None, f"no gradient for {name}"
            if name == "core" and dtype != torch.float32:
                _assert_core_grad_close(leaf.grad, ref_leaves, x64, keep, dropout_p, activation, scale, gy,
                                        tol_grad)
                continue
            assert_close_rel(leaf.grad, ref_leaves[name].grad, tol_grad, f"d{name}")
        elif leaf is not None:
            assert leaf.grad is None


def _assert_core_grad_close(got, ref_leaves, x64, keep, dropout_p, activation, scale, gy, tol):
    """dS = s·Gᵀ Z (or s·Σ G ⊙ Z) is a sum over M whose terms can cancel: T and dY held in 16 bits
    leave each term ~2⁻⁸ off, so its error is relative to s·|G|ᵀ|Z|, not to |dS| (at r = 1 a third
    of random masks put |dS| under a tenth of that)."""
    from fastpeft.ops.lowrank import activation_fn

    k = x64.shape[-1]
    xd = x64.detach().reshape(-1, k)
    if keep is not None:
        xd = xd * keep.to(torch.float64) / (1 - dropout_p)
    z = activation_fn(xd @ ref_leaves["lora_A"].detach().t(), activation)
    gyo = gy.reshape(-1, gy.shape[-1])
    if ref_leaves["out_scale"] is not None:
        gyo = gyo * ref_leaves["out_scale"].detach()
    g = gyo @ ref_leaves["lora_B"].detach()
    want = ref_leaves["core"].grad
    bound = scale * (g.abs().t() @ z.abs() if want.dim() == 2 else (g.abs() * z.abs()).sum(0))
    err = ((got.double() - want).norm() / bound.norm()).item()
    assert err <= tol, f"dcore: error {err:.3e} of s·|G|ᵀ|Z| > {tol:.1e}"


SHAPES = [((1,), 123, 77, 12), ((37,), 123, 77, 12), ((2, 9), 64, 48, 8), ((16,), 33, 130, 1)]


def _ids(shape):
    lead, k, d, r = shape
    return f"M{'x'.join(map(str, lead))}-k{k}-d{d}-r{r}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("core_kind,with_os,activation,dropout_p,quant_type,blocksize,nested", [
    (None, False, None, 0.0, "nf4", 64, True),
    ("full", False, None, 0.1, "fp4", 32, False),
    ("diag", True, None, 0.0, "nf4", 128, False),
    (None, False, "gelu", 0.1, "fp4", 64, True),
    ("full", True, "silu", 0.0, "nf4", 256, True),
])
def test_matches_float64_reference(dtype, shape, core_kind, with_os, activation, dropout_p,
                                   quant_type, blocksize, nested):
    lead, k, d, r = shape
    p = _make(lead, k, d, r, dtype, core_kind, with_os, True, quant_type, blocksize, nested, seed=k + d)
    _check_against_reference(p, dtype, 0.7, dropout_p, activation)


@pytest.mark.parametrize("train_a", [True, False], ids=["A-trains", "A-frozen"])
def test_a_frozen_and_no_bias(train_a):
    p = _make((5, 3), 40, 24, 4, torch.float32, "full", False, False)
    _check_against_reference(p, torch.float32, 2.0, 0.2, None, train_a=train_a)


def test_gradcheck_float64_adapter():
    """Every adapter gradient by finite differences (W is fixed by its 4-bit code)."""
    p = _make((4,), 10, 6, 3, torch.float32, "full", True, True)
    w_state = p["state"]
    w_state.dtype = torch.float32
    xs = [p["x"].double().requires_grad_()]
    rest = [p[n].double().requires_grad_() for n in ("bias", "lora_A", "lora_B", "core", "out_scale")]

    def fn(x, bias, a, b, core, os_):
        return fastpeft.lowrank_linear_4bit(x, p["packed"], w_state, bias, a, b, core=core, out_scale=os_,
                                            scale=0.7, dropout_p=0.3, activation="silu", seed=5)

    # float64 compute over an fp32-stated weight: dequantised in fp32, cast to float64 exactly
    assert torch.autograd.gradcheck(fn, tuple(xs + rest), eps=1e-6, atol=1e-7)


def test_quant_state_dtype_differs_from_compute_dtype():
    """A bf16-stated weight run in fp32 (as bitsandbytes' compute_dtype does)."""
    p = _make((6,), 64, 32, 4, torch.bfloat16, None, False, True)
    for n in ("x", "bias", "lora_A", "lora_B"):
        p[n] = p[n].float()
    _check_against_reference(p, torch.float32, 1.0, 0.0, None)


# -- memory contract -----------------------------------------------------------------------

@pytest.mark.parametrize("train_a", [True, False], ids=["A-trains", "A-frozen"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_saves_packed_weight_never_dense(train_a, dropout_p):
    m, k, d, r = 24, 96, 80, 4
    p = _make((m,), k, d, r, torch.float32, "full", False, True)
    x = p["x"].clone().requires_grad_()
    a = p["lora_A"].clone().requires_grad_(train_a)
    b = p["lora_B"].clone().requires_grad_()
    core = p["core"].clone().requires_grad_()
    with saved_tensors() as saved:
        y = fastpeft.lowrank_linear_4bit(x, p["packed"], p["state"], p["bias"], a, b, core=core,
                                         dropout_p=dropout_p)
    y.sum().backward()
    dense = [tuple(t.shape) for t in saved.tensors if t.is_floating_point() and t.numel() >= d * k]
    assert dense == [], f"a dense copy of W (or something that large) was saved: {dense}"
    ptrs = {t.data_ptr() for t in saved.tensors}
    assert p["packed"].data_ptr() in ptrs, "the packed weight itself is saved (a reference)"
    assert p["state"].absmax.data_ptr() in ptrs
    big = [t for t in saved.tensors if t.is_floating_point() and t.numel() >= m * k]
    if train_a:  # the caller's x itself, nothing else of size M×k
        assert [t.data_ptr() for t in big] == [x.data_ptr()]
    else:
        assert big == []
    # packed (d·k/2 bytes) + x (if A trains) + T + the adapter + quant statistics
    limit = d * k // 2 + (m * k * 4 if train_a else 0) + m * r * 4 + (r * k + d * r + r * r) * 4 + 4096
    assert saved.storage_bytes() <= limit


# -- the module ----------------------------------------------------------------------------

PRESETS = [m for m in METHODS if METHODS[m].has_adapter]


@pytest.mark.parametrize("method", PRESETS)
def test_every_preset_equals_the_dense_layer(method):
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40)
    config = fastpeft.AdapterConfig(method=method, r=4, alpha=8, dropout=0.0)
    layer4 = fastpeft.LowRankLinear4bit.from_linear(base, config, quant_type="nf4", blocksize=64)
    assert layer4.weight.dtype == torch.uint8 and not layer4.weight.requires_grad
    assert layer4.bias is base.bias
    dense_base = torch.nn.Linear(48, 40)
    with torch.no_grad():
        dense_base.weight.copy_(fastpeft.dequantize_4bit(layer4.weight, layer4.quant_state))
        dense_base.bias.copy_(base.bias)
    dense = fastpeft.LowRankLinear.from_linear(dense_base, config)
    with torch.no_grad():  # same adapter values (and a non-zero B so every path is exercised)
        for name in ("lora_A", "lora_B", "lora_core", "lora_out_scale"):
            src = getattr(layer4, name)
            if src is not None:
                if name != "lora_A":
                    src.copy_(torch.randn_like(src))
                getattr(dense, name).copy_(src)
    for name in ("lora_A", "lora_B", "lora_core", "lora_out_scale"):
        t4, td = getattr(layer4, name), getattr(dense, name)
        assert (t4 is None) == (td is None)
        if t4 is not None:
            assert t4.requires_grad == td.requires_grad, name
    x = torch.randn(2, 7, 48)
    y4, yd = layer4(x), dense(x)
    torch.testing.assert_close(y4, yd, rtol=1e-5, atol=1e-5)
    (y4 ** 2).sum().backward()
    (yd ** 2).sum().backward()
    for name, param in layer4.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, dict(dense.named_parameters())[name].grad,
                                       rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_lamda_initialises_from_the_dequantised_weight():
    base = torch.nn.Linear(32, 24)
    layer = fastpeft.LowRankLinear4bit.from_linear(base, fastpeft.AdapterConfig(method="lamda", r=4))
    w = fastpeft.dequantize_4bit(layer.weight, layer.quant_state).float()
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(layer.lora_A.abs(), vh[:4].abs())
    torch.testing.assert_close(layer.lora_B.abs(), u[:, :4].abs())


def test_merge_is_refused_and_to_linear_merges_exactly():
    torch.manual_seed(1)
    layer = fastpeft.LowRankLinear4bit.from_linear(torch.nn.Linear(32, 16), fastpeft.AdapterConfig(r=4))
    with torch.no_grad():
        layer.lora_B.normal_()
    before = layer.weight.clone()
    with pytest.raises(RuntimeError, match="merge\\(\\) is refused for a 4-bit weight"):
        layer.merge()
    with pytest.raises(RuntimeError, match="never merged"):
        layer.unmerge()
    assert torch.equal(layer.weight, before) and not layer.merged
    x = torch.randn(5, 32)
    dense = layer.to_linear()
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)
    plain = layer.to_linear(merge=False)
    torch.testing.assert_close(plain.weight, fastpeft.dequantize_4bit(layer.weight, layer.quant_state))


def test_compute_dtype_and_output_dtype():
    base = torch.nn.Linear(64, 32)
    layer = fastpeft.LowRankLinear4bit.from_linear(base, fastpeft.AdapterConfig(r=4), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = torch.nn.functional.linear(x.bfloat16(), fastpeft.dequantize_4bit(layer.weight, layer.quant_state).bfloat16(),
                                     base.bias.bfloat16())
    torch.testing.assert_close(y, ref.float())


def test_state_dict_round_trip():
    torch.manual_seed(2)
    src = fastpeft.LowRankLinear4bit.from_linear(torch.nn.Linear(40, 24), fastpeft.AdapterConfig(r=4),
                                                 blocksize=32)
    with torch.no_grad():
        src.lora_B.normal_()
    sd = src.state_dict()
    assert "weight.absmax" in sd and "weight.nested_absmax" in sd and sd["weight"].dtype == torch.uint8
    dst = fastpeft.LowRankLinear4bit.from_linear(torch.nn.Linear(40, 24), fastpeft.AdapterConfig(r=4),
                                                 blocksize=32)
    dst.load_state_dict(sd)
    x = torch.randn(3, 40)
    assert torch.equal(dst(x), src(x))


# -- bitsandbytes interop ------------------------------------------------------------------

def _bnb_linear(k, d, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32, bias=True):
    torch.manual_seed(3)
    lin = bitsandbytes.nn.Linear4bit(k, d, bias=bias, quant_type=quant_type,
                                     compress_statistics=compress_statistics, compute_dtype=compute_dtype)
    return lin.to("cpu")  # bitsandbytes quantises on the move


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_from_bnb_shares_storage(quant_type):
    lin = _bnb_linear(128, 36, quant_type)
    packed_ptr, qs = lin.weight.data_ptr(), lin.weight.quant_state
    layer = fastpeft.LowRankLinear4bit.from_bnb(lin, fastpeft.AdapterConfig(method="lamda", r=4))
    assert layer.weight is lin.weight and layer.weight.data_ptr() == packed_ptr
    assert layer.quant_state is qs and layer.bias is lin.bias
    assert layer.compute_dtype == torch.float32
    x = torch.randn(4, 128)
    w = BF.dequantize_4bit(lin.weight.data, qs)  # k a multiple of the blocksize: see test_quant
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    assert lin.weight.data_ptr() == packed_ptr


@needs_bnb
def test_from_bnb_after_cpu_inference_packing():
    """bitsandbytes may repack a Linear4bit for its CPU inference kernel; from_bnb undoes it."""
    lin = _bnb_linear(64, 32, compute_dtype=torch.bfloat16)
    expected = BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state).clone()
    lin.eval()
    with torch.no_grad():
        lin(torch.randn(2, 64, dtype=torch.bfloat16))
    packed_for_cpu = getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
    layer = fastpeft.LowRankLinear4bit.from_bnb(lin, fastpeft.AdapterConfig(r=4))
    assert not getattr(layer.quant_state, "packing_format_for_cpu", False)
    got = fastpeft.dequantize_4bit(layer.weight, layer.quant_state)
    assert_close_rel(got, BF.dequantize_4bit(layer.weight.data, layer.quant_state), 0, "vs bitsandbytes")
    # bitsandbytes' CPU packing keeps absmax in bf16, so the weight comes back rounded to that
    assert_close_rel(got, expected, 4e-3 if packed_for_cpu else 0, "vs before packing")


@needs_bnb
def test_inject_converts_linear4bit_in_place(tmp_path):
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        bitsandbytes.nn.Linear4bit(64, 32, compute_dtype=torch.float32), torch.nn.GELU(),
        bitsandbytes.nn.Linear4bit(32, 8, compute_dtype=torch.float32)).to("cpu")
    packed = [model[0].weight, model[2].weight]
    x = torch.randn(5, 64)
    with torch.no_grad():  # the model's output before conversion (fastpeft's dequantisation is
        # bitsandbytes' on every shape, its CPU kernel's only on some: see test_quant)
        h = torch.nn.functional.gelu(torch.nn.functional.linear(
            x, fastpeft.dequantize_4bit(packed[0]), model[0].bias))
        before = torch.nn.functional.linear(h, fastpeft.dequantize_4bit(packed[1]), model[2].bias)
    same = fastpeft.inject(model, fastpeft.AdapterConfig(method="lora", r=4, target_modules=["0", "2"]))
    assert same is model
    assert all(isinstance(model[i], fastpeft.LowRankLinear4bit) for i in (0, 2))
    assert model[0].weight is packed[0] and model[2].weight is packed[1]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)  # B = 0 at the start
    model(x).square().mean().backward()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    fastpeft.save_adapter(model, tmp_path)
    assert fastpeft.adapter_state_dict(model).keys() == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}


@needs_bnb
def test_from_bnb_rejects_unquantised_and_other_layers():
    lin = bitsandbytes.nn.Linear4bit(16, 8)  # still dense: bitsandbytes quantises on .to(device)
    with pytest.raises(ValueError, match="not quantised yet"):
        fastpeft.LowRankLinear4bit.from_bnb(lin, fastpeft.AdapterConfig(r=2))
    with pytest.raises(TypeError, match="linear4bit must be a bitsandbytes.nn.Linear4bit"):
        fastpeft.LowRankLinear4bit.from_bnb(torch.nn.Linear(16, 8), fastpeft.AdapterConfig(r=2))


# -- bad input -----------------------------------------------------------------------------

def test_bad_input_names_the_argument_and_changes_nothing():
    p = _make((3,), 64, 32, 4, torch.float32, None, False, True)
    other_packed, other_state = fastpeft.quantize_4bit(torch.randn(16, 64))
    snapshot = {n: v.clone() for n, v in p.items() if isinstance(v, torch.Tensor)}
    absmax = p["state"].absmax.clone()
    call = lambda **kw: fastpeft.lowrank_linear_4bit(**{**dict(
        x=p["x"], packed=p["packed"], quant_state=p["state"], bias=p["bias"], lora_A=p["lora_A"],
        lora_B=p["lora_B"]), **kw})
    with pytest.raises(ValueError, match=r"packed has 1024 bytes .* quant_state.shape \(16, 64\) needs"):
        call(quant_state=other_state)
    with pytest.raises(ValueError, match="quant_state.absmax has 32 entries but .* needs 16"):
        call(packed=other_packed, quant_state=type(other_state)(
            absmax=p["state"].absmax, shape=other_state.shape, code=other_state.code, blocksize=64,
            quant_type="nf4", dtype=torch.float32, offset=p["state"].offset, state2=p["state"].state2))
    with pytest.raises(ValueError, match="dense weight was passed as packed"):
        call(packed=torch.randn(32, 64))
    with pytest.raises(ValueError, match=r"x must have last dimension k=64 .*4-bit weight"):
        call(x=torch.randn(3, 63))
    with pytest.raises(ValueError, match=r"lora_B must have shape \[d=32, r=4\]"):
        call(lora_B=torch.randn(31, 4))
    with pytest.raises(TypeError, match="lora_A dtype torch.float16 must equal x dtype torch.float32"):
        call(lora_A=p["lora_A"].half())
    with pytest.raises(ValueError, match="quant_state is required"):
        call(quant_state=None)
    for n, v in snapshot.items():
        assert torch.equal(p[n], v), f"{n} changed"
    assert torch.equal(p["state"].absmax, absmax)


def test_module_constructor_points_to_the_factories():
    with pytest.raises(TypeError, match="from_bnb.*from_linear"):
        fastpeft.LowRankLinear4bit(16, 8)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        fastpeft.LowRankLinear4bit.from_linear(torch.nn.Linear(16, 8), fastpeft.AdapterConfig(r=2), blocksize=100)

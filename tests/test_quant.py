"""4-bit quantisation: bit-exact with bitsandbytes (which runs on CPU), reads its objects as they
are, and refuses bad input without changing anything.

bitsandbytes 0.50.2's AVX-512 CPU dequantiser mis-reads blocks that span two rows (row length
not a multiple of the blocksize, even row length): there its CUDA kernel and its own pure-torch
backend agree with fastpeft, so those shapes are compared with the pure-torch backend and the
direct comparison with ``bitsandbytes.functional.dequantize_4bit`` uses the other shapes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastpeft
from fastpeft import quant

try:  # bitsandbytes is optional: the bit-exactness tests skip without it, the rest still run
    import bitsandbytes
    import bitsandbytes.functional as BF
except Exception:  # pragma: no cover - depends on the environment
    bitsandbytes = BF = None

needs_bnb = pytest.mark.skipif(BF is None, reason="bitsandbytes is not installed")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bitsandbytes wraps some CPU fallbacks in torch.compile; compiling them per shape would
    # dominate the run time and tests nothing of ours
    with torch._dynamo.config.patch(disable=True):
        yield


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that equality is bit equality (-0 != 0, NaN == NaN)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def cuda_signed_zeros(expected: torch.Tensor, packed: torch.Tensor, quant_type: str) -> torch.Tensor:
    """bitsandbytes' dequantisation ``expected`` of ``packed`` with FP4 index 8 as its CUDA kernels
    (and its scalar CPU kernel) give it, -0: its table-driven CPU paths give +0 (which one runs
    depends on this machine's CPU). The value there must be a zero either way."""
    if quant_type != "fp4":
        return expected
    b = packed.reshape(-1).view(torch.uint8)
    at8 = (torch.stack([b >> 4, b & 15], dim=1).reshape(-1) == 8)[: expected.numel()].reshape(expected.shape)
    assert torch.all(expected[at8] == 0), "FP4 index 8 must dequantise to a zero"
    return torch.where(at8, torch.tensor(-0.0, dtype=expected.dtype), expected)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = _bits(actual) != _bits(expected)
    if diff.any():
        idx = tuple(int(i) for i in diff.nonzero()[0])
        raise AssertionError(f"{name}: {int(diff.sum())} of {diff.numel()} differ; first at {idx}: "
                             f"{actual[idx].item()} vs {expected[idx].item()}")


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = shape[0]
    w = torch.randn(shape, generator=g) * (0.02 + torch.rand(rows, *([1] * (len(shape) - 1)), generator=g))
    flat = w.view(-1)
    flat[: min(70, flat.numel()) // 2] = 0.0  # exact zeros, and a mostly-zero first block
    return w.to(dtype)


def _bnb_safe_shape(shape, blocksize):
    """Shapes on which bitsandbytes' AVX-512 CPU dequantiser is right (see the module docstring)."""
    return len(shape) == 2 and (shape[-1] % 2 == 1 or shape[-1] % blocksize == 0 or blocksize >= 2048)


def _bnb_torch_dequantize(packed, state):
    """bitsandbytes' pure-torch 4-bit dequantiser (its CPU fallback and the CUDA semantics)."""
    from bitsandbytes.backends.default import ops as default_ops

    fn = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    absmax = state.absmax
    if state.nested:
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return fn(packed.reshape(-1), absmax.float(), BF.get_4bit_type(state.quant_type, device=packed.device),
              state.blocksize, state.shape, state.dtype)


CASES = [
    # (shape, blocksize): odd k = 123, numel not a multiple of the blocksize, a short last block,
    # a 1-element tensor, large blocks, a 1-D tensor
    ((37, 123), 64), ((6, 123), 32), ((64, 128), 64), ((16, 256), 128), ((8, 512), 256),
    ((5, 7), 64), ((1, 1), 32), ((3, 1000), 512), ((2, 4096), 1024), ((3, 2051), 2048),
    ((4, 4096), 4096), ((777,), 64),
]


def _case_id(case):
    shape, bs = case
    return "x".join(map(str, shape)) + f"-bs{bs}"


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_quantize_matches_bitsandbytes(case, dtype, nested, quant_type):
    shape, blocksize = case
    w = _weight(shape, dtype, seed=hash((shape, blocksize)) % 1000)
    w_before = w.clone()
    p_ref, s_ref = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize,
                                           compress_statistics=nested)
    assert torch.equal(w, w_before), "quantize_4bit modified its input"
    assert packed.dtype == torch.uint8 and packed.shape == p_ref.shape == ((math.prod(shape) + 1) // 2, 1)
    assert torch.equal(packed, p_ref), f"packed bytes differ at {(packed != p_ref).nonzero()[:3].tolist()}"
    assert type(state) is type(s_ref), "quantize_4bit should produce bitsandbytes' QuantState when it imports"
    assert state.shape == s_ref.shape and state.dtype == s_ref.dtype and state.blocksize == s_ref.blocksize
    assert state.quant_type == s_ref.quant_type and state.nested == s_ref.nested
    assert_bit_equal(state.code, s_ref.code, "code")
    assert state.absmax.dtype == s_ref.absmax.dtype
    assert torch.equal(state.absmax, s_ref.absmax), "absmax (or its nested codes) differ"
    if nested:
        assert_bit_equal(state.offset, s_ref.offset, "offset")
        assert_bit_equal(state.state2.absmax, s_ref.state2.absmax, "absmax2")
        assert_bit_equal(state.state2.code, s_ref.state2.code, "nested code")
        assert state.state2.blocksize == s_ref.state2.blocksize == 256
        assert state.state2.dtype == s_ref.state2.dtype


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_dequantize_matches_bitsandbytes(case, dtype, nested, quant_type):
    shape, blocksize = case
    w = _weight(shape, dtype, seed=1 + hash((shape, blocksize)) % 1000)
    p_ref, s_ref = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    absmax_before = s_ref.absmax.clone()
    out = fastpeft.dequantize_4bit(p_ref, s_ref)  # bitsandbytes' own objects, as they are
    assert torch.equal(s_ref.absmax, absmax_before), "dequantize_4bit modified the quant state"
    assert out.shape == torch.Size(shape) and out.dtype == dtype
    assert_bit_equal(out, cuda_signed_zeros(_bnb_torch_dequantize(p_ref, s_ref).reshape(shape), p_ref, quant_type),
                     "vs bitsandbytes (torch backend)")
    if _bnb_safe_shape(shape, blocksize):
        assert_bit_equal(out, cuda_signed_zeros(BF.dequantize_4bit(p_ref, s_ref), p_ref, quant_type),
                         "vs bitsandbytes.functional.dequantize_4bit")
    # the round trip through our own quantiser gives the same values
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    assert_bit_equal(fastpeft.dequantize_4bit(packed, state), out, "own round trip")


@needs_bnb
def test_every_code_and_byte():
    """All 256 byte values, NF4 and FP4, against bitsandbytes with absmax = 1 and a generic scale."""
    for quant_type, dtype, scale in itertools.product(["nf4", "fp4"], DTYPES, [1.0, 0.37]):
        packed = torch.arange(256, dtype=torch.uint8).unsqueeze(1)
        state = BF.QuantState(absmax=torch.full((8,), scale), shape=torch.Size([8, 64]), blocksize=64,
                              quant_type=quant_type, dtype=dtype, code=BF.get_4bit_type(quant_type, device="cpu"))
        assert_bit_equal(fastpeft.dequantize_4bit(packed, state),
                         cuda_signed_zeros(BF.dequantize_4bit(packed, state), packed, quant_type), quant_type)
        assert_bit_equal(quant.four_bit_code(quant_type), BF.get_4bit_type(quant_type, device="cpu"), "table")
    assert_bit_equal(quant.dynamic_map(), BF.create_dynamic_map(), "dynamic map")


def test_tables_match_the_spec():
    nf4 = quant.four_bit_code("nf4")
    assert nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1 and bool((nf4[1:] > nf4[:-1]).all())
    assert nf4[8].item() == pytest.approx(0.07958029955625534, abs=0)
    fp4 = quant.four_bit_code("fp4")
    assert fp4.abs().max() == 1 and fp4[1].item() == pytest.approx(0.0625 / 12)
    assert torch.equal(fp4[8:], -fp4[:8])  # bit 3 is the sign
    dm = quant.dynamic_map()
    assert dm.numel() == 256 and bool((dm[1:] > dm[:-1]).all()) and dm[-1] == 1


@needs_bnb
def test_params4bit_and_linear4bit_read_as_they_are():
    layer = bitsandbytes.nn.Linear4bit(123, 37, bias=True, quant_type="nf4", compress_statistics=True,
                                       compute_dtype=torch.float32)
    dense = layer.weight.data.clone()
    layer = layer.to("cpu")  # quantises on first move (bitsandbytes' Params4bit)
    weight = layer.weight
    assert weight.quant_state is not None
    expected = BF.dequantize_4bit(weight.data, weight.quant_state)
    assert_bit_equal(fastpeft.dequantize_4bit(weight), expected, "Params4bit alone")
    assert_bit_equal(fastpeft.dequantize_4bit(weight, weight.quant_state), expected, "Params4bit + state")
    assert (expected - dense).abs().max() <= dense.abs().max() * 0.2
    # our quantiser's state is accepted by bitsandbytes' own dequantiser as well
    packed, state = fastpeft.quantize_4bit(dense, quant_type="nf4", blocksize=64, compress_statistics=True)
    assert_bit_equal(fastpeft.dequantize_4bit(packed, state), expected, "ours vs Linear4bit")


@needs_bnb
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8])
def test_quant_storage(storage):
    w = _weight((16, 64), torch.bfloat16)
    p_ref, s_ref = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=storage)
    packed, state = fastpeft.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_storage=storage)
    assert packed.dtype == storage and packed.shape == p_ref.shape
    assert torch.equal(packed.view(torch.uint8), p_ref.view(torch.uint8))
    assert_bit_equal(fastpeft.dequantize_4bit(packed, state), BF.dequantize_4bit(p_ref, s_ref), "storage")


def test_without_bitsandbytes(monkeypatch):
    """The fallback QuantState: same attributes, serialisable, and dequantises identically."""
    quant._state_class.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes.functional", None)
    try:
        w = _weight((9, 64), torch.float16)
        packed, state = fastpeft.quantize_4bit(w, quant_type="fp4", blocksize=32, compress_statistics=True)
        assert type(state) is quant.QuantState
        for attr in ("absmax", "blocksize", "code", "dtype", "nested", "offset", "quant_type", "shape", "state2"):
            assert hasattr(state, attr)
        out = fastpeft.dequantize_4bit(packed, state)
        for packed_dict in (False, True):
            d = state.as_dict(packed=packed_dict)
            again = quant.QuantState.from_dict(d)
            assert_bit_equal(fastpeft.dequantize_4bit(packed, again), out, f"from_dict(packed={packed_dict})")
        if BF is not None:  # bitsandbytes reads our serialised state too
            monkeypatch.undo()
            qs = BF.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
            assert_bit_equal(cuda_signed_zeros(BF.dequantize_4bit(packed, qs), packed, "fp4"), out,
                             "bitsandbytes.from_dict")
    finally:
        quant._state_class.cache_clear()


def test_out_argument():
    w = _weight((10, 64), torch.float32)
    packed, state = fastpeft.quantize_4bit(w, blocksize=64)
    out = torch.full((10, 64), 7.0)
    res = fastpeft.dequantize_4bit(packed, state, out=out)
    assert res is out
    assert_bit_equal(out, fastpeft.dequantize_4bit(packed, state), "out")
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor of shape \\(10, 64\\)"):
        fastpeft.dequantize_4bit(packed, state, out=torch.empty(64, 10))


# -- bad input: a clear error naming the argument, and nothing changed ------------------------

def _state_snapshot(state):
    snap = {k: getattr(state, k) for k in ("blocksize", "quant_type", "shape", "dtype")}
    snap["absmax"] = state.absmax.clone()
    return snap


def test_quantize_rejects_bad_arguments():
    w = _weight((8, 64), torch.float32)
    before = w.clone()
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64, .*4096\), got 48"):
        fastpeft.quantize_4bit(w, blocksize=48)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        fastpeft.quantize_4bit(w, blocksize=8192)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        fastpeft.quantize_4bit(w, quant_type="int4")
    with pytest.raises(ValueError, match="w must be float32, float16 or bfloat16, got torch.float64"):
        fastpeft.quantize_4bit(w.double())
    with pytest.raises(ValueError, match="at least one element"):
        fastpeft.quantize_4bit(torch.empty(0, 64))
    with pytest.raises(ValueError, match="compress_statistics must be True or False"):
        fastpeft.quantize_4bit(w, compress_statistics="yes")
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        fastpeft.quantize_4bit(w.tolist())
    assert torch.equal(w, before)


def test_dequantize_rejects_mismatched_input():
    w = _weight((8, 64), torch.float32)
    packed, state = fastpeft.quantize_4bit(w, blocksize=64, compress_statistics=True)
    other_packed, other = fastpeft.quantize_4bit(_weight((16, 64), torch.float32), blocksize=64)
    packed_before, snap = packed.clone(), _state_snapshot(state)

    with pytest.raises(ValueError, match=r"packed has 256 bytes .*quant_state.shape \(16, 64\) needs \(numel \+ 1\) // 2 = 512"):
        fastpeft.dequantize_4bit(packed, other)
    with pytest.raises(ValueError, match=r"dense weight was passed"):
        fastpeft.dequantize_4bit(w, state)
    with pytest.raises(ValueError, match="packed must hold the packed bytes as uint8"):
        fastpeft.dequantize_4bit(torch.zeros(256, 1, dtype=torch.int64), state)
    # a state from another tensor of the same size: absmax count does not match
    _, other_bs = fastpeft.quantize_4bit(w, blocksize=128, compress_statistics=False)
    other_bs.blocksize = 64
    with pytest.raises(ValueError, match="quant_state.absmax has 4 entries but .* blocks of 64 needs 8"):
        fastpeft.dequantize_4bit(packed, other_bs)
    bad = quant.QuantState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=48,
                           quant_type="nf4", dtype=torch.float32, offset=state.offset, state2=state.state2)
    with pytest.raises(ValueError, match="quant_state.blocksize must be one of"):
        fastpeft.dequantize_4bit(packed, bad)
    bad.blocksize, bad.quant_type = 64, "af4"
    with pytest.raises(ValueError, match="quant_state.quant_type must be 'nf4' or 'fp4', got 'af4'"):
        fastpeft.dequantize_4bit(packed, bad)
    bad.quant_type, bad.state2 = "nf4", None
    with pytest.raises(ValueError, match="quant_state.absmax must be float"):
        fastpeft.dequantize_4bit(packed, bad)
    with pytest.raises(ValueError, match="quant_state is required"):
        fastpeft.dequantize_4bit(packed)
    with pytest.raises(TypeError, match="quant_state has no attribute 'quant_type'"):
        fastpeft.dequantize_4bit(packed, object())
    out = torch.full((8, 64), 3.0)
    with pytest.raises(ValueError):
        fastpeft.dequantize_4bit(packed, other, out=out)
    assert torch.equal(out, torch.full((8, 64), 3.0)), "out was written on failure"
    assert torch.equal(packed, packed_before)
    assert all(torch.equal(v, getattr(state, k)) if isinstance(v, torch.Tensor) else v == getattr(state, k)
               for k, v in snap.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_matches_cpu(quant_type):
    w = _weight((300, 123), torch.bfloat16)
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    cpu = fastpeft.dequantize_4bit(packed, state)
    state.to("cuda")
    assert_bit_equal(fastpeft.dequantize_4bit(packed.cuda(), state).cpu(), cpu, "cuda")

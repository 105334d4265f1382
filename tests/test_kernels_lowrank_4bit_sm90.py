"""The sm_90 TMA forward GEMM of the 4-bit op (``fastpeft.kernels.lowrank_4bit_sm90``) under the
Triton interpreter: the launcher assumes an sm_90 device (``lowrank_sm90.INTERPRET_ARCH``), the
descriptors run on CPU tensors. Output and every gradient through the op against float64 (the
backward runs the pointer dX kernel); the tile's decode bit for bit against bitsandbytes, by the
select tree (the interpreter's path) and by the byte-permute asm run by the PTX emulator of
test_kernels_dequant_prmt; and which shapes take the kernel."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import fastpeft  # noqa: E402
from fastpeft.kernels import _common as L  # noqa: E402
from fastpeft.kernels import lowrank_4bit as L4  # noqa: E402
from fastpeft.kernels import lowrank_4bit_sm90 as T4  # noqa: E402
from fastpeft.kernels import lowrank_sm90 as S  # noqa: E402
from test_kernels_dequant_prmt import _emulated_inline_asm  # noqa: E402
from test_kernels_lowrank_4bit import make_case, run_and_check  # noqa: E402

pytestmark = pytest.mark.skipif(not L._interpreting(), reason="runs the kernel under the Triton interpreter")


@pytest.fixture
def sm90(monkeypatch):
    """An assumed sm_90 device with 32-blocks (several tiles over M, d and k); returns the list of
    TMA launches ("fwd", "dx", "-lut" where the emulated lookup ran)."""
    monkeypatch.setattr(S, "INTERPRET_ARCH", 90)
    monkeypatch.setattr(L, "INTERPRET_BLOCK_CAP", 32)
    ran = []

    def record(name, launch):
        def wrapped(args, t):
            ran.append(name + ("-lut" if T4.EMULATED_LUT else ""))
            return launch(args, t)
        return wrapped
    monkeypatch.setattr(T4, "fwd_gemm", record("fwd", T4.fwd_gemm))
    monkeypatch.setattr(T4, "bwd_dx", record("dx", T4.bwd_dx))
    return ran


@pytest.fixture
def emulated_lut(monkeypatch):
    """The byte-permute lookup under the interpreter, its asm run by the PTX emulator."""
    from triton.runtime import interpreter
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_inline_asm", _emulated_inline_asm)
    monkeypatch.setattr(T4, "EMULATED_LUT", True)


# (M, k, d, r, dtype, core, out_scale, activation, dropout, quant_type, blocksize, nested, A trains);
# dX runs its TMA kernel where r and d are multiples of 8 and there is no out_scale
CASES = [
    ((70, 128, 72, 8), torch.bfloat16, None, False, None, 0.0, "nf4", 64, True, True),
    ((64, 96, 40, 4), torch.float16, "full", True, "gelu", 0.1, "fp4", 32, False, True),
    ((90, 256, 33, 16), torch.bfloat16, "diag", False, None, 0.2, "nf4", 128, False, False),
    ((65, 64, 48, 3), torch.float16, None, True, "silu", 0.0, "fp4", 64, True, True),
    ((66, 160, 70, 8), torch.float16, "full", False, "relu", 0.1, "nf4", 32, True, True),
]


@pytest.mark.parametrize("lut", [False, True], ids=["tree", "emulated-lut"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-k{}-d{}-r{}".format(*c[0]) +
                         f"-{str(c[1])[6:]}-{c[2]}-os{int(c[3])}-{c[4]}-p{c[5]}-{c[6]}-bs{c[7]}")
def test_tma_gemm_output_and_gradients_match_float64(sm90, request, case, lut):
    if lut:
        request.getfixturevalue("emulated_lut")
    (M, k, d, r), dtype, core, with_os, act, p, qt, bs, nested, train_a = case
    c = make_case(M, k, d, r, dtype, core, with_os, qt, bs, nested, seed=M + k)
    run_and_check(c, dtype, p, act, train_a=train_a)
    tag = "-lut" if lut else ""
    dx_tma = r % 8 == 0 and not with_os and d % 8 == 0          # B and dY TMA-readable
    assert sm90 == ["fwd" + tag] + (["dx" + tag] if dx_tma else []), sm90


@pytest.mark.parametrize("lut", [False, True], ids=["tree", "emulated-lut"])
@pytest.mark.parametrize("quant_type,nested,blocksize,block_cap", [("nf4", True, 64, 32), ("fp4", False, 32, 128),
                                                                   ("nf4", False, 128, 64), ("fp4", True, 64, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tma_gemm_decodes_bit_exact(sm90, request, monkeypatch, lut, quant_type, nested, blocksize, block_cap, dtype):
    """X = I (k rows) and no adapter term: Y = Wᵀ, so Y equals bitsandbytes' W cast to the dtype
    bit for bit (a tile inside one quant block, spanning several, a partial last row tile). The
    select tree only in fp16: the interpreter truncates fp32 -> bf16 where the GPU rounds."""
    if not lut and dtype == torch.bfloat16:
        pytest.skip("the interpreter truncates fp32 -> bf16")
    if lut:
        request.getfixturevalue("emulated_lut")
    monkeypatch.setattr(L, "INTERPRET_BLOCK_CAP", block_cap)
    k, d = 128, 37
    gen = torch.Generator().manual_seed(blocksize + d)
    w = torch.randn(d, k, generator=gen) * torch.logspace(-3, 2, d)[:, None]
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    x = torch.eye(k, dtype=dtype)
    y, _ = L4.lowrank_4bit_fwd(x, packed, state, None, torch.zeros(4, k, dtype=dtype), torch.zeros(d, 4, dtype=dtype),
                               None, None, 1.0, 0.0, 0, None)
    ref = fastpeft.dequantize_4bit(packed, state).to(dtype)
    assert sm90 == ["fwd-lut" if lut else "fwd"]
    # equal values (a sum turns bitsandbytes' -0.0 into +0.0), the nonzero ones bit for bit
    assert torch.equal(y, ref.t())
    nz = ref.t() != 0
    assert torch.equal(y[nz].view(torch.int16), ref.t()[nz].view(torch.int16))


@pytest.mark.parametrize("what", ["sm80", "M<64", "fp32", "layout-1", "unaligned-x"])
def test_other_problems_take_the_pointer_kernel(sm90, monkeypatch, what):
    M, k, d, bs, dtype = 64, 128, 24, 64, torch.bfloat16
    if what == "sm80":
        monkeypatch.setattr(S, "INTERPRET_ARCH", 80)
    elif what == "M<64":
        M = 63
    elif what == "fp32":
        dtype = torch.float32
    elif what == "layout-1":
        k = 100
    c = make_case(M, k, d, 4, dtype, None, False, "nf4", bs, False)
    x = c["x"]
    if what == "unaligned-x":
        x = torch.empty(M, k + 4, dtype=dtype)[:, 4:].copy_(x)           # 8-byte offset: not TMA-readable
    y, _ = L4.lowrank_4bit_fwd(x, c["packed"], c["state"], c["bias"], c["lora_A"], c["lora_B"], None, None, 1.0, 0.0,
                               0, None)
    assert sm90 == []
    w = fastpeft.dequantize_4bit(c["packed"], c["state"]).double()
    ref = x.double() @ w.t() + c["bias"].double() + (x.double() @ c["lora_A"].double().t()) @ c["lora_B"].double().t()
    assert (y.double() - ref).norm() <= 2e-2 * ref.norm()


def test_tma_gemm_with_dora_row_scale_and_z(sm90):
    """DoRA's epilogue (row scale, Z beside Y) through the TMA kernel: Y = c ⊙ Z + b."""
    M, k, d, r, dtype = 66, 128, 40, 4, torch.float16
    c = make_case(M, k, d, r, dtype, None, False, "nf4", 64, True)
    rs = torch.rand(d, dtype=torch.float32) + 0.5
    z = torch.empty(M, d, dtype=dtype)
    y, _ = L4.lowrank_4bit_fwd(c["x"], c["packed"], c["state"], c["bias"], c["lora_A"], c["lora_B"], None, None, 0.5,
                               0.0, 0, None, row_scale=rs, z=z)
    assert sm90 == ["fwd"]
    w = fastpeft.dequantize_4bit(c["packed"], c["state"]).double()
    x64 = c["x"].double()
    z_ref = x64 @ w.t() + 0.5 * (x64 @ c["lora_A"].double().t()) @ c["lora_B"].double().t()
    y_ref = z_ref * rs.double() + c["bias"].double()
    assert (z.double() - z_ref).norm() <= 2e-3 * z_ref.norm()
    assert (y.double() - y_ref).norm() <= 2e-3 * y_ref.norm()


@pytest.mark.parametrize("lut", [False, True], ids=["tree", "emulated-lut"])
@pytest.mark.parametrize("quant_type,nested,blocksize,block_cap", [("nf4", True, 64, 32), ("fp4", False, 32, 128)])
def test_tma_dx_decodes_bit_exact(sm90, request, monkeypatch, lut, quant_type, nested, blocksize, block_cap):
    """dY = I (d rows) and B = 0: dX = W, so dX equals bitsandbytes' W (fp16) in value, bit for bit
    where nonzero (W tiles spanning rows of W in several k-steps, columns in one or more blocks)."""
    if lut:
        request.getfixturevalue("emulated_lut")
    monkeypatch.setattr(L, "INTERPRET_BLOCK_CAP", block_cap)
    k, d, dtype = 128, 96, torch.float16
    gen = torch.Generator().manual_seed(blocksize + k)
    w = torch.randn(d, k, generator=gen) * torch.logspace(-3, 2, d)[:, None]
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    gy = torch.eye(d, dtype=dtype)
    t = torch.zeros(d, 8, dtype=dtype)
    dx, *_ = L4.lowrank_4bit_bwd(gy, None, packed, state, t, torch.zeros(8, k, dtype=dtype),
                                 torch.zeros(d, 8, dtype=dtype), None, None, 1.0, 0.0, 0, None, True, False, False,
                                 False, False, False)
    ref = fastpeft.dequantize_4bit(packed, state).to(dtype)
    assert sm90 == ["dx-lut" if lut else "dx"]
    assert torch.equal(dx, ref)
    nz = ref != 0
    assert torch.equal(dx[nz].view(torch.int16), ref[nz].view(torch.int16))

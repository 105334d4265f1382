"""The public op on the "triton" backend goes through the Triton launchers and matches float64.

On CPU tensors the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); on a GPU machine the same tests run for real.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from fastpeft.kernels import lowrank as L  # noqa: E402
from helpers import reference_lowrank, saved_tensors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.fixture
def calls(monkeypatch):
    """Counts the launcher calls made through the backend dispatch."""
    seen = {"fwd": 0, "bwd": 0}
    fwd, bwd = L.lowrank_fwd, L.lowrank_bwd

    def counted_fwd(*args, **kwargs):
        seen["fwd"] += 1
        return fwd(*args, **kwargs)

    def counted_bwd(*args, **kwargs):
        seen["bwd"] += 1
        return bwd(*args, **kwargs)

    monkeypatch.setattr(L, "lowrank_fwd", counted_fwd)
    monkeypatch.setattr(L, "lowrank_bwd", counted_bwd)
    return seen


def make(shape, k, d, r, dtype, core_kind, with_os, with_bias, train_a=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0, grad=True):
        t = (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)
        return t.requires_grad_(grad)

    x = rnd(*shape, k)
    w = rnd(d, k, scale=k ** -0.5, grad=False)
    bias = rnd(d) if with_bias else None
    a = rnd(r, k, scale=k ** -0.5, grad=train_a)
    b = rnd(d, r, scale=r ** -0.5)
    core = None if core_kind is None else (rnd(r) if core_kind == "diag" else rnd(r, r, scale=r ** -0.5))
    out_scale = rnd(d) if with_os else None
    return x, w, bias, a, b, core, out_scale


CASES = [
    ((2, 7), 37, 29, 8, torch.float32, "full", True, True, "gelu", 0.1),
    ((3, 5), 40, 24, 16, torch.float16, "diag", False, True, None, 0.0),
    ((11,), 33, 18, 4, torch.bfloat16, None, True, False, "silu", 0.2),
    ((1, 1, 4), 64, 48, 12, torch.float32, None, False, False, "relu", 0.0),
]


@pytest.mark.parametrize("shape,k,d,r,dtype,core_kind,with_os,with_bias,act,p", CASES,
                         ids=[f"x{'x'.join(map(str, c[0]))}-k{c[1]}-d{c[2]}-r{c[3]}-{str(c[4])[6:]}-{c[5]}-{c[8]}-p{c[9]}"
                              for c in CASES])
def test_public_op_on_triton_matches_float64(calls, shape, k, d, r, dtype, core_kind, with_os, with_bias, act, p):
    x, w, bias, a, b, core, out_scale = make(shape, k, d, r, dtype, core_kind, with_os, with_bias)
    seed, scale = 4321, 0.5
    with fastpeft.use_backend("triton"):
        y = fastpeft.lowrank_linear(x, w, bias, a, b, core=core, out_scale=out_scale, scale=scale,
                                    dropout_p=p, activation=act, seed=seed)
    assert y.shape == (*shape, d) and y.dtype == dtype
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE, dtype)
    y.backward(gy)
    assert calls == {"fwd": 1, "bwd": 1}, f"the launchers were not used: {calls}"

    m = math.prod(shape)
    keep = L.dropout_keep_mask(seed, m, k, p, DEVICE).cpu() if p > 0 else None
    leaves = {name: (None if t is None else t.detach().cpu().double().requires_grad_(t.requires_grad))
              for name, t in dict(x=x, w=w, bias=bias, a=a, b=b, core=core, out_scale=out_scale).items()}
    y_ref = reference_lowrank(leaves["x"], leaves["w"], leaves["bias"], leaves["a"], leaves["b"], leaves["core"],
                              leaves["out_scale"], scale, keep_mask=keep, dropout_p=p, activation=act)
    y_ref.backward(gy.cpu().double())
    assert rel_err(y, y_ref) <= TOL[dtype] / 2, "y"
    for name, t in dict(x=x, bias=bias, a=a, b=b, core=core, out_scale=out_scale).items():
        if t is None:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.dtype == t.dtype
        err = rel_err(t.grad, leaves[name].grad)
        assert err <= TOL[dtype], f"d{name}: relative error {err:.2e}"


def test_memory_contract_on_triton():
    """A frozen: backward keeps T [M, r], the seed and the parameters, nothing of size M x k."""
    m_shape, k, d, r = (4, 9), 64, 32, 8
    x, w, bias, a, b, core, _ = make(m_shape, k, d, r, torch.float32, "full", False, True, train_a=False)
    m = math.prod(m_shape)
    with fastpeft.use_backend("triton"), saved_tensors() as saved:
        y = fastpeft.lowrank_linear(x, w, bias, a, b, core=core, scale=2.0, dropout_p=0.1, seed=7)
    big = [tuple(t.shape) for t in saved.tensors if t.numel() >= m * k]
    assert not big, f"tensors of size M x k saved with A frozen: {big}"
    assert (m, r) in saved.shapes(), "T [M, r] is what backward needs"
    y.sum().backward()
    assert x.grad is not None and b.grad is not None and core.grad is not None and a.grad is None

    # A trainable: the caller's x itself is kept (the same storage), still no dropped copy
    x2, w2, bias2, a2, b2, core2, _ = make(m_shape, k, d, r, torch.float32, "full", False, True, train_a=True)
    with fastpeft.use_backend("triton"), saved_tensors() as saved:
        fastpeft.lowrank_linear(x2, w2, bias2, a2, b2, core=core2, scale=2.0, dropout_p=0.1, seed=7)
    big = [t for t in saved.tensors if t.numel() >= m * k]
    assert big and all(t.untyped_storage().data_ptr() == x2.untyped_storage().data_ptr() for t in big)


def test_triton_and_torch_backends_agree_without_dropout():
    x, w, bias, a, b, core, out_scale = make((3, 6), 40, 24, 8, torch.float32, "diag", True, True)
    outs = []
    for backend in ("torch", "triton"):
        for t in (x, bias, a, b, core, out_scale):
            t.grad = None
        with fastpeft.use_backend(backend):
            y = fastpeft.lowrank_linear(x, w, bias, a, b, core=core, out_scale=out_scale, scale=1.5,
                                        activation="gelu")
        y.square().sum().backward()
        outs.append([y.detach()] + [t.grad.clone() for t in (x, bias, a, b, core, out_scale)])
    for u, v in zip(*outs):
        assert rel_err(v, u) < 1e-5

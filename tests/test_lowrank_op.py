"""The op ``fastpeft.lowrank_linear`` on the torch backend: gradients, dtypes, shapes, errors."""

import itertools

import pytest
import torch

import fastpeft
from fastpeft.ops.lowrank import dropout_keep_mask_torch
from helpers import TOLERANCES, assert_close_rel, reference_lowrank

ACTIVATIONS = [None, "relu", "gelu", "silu"]


def _make(m_shape, k, d, r, dtype, core_kind, with_out_scale, with_bias, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    x = rnd(*m_shape, k)
    weight = rnd(d, k) / k ** 0.5
    bias = rnd(d) if with_bias else None
    lora_a = rnd(r, k) / k ** 0.5
    lora_b = rnd(d, r) / r ** 0.5
    core = {None: None, "diag": rnd(r) if core_kind == "diag" else None,
            "full": rnd(r, r) / r ** 0.5 if core_kind == "full" else None}[core_kind]
    out_scale = rnd(d) if with_out_scale else None
    return x, weight, bias, lora_a, lora_b, core, out_scale


COMBOS = list(itertools.product(
    [True, False],                 # A trainable
    [None, "diag", "full"],        # core
    [False, True],                 # out_scale
    [None, "frozen", "trainable"], # bias
    ACTIVATIONS,
    [0.0, 0.25],                   # dropout
    [(5,), (2, 3)],                # 2-D and 3-D x
))


@pytest.mark.parametrize("train_a,core_kind,with_os,bias_kind,activation,dropout_p,m_shape", COMBOS)
def test_gradcheck_float64(train_a, core_kind, with_os, bias_kind, activation, dropout_p, m_shape):
    x, w, b, a, bb, core, os_ = _make(m_shape, 6, 5, 3, torch.float64, core_kind, with_os,
                                      bias_kind is not None, seed=len(m_shape))
    inputs = [x.requires_grad_(), w, b, a.requires_grad_(train_a), bb.requires_grad_(), core, os_]
    if b is not None:
        b.requires_grad_(bias_kind == "trainable")
    for t in (core, os_):
        if t is not None:
            t.requires_grad_()

    def fn(x, w, b, a, bb, core, os_):
        return fastpeft.lowrank_linear(x, w, b, a, bb, core=core, out_scale=os_, scale=0.7,
                                       dropout_p=dropout_p, activation=activation, seed=1234)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7)


SHAPES = [  # (leading dims of x, k, d, r)
    ((1,), 123, 77, 12),
    ((37,), 123, 77, 12),
    ((2, 9), 64, 48, 8),
    ((16,), 33, 130, 1),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ids(shape):
    lead, k, d, r = shape
    return f"M{'x'.join(map(str, lead))}-k{k}-d{d}-r{r}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("core_kind,with_os,activation,dropout_p", [
    (None, False, None, 0.0), ("full", False, None, 0.1), ("diag", True, None, 0.0),
    (None, False, "gelu", 0.1), ("full", True, "silu", 0.0),
])
def test_matches_float64_reference(dtype, shape, core_kind, with_os, activation, dropout_p):
    lead, k, d, r = shape
    x, w, b, a, bb, core, os_ = _make(lead, k, d, r, dtype, core_kind, with_os, True, seed=k + d + r)
    trainables = [t for t in (x, b, a, bb, core, os_) if t is not None]
    for t in trainables:
        t.requires_grad_()
    y = fastpeft.lowrank_linear(x, w, b, a, bb, core=core, out_scale=os_, scale=1.5,
                                dropout_p=dropout_p, activation=activation, seed=99)
    m = x.numel() // k
    keep = dropout_keep_mask_torch(99, m, k, dropout_p, "cpu") if dropout_p else None
    ref = reference_lowrank(x, w, b, a, bb, core, os_, 1.5, keep, dropout_p, activation)
    tol, grad_tol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == (*lead, d)
    assert_close_rel(y, ref, tol, "y")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad(y, trainables, grad.to(dtype))
    want = torch.autograd.grad(ref, trainables, grad.to(dtype).double())  # the same grad values
    names = [n for n, t in zip(["x", "bias", "A", "B", "core", "out_scale"], (x, b, a, bb, core, os_)) if t is not None]
    for name, g, e in zip(names, got, want):
        assert g.dtype == dtype
        assert_close_rel(g, e, grad_tol, f"d{name}")


def test_dropout_mask_regenerated_from_seed():
    x, w, b, a, bb, *_ = _make((8,), 20, 10, 4, torch.float32, None, False, False)
    x.requires_grad_(); a.requires_grad_()
    y1 = fastpeft.lowrank_linear(x, w, b, a, bb, dropout_p=0.5, seed=7)
    y2 = fastpeft.lowrank_linear(x, w, b, a, bb, dropout_p=0.5, seed=7)
    y3 = fastpeft.lowrank_linear(x, w, b, a, bb, dropout_p=0.5, seed=8)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # seed=None draws from torch's generator: reproducible under manual_seed
    torch.manual_seed(0)
    z1 = fastpeft.lowrank_linear(x, w, b, a, bb, dropout_p=0.5)
    torch.manual_seed(0)
    z2 = fastpeft.lowrank_linear(x, w, b, a, bb, dropout_p=0.5)
    assert torch.equal(z1, z2)
    # the adapter really sees a dropped input (about half the entries)
    keep = dropout_keep_mask_torch(7, 8, 20, 0.5, "cpu")
    assert 0.3 < keep.float().mean() < 0.7


def test_empty_batch():
    x, w, b, a, bb, core, os_ = _make((0,), 12, 6, 3, torch.float32, "full", True, True)
    x.requires_grad_(); a.requires_grad_(); bb.requires_grad_(); core.requires_grad_()
    y = fastpeft.lowrank_linear(x, w, b, a, bb, core=core, out_scale=os_, dropout_p=0.1)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 12) and torch.count_nonzero(a.grad) == 0 and bb.grad.shape == (6, 3)
    y3 = fastpeft.lowrank_linear(torch.randn(2, 0, 12), w, b, a.detach(), bb.detach())
    assert y3.shape == (2, 0, 6)


def test_only_needed_gradients_are_computed(monkeypatch):
    import fastpeft.ops.lowrank as lr

    seen = {}
    real = lr.lowrank_bwd_torch

    def spy(*args):
        seen["needs"] = args[12:]
        return real(*args)

    monkeypatch.setattr(lr, "lowrank_bwd_torch", spy)
    x, w, b, a, bb, core, _ = _make((4,), 10, 8, 2, torch.float32, "full", False, True)
    core.requires_grad_()
    fastpeft.lowrank_linear(x, w, b, a, bb, core=core).sum().backward()
    # x, A, B, out_scale, bias frozen: only dcore
    assert seen["needs"] == (False, False, False, True, False, False)
    assert a.grad is None and bb.grad is None and core.grad is not None


def test_nan_and_inf_propagate():
    x, w, b, a, bb, *_ = _make((3,), 8, 4, 2, torch.float32, None, False, True)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    y = fastpeft.lowrank_linear(x, w, b, a, bb)
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).all() and torch.isfinite(y[0]).all()


class TestBadInput:
    def setup_method(self):
        self.x, self.w, self.b, self.a, self.bb, self.core, self.os = _make(
            (4,), 10, 6, 3, torch.float32, "full", True, True)

    def call(self, **over):
        args = dict(x=self.x, weight=self.w, bias=self.b, lora_A=self.a, lora_B=self.bb)
        kw = dict(core=self.core, out_scale=self.os)
        for key, value in over.items():
            (args if key in args else kw)[key] = value
        return fastpeft.lowrank_linear(*args.values(), **kw)

    @pytest.mark.parametrize("over,pattern", [
        (dict(x=torch.randn(4, 11)), r"x must have last dimension k=10"),
        (dict(weight=torch.randn(6, 10, 1)), r"weight must be 2-D"),
        (dict(lora_A=torch.randn(3, 9)), r"lora_A must have shape \[r, k=10\]"),
        (dict(lora_A=torch.randn(0, 10)), r"r >= 1"),
        (dict(lora_B=torch.randn(6, 4)), r"lora_B must have shape \[d=6, r=3\]"),
        (dict(bias=torch.randn(5)), r"bias must have shape \[6\]"),
        (dict(core=torch.randn(3, 2)), r"core must have shape \[3\] or \[3, 3\]"),
        (dict(out_scale=torch.randn(7)), r"out_scale must have shape \[6\]"),
        (dict(lora_B=torch.randn(6, 3, dtype=torch.float64)), r"lora_B dtype torch.float64 must equal x dtype"),
        (dict(weight=torch.randn(6, 10, dtype=torch.float16)), r"weight dtype torch.float16 must equal x dtype"),
        (dict(x=torch.randint(0, 3, (4, 10))), r"x must be a floating-point tensor"),
        (dict(lora_A=torch.randn(3, 10, device="meta")), r"lora_A is on meta but x is on cpu"),
        (dict(weight=torch.randn(6, 10, device="meta")), r"weight is on meta but x is on cpu"),
        (dict(dropout_p=1.0), r"dropout_p must be a number in \[0, 1\)"),
        (dict(dropout_p=-0.1), r"dropout_p must be a number in \[0, 1\)"),
        (dict(activation="tanh"), r"activation must be one of"),
        (dict(scale=float("nan")), r"scale must be a finite"),
        (dict(seed=1.5), r"seed must be an int"),
    ])
    def test_clear_errors(self, over, pattern):
        with pytest.raises((ValueError, TypeError), match=pattern):
            self.call(**over)

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match=r"backend must be one of"):
            with fastpeft.use_backend("tpu"):
                pass
        with pytest.raises(RuntimeError, match=r"no 'cuda' implementation"):
            with fastpeft.use_backend("cuda"):
                self.call()
        assert fastpeft.get_backend() == "auto"

    def test_triton_on_cpu_needs_the_interpreter(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
            with fastpeft.use_backend("triton"):
                self.call()


def _three_ops(x, w, a, b, core):
    """The dense, 4-bit and grouped ops on one input (the group: two projections)."""
    packed, state = fastpeft.quantize_4bit(w.detach().float(), blocksize=32)
    return (fastpeft.lowrank_linear(x, w, None, a, b, core=core, scale=0.5),
            fastpeft.lowrank_linear_4bit(x, packed, state, None, a, b, core=core, scale=0.5),
            *fastpeft.lowrank_linear_group(x, [w, w], [None, None], [a, a], [b, b], cores=[core, core],
                                           scales=[0.5, 0.5]))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_calls_that_need_no_graph_match_those_that_do(autocast):
    """With grad mode off, or nothing requiring grad, the ops run without an autograd node (less
    host time a call) and give the same values, dtype included under autocast, as the calls that
    build one."""
    gen = torch.Generator().manual_seed(3)
    w, a, b, core = (torch.randn(*s, generator=gen) for s in ((20, 32), (4, 32), (20, 4), (4, 4)))
    x = torch.randn(3, 32, generator=gen)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            no_grad = _three_ops(x, w, a, b, core)
        frozen = _three_ops(x, w, a, b, core)
        graph = _three_ops(x.clone().requires_grad_(), w, a.clone().requires_grad_(), b, core)
    for y0, y1, y2 in zip(no_grad, frozen, graph):
        assert y0.grad_fn is None and y1.grad_fn is None and y2.grad_fn is not None
        assert y0.dtype == y2.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.equal(y0, y2.detach()) and torch.equal(y1, y2.detach())

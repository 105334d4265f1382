"""The torch path's eager calls: every needs_input_grad combination against float64, the mask's
definition from the raw generator words, the per-call seed, and the ops one training step runs."""

import itertools
import threading

import pytest
import torch

import fastpeft
from fastpeft.ops.lowrank import dropout_keep_mask_torch
from helpers import saved_tensors

M, K, D, R = 7, 13, 11, 3      # odd k: the last word's high half is not used


def _tensors(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    return rnd(M, K), rnd(D, K) / K ** 0.5, rnd(D), rnd(R, K) / K ** 0.5, rnd(D, R) / R ** 0.5


def _reference(x, w, b, a, bb, scale, dropout_p, seed):
    keep = dropout_keep_mask_torch(seed, M, K, dropout_p, "cpu").to(torch.float64) / (1 - dropout_p) \
        if dropout_p else 1.0
    return x @ w.t() + b + scale * ((x * keep) @ a.t()) @ bb.t()


@pytest.mark.parametrize("need", [n for n in itertools.product([False, True], repeat=3) if any(n)],
                         ids=lambda n: "".join(c for c, on in zip("xAB", n) if on))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)], ids=["fp32", "fp64"])
def test_each_needs_input_grad_combination(need, dropout_p, dtype, tol):
    x, w, b, a, bb = _tensors(dtype)
    leaves = [t.requires_grad_(n) for t, n in zip((x, a, bb), need)]
    y = fastpeft.lowrank_linear(x, w, b, a, bb, scale=1.7, dropout_p=dropout_p, seed=21)
    ref_leaves = [t.detach().double().requires_grad_(n) for t, n in zip(leaves, need)]
    ref = _reference(ref_leaves[0], w.double(), b.double(), ref_leaves[1], ref_leaves[2], 1.7, dropout_p, 21)
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol)
    grad = torch.randn(M, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y.backward(grad.to(dtype))
    ref.backward(grad)
    for name, got, want, n in zip("xAB", leaves, ref_leaves, need):
        if not n:
            assert got.grad is None, f"d{name} computed though not needed"
            continue
        err = (got.grad.double() - want.grad).abs().max() / want.grad.abs().max()
        assert err < tol * 10, f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_only_b_trains_saves_nothing_of_x_size(dropout_p):
    x, w, b, a, bb = _tensors(torch.float32)
    x.requires_grad_(), bb.requires_grad_()
    with saved_tensors() as saved:
        y = fastpeft.lowrank_linear(x, w, b, a, bb, scale=2.0, dropout_p=dropout_p)
    params = {t.data_ptr() for t in (w, b, a, bb)}
    kept = [tuple(t.shape) for t in saved.tensors if t.data_ptr() not in params]
    assert kept == [(M, R)], kept       # T alone: no x, no mask, no dropped copy
    y.sum().backward()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1 - 2 ** -17])
def test_mask_is_the_documented_rule_on_the_generator_words(p):
    """Even column 2j: the low 16 bits of word j as int16, kept when >= 2t - 2^15; odd column
    2j+1: bits 16-30, kept when >= t; t = min(round(p * 2^15), 2^15 - 1)."""
    m, k = 9, 31
    gen = torch.Generator().manual_seed(77)
    words = torch.empty(m, (k + 1) // 2, dtype=torch.int32).random_(generator=gen).long()
    t = min(round(p * 2 ** 15), 2 ** 15 - 1)
    low = words & 0xFFFF
    low = torch.where(low >= 2 ** 15, low - 2 ** 16, low)
    high = words >> 16
    want = torch.stack([low >= 2 * t - 2 ** 15, high >= t], dim=2).reshape(m, -1)[:, :k]
    assert torch.equal(dropout_keep_mask_torch(77, m, k, p, "cpu"), want)


def test_dropout_near_one_drops_almost_everything():
    keep = dropout_keep_mask_torch(5, 64, 512, 1 - 2 ** -17, "cpu")
    assert keep.float().mean().item() < 1e-3      # not "keep all" from an int16 overflow


def test_masks_match_across_threads():
    out = {}

    def draw():
        out["thread"] = dropout_keep_mask_torch(123, 40, 50, 0.4, "cpu")

    worker = threading.Thread(target=draw)
    worker.start()
    worker.join()
    assert torch.equal(out["thread"], dropout_keep_mask_torch(123, 40, 50, 0.4, "cpu"))


def test_unseeded_calls_follow_torch_manual_seed():
    x, w, b, a, bb = _tensors(torch.float32)
    run = lambda: fastpeft.lowrank_linear(x, w, b, a, bb, scale=2.0, dropout_p=0.5)
    torch.manual_seed(3)
    first, second = run(), run()
    torch.manual_seed(3)
    assert torch.equal(run(), first) and not torch.equal(second, first)
    # the seed is torch.randint's draw from the default generator
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    assert torch.allclose(first.double(), _reference(x.double(), w.double(), b.double(), a.double(),
                                                     bb.double(), 2.0, 0.5, seed), rtol=1e-5, atol=1e-5)


def _aten_ops(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_training_step_draws_the_mask_once_each_way_and_nothing_else():
    x, w, b, a, bb = _tensors(torch.float32)
    x.requires_grad_(), a.requires_grad_(), bb.requires_grad_()

    def step():
        fastpeft.lowrank_linear(x, w, None, a, bb, scale=2.0, dropout_p=0.1).backward(torch.ones(M, D))

    step()
    ops = _aten_ops(step)
    assert ops.count("aten::random_") == 3      # the seed, the forward mask, the backward mask
    assert "aten::randint" not in ops and "aten::bitwise_and_" not in ops and "aten::bernoulli_" not in ops
    assert ops.count("aten::item") + ops.count("aten::_local_scalar_dense") <= 2   # the seed read once

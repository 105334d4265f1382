"""The torch backend's dropout mask: 15-bit draws from a seeded generator, regenerated in
backward, the same for every caller of ``dropout_keep_mask_torch``."""

import math

import pytest
import torch

import fastpeft
from fastpeft.ops.lowrank import _keep_factor, dropout_keep_mask_torch


@pytest.mark.parametrize("m,k", [(1, 1), (3, 7), (64, 123), (200, 256)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_fraction_and_factor_agree(m, k, p):
    keep = dropout_keep_mask_torch(11, m, k, p, "cpu")
    assert keep.shape == (m, k) and keep.dtype == torch.bool
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        factor = _keep_factor(11, m, k, p, dtype, "cpu")
        assert factor.dtype == dtype and torch.equal(factor != 0, keep)
        assert set(factor.unique().tolist()) <= {0.0, 1.0}
    n = m * k
    if n >= 10_000:   # the keep share within 5 binomial standard deviations of 1 - p
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_masks_differ_across_seeds_rows_and_word_halves():
    a = dropout_keep_mask_torch(1, 64, 512, 0.5, "cpu")
    b = dropout_keep_mask_torch(2, 64, 512, 0.5, "cpu")
    assert torch.equal(a, dropout_keep_mask_torch(1, 64, 512, 0.5, "cpu"))
    assert (a != b).float().mean() > 0.4
    assert (a[0] != a[1]).float().mean() > 0.4
    # even and odd columns come from the low and high halves of one 32-bit draw: both unbiased
    for half in (a[:, 0::2], a[:, 1::2]):
        assert abs(half.float().mean().item() - 0.5) < 0.02


def test_no_dropout_keeps_everything_and_tiny_p_rounds_to_zero():
    assert bool(dropout_keep_mask_torch(3, 16, 32, 0.0, "cpu").all())
    assert bool(dropout_keep_mask_torch(3, 16, 32, 1e-6, "cpu").all())   # p < 2⁻¹⁶ rounds to 0


def test_forward_and_backward_use_one_mask():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, 33, generator=gen, dtype=torch.float64).requires_grad_()
    w, a, b = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((17, 33), (4, 33), (17, 4)))
    a.requires_grad_(), b.requires_grad_()
    y = fastpeft.lowrank_linear(x, w, None, a, b, scale=1.5, dropout_p=0.3, seed=42)
    y.backward(torch.ones_like(y))
    keep = dropout_keep_mask_torch(42, 45, 33, 0.3, "cpu").to(torch.float64) / 0.7
    a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref = x2 @ w.t() + 1.5 * ((x2.reshape(45, 33) * keep) @ a2.t() @ b2.t()).reshape(5, 9, 17)
    ref.backward(torch.ones_like(ref))
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)

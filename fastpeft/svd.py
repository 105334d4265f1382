"""The top singular triplets of a weight, without a full SVD (LaMDA's initialisation, LaMDA++'s
spectrum).

LaMDA needs only the top-r singular vectors of each pretrained W [d, k], and LaMDA++ only the
top singular values and ‖W‖_F² = Σ_i σ_i². A full SVD costs O(d·k·min(d, k)) time and
workspace of the size of W per layer. The randomised block Krylov method (Musco and Musco,
NeurIPS 2015; Halko, Martinsson and Tropp, SIAM Review 2011, for the range finder) costs
O(d·k·b) per pass for a block of b columns:

    Ω  [k, b] Gaussian (a fixed seed: the same W gives the same result)
    Q₀ = orth(W Ω);   Q_i = orth(W · orth(Wᵀ Q_{i-1}))        i = 1 … q
    K  = orth([Q₀, Q₁, …, Q_q])                               [d, b(q+1)], a Krylov basis of
                                                              W's dominant range
    Kᵀ W = Û Σ Vᵀ  (an exact SVD of a b(q+1) × k matrix, from the eigendecomposition of
                    (Kᵀ W)(Kᵀ W)ᵀ in float64);  U = K Û

(Rayleigh–Ritz on the Krylov space). Unlike plain subspace iteration, the Krylov space keeps
every pass's block, which converges fast even where the spectrum is flat, as in pretrained
weights. Blocks b = 2r for the triplets and r + max(16, r/2) for the values, q = 4 passes: on
all-MiniLM-L6-v2's weights the top-16 singular values come within 1e-3 relative of the full
SVD and the captured energy ‖W V_r‖_F² within 1e-5 of Σ_{i≤r} σ_i² (tests/test_svd.py).
Where the Krylov space would not be well below min(d, k), the full SVD is used. Signs are made
deterministic: each left vector's largest-magnitude entry is positive (the right vector flips
with it, so u σ vᵀ is unchanged).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["top_singular_triplets", "top_singular_values", "frobenius_sq", "all_finite"]

_SEED = 0x5EED


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, from one reduction (one read of ``t``, against
    three passes for ``isfinite(t).all()``): a NaN or an infinity makes the sum non-finite, and
    a sum of finite entries is finite unless it overflows (then the entries are checked one by
    one)."""
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def _check(weight: Tensor, r: int, name: str = "weight") -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"{name} must be a 2-D floating-point tensor, got "
                        f"{type(weight).__name__ if not isinstance(weight, Tensor) else (weight.dtype, tuple(weight.shape))}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(weight.shape):
        raise ValueError(f"r must be an int in [1, min(d, k) = {min(weight.shape)}], got {r!r}")
    if not all_finite(weight):
        raise ValueError(f"{name} has non-finite entries (inf or nan): its singular vectors are undefined")


def _orth(y: Tensor, rounds: int = 2) -> Tensor:
    """An orthonormal basis of y's columns [n, ≤ m], by the eigendecomposition of its float64
    Gram matrix, twice (as CholeskyQR2; once gives a well-conditioned basis, enough between
    passes): only m×m matrices go through LAPACK, whose QR of a tall matrix is slow on some CPUs
    (hundreds of ms for 1024×160), and directions below the Gram's rounding level (a Krylov
    space whose later blocks repeat converged directions) are dropped."""
    for _ in range(rounds):
        y64 = y.to(torch.float64)
        lam, vec = torch.linalg.eigh(y64.t() @ y64)
        keep = lam > lam[-1].clamp(min=0) * 1e-12
        if not bool(keep.any()):
            return y[:, :0]
        y = (y64 @ (vec[:, keep] / lam[keep].sqrt())).to(y.dtype)
    return y


def _krylov_basis(w: Tensor, block: int, passes: int) -> Tensor:
    """An orthonormal basis K [d, ≤ block·(passes+1)] of W's dominant range (block Krylov)."""
    gen = torch.Generator().manual_seed(_SEED)
    omega = torch.randn(w.shape[1], block, generator=gen, dtype=w.dtype).to(w.device)
    q = _orth(w @ omega, 1)
    blocks = [q]
    for _ in range(passes):
        q = _orth(w @ _orth(w.t() @ q, 1), 1)
        blocks.append(q)
    return _orth(torch.cat(blocks, dim=1))


def _projected_svd(basis: Tensor, a: Tensor, r: int, vectors: bool = True):
    """The top-r SVD of P = Kᵀ A [m, k] from the float64 eigendecomposition of P Pᵀ [m, m]:
    σ² its eigenvalues, Û its eigenvectors, Vᵀ = Σ⁻¹ Ûᵀ P; returns (K Û, σ, Vᵀ) or σ alone."""
    p = (basis.t() @ a).to(torch.float64)
    lam, vec = torch.linalg.eigh(p @ p.t())
    lam, vec = lam.flip(0)[:r].clamp(min=0), vec.flip(1)[:, :r]
    s = lam.sqrt()
    if not vectors:
        return s.to(a.dtype)
    vh = (vec.t() @ p) / s.clamp(min=torch.finfo(torch.float64).tiny)[:, None]
    return (basis.to(torch.float64) @ vec).to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def _small_enough(block: int, passes: int, n: int) -> bool:
    return 2 * block * (passes + 1) <= n


def _fix_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    rows = u.abs().argmax(0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


@torch.no_grad()
def top_singular_triplets(weight: Tensor, r: int, *, passes: int = 4,
                          _full: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(U [d, r], S [r], Vh [r, k]): the top-r singular triplets of ``weight`` in its dtype
    (pass float32 or float64 to choose the precision), singular values descending, signs
    fixed (module docstring). Block Krylov with a fixed seed (deterministic) unless its space
    would not be well below min(d, k), then the full SVD."""
    _check(weight, r)
    w = weight.detach()
    d, k = w.shape
    block = 2 * r
    if _full or not _small_enough(block, passes, min(d, k)):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        transpose = d > k               # the basis on the shorter side
        a = w.t() if transpose else w
        basis = _krylov_basis(a, block, passes)
        if basis.shape[1] < r:          # W of rank < r: the full SVD completes the basis
            return top_singular_triplets(weight, r, passes=passes, _full=True)
        u, s, vh = _projected_svd(basis, a, r)
        if transpose:
            u, vh = vh.t(), u.t()
    u, vh = _fix_signs(u, vh)             # fresh tensors, not views of the larger factors
    return u.contiguous(), s.clone(), vh.contiguous()


@torch.no_grad()
def top_singular_values(weight: Tensor, r: int, *, passes: int = 4) -> Tensor:
    """The top-r singular values of ``weight`` [r], descending, in its dtype (block Krylov as
    :func:`top_singular_triplets`, block r + max(16, r/2); ``svdvals`` where that would not
    be smaller)."""
    _check(weight, r)
    w = weight.detach()
    block = r + max(16, r // 2)
    if not _small_enough(block, passes, min(w.shape)):
        return torch.linalg.svdvals(w)[:r]
    a = w.t() if w.shape[0] > w.shape[1] else w
    basis = _krylov_basis(a, block, passes)
    if basis.shape[1] < r:
        return torch.linalg.svdvals(w)[:r]
    return _projected_svd(basis, a, r, vectors=False)


def frobenius_sq(weight: Tensor) -> Tensor:
    """‖W‖_F² = Σ_i σ_i² (0-dim, in W's dtype): the total energy of the spectrum."""
    w = weight.detach()
    return (w * w).sum()

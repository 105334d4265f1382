"""LaMDA training schedules: PMB gradual freezing, and LaMDA++'s spectrum-based rank allocation.

LaMDA (Azizi et al., EMNLP Findings 2024, arXiv 2406.12832) adapts a layer as
``Y = X Wᵀ + s·((X Aᵀ) Sᵀ) Bᵀ`` with A [r, k] (PMA) the top-r right singular vectors of W, frozen;
S [r, r] (the low-dimensional adapter) trained throughout; and B [d, r] (PMB) the top-r left
singular vectors of W, trained early and frozen column by column, in order of singular value,
until only S trains: r² numbers per layer instead of r(d + k).

- :class:`PMBFreezer` runs the freezing schedule in a plain PyTorch loop;
  :func:`pmb_freezer_callback` (or ``fastpeft.lamda.PMBFreezerCallback``) in a transformers
  ``Trainer``.
- :func:`lamda_plus_ranks` allocates per-layer ranks from the normalised energy of each
  pretrained weight's spectrum (LaMDA++); pass the result to ``fastpeft.inject(..., ranks=...)``.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .config import AdapterConfig
from .inject import _find_targets, lowrank_layers
from .nn.linear import LowRankLinear
from .svd import frobenius_sq, krylov_applies, top_singular_values

__all__ = ["PMBFreezer", "pmb_freeze_step", "pmb_freezer_callback", "energy_curve", "energy_scores",
           "lamda_plus_ranks"]


# --------------------------------------------------------------------------------------------
# PMB gradual freezing
# --------------------------------------------------------------------------------------------

def pmb_freeze_step(column: int, r: int, freeze_b_steps: int) -> int:
    """The optimiser step after which column ``column`` (0-based) of a rank-``r`` B is frozen:

        t_j = ceil((j + 1) · T / r)          T = freeze_b_steps, j = 0 … r − 1

    Column 0 (the top singular vector) freezes first, column r − 1 last, at exactly step T;
    the columns freeze evenly spread over the first T steps (all at once, before training,
    when T = 0). Computed in integers, so no rounding can move a step.

    >>> [pmb_freeze_step(j, 4, 10) for j in range(4)]
    [3, 5, 8, 10]
    """
    if not 0 <= column < r:
        raise ValueError(f"column must be in [0, r={r}), got {column!r}")
    return -(-(column + 1) * freeze_b_steps // r)


class _FrozenB:
    """Per-layer state: how many leading columns of B are frozen, and their frozen values."""

    def __init__(self, name: str, layer: LowRankLinear):
        self.name, self.layer = name, layer
        self.r = layer.lora_B.shape[1]
        self.n_frozen = 0
        self.values: Optional[Tensor] = None        # [d, n_frozen], the frozen columns
        self.mask: Optional[Tensor] = None          # [r], 0 on frozen columns, for the grad hook
        self.hook = None


class PMBFreezer:
    """LaMDA's PMB gradual freezing for a plain PyTorch training loop.

    Over the first ``freeze_b_steps`` optimiser steps, the columns of every LaMDA layer's
    ``lora_B`` freeze one after another in order of the singular value they were initialised
    from (column 0, the top singular vector, first); column j of a rank-r layer is frozen from
    step ``t_j = ceil((j + 1)·T / r)`` on (:func:`pmb_freeze_step`). When a layer's last column
    freezes, ``lora_B.requires_grad_(False)``: backward computes no dB for it any more, and the
    layer trains only its r×r core (r² numbers).

    Frozen columns never move, whatever the optimiser does (weight decay, momentum, Adam
    state): their gradients are zeroed by a hook, and after every optimiser step their values
    are restored, bit for bit, from a copy taken when they froze. Once a layer's B is frozen
    entirely it has no gradient, so no optimiser moves it, and the copy is dropped: a finished
    schedule keeps nothing beyond the layers' own tensors.

    Call :meth:`step` once per optimiser step, after ``optimizer.step()``; or pass
    ``optimizer=`` and the freezer steps itself from the optimiser's step post-hook (then do not
    call :meth:`step`). With gradient accumulation, count optimiser steps, not micro-batches.

    Args:
        model: a model adapted by :func:`fastpeft.inject` (or any module holding fastpeft layers).
        freeze_b_steps: T; defaults to the ``AdapterConfig.freeze_b_steps`` that
            :func:`fastpeft.inject` recorded on the model (or on an adapted submodule).
        layers: names of the layers to schedule; default: every fastpeft layer whose
            ``lora_B`` requires grad when the freezer is built.
        optimizer: optional ``torch.optim.Optimizer`` to step from (see above).

    >>> import torch, fastpeft
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    >>> model = fastpeft.inject(model, fastpeft.AdapterConfig(method="lamda", r=4, freeze_b_steps=2))
    >>> opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    >>> freezer = fastpeft.PMBFreezer(model)
    >>> for _ in range(2):
    ...     model(torch.randn(3, 16)).sum().backward(); opt.step(); freezer.step(); opt.zero_grad()
    >>> model[0].lora_B.requires_grad, fastpeft.trainable_parameter_count(model)
    (False, 16)
    """

    def __init__(self, model: nn.Module, freeze_b_steps: Optional[int] = None, *,
                 layers: Optional[Iterable[str]] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if freeze_b_steps is None:
            # the config that inject recorded, on the model or on an adapted submodule
            configs = [m.fastpeft_config for m in model.modules() if hasattr(m, "fastpeft_config")]
            freeze_b_steps = next((c.freeze_b_steps for c in configs if c.freeze_b_steps is not None), None)
            if freeze_b_steps is None:
                raise ValueError("freeze_b_steps is not given and the model's AdapterConfig has "
                                 "freeze_b_steps=None: pass freeze_b_steps=<steps>")
        if isinstance(freeze_b_steps, bool) or not isinstance(freeze_b_steps, int) or freeze_b_steps < 0:
            raise ValueError(f"freeze_b_steps must be an int >= 0, got {freeze_b_steps!r}")
        found = dict(lowrank_layers(model))
        if layers is None:
            names = [n for n, m in found.items() if m.lora_B.requires_grad]
        else:
            names = list(layers)
            missing = [n for n in names if n not in found]
            if missing:
                raise ValueError(f"layers names modules that are not fastpeft layers: {missing[:10]}")
        if not names:
            raise ValueError("no fastpeft layer with a trainable lora_B in model: PMB freezing needs "
                             "a model adapted with method='lamda' (or another preset that trains B)")
        self.freeze_b_steps = freeze_b_steps
        self.step_count = 0
        self._layers = [_FrozenB(n, found[n]) for n in names]
        self._post_hook = None
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            self._post_hook = optimizer.register_step_post_hook(lambda *_: self.step())
        self._apply()  # T = 0 freezes everything before the first step

    # -- schedule ---------------------------------------------------------------------------

    def frozen_columns(self, name: str) -> int:
        """How many leading columns of layer ``name``'s B are frozen now."""
        for state in self._layers:
            if state.name == name:
                return state.n_frozen
        raise KeyError(f"{name!r} is not scheduled by this PMBFreezer")

    @property
    def done(self) -> bool:
        """True once every scheduled B is frozen entirely."""
        return all(s.n_frozen == s.r for s in self._layers)

    def _due(self, r: int) -> int:
        """Columns of a rank-r B frozen after ``step_count`` steps: #{j : t_j ≤ step_count}."""
        if self.step_count >= self.freeze_b_steps:
            return r
        # t_j ≤ n  ⇔  ceil((j+1)T/r) ≤ n  ⇔  (j+1)·T ≤ n·r  ⇔  j + 1 ≤ floor(n·r / T)
        return min(r, self.step_count * r // self.freeze_b_steps)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen columns back from their saved copies (bit-identical)."""
        for state in self._layers:
            if state.values is not None:
                state.layer.lora_B[:, :state.n_frozen] = state.values

    def step(self) -> None:
        """Advance one optimiser step: undo whatever the optimiser did to frozen columns, then
        freeze the columns that are due."""
        self.restore()
        self.step_count += 1
        self._apply()

    @torch.no_grad()
    def _apply(self) -> None:
        for state in self._layers:
            due = self._due(state.r)
            if due <= state.n_frozen:
                continue
            lora_b = state.layer.lora_B
            new = lora_b[:, state.n_frozen:due].detach().clone()
            state.values = new if state.values is None else torch.cat([state.values, new], dim=1)
            state.n_frozen = due
            if due == state.r:
                # B no longer requires grad: backward computes no dB; drop any stale gradient
                # so that no optimiser (even one whose grads are zeroed, not set to None)
                # applies weight decay or momentum to it
                if state.hook is not None:
                    state.hook.remove()
                    state.hook = None
                lora_b.requires_grad_(False)
                lora_b.grad = None
                state.mask = None
                # with no gradient, no optimiser moves B any more: the copy is not needed
                state.values = None
            else:
                mask = torch.ones(state.r, device=lora_b.device, dtype=lora_b.dtype)
                mask[:due] = 0
                state.mask = mask
                if state.hook is None:
                    state.hook = lora_b.register_hook(lambda g, s=state: g * s.mask)
                if lora_b.grad is not None:
                    lora_b.grad[:, :due] = 0

    def remove(self) -> None:
        """Detach the freezer: remove its gradient hooks and optimiser hook (frozen columns keep
        their values; a fully frozen B stays frozen)."""
        for state in self._layers:
            if state.hook is not None:
                state.hook.remove()
                state.hook = None
        if self._post_hook is not None:
            self._post_hook.remove()
            self._post_hook = None

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The step count and each layer's frozen column values (to resume training)."""
        return {"step_count": self.step_count, "freeze_b_steps": self.freeze_b_steps,
                "frozen": {s.name: (s.layer.lora_B[:, :s.n_frozen] if s.values is None else s.values).detach().clone()
                           for s in self._layers if s.n_frozen}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the frozen columns are written back and frozen."""
        if state.get("freeze_b_steps") != self.freeze_b_steps:
            raise ValueError(f"state was saved with freeze_b_steps={state.get('freeze_b_steps')!r}, "
                             f"this freezer has {self.freeze_b_steps}")
        frozen = state["frozen"]
        unknown = sorted(set(frozen) - {s.name for s in self._layers})
        if unknown:
            raise ValueError(f"state names layers this freezer does not schedule: {unknown[:10]}")
        for s in self._layers:
            if s.n_frozen:
                raise RuntimeError("load_state_dict must be called on a fresh PMBFreezer (before any step)")
        self.step_count = int(state["step_count"])
        for s in self._layers:
            values = frozen.get(s.name)
            if values is not None:
                s.layer.lora_B[:, :values.shape[1]] = values.to(s.layer.lora_B)
        self._apply()

    def trainable_adapter_parameters(self) -> int:
        """Numbers that still train in the scheduled layers' A, B and core: r² per layer once B
        is frozen (LaMDA), plus d per column of B still trainable."""
        total = 0
        for s in self._layers:
            layer = s.layer
            for p in (layer.lora_A, layer.lora_core):
                if p is not None and p.requires_grad:
                    total += p.numel()
            if layer.lora_B.requires_grad:
                total += layer.lora_B.shape[0] * (s.r - s.n_frozen)
        return total


_CALLBACK_CLASS = None


def _callback_class():
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        try:
            from transformers import TrainerCallback
        except ImportError as err:
            raise ImportError("PMBFreezerCallback needs transformers: pip install 'fastpeft[hf]'") from err

        class PMBFreezerCallback(TrainerCallback):
            """A transformers ``TrainerCallback`` running :class:`PMBFreezer`: built at
            ``on_train_begin`` on the Trainer's model, stepped at ``on_optimizer_step`` (right
            after every ``optimizer.step()``, so frozen columns are restored before the next
            forward). ``freeze_b_steps`` defaults to the model's ``AdapterConfig``."""

            def __init__(self, freeze_b_steps: Optional[int] = None):
                if freeze_b_steps is not None and (isinstance(freeze_b_steps, bool)
                                                   or not isinstance(freeze_b_steps, int) or freeze_b_steps < 0):
                    raise ValueError(f"freeze_b_steps must be an int >= 0 or None, got {freeze_b_steps!r}")
                self.freeze_b_steps = freeze_b_steps
                self.freezer: Optional[PMBFreezer] = None

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if model is None:
                    raise ValueError("PMBFreezerCallback needs the Trainer's model at on_train_begin")
                if self.freezer is None:
                    self.freezer = PMBFreezer(_unwrap(model), self.freeze_b_steps)
                    # resuming from a checkpoint: catch up to the global step
                    while self.freezer.step_count < state.global_step:
                        self.freezer.step()

            def on_optimizer_step(self, args, state, control, **kwargs):
                if self.freezer is not None:
                    self.freezer.step()

        _CALLBACK_CLASS = PMBFreezerCallback
    return _CALLBACK_CLASS


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself under DDP / accelerate wrappers (``.module``)."""
    while not lowrank_layers(model) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def pmb_freezer_callback(freeze_b_steps: Optional[int] = None):
    """A transformers ``TrainerCallback`` that runs LaMDA's PMB gradual freezing
    (:class:`PMBFreezer`) inside ``Trainer``; transformers is imported only here.

    >>> trainer = transformers.Trainer(model, args, train_dataset=data,     # doctest: +SKIP
    ...                                callbacks=[fastpeft.pmb_freezer_callback(100)])
    """
    return _callback_class()(freeze_b_steps)


def __getattr__(name):  # fastpeft.lamda.PMBFreezerCallback, built on first use
    if name == "PMBFreezerCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# LaMDA++: per-layer ranks from the normalised energy of the pretrained spectrum
# --------------------------------------------------------------------------------------------

def _target_layers(model: nn.Module, targets) -> list[tuple[str, nn.Module, tuple[int, int]]]:
    if isinstance(targets, AdapterConfig):
        config = targets
    else:
        config = AdapterConfig(method="lamda", target_modules=targets)
    found = [(name, module, shape) for name, module, _, shape in _find_targets(model, config)]
    if not found:
        raise ValueError(f"no Linear layer of model matched target_modules={config.target_modules!r}")
    return found


def _dense_weight(name: str, module: nn.Module) -> Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"layer {name!r}: LaMDA++ needs a dense floating-point 2-D weight, got "
                        f"{None if weight is None else (weight.dtype, tuple(weight.shape))}")
    return weight.detach()


def energy_curve(name: str, module: nn.Module, max_rank: Optional[int] = None) -> Tensor:
    """The normalised cumulative energy of one layer's weight, float64 [n + 1]:

        e(k) = Σ_{i ≤ k} σ_i² / Σ_i σ_i²          k = 0 … n = min(d, k_in),  e(0) = 0, e(n) = 1

    σ_1 ≥ σ_2 ≥ … the singular values of W (a zero W counts as a flat spectrum). The total
    Σ_i σ_i² is ‖W‖_F², summed from W's entries in float64. With ``max_rank`` < n only
    e(0 … max_rank) are returned [max_rank + 1], from the top singular values alone
    (:func:`fastpeft.svd.top_singular_values`, a block Krylov method instead of a full SVD, run
    on W as it is, float32 for 16-bit weights: no float64 copy of W; its values are within
    1e-4 relative, far below what moves a rank). Where the full SVD is used, it runs in float64."""
    w = _dense_weight(name, module)
    n = min(w.shape)
    total = frobenius_sq(w, torch.float64)
    if max_rank is not None and not 1 <= max_rank:
        raise ValueError(f"max_rank must be >= 1, got {max_rank!r}")
    if total <= 0:
        m = n if max_rank is None else min(max_rank, n)
        sq, total = torch.ones(m, dtype=torch.float64), torch.tensor(float(n), dtype=torch.float64)
    elif max_rank is None or max_rank >= n:
        sq = torch.linalg.svdvals(w.double()) ** 2
        total = sq.sum()              # so that e(n) = 1 exactly
    elif not krylov_applies(tuple(w.shape), max_rank):
        sq = torch.linalg.svdvals(w.double())[:max_rank] ** 2
    else:
        work = w if w.dtype in (torch.float32, torch.float64) else w.float()
        sq = top_singular_values(work, max_rank).double() ** 2
    return torch.cat([sq.new_zeros(1), torch.cumsum(sq, 0) / total]).clamp_(max=1.0)


def energy_scores(model: nn.Module, targets, energy_rank: int) -> dict[str, float]:
    """The normalised energy score e(ρ) of each targeted layer's pretrained weight W:

        e(ρ) = Σ_{i ≤ ρ} σ_i² / Σ_i σ_i²          σ_1 ≥ σ_2 ≥ …  the singular values of W

    the share of W's energy (squared Frobenius norm) in its top ρ = ``energy_rank`` singular
    directions; 1 means W is (numerically) of rank ≤ ρ. ``targets``: an AdapterConfig, or a
    target_modules value (names or a regex, as :class:`fastpeft.AdapterConfig`)."""
    if isinstance(energy_rank, bool) or not isinstance(energy_rank, int) or energy_rank < 1:
        raise ValueError(f"energy_rank must be an int >= 1, got {energy_rank!r}")
    scores = {}
    for name, module, _ in _target_layers(model, targets):
        curve = energy_curve(name, module, max_rank=energy_rank)
        scores[name] = curve[min(energy_rank, curve.numel() - 1)].item()
    return scores


def _rank_at_energy(curve: Tensor, tau: float) -> float:
    """e⁻¹(τ) on the piecewise-linear curve through (k, e(k)): the (fractional) rank at which
    the layer holds a share τ of its energy."""
    if tau <= 0.0:
        return 0.0
    k = int(torch.searchsorted(curve, torch.tensor(tau, dtype=curve.dtype)).item())
    k = min(max(k, 1), curve.numel() - 1)
    lo, hi = curve[k - 1].item(), curve[k].item()
    return (k - 1) + (0.0 if hi <= lo else min(1.0, max(0.0, (tau - lo) / (hi - lo))))


def lamda_plus_ranks(model: nn.Module, targets: Union[AdapterConfig, list[str], str, None],
                     mean_rank: int, *, multiple: int = 8, min_rank: Optional[int] = None,
                     max_rank: Optional[int] = None) -> dict[str, int]:
    """LaMDA++: per-layer ranks from the spectrum of each pretrained weight, under the budget of
    ``mean_rank`` per layer. Returns ``{layer name: r}`` for ``fastpeft.inject(model, config,
    ranks=...)``.

    For the L targeted layers, with budget R = mean_rank · L:

    1. normalised energy score of each layer, as a function of the rank (:func:`energy_curve`):
       e_ℓ(k) = Σ_{i ≤ k} σ_{ℓ,i}² / Σ_i σ_{ℓ,i}², linear between integer k;
    2. one energy level τ for all layers: every layer gets the rank at which it holds the share
       τ of its energy,  t_ℓ = clip(e_ℓ⁻¹(τ), lo, hi_ℓ),  with τ ∈ [0, 1] found by bisection
       so that Σ t_ℓ = q·round(R/q). A layer whose energy concentrates in few singular values
       reaches τ early and gets less rank; a layer with a flat spectrum gets more.
       lo = ``min_rank`` (default ``multiple``); hi_ℓ = the largest multiple of ``multiple``
       ≤ min(``max_rank``, d_ℓ, k_ℓ) (``max_rank`` default 4·mean_rank);
    3. rounding to multiples of q = ``multiple`` by largest remainders: every layer gets
       q·⌊t_ℓ/q⌋, then the U − Σ⌊t_ℓ/q⌋ units left (U = round(R / q)) go, one q each, to the
       layers with the largest fractional parts t_ℓ/q − ⌊t_ℓ/q⌋, earlier layers (module order)
       first on ties, never above hi_ℓ.

    So Σ r_ℓ = q·round(R/q) (exactly R when R is a multiple of q), every r_ℓ is a multiple of q
    in [lo, hi_ℓ], and |r_ℓ − t_ℓ| < q (unless even τ = 1 leaves budget over, for weights of
    rank below their share: step 3 then places the rest below the caps). Example: four 64×64 weights with flat spectra of rank
    16, 32, 32 and 48 (e_ℓ(k) = k / rank_ℓ) and mean_rank 16 give τ = ½ and ranks 8, 16, 16,
    24. Deterministic: the same weights give the same ranks. Singular values in float64, the top
    hi_ℓ of each layer only (:func:`fastpeft.svd.top_singular_values`), and ‖W‖_F² from W's entries.

    >>> import torch, fastpeft
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    >>> ranks = fastpeft.lamda_plus_ranks(model, ["0", "1"], mean_rank=16)
    >>> sum(ranks.values())
    32
    >>> model = fastpeft.inject(model, fastpeft.AdapterConfig(method="lamda", target_modules=["0", "1"]),
    ...                         ranks=ranks)
    """
    for arg, value in (("mean_rank", mean_rank), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    q = multiple
    lo = q if min_rank is None else min_rank
    if isinstance(lo, bool) or not isinstance(lo, int) or lo < 1 or lo % q:
        raise ValueError(f"min_rank must be a positive multiple of multiple={q}, got {min_rank!r}")
    cap = 4 * mean_rank if max_rank is None else max_rank
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < lo:
        raise ValueError(f"max_rank must be an int >= min_rank={lo}, got {max_rank!r}")
    layers = _target_layers(model, targets)
    names = [n for n, *_ in layers]
    hi = {n: (min(cap, d, k) // q) * q for n, _, (d, k) in layers}
    small = [n for n in names if hi[n] < lo]
    if small:
        raise ValueError(f"min_rank={lo} does not fit layers {small[:5]} (rank at most min(d, k) "
                         f"rounded down to a multiple of {q})")
    budget = mean_rank * len(names)
    units = int(math.floor(budget / q + 0.5))
    if units * q < lo * len(names) or units * q > sum(hi.values()):
        raise ValueError(f"the budget mean_rank={mean_rank} × {len(names)} layers (rounded to "
                         f"{units * q}) lies outside [min_rank·L = {lo * len(names)}, "
                         f"Σ max ranks = {sum(hi.values())}]: change mean_rank, min_rank or max_rank")
    # e(k) is needed only up to each layer's cap hi: the rank is clipped there
    curves = {n: energy_curve(n, module, max_rank=hi[n]) for n, module, _ in layers}
    target = _energy_fill(names, curves, lo, hi, float(units * q))

    base = {n: max(lo // q, min(int(math.floor(target[n] / q + 1e-9)), hi[n] // q)) for n in names}
    left = units - sum(base.values())
    order = sorted(range(len(names)), key=lambda i: (-(target[names[i]] / q - base[names[i]]), i))
    while left > 0:
        progressed = False
        for i in order:
            n = names[i]
            if left and base[n] < hi[n] // q:
                base[n] += 1
                left -= 1
                progressed = True
        if not progressed:  # cannot happen: the budget check bounds units by Σ hi
            raise RuntimeError("LaMDA++ rounding could not place the budget")
    while left < 0:  # only through the 1e-9 guard on ⌊t/q⌋
        for i in reversed(order):
            n = names[i]
            if left and base[n] > lo // q:
                base[n] -= 1
                left += 1
    return {n: base[n] * q for n in names}


def _energy_fill(names, curves, lo, hi, total) -> dict[str, float]:
    """t_n = clip(e_n⁻¹(τ), lo, hi_n) with Σ t_n = total; Σ t_n grows with τ, so bisect τ."""
    def fill(tau):
        return {n: min(float(hi[n]), max(float(lo), _rank_at_energy(curves[n], tau))) for n in names}

    t_lo, t_hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (t_lo + t_hi)
        if sum(fill(mid).values()) < total:
            t_lo = mid
        else:
            t_hi = mid
    return fill(t_hi)

"""AdaLoRA's rank budget: importance scores, cubic budget schedule, pruning masks, and the
orthogonality regulariser (Zhang et al., ICLR 2023, "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning").

An ``adalora`` layer computes ``ΔW x = s·P diag(Λ) Q x`` with P = ``lora_B`` [d, r],
Λ = ``lora_core`` [r] (diagonal) and Q = ``lora_A`` [r, k]. Each triplet i = (P[:, i], Λ_i,
Q[i, :]) is one rank-1 direction; :class:`AdaLoRABudget` scores the triplets during training and
zeroes the Λ_i of the least important ones until the total number of live triplets reaches the
target budget; :func:`orthogonality_loss` keeps P and Q near-orthogonal so Λ acts as a spectrum.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .inject import lowrank_layers

__all__ = ["AdaLoRABudget", "budget_schedule", "orthogonality_loss"]


def budget_schedule(step: int, initial: int, target: int, tinit: int, tfinal: int) -> int:
    """AdaLoRA's cubic budget (total live rank) after ``step`` optimiser steps:

        b(t) = b₀                                              t ≤ t_init
        b(t) = b_T + (b₀ − b_T)·(1 − (t − t_init)/(t_final − t_init))³      t_init < t < t_final
        b(t) = b_T                                             t ≥ t_final

    rounded down to an int (never below b_T). ``tinit`` and ``tfinal`` are step numbers
    (HF PEFT's ``AdaLoraConfig`` counts its ``tfinal`` back from ``total_step``: PEFT's
    ``total_step − tfinal`` is this ``tfinal``).

    >>> [budget_schedule(t, 96, 48, 10, 20) for t in (0, 10, 11, 15, 19, 20, 30)]
    [96, 96, 82, 54, 48, 48, 48]
    """
    if step <= tinit:
        return initial
    if step >= tfinal:
        return target
    frac = 1.0 - (step - tinit) / (tfinal - tinit)
    return max(target, int(target + (initial - target) * frac ** 3))


class AdaLoRABudget:
    """Prunes the diagonal cores of ``adalora`` layers to a total rank budget, as AdaLoRA.

    Importance of one parameter entry w at step t (sensitivity with its uncertainty):

        I⁽ᵗ⁾ = |w · ∂L/∂w|
        Ī⁽ᵗ⁾ = β₁·Ī⁽ᵗ⁻¹⁾ + (1 − β₁)·I⁽ᵗ⁾                 (smoothed sensitivity)
        Ū⁽ᵗ⁾ = β₂·Ū⁽ᵗ⁻¹⁾ + (1 − β₂)·|I⁽ᵗ⁾ − Ī⁽ᵗ⁾|         (uncertainty)
        s(w) = Ī⁽ᵗ⁾ · Ū⁽ᵗ⁾

    and of triplet i of a layer (P = lora_B [d, r], Λ = lora_core [r], Q = lora_A [r, k]):

        S_i = s(Λ_i) + (1/d)·Σ_j s(P_ji) + (1/k)·Σ_j s(Q_ij)

    (``score="core"`` uses s(Λ_i) alone). Every ``deltaT`` steps in (tinit, tfinal), and at
    every step from ``tfinal`` on, the b(t) triplets with the largest S_i over all layers keep
    their Λ_i, and the others are set to zero (:func:`budget_schedule` gives b(t); ties at
    the threshold are broken by layer order, then index, so exactly b(t) stay). From
    ``tfinal`` on the mask is fixed and the scores are no longer updated. Between allocations
    the current mask is re-applied after every step: a pruned Λ_i stays zero whatever the
    optimiser does (weight decay, momentum), and its gradient is zeroed too.

    Call :meth:`step` once per optimiser step, after ``optimizer.step()`` and before
    ``optimizer.zero_grad()`` (the scores read the gradients); or pass ``optimizer=`` to run
    it from the optimiser's step post-hook.

    Args:
        model: a model adapted with ``method="adalora"``.
        target_rank: the mean rank per layer to reach (b_T = target_rank × layers), as PEFT's
            ``target_r``; or give ``target_total`` (b_T) instead.
        tinit: warm-up steps at the full budget b₀ = Σ initial ranks.
        tfinal: the step at which the budget reaches b_T (> tinit).
        deltaT: steps between two allocations while the budget falls.
        beta1, beta2: the EMA factors of the sensitivity and the uncertainty.
    """

    def __init__(self, model: nn.Module, target_rank: Optional[int] = None, *, tinit: int,
                 tfinal: int, target_total: Optional[int] = None, deltaT: int = 1,
                 beta1: float = 0.85, beta2: float = 0.85, score: str = "triplet",
                 optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.layers = [(n, m) for n, m in lowrank_layers(model)
                       if m.lora_core is not None and m.lora_core.dim() == 1 and m.lora_core.requires_grad]
        if not self.layers:
            raise ValueError("model has no fastpeft layer with a trainable diagonal core: adapt it "
                             "with fastpeft.AdapterConfig(method='adalora', ...) first")
        for arg, value in (("tinit", tinit), ("tfinal", tfinal), ("deltaT", deltaT)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if arg == "deltaT" else 0):
                raise ValueError(f"{arg} must be an int >= {1 if arg == 'deltaT' else 0}, got {value!r}")
        if tfinal <= tinit:
            raise ValueError(f"tfinal must be greater than tinit, got tinit={tinit}, tfinal={tfinal}")
        for arg, value in (("beta1", beta1), ("beta2", beta2)):
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{arg} must be in (0, 1), got {value!r}")
        if score not in ("triplet", "core"):
            raise ValueError(f"score must be 'triplet' or 'core', got {score!r}")
        self.initial_total = sum(m.lora_core.numel() for _, m in self.layers)
        if (target_rank is None) == (target_total is None):
            raise ValueError("give exactly one of target_rank (mean per layer) and target_total")
        if target_total is None:
            if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
                raise ValueError(f"target_rank must be an int >= 1, got {target_rank!r}")
            target_total = target_rank * len(self.layers)
        if isinstance(target_total, bool) or not isinstance(target_total, int) \
                or not 0 <= target_total <= self.initial_total:
            raise ValueError(f"target_total must be an int in [0, {self.initial_total}] (the total "
                             f"initial rank), got {target_total!r}")
        self.target_total = target_total
        self.tinit, self.tfinal, self.deltaT = tinit, tfinal, deltaT
        self.beta1, self.beta2, self.score = float(beta1), float(beta2), score
        self.step_count = 0
        self.budget = self.initial_total
        self._ipt: dict[int, Tensor] = {}
        self._unc: dict[int, Tensor] = {}
        self.masks: dict[str, Tensor] = {}
        self._hooks = {}
        self._post_hook = None
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            self._post_hook = optimizer.register_step_post_hook(lambda *_: self.step())

    # -- scores -----------------------------------------------------------------------------

    def _tracked(self, layer):
        if self.score == "core":
            return [layer.lora_core]
        return [p for p in (layer.lora_core, layer.lora_B, layer.lora_A) if p.requires_grad]

    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold the current gradients into the smoothed sensitivity and uncertainty."""
        for _, layer in self.layers:
            for p in self._tracked(layer):
                if p.grad is None:
                    continue
                sens = (p.detach() * p.grad).abs().float()
                key = id(p)
                if key not in self._ipt:
                    self._ipt[key] = torch.zeros_like(sens)
                    self._unc[key] = torch.zeros_like(sens)
                ipt = self._ipt[key].mul_(self.beta1).add_(sens, alpha=1 - self.beta1)
                self._unc[key].mul_(self.beta2).add_((sens - ipt).abs(), alpha=1 - self.beta2)

    def _element_score(self, p) -> Optional[Tensor]:
        key = id(p)
        if key not in self._ipt:
            return None
        return self._ipt[key] * self._unc[key]

    def triplet_scores(self) -> dict[str, Tensor]:
        """S_i for every layer ({name: [r]}, float32); zeros before any gradient was seen."""
        out = {}
        for name, layer in self.layers:
            r = layer.lora_core.numel()
            total = torch.zeros(r, device=layer.lora_core.device)
            s_core = self._element_score(layer.lora_core)
            if s_core is not None:
                total += s_core
            if self.score == "triplet":
                s_b = self._element_score(layer.lora_B)      # [d, r] → mean over d
                if s_b is not None:
                    total += s_b.mean(0)
                s_a = self._element_score(layer.lora_A)      # [r, k] → mean over k
                if s_a is not None:
                    total += s_a.mean(1)
            out[name] = total
        return out

    # -- masks ------------------------------------------------------------------------------

    @torch.no_grad()
    def allocate(self, budget: int) -> dict[str, Tensor]:
        """Keep the ``budget`` triplets with the largest scores (ties: layer order, then
        index), zero the other Λ_i; returns and records the masks ({name: bool [r]})."""
        scores = self.triplet_scores()
        flat = torch.cat([scores[n].detach().cpu().double() for n, _ in self.layers])
        # a stable sort on -score keeps layer order, then index, among equal scores
        order = torch.sort(-flat, stable=True).indices
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[order[:budget]] = True
        start = 0
        for name, layer in self.layers:
            r = layer.lora_core.numel()
            self.masks[name] = keep[start:start + r].to(layer.lora_core.device)
            start += r
        self._set_hooks()
        self.apply_masks()
        return dict(self.masks)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned Λ_i (and their gradients)."""
        for name, layer in self.layers:
            mask = self.masks.get(name)
            if mask is None:
                continue
            core = layer.lora_core
            core.mul_(mask.to(core.dtype))
            if core.grad is not None:
                core.grad.mul_(mask.to(core.grad.dtype))

    def _set_hooks(self) -> None:
        for name, layer in self.layers:
            if name not in self._hooks:
                self._hooks[name] = layer.lora_core.register_hook(
                    lambda g, n=name: g * self.masks[n].to(g.dtype))

    def step(self) -> None:
        """One optimiser step done: update the scores, and prune to b(t) when an allocation is
        due (re-apply the current masks otherwise)."""
        self.step_count += 1
        t = self.step_count
        if t <= self.tfinal:
            self.update_importance()
        self.budget = budget_schedule(t, self.initial_total, self.target_total, self.tinit, self.tfinal)
        due = (self.tinit < t < self.tfinal and (t - self.tinit) % self.deltaT == 0) or t == self.tfinal
        if due:
            self.allocate(self.budget)
        else:
            self.apply_masks()

    def ranks(self) -> dict[str, int]:
        """The live rank (non-pruned triplets) of every layer."""
        return {name: int(self.masks[name].sum()) if name in self.masks else layer.lora_core.numel()
                for name, layer in self.layers}

    def remove(self) -> None:
        """Remove the gradient hooks and the optimiser hook (the cores keep their values)."""
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
        if self._post_hook is not None:
            self._post_hook.remove()
            self._post_hook = None


def orthogonality_loss(model: nn.Module, *, reduction: str = "sum") -> Tensor:
    """AdaLoRA's orthogonality regulariser over the ``adalora`` layers of ``model``:

        R = Σ_layers ‖Q Qᵀ − I_r‖²_F + ‖Pᵀ P − I_r‖²_F       Q = lora_A [r, k], P = lora_B [d, r]

    (``reduction="mean"`` divides by the number of layers). Add ``γ·R`` to the loss
    (AdaLoRA uses γ = 0.1 to 0.5; PEFT's ``orth_reg_weight`` defaults to 0.5, on an unsquared,
    averaged norm).

    >>> import torch, fastpeft
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    >>> model = fastpeft.inject(model, fastpeft.AdapterConfig(method="adalora", r=4))
    >>> loss = model(torch.randn(2, 16)).sum() + 0.1 * fastpeft.orthogonality_loss(model)
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    terms = []
    for _, layer in lowrank_layers(model):
        if layer.lora_core is None or layer.lora_core.dim() != 1 or layer.lora_out_scale is not None:
            continue  # adalora layers only (VeRA's diagonal core comes with an out_scale)
        a, b = layer.lora_A, layer.lora_B
        eye = torch.eye(a.shape[0], device=a.device, dtype=torch.float32)
        terms.append(((a.float() @ a.float().t() - eye) ** 2).sum()
                     + ((b.float().t() @ b.float() - eye) ** 2).sum())
    if not terms:
        raise ValueError("model has no adalora layer: adapt it with method='adalora' first")
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total

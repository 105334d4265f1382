"""``LowRankLinear``: a drop-in ``nn.Linear`` with a low-rank adapter beside its frozen weight."""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import AdapterConfig
from ..ops.dora import dora_linear, dora_norm, dora_row_scale, row_sq_norms
from ..ops.lowrank import lowrank_linear
from ..svd import all_finite, top_singular_triplets

__all__ = ["LowRankLinear", "ADAPTER_PARAMS", "vera_projections"]

ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_core", "lora_out_scale", "lora_magnitude")

# layer -> the sibling group it belongs to (see fastpeft.nn.group); weak keys, so copies of a model
# and layers that are gone are never linked
SIBLING_GROUPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vera_projections(seed: int, r: int, max_in: int, max_out: int, device=None, dtype=None):
    """VeRA's frozen random projections shared by every layer, drawn from ``seed``:
    A [r, max_in] and B [max_out, r], Kaiming-uniform; each layer uses A[:, :k] and B[:d]."""
    gen = torch.Generator().manual_seed(int(seed))
    proj_a = torch.empty(r, max_in)
    proj_b = torch.empty(max_out, r)
    nn.init.kaiming_uniform_(proj_a, a=math.sqrt(5), generator=gen)
    nn.init.kaiming_uniform_(proj_b, a=math.sqrt(5), generator=gen)
    return proj_a.to(device=device, dtype=dtype), proj_b.to(device=device, dtype=dtype)


class LowRankLinear(nn.Module):
    """``y = x Wᵀ + b + s·(σ(D(x) Aᵀ) coreᵀ) Bᵀ ⊙ out_scale`` as a module.

    Keeps ``nn.Linear``'s state-dict keys (``weight``, ``bias``) and adds ``lora_A`` [r, k],
    ``lora_B`` [d, r], ``lora_core`` (``None``, [r] or [r, r]), ``lora_out_scale``
    (``None`` or [d]) and ``lora_magnitude`` (DoRA's m [d], else ``None``). Build one from an existing layer with :meth:`from_linear`, which shares
    the base weight and bias (no copy).

    ``merge()`` adds ``s·diag(out_scale)·B·core·A`` (computed in fp32) to the weight and
    ``unmerge()`` subtracts it. In fp32 the round trip is exact to ~1e-7 relative; in fp16/bf16
    each of the two roundings moves an element by at most half an ulp of its value, so the
    drift is bounded by one ulp of ``|W| + |ΔW|`` per element (2⁻¹⁰ relative for fp16, 2⁻⁷ for
    bf16); keep an fp32 copy if you need the exact weight back.

    DoRA (``method="dora"``): ``y = (m / n) ⊙ (x Wᵀ + s·(D(x) Aᵀ) Bᵀ) + b`` with n = ‖W + s·B·A‖
    per row (:mod:`fastpeft.ops.dora`); ‖W_j‖² is cached while the weight is unchanged.
    ``merge()`` writes ``W' = (m / n) ⊙ (W + s·B·A)`` and keeps n for ``unmerge()``.

    >>> import torch, fastpeft
    >>> base = torch.nn.Linear(32, 16)
    >>> layer = fastpeft.LowRankLinear.from_linear(base, fastpeft.AdapterConfig(method="lora", r=4))
    >>> layer.weight is base.weight, layer(torch.randn(3, 32)).shape
    (True, torch.Size([3, 16]))

    A layer may hold several named adapters (:func:`fastpeft.load_adapter` with
    ``adapter_name``): the parameters above are those of ``active_adapter``, the others wait in
    ``lora_slots`` (see :mod:`fastpeft.nn.multi`).
    """

    # the name of the adapter whose tensors are the parameters above; ``_routing`` (set by
    # fastpeft.set_adapter / mixed_batch) redirects forward when not None
    active_adapter = "default"
    _routing = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: Optional[AdapterConfig] = None, *, r: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, config or AdapterConfig(), r)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: AdapterConfig, *, r: Optional[int] = None,
                    vera_shared: Optional[tuple[Tensor, Tensor]] = None) -> "LowRankLinear":
        """Wrap ``linear`` (its weight and bias are shared, not copied) with an adapter of
        ``config``'s method. ``r`` overrides ``config.r``; ``vera_shared`` passes VeRA's shared
        projections (see :func:`vera_projections`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear.weight, linear.bias, config, r, vera_shared)
        return layer

    # -- construction ---------------------------------------------------------------------

    def _setup(self, weight, bias, config, r, vera_shared=None, base_dtype=None):
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be a fastpeft.AdapterConfig, got {type(config).__name__}")
        spec = config.spec
        out_features, in_features = self._base_shape(weight)
        r = config.r if r is None else r
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if spec.init == "svd" and r > min(in_features, out_features):
            raise ValueError(f"r must be an int in [1, min(d={out_features}, k={in_features})] for "
                             f"{config.method}'s SVD initialisation, got {r!r}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.method = config.method
        self.scale = config.scale_for(r)
        self.dropout_p = float(config.dropout)
        self.activation = config.effective_activation
        self.merged = False
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(bool(config.train_bias or config.method == "bitfit"))

        device = weight.device
        dtype = config.torch_adapter_dtype or base_dtype or weight.dtype
        lora_a, lora_b, core, out_scale = self._init_adapter(config, r, device, dtype, vera_shared)
        self.lora_A = nn.Parameter(lora_a, requires_grad=spec.train_A)
        self.lora_B = nn.Parameter(lora_b, requires_grad=spec.train_B)
        self.lora_core = None if core is None else nn.Parameter(core)
        self.lora_out_scale = None if out_scale is None else nn.Parameter(out_scale)
        self._merge_norm = None     # DoRA: n of the unmerged weight while merged
        self._w_sq_cache = None     # DoRA: (key of the weight, ‖W_j‖² fp32 [d])
        if spec.magnitude:
            if self.activation is not None:
                raise ValueError(f"method {config.method!r} needs a linear adapter; activation "
                                 f"{self.activation!r} is not supported with it")
            # m starts at ‖W_j‖ (n at B = 0): the layer starts as the base layer
            self.lora_magnitude = nn.Parameter(self._weight_sq_norm().sqrt().to(device=device, dtype=dtype))
        else:
            self.lora_magnitude = None

    @staticmethod
    def _base_shape(weight) -> tuple[int, int]:
        return tuple(weight.shape)

    def _dense_weight_fp32(self) -> Tensor:
        """The base weight in fp32 (for SVD initialisation and merging)."""
        return self.weight.detach().float()

    def _init_adapter(self, config, r, device, dtype, vera_shared):
        d, k = self.out_features, self.in_features
        init = config.spec.init
        core = out_scale = None
        if init == "svd":
            # LaMDA: A = top-r right singular vectors, B = top-r left singular vectors, core 0.
            weight = self._dense_weight_fp32()
            if not all_finite(weight):
                raise ValueError("the base weight has NaN or Inf entries; LaMDA's SVD initialisation needs "
                                 "a finite weight")
            # only the top r triplets (fastpeft.svd), contiguous tensors of their own: strided
            # parameters break FSDP2 sharding and slow the kernels
            u, _, vh = top_singular_triplets(weight, r, check_finite=False)   # checked above
            lora_a, lora_b = vh, u
            core = torch.zeros(r, r, device=device)
        elif init == "vera":
            if vera_shared is None:
                vera_shared = vera_projections(config.seed, r, k, d, device, dtype)
            proj_a, proj_b = vera_shared
            if proj_a.shape[0] != r or proj_a.shape[1] < k or proj_b.shape[0] < d:
                raise ValueError(f"vera_shared projections {tuple(proj_a.shape)}, {tuple(proj_b.shape)} "
                                 f"are too small for r={r}, k={k}, d={d}")
            lora_a, lora_b = proj_a[:, :k], proj_b[:d]           # views: storage shared by layers
            core = torch.full((r,), float(config.vera_d_initial), device=device)
            out_scale = torch.zeros(d, device=device)
        elif init == "adalora":
            gen_device = "cpu"
            lora_a = torch.randn(r, k, device=gen_device) * 0.02
            lora_b = torch.randn(d, r, device=gen_device) * 0.02
            core = torch.zeros(r, device=device)
        else:  # Kaiming-uniform A, zero B: the layer starts as the base layer
            lora_a = torch.empty(r, k, device=device, dtype=torch.float32)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            lora_b = torch.zeros(d, r, device=device)
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
        if init == "vera":
            return lora_a, lora_b, cast(core), cast(out_scale)
        return cast(lora_a), cast(lora_b), cast(core), cast(out_scale)

    def _weight_sq_norm(self) -> Tensor:
        """‖W_j‖² (fp32 [d]) of the base weight, cached while the weight is unchanged."""
        w = self.weight
        if torch.compiler.is_compiling():   # traced: computed in the graph, not cached
            return row_sq_norms(w)
        key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
        if self._w_sq_cache is None or self._w_sq_cache[0] != key:
            self._w_sq_cache = (key, row_sq_norms(w))
        return self._w_sq_cache[1]

    def dora_norm(self) -> Tensor:
        """n = ‖W + s·B·A‖ per output row (fp32 [d], detached) of the unmerged weight."""
        lora_a, lora_b = self.lora_A.detach().to(self.weight.dtype), self.lora_B.detach().to(self.weight.dtype)
        return dora_norm(self.weight, lora_a, lora_b, self.scale, weight_sq_norm=self._weight_sq_norm())

    # -- forward ----------------------------------------------------------------------------

    def adapter_tensors(self, dtype) -> tuple:
        """(A, B, core, out_scale) in ``dtype`` (a differentiable cast where they differ)."""
        return tuple(t if t is None or t.dtype == dtype else t.to(dtype)
                     for t in (self.lora_A, self.lora_B, self.lora_core, self.lora_out_scale))

    def forward(self, x: Tensor) -> Tensor:
        if self._routing is not None:    # a mixed batch, or the model's active adapter is not here
            return self._routing(self, x)
        # a layer linked to its siblings (fastpeft.group_projections) may take its output from
        # the group's one pass over x; never while torch.compile traces
        if not torch.compiler.is_compiling() and SIBLING_GROUPS:
            group = SIBLING_GROUPS.get(self)
            if group is not None:
                out = group.output_for(self, x)
                if out is not None:
                    return out
        return self._forward_alone(x)

    def _forward_alone(self, x: Tensor) -> Tensor:
        # each parameter read once (nn.Module.__getattr__ is a Python call per read)
        weight, bias = self.weight, self.bias
        if self.merged:
            return F.linear(x, weight, bias)
        lora_a, lora_b, core, out_scale = self.adapter_tensors(weight.dtype)
        dropout_p = self.dropout_p if self.training else 0.0
        magnitude = self.lora_magnitude
        if magnitude is not None:
            return dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scale=self.scale,
                               dropout_p=dropout_p, weight_sq_norm=self._weight_sq_norm())
        return lowrank_linear(x, weight, bias, lora_a, lora_b, core=core, out_scale=out_scale,
                              scale=self.scale, dropout_p=dropout_p, activation=self.activation)

    # -- merging ----------------------------------------------------------------------------

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """ΔW = s·diag(out_scale)·B·core·A in fp32, [d, k]."""
        if self.activation is not None:
            raise RuntimeError(f"a {self.method} adapter with activation {self.activation!r} is "
                               "not linear in x and cannot be merged into the weight")
        lora_b = self.lora_B.float()
        if self.lora_core is not None:
            core = self.lora_core.float()
            lora_b = lora_b * core if core.dim() == 1 else lora_b @ core
        if self.lora_out_scale is not None:
            lora_b = lora_b * self.lora_out_scale.float()[:, None]
        return (lora_b @ self.lora_A.float()) * self.scale

    def merge_refusal(self) -> Optional[str]:
        """Why :meth:`merge` would be refused (``None`` when it would not)."""
        if self.activation is not None:
            return (f"a {self.method} adapter with activation {self.activation!r} is not linear in x "
                    "and cannot be merged into the weight")
        shared = getattr(self, "weight_shared_with", None)
        if shared:
            return (f"the weight is shared with {', '.join(shared[:5])} (tied weights): merging would "
                    "change those modules too")
        return None

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the base weight (in place, in fp32, rounded once). Refused for a
        weight that :func:`fastpeft.inject` found shared with other modules (tied weights)."""
        if self.merged:
            raise RuntimeError("the adapter is already merged; call unmerge() first")
        reason = self.merge_refusal()
        if reason is not None:
            raise RuntimeError(f"cannot merge: {reason}")
        delta = self.delta_weight()
        if self.lora_magnitude is not None:          # W' = (m / n) ⊙ (W + ΔW), n kept for unmerge
            norm = self.dora_norm()
            factor = dora_row_scale(self.lora_magnitude.detach(), norm)
            if not bool((factor != 0).all()):
                raise RuntimeError("merge() is refused: a DoRA row scale m / n is 0 (m_j = 0 or a "
                                   "zero row of W + s·B·A), which unmerge() could not undo")
            self.weight.copy_((self.weight.float() + delta) * factor[:, None])
            self._merge_norm = norm
            self.merged = True
            return
        self.weight.copy_(self.weight.float() + delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter from the base weight."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged; nothing to unmerge")
        delta = self.delta_weight()
        if self.lora_magnitude is not None:
            if self._merge_norm is None:
                raise RuntimeError("the DoRA norm of the unmerged weight was not kept (the layer was "
                                   "merged elsewhere); it cannot be unmerged")
            factor = dora_row_scale(self.lora_magnitude.detach(), self._merge_norm)
            self.weight.copy_(self.weight.float() / factor[:, None] - delta)
            self._merge_norm = None
            self.merged = False
            return
        self.weight.copy_(self.weight.float() - delta)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.method}, r={self.r}, "
                f"scale={self.scale:g}, dropout={self.dropout_p:g}"
                + (f", activation={self.activation}" if self.activation else "")
                + (", merged" if self.merged else ""))

"""Providers of the low-rank layer benchmarked side by side: what each one builds for a case.

A provider turns a :class:`Case` (one shape, rank, dtype, method) into a :class:`Built`: a
forward callable on an input ``x [M, k]`` and the tensors whose ``.grad`` a training step
fills. A provider that cannot run raises :class:`~fastpeft.benchmark.runner.Skip` with the
reason (a missing package, no GPU, a backend this build lacks); the harness records it as a
skipped row.

Dense providers: ``torch-linear`` (the floor: the base ``F.linear`` alone), ``peft-lora`` (HF
PEFT's LoRA layer around an ``nn.Linear``: the naive baseline), ``fastpeft-torch``,
``fastpeft-triton`` and ``fastpeft-cuda`` (the op under each backend; ``fastpeft-torch`` on a
GPU is the composed cuBLAS path), ``fastpeft-auto`` (GPU only: what the default backend runs, the
fused kernels or the composed path as the dispatch table says). 4-bit providers:
``bnb-4bit`` (bitsandbytes ``Linear4bit`` alone), ``bnb-4bit+peft-lora`` and
``fastpeft-4bit-torch`` / ``fastpeft-4bit-triton`` (``fastpeft.lowrank_linear_4bit``; the
Triton backend with its default rule: W in registers below the dense-buffer crossover, through a
transient dense buffer from it), ``fastpeft-4bit-cuda`` (the CUDA decode kernel of
``fastpeft._C``: M <= 16 without dropout, the decode rows), ``fastpeft-4bit-auto`` (GPU only: what
the default backend runs), ``fastpeft-4bit-triton-registers`` (W in registers at every M)
and ``fastpeft-4bit-triton-buffered`` (W through the buffer at every M > 16): the two sides of the
crossover, measured so that its value comes from a GPU run.
DoRA: ``peft-dora`` / ``bnb-4bit+peft-dora`` (PEFT's ``use_dora=True`` layer, which forms
W + s·B·A every call) and ``fastpeft-dora`` / ``fastpeft-4bit-dora`` (``fastpeft.dora_linear``
and ``dora_linear_4bit`` under the ``auto`` backend: the norm kernel and the fused op on a GPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runner import Skip, env_vars, optional_import

__all__ = ["Case", "Built", "Provider", "PROVIDERS", "provider_names", "flops", "bytes_moved"]


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: ``x [M, k]`` through a ``k → d`` layer with rank ``r``."""
    op: str                 # "dense" | "4bit"
    M: int
    k: int
    d: int
    r: int
    dtype: torch.dtype
    method: str = "lora"
    dropout: float = 0.1
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.op} M={self.M} {self.k}->{self.d} r={self.r} {str(self.dtype)[6:]}"


@dataclass
class Built:
    forward: Callable[[torch.Tensor], torch.Tensor]
    grads: list = field(default_factory=list)     # tensors whose .grad a step fills
    params: list = field(default_factory=list)    # every parameter (excluded from saved bytes)
    scope: Callable = contextlib.nullcontext      # entered around every call, backward included


@dataclass(frozen=True)
class Provider:
    name: str
    op: str                                          # "dense" | "4bit"
    build: Callable[[Case, torch.device], Built]
    floor: bool = False                              # the reference the ratios are taken to
    adapter: bool = True                             # runs the adapter branch (FLOP count)
    per_rank: bool = True                            # its time depends on r


def _rand(gen, *shape, scale=1.0, dtype, device):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _base_weight(case: Case, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.seed)
    return _rand(gen, case.d, case.k, scale=case.k ** -0.5, dtype=case.dtype, device=device)


def _randomise_(tensor: torch.Tensor, gen, scale: float) -> None:
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)


# -- dense ------------------------------------------------------------------------------------

def _build_floor(case: Case, device) -> Built:
    weight = _base_weight(case, device)
    return Built(lambda x: F.linear(x, weight), [], [weight])


def _peft_wrap(base: nn.Module, case: Case, use_dora: bool = False) -> nn.Module:
    peft = optional_import("peft", "hf")
    config = peft.LoraConfig(target_modules=["0"], r=case.r, lora_alpha=2 * case.r,
                             lora_dropout=case.dropout, use_dora=use_dora)
    wrapped = peft.get_peft_model(nn.Sequential(base), config)
    layer = wrapped.base_model.model[0]
    gen = torch.Generator().manual_seed(case.seed + 1)
    for name, p in layer.named_parameters():
        if "lora_B" in name:   # PEFT starts B at zero: benchmark on random data
            _randomise_(p, gen, case.r ** -0.5)
    return layer.train()


def _build_peft(case: Case, device, use_dora: bool = False) -> Built:
    linear = nn.Linear(case.k, case.d, bias=False, device=device, dtype=case.dtype)
    with torch.no_grad():
        linear.weight.copy_(_base_weight(case, device))
    layer = _peft_wrap(linear, case, use_dora).to(device=device, dtype=case.dtype)
    params = list(layer.parameters())
    return Built(layer, [p for p in params if p.requires_grad], params)


def _dora_tensors(case: Case, device, weight_norm: torch.Tensor):
    """(A, B, m, scale) of a DoRA adapter, random, trainable; m near the weight's row norms."""
    gen = torch.Generator().manual_seed(case.seed + 2)
    mk = lambda *s, scale: _rand(gen, *s, scale=scale, dtype=case.dtype, device=device).requires_grad_(True)
    lora_a, lora_b = mk(case.r, case.k, scale=case.k ** -0.5), mk(case.d, case.r, scale=case.r ** -0.5)
    magnitude = (weight_norm.float() * (1.0 + 0.1 * torch.randn(case.d, generator=gen).to(device))).to(case.dtype)
    return lora_a, lora_b, magnitude.requires_grad_(True), 2.0


def _build_fastpeft_dora(case: Case, device) -> Built:
    import fastpeft

    weight = _base_weight(case, device)
    lora_a, lora_b, magnitude, scale = _dora_tensors(case, device, torch.linalg.vector_norm(weight, dim=1))

    def forward(x):
        return fastpeft.dora_linear(x, weight, None, lora_a, lora_b, magnitude, scale=scale, dropout_p=case.dropout)

    return Built(forward, [lora_a, lora_b, magnitude], [weight, lora_a, lora_b, magnitude])


def _adapter_tensors(case: Case, device):
    """(A, B, core, out_scale, activation, scale) of ``case.method``, random, trainable as the
    preset says."""
    from ..config import AdapterConfig

    config = AdapterConfig(method=case.method, r=case.r, alpha=2 * case.r, dropout=case.dropout)
    spec = config.spec
    if not spec.has_adapter:
        raise Skip(f"method {case.method!r} has no adapter branch")
    if spec.magnitude:
        raise Skip("DoRA is benchmarked by the fastpeft-dora and fastpeft-4bit-dora providers")
    gen = torch.Generator().manual_seed(case.seed + 2)
    r, k, d = case.r, case.k, case.d
    mk = lambda *s, scale, grad: _rand(gen, *s, scale=scale, dtype=case.dtype,
                                       device=device).requires_grad_(grad)
    lora_a = mk(r, k, scale=k ** -0.5, grad=spec.train_A)
    lora_b = mk(d, r, scale=r ** -0.5, grad=spec.train_B)
    core = None
    if spec.core == "full":
        core = mk(r, r, scale=r ** -0.5, grad=True)
    elif spec.core == "diag":
        core = mk(r, scale=1.0, grad=True)
    out_scale = mk(d, scale=1.0, grad=True) if spec.out_scale else None
    return lora_a, lora_b, core, out_scale, config.effective_activation, config.scale_for(r)


def _build_fastpeft(backend: str):
    def build(case: Case, device) -> Built:
        import fastpeft

        from .. import _backend
        from ..ops.lowrank import OP_NAME

        if backend != "torch" and device.type != "cuda":
            raise Skip("no GPU")
        try:
            _backend.resolve_backend(OP_NAME, device, backend)
        except RuntimeError as err:
            raise Skip(str(err)) from None
        weight = _base_weight(case, device)
        lora_a, lora_b, core, out_scale, activation, scale = _adapter_tensors(case, device)

        def forward(x):
            return fastpeft.lowrank_linear(x, weight, None, lora_a, lora_b, core=core,
                                           out_scale=out_scale, scale=scale,
                                           dropout_p=case.dropout, activation=activation)

        params = [t for t in (weight, lora_a, lora_b, core, out_scale) if t is not None]
        # the backend is chosen once around the timed calls, as a user's model would run
        return Built(forward, [t for t in params if t.requires_grad], params,
                     scope=lambda: fastpeft.use_backend(backend))
    return build


# -- 4-bit ------------------------------------------------------------------------------------

def _bnb_linear4bit(case: Case, device) -> nn.Module:
    bnb = optional_import("bitsandbytes", "quant")
    layer = bnb.nn.Linear4bit(case.k, case.d, bias=False, compute_dtype=case.dtype,
                              quant_type="nf4", device="cpu")
    layer.weight = bnb.nn.Params4bit(_base_weight(case, "cpu").float(), requires_grad=False,
                                     quant_type="nf4", blocksize=64, compress_statistics=True)
    return layer.to(device)   # quantises on the move


def _build_bnb(case: Case, device) -> Built:
    layer = _bnb_linear4bit(case, device)
    return Built(layer, [], list(layer.parameters()))


def _build_bnb_peft(case: Case, device, use_dora: bool = False) -> Built:
    layer = _peft_wrap(_bnb_linear4bit(case, device), case, use_dora)
    for name, p in layer.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(device=device, dtype=case.dtype)
    params = list(layer.parameters())
    return Built(layer, [p for p in params if p.requires_grad], params)


def _build_fastpeft_4bit(backend: str, buffer: str | None = None):
    """``buffer``: None, the default rule (the transient dense W from ``buffer_min_m()``); "on",
    always at M > 16; "off", never (W dequantised in registers at every M)."""
    def build(case: Case, device) -> Built:
        import fastpeft

        op = getattr(fastpeft, "lowrank_linear_4bit", None)
        quantize = getattr(fastpeft, "quantize_4bit", None)
        if op is None or quantize is None:
            raise Skip("fastpeft.lowrank_linear_4bit is not in this build")
        if backend != "torch" and device.type != "cuda":
            raise Skip("no GPU")
        if backend == "cuda":   # the decode kernel: say why it cannot take this case
            from .. import _backend
            from ..ops.lowrank_4bit import OP_NAME

            problem = dict(M=case.M, dropout_p=case.dropout, dtype=case.dtype, k=case.k, r=case.r, blocksize=64)
            try:
                _backend.resolve_backend(OP_NAME, device, backend, problem)
            except RuntimeError as err:
                raise Skip(str(err)) from None
        scope = contextlib.nullcontext
        if buffer is not None:
            from ..kernels import lowrank_4bit as kernels_4bit

            if case.M <= kernels_4bit.DECODE_MAX_M:
                raise Skip(f"the dense buffer applies at M > {kernels_4bit.DECODE_MAX_M} (decode keeps 4 bits)")
            scope = lambda: env_vars({kernels_4bit.BUFFER_MIN_M_ENV: "1" if buffer == "on" else "0"})
        packed, state = quantize(_base_weight(case, device), quant_type="nf4", blocksize=64,
                                 compress_statistics=True)
        lora_a, lora_b, core, out_scale, activation, scale = _adapter_tensors(case, device)

        def forward(x):
            with fastpeft.use_backend(backend):
                return op(x, packed, state, None, lora_a, lora_b, core=core, out_scale=out_scale,
                          scale=scale, dropout_p=case.dropout, activation=activation)

        params = [t for t in (packed, lora_a, lora_b, core, out_scale) if t is not None]
        return Built(forward, [t for t in params if t.requires_grad], params, scope)
    return build


def _build_fastpeft_4bit_dora(case: Case, device) -> Built:
    import fastpeft

    packed, state = fastpeft.quantize_4bit(_base_weight(case, device), quant_type="nf4", blocksize=64,
                                           compress_statistics=True)
    norm = torch.linalg.vector_norm(fastpeft.dequantize_4bit(packed, state).float(), dim=1)
    lora_a, lora_b, magnitude, scale = _dora_tensors(case, device, norm)

    def forward(x):
        return fastpeft.dora_linear_4bit(x, packed, state, None, lora_a, lora_b, magnitude, scale=scale,
                                         dropout_p=case.dropout)

    return Built(forward, [lora_a, lora_b, magnitude], [packed, lora_a, lora_b, magnitude])


PROVIDERS: list[Provider] = [
    Provider("torch-linear", "dense", _build_floor, floor=True, adapter=False, per_rank=False),
    Provider("peft-lora", "dense", _build_peft),
    Provider("fastpeft-torch", "dense", _build_fastpeft("torch")),
    Provider("fastpeft-triton", "dense", _build_fastpeft("triton")),
    Provider("fastpeft-cuda", "dense", _build_fastpeft("cuda")),
    Provider("fastpeft-auto", "dense", _build_fastpeft("auto")),
    Provider("peft-dora", "dense", lambda case, device: _build_peft(case, device, use_dora=True)),
    Provider("fastpeft-dora", "dense", _build_fastpeft_dora),
    Provider("bnb-4bit", "4bit", _build_bnb, adapter=False, per_rank=False),
    Provider("bnb-4bit+peft-lora", "4bit", _build_bnb_peft),
    Provider("fastpeft-4bit-torch", "4bit", _build_fastpeft_4bit("torch")),
    Provider("fastpeft-4bit-triton", "4bit", _build_fastpeft_4bit("triton")),
    Provider("fastpeft-4bit-cuda", "4bit", _build_fastpeft_4bit("cuda")),
    Provider("fastpeft-4bit-auto", "4bit", _build_fastpeft_4bit("auto")),
    Provider("fastpeft-4bit-triton-registers", "4bit", _build_fastpeft_4bit("triton", buffer="off")),
    Provider("fastpeft-4bit-triton-buffered", "4bit", _build_fastpeft_4bit("triton", buffer="on")),
    Provider("bnb-4bit+peft-dora", "4bit", lambda case, device: _build_bnb_peft(case, device, use_dora=True)),
    Provider("fastpeft-4bit-dora", "4bit", _build_fastpeft_4bit_dora),
]


def provider_names() -> list[str]:
    return [p.name for p in PROVIDERS]


# -- work counts --------------------------------------------------------------------------------

def _adapter_flops(case: Case, mode: str) -> float:
    from ..config import method_spec

    spec = method_spec(case.method)
    M, k, d, r = case.M, case.k, case.d, case.r
    core = 2 * M * r * r if spec.core == "full" else 0
    fwd = 2 * M * r * (k + d) + core
    bwd = 2 * M * d * r + 2 * M * r * k + core                  # G = dY B; dX += H A
    bwd += 2 * M * d * r if spec.train_B else 0                 # dB = dYᵀ U
    bwd += 2 * M * r * k if spec.train_A else 0                 # dA = Hᵀ D(X)
    bwd += 2 * core                                             # U recomputed, dS = Gᵀ T
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def flops(provider: Provider, case: Case, mode: str) -> float:
    """Floating-point operations of one call: the base GEMM (forward Y, backward dX; the base
    weight is frozen) plus the adapter's, by the method's math."""
    base = 2.0 * case.M * case.k * case.d
    total = {"fwd": base, "bwd": base, "fwd+bwd": 2 * base}[mode]
    return total + (_adapter_flops(case, mode) if provider.adapter else 0.0)


def bytes_moved(provider: Provider, case: Case, mode: str) -> float:
    """The least memory traffic of one call (every operand read and every result written
    once); the 4-bit weight counts 0.5 byte per element plus one fp32 absmax per 64."""
    e = torch.finfo(case.dtype).bits // 8
    M, k, d, r = case.M, case.k, case.d, case.r
    weight = k * d * (0.5 + 4 / 64) if provider.op == "4bit" else k * d * e
    lowrank = r * (k + d) * e if provider.adapter else 0
    fwd = weight + lowrank + e * (M * k + M * d) + (e * M * r if provider.adapter else 0)
    bwd = weight + lowrank + e * (M * d + M * k)
    if provider.adapter:
        bwd += e * M * r + lowrank    # T read, dA/dB written
        if mode != "fwd":
            from ..config import method_spec
            bwd += e * M * k if method_spec(case.method).train_A else 0   # X read for dA
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

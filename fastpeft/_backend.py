"""Choosing the implementation of an op: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

Every op has a pure-torch implementation (the reference and the fallback). Kernel backends
register on top of it with :func:`register_impl`. :func:`use_backend` forces one of them for a
block of code; ``"auto"`` picks the fastest one that can run on the tensors' device (for the dense
op on CUDA tensors, from the dispatch table of :mod:`fastpeft._dispatch`).

The choice is made once in the forward pass and remembered for the backward pass, so both
halves of a step always use the same implementation (and the same dropout mask stream).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import _dispatch

__all__ = ["BACKENDS", "use_backend", "get_backend", "register_impl", "register_triton", "resolve_backend",
           "get_impl", "custom_op"]

BACKENDS = ("auto", "torch", "triton", "cuda")

# The requested backend. A plain module attribute (not a ContextVar) so that torch.compile can
# read it and guard on it, and so that autograd's device threads see the same value.
_requested = "auto"


@dataclass(frozen=True)
class _Impl:
    loader: Callable[[], object]  # returns an object with the op's functions as attributes
    available: Callable[[torch.device], str | None]  # None if usable, else the reason it is not
    supports: Callable[[dict], str | None] | None = None  # the same, for one call's problem


_IMPLS: dict[tuple[str, str], _Impl] = {}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fastpeft ops inside the block with the named backend.

    ``"torch"`` is the pure-torch implementation (any device); ``"triton"`` the fused Triton
    kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"cuda"`` the compiled
    extension ``fastpeft._C`` where an op has one; ``"auto"`` (the default) the fastest available
    (for the dense op on CUDA tensors, fused or composed as the dispatch table says).

    >>> import torch, fastpeft
    >>> x, w = torch.randn(4, 8), torch.randn(6, 8)
    >>> a, b = torch.randn(2, 8), torch.randn(6, 2)
    >>> with fastpeft.use_backend("torch"):
    ...     y = fastpeft.lowrank_linear(x, w, None, a, b)
    """
    global _requested
    previous = _requested
    _requested = _check_name(name)
    try:
        yield
    finally:
        _requested = previous


def get_backend() -> str:
    """The backend requested by the innermost :func:`use_backend` block (``"auto"`` outside)."""
    return _requested


def register_impl(op: str, backend: str, loader: Callable[[], object],
                  available: Callable[[torch.device], str | None],
                  supports: Callable[[dict], str | None] | None = None) -> None:
    """Register ``backend`` for ``op``. ``loader`` imports lazily; ``available(device)`` returns
    ``None`` when the backend can run on ``device``, else a sentence saying why not.
    ``supports(problem)``, for a backend that covers only part of the op (e.g. small M), does the
    same for the problem an op passes to :func:`resolve_backend` (a dict of sizes and options)."""
    _IMPLS[(op, _check_name(backend))] = _Impl(loader, available, supports)


def register_triton(op: str, kernel_module: str) -> Callable[[torch.device], str | None]:
    """Register the Triton kernels in ``fastpeft.kernels.<kernel_module>`` as ``op``'s
    ``"triton"`` backend; returns its availability check (None, or why the kernels cannot run)."""
    def load():
        return importlib.import_module(f"fastpeft.kernels.{kernel_module}")

    def available(device: torch.device) -> str | None:
        reason = triton_available(device)
        if reason is None:
            try:
                load()
            except ImportError as err:
                return f"the Triton kernels failed to import ({err})"
        return reason

    register_impl(op, "triton", load, available)
    return available


def _reason(impl: _Impl, device: torch.device, problem: dict | None) -> str | None:
    reason = impl.available(device)
    if reason is None and impl.supports is not None and problem is not None:
        reason = impl.supports(problem)
    return reason


def _auto_order(op: str, device: torch.device, problem: dict | None) -> tuple[str, ...]:
    """The backends ``"auto"`` tries, in order. On CUDA tensors, for an op the dispatch table
    covers (:mod:`fastpeft._dispatch`), the fused Triton kernels only where the table (or, for a
    problem not measured yet, the static prediction) says they beat the composed torch path."""
    if device.type != "cuda":
        return ("torch",)
    if problem is not None and op in _dispatch.TABLE_OPS and _dispatch.choose(op, device, problem) == "torch":
        return ("cuda", "torch")
    return ("cuda", "triton", "torch")


def resolve_backend(op: str, device: torch.device, requested: str | None = None,
                    problem: dict | None = None) -> str:
    """The concrete backend that runs ``op`` on ``device`` (for ``problem``, when the op passes
    one); a clear error if the requested one cannot run there."""
    requested = requested or _requested
    if requested == "auto" and device.type != "cuda":   # off CUDA, auto is the torch path
        return "torch"
    _check_name(requested)
    if requested == "auto":
        for name in _auto_order(op, device, problem):
            impl = _IMPLS.get((op, name))
            if impl is not None and _reason(impl, device, problem) is None:
                return name
        return "torch"
    impl = _IMPLS.get((op, requested))
    if impl is None:
        have = sorted(b for (o, b) in _IMPLS if o == op)
        raise RuntimeError(f"{op} has no {requested!r} implementation; available backends: {have}")
    reason = _reason(impl, device, problem)
    if reason is not None:
        raise RuntimeError(f"backend {requested!r} cannot run {op} on {device.type} tensors: {reason}")
    return requested


def get_impl(op: str, backend: str):
    """The module (or object) holding ``backend``'s functions for ``op``."""
    return _IMPLS[(op, backend)].loader()


# -- the op boundary -------------------------------------------------------------------------

def custom_op(name: str, fn: Callable, fake: Callable) -> Callable:
    """Register ``fn`` as the ``torch.library`` custom op ``name`` with the fake implementation
    ``fake``, and return the callable the autograd Functions use: ``fn`` itself in plain eager
    mode, where the custom-op dispatcher would add tens of microseconds a call (felt when decoding,
    where every layer's call is small); the custom op whenever anything traces (torch.compile,
    export, AOT autograd, opcheck, a dispatch mode, fake or other tensor subclasses), so that a
    graph holds one opaque node."""
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    namespace, op_name = name.split("::")
    packet = getattr(getattr(torch.ops, namespace), op_name)

    def call(first, *args):
        if plain_eager(first):
            return fn(first, *args)
        return packet(first, *args)

    return call


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(first) -> bool:
    """True outside any tracing, with a plain tensor (or a list holding one) as first argument."""
    if torch.compiler.is_compiling():   # first: dynamo must not trace the dispatch-stack query
        return False
    if type(first) in _PLAIN:   # the common case: one tensor
        return not (first.is_meta or torch._C._len_torch_dispatch_stack())
    if isinstance(first, (list, tuple)):    # a list of tensors (the group op's gradients)
        first = next((t for t in first if t is not None), None)
        return type(first) in _PLAIN and plain_eager(first)
    return False


# -- availability checks shared by the kernel backends ---------------------------------------

def triton_available(device: torch.device) -> str | None:
    """``None`` if Triton kernels can run on ``device``, else why not."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not installed (pip install 'fastpeft[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"


def cuda_extension_available(device: torch.device) -> str | None:
    """``None`` if the compiled extension ``fastpeft._C`` is loaded and ``device`` is CUDA."""
    if device.type != "cuda":
        return "the compiled extension runs on CUDA tensors only"
    try:
        importlib.import_module("fastpeft._C")
    except ImportError as err:
        return f"the compiled extension fastpeft._C is not available ({err}); build with FASTPEFT_BUILD_CUDA=1 pip install ."
    return None

"""Compile Triton kernels ahead of time for a named GPU, without a GPU, and inspect the result.

Used by the static tests of every kernel module: shared memory per block, local-memory spills
(``LDL``/``STL`` in the SASS) and tensor-core instructions (``HGMMA`` on sm_90, ``HMMA`` on
sm_80). The version-sensitive parts of Triton's API (``ASTSource``, signatures, attributes) live
here and nowhere else.

>>> from kernels import _aot, lowrank                                    # doctest: +SKIP
>>> mod = _aot.jit_module(lowrank)      # compiled (not interpreted) copy of the kernels
>>> res = _aot.compile_kernel(mod.KERNELS[0].kernel, signature, constexprs, arch=90)
>>> res.shared, res.spills, res.uses_tensor_cores
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["SMEM_LIMIT", "KernelSpec", "AotResult", "jit_module", "jit_function",
           "compile_kernel", "cuobjdump", "dtype_name"]

# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# H100 (sm_90) 227 KB of the SM's 228 KB; A100 (sm_80) 163 KB of the SM's 164 KB.
SMEM_LIMIT = {90: 232448, 80: 166912}

_TRITON_DTYPE = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32",
                 "fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


def dtype_name(dtype) -> str:
    """Triton's name for a torch dtype (or pass a name through): ``"fp16"``, ``"bf16"``, ``"fp32"``."""
    return _TRITON_DTYPE[str(dtype)]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel of a module, described for static checks.

    ``kernel`` is the autotuned kernel (``kernel.configs`` every config, ``kernel.fn`` the
    ``@triton.jit`` function). ``configs_for(arch, problem)`` returns the configs the module's
    prune function keeps on that architecture for a problem (a dict of sizes, ``"dtype"``
    included). ``signature(problem, config)`` returns ``(types, constexprs)`` for
    :func:`compile_kernel`. ``tensor_cores``: whether the kernel's dots must run on tensor cores
    for 16-bit inputs.
    """
    name: str
    kernel: Any
    configs_for: Callable[[int, dict], list]
    signature: Callable[[dict, Any], tuple[dict, dict]]
    tensor_cores: bool = True


@dataclass
class AotResult:
    name: str
    arch: int
    shared: int                     # bytes of shared memory per block
    sass: str
    ptx: str
    resources: dict = field(default_factory=dict)   # cuobjdump -res-usage: REG, STACK, LOCAL, ...

    @property
    def spills(self) -> list[str]:
        """SASS lines that touch local memory (register spills)."""
        return [ln.strip() for ln in self.sass.splitlines() if re.search(r"\b(LDL|STL)(\.\w+)*\b", ln)]

    @property
    def tensor_core_ops(self) -> list[str]:
        ops = re.findall(r"\b(HGMMA|HMMA|WGMMA|UTCHMMA|UTCQMMA)[\w.]*", self.sass)
        return sorted(set(ops))

    @property
    def uses_tensor_cores(self) -> bool:
        """HGMMA (wgmma) or HMMA (mma.sync): either is a tensor-core path."""
        return bool(self.tensor_core_ops)


# --------------------------------------------------------------------------------------------
# Getting compiled (not interpreted) kernels under TRITON_INTERPRET=1
# --------------------------------------------------------------------------------------------

_import_lock = threading.Lock()
_copies: dict[str, Any] = {}


def jit_module(module):
    """``module`` itself when its kernels are compiled ``@triton.jit`` functions, else (under
    ``TRITON_INTERPRET=1``, where ``triton.jit`` returns interpreted functions) a private copy
    of the module imported with the interpreter switched off. Cached per module."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return module
    name = module.__name__
    with _import_lock:
        if name in _copies:
            return _copies[name]
        spec = importlib.util.spec_from_file_location(
            name + "__aot", module.__file__,
            submodule_search_locations=None)
        copy = importlib.util.module_from_spec(spec)
        copy.__package__ = module.__package__
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            sys.modules[spec.name] = copy
            spec.loader.exec_module(copy)
        finally:
            os.environ["TRITON_INTERPRET"] = previous
        _copies[name] = copy
        return copy


def jit_function(kernel):
    """The ``JITFunction`` under an autotuner / heuristics wrapper."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)
        if inner is None:
            raise TypeError(f"{kernel!r} is not a compiled @triton.jit kernel (under TRITON_INTERPRET=1 "
                            "take the kernels from _aot.jit_module(module))")
        fn = inner
    return fn


# --------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------

def _ast_source(fn, signature: dict, constexprs: dict, attrs: dict | None):
    """ASTSource across Triton versions: constexprs keyed by name (3.3+) or by index tuple."""
    from triton.compiler import ASTSource

    try:
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    except (AssertionError, TypeError, ValueError):
        keyed = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        return ASTSource(fn=fn, signature=signature, constexprs=keyed, attrs=attrs)


def _pointer_attrs(fn, signature: dict) -> dict:
    """16-byte alignment of every pointer argument (as a real launch specialises them)."""
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
            for k, v in signature.items() if isinstance(v, str) and v.startswith("*")}


def _bin_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """Run Triton's bundled ``cuobjdump`` on a cubin (default: ``--dump-sass``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([os.path.join(_bin_dir(), "cuobjdump"), *(flags or ("--dump-sass",)), path],
                             check=True, capture_output=True, text=True)
        return out.stdout
    finally:
        os.unlink(path)


def _resources(cubin: bytes) -> dict:
    text = cuobjdump(cubin, "--dump-resource-usage")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL|TEXTURE|SURFACE|SAMPLER):(\d+)", text)}


def compile_kernel(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                   num_stages: int = 3) -> AotResult:
    """Compile ``kernel`` (a ``@triton.jit`` function, or an autotuned one) for
    ``GPUTarget("cuda", arch, 32)``.

    ``signature`` maps every non-constexpr argument to its Triton type (``"*bf16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` maps the others (meta-parameters, and arguments specialised to a
    value such as a unit stride) to their values. Returns the shared memory per block, the SASS,
    the PTX and cuobjdump's resource usage.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    fn = jit_function(kernel)
    full = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    missing = [n for n in fn.arg_names if n not in constexprs and n not in signature]
    if missing:
        raise KeyError(f"{fn.__name__}: no type for {missing}")
    try:
        src = _ast_source(fn, full, constexprs, _pointer_attrs(fn, full))
    except Exception:  # attribute format of another Triton version: compile without the hints
        src = _ast_source(fn, full, constexprs, None)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = ck.asm["cubin"]
    return AotResult(name=fn.__name__, arch=arch, shared=int(ck.metadata.shared),
                     sass=cuobjdump(cubin), ptx=ck.asm.get("ptx", ""), resources=_resources(cubin))

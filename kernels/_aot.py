"""Compile Triton kernels ahead of time for a named GPU, without a GPU, and inspect the result.

Used by the static tests of every kernel module: shared memory per block, local-memory spills
(``LDL``/``STL`` in the SASS) and tensor-core instructions (``HGMMA`` on sm_90, ``HMMA`` on
sm_80). The version-sensitive parts of Triton's API (``ASTSource``, signatures, attributes) live
here and nowhere else.

>>> from fastpeft.kernels import _aot, lowrank                           # doctest: +SKIP
>>> spec = lowrank.KERNELS[0]
>>> problem = dict(M=4096, N=4096, K=4096, R=16, dtype="bf16")
>>> jobs = [spec.job(90, problem, c) for c in spec.configs_for(90, problem)]
>>> [(r.shared, r.spills, r.uses_tensor_cores) for r in _aot.compile_kernels(jobs)]
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

__all__ = ["SMEM_LIMIT", "KernelSpec", "AotResult", "AotJob", "jit_function", "compile_kernel",
           "compile_kernels", "cuobjdump", "dtype_name"]

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

    ``attr`` names the kernel in its module: the autotuned kernel (``.configs`` every config,
    ``.fn`` the ``@triton.jit`` function) or a bare ``@triton.jit`` one. ``configs_for(arch, problem)`` returns the configs the module's
    prune function keeps on that architecture for a problem (a dict of sizes, ``"dtype"``
    included). ``signature(problem, config)`` returns ``(types, constexprs)`` for
    :func:`compile_kernel`. ``tensor_cores``: whether the kernel's dots must run on tensor cores
    for 16-bit inputs. ``variants``: problem entries (e.g. ``{"dropout": False}``) under which the
    prune keeps other configs, each to be checked.
    """
    name: str
    module: str
    attr: str
    configs_for: Callable[[int, dict], list]
    signature: Callable[[dict, Any], tuple[dict, dict]]
    tensor_cores: bool = True
    variants: tuple = ({},)
    options: tuple = ()          # extra compile options, as at launch: (("enable_fp_fusion", False),)

    @property
    def kernel(self):
        return getattr(importlib.import_module(self.module), self.attr)

    @property
    def configs(self) -> list:
        """Every autotune config declared on the kernel (empty for a kernel without autotuning)."""
        return list(getattr(self.kernel, "configs", []))

    def job(self, arch: int, problem: dict, config) -> "AotJob":
        types, constexprs = self.signature(problem, config)
        return AotJob(self.module, self.attr, types, constexprs, arch, config.num_warps, config.num_stages,
                      dict(self.options))


@dataclass(frozen=True)
class AotJob:
    """One compilation: kernel ``module.attr`` with a signature, constexprs and launch options."""
    module: str
    attr: str
    signature: dict
    constexprs: dict
    arch: int
    num_warps: int = 4
    num_stages: int = 3
    options: dict = field(default_factory=dict)


@dataclass
class AotResult:
    name: str
    arch: int
    shared: int                     # bytes of shared memory per block
    sass: str
    ptx: str
    resources: dict = field(default_factory=dict)   # cuobjdump -res-usage: REG, STACK, LOCAL, ...
    error: str = ""                                  # the compiler's message when it failed

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
# Under TRITON_INTERPRET=1 (set before triton was imported) every @triton.jit function of the
# process, triton.language's own included, is an interpreted function that the compiler cannot
# use: compilation then runs in a subprocess without the variable.
# --------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def jit_function(kernel):
    """The ``JITFunction`` under an autotuner / heuristics wrapper."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)
        if inner is None:
            raise TypeError(f"{kernel!r} is not a compiled @triton.jit kernel (under TRITON_INTERPRET=1 "
                            "use compile_kernels, which compiles in a subprocess)")
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
                   num_stages: int = 3, options: dict | None = None) -> AotResult:
    """Compile ``kernel`` (a ``@triton.jit`` function, or an autotuned one) for
    ``GPUTarget("cuda", arch, 32)``.

    ``signature`` maps every non-constexpr argument to its Triton type (``"*bf16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` maps the others (meta-parameters, and arguments specialised to a
    value such as a unit stride) to their values; ``options``, more compile options (as a launch
    passes them). Returns the shared memory per block, the SASS, the PTX and cuobjdump's resource
    usage.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    fn = jit_function(kernel)
    full = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    missing = [n for n in fn.arg_names if n not in constexprs and n not in signature]
    if missing:
        raise KeyError(f"{fn.__name__}: no type for {missing}")
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": num_warps, "num_stages": num_stages, **(options or {})}
    try:
        ck = triton.compile(_ast_source(fn, full, constexprs, _pointer_attrs(fn, full)),
                            target=target, options=options)
    except (TypeError, KeyError, AttributeError):
        # the attribute format of another Triton version: compile without alignment hints
        ck = triton.compile(_ast_source(fn, full, constexprs, None), target=target, options=options)
    cubin = ck.asm["cubin"]
    return AotResult(name=fn.__name__, arch=arch, shared=int(ck.metadata.shared),
                     sass=cuobjdump(cubin), ptx=ck.asm.get("ptx", ""), resources=_resources(cubin))


def _run_job(job: AotJob) -> AotResult:
    try:
        kernel = getattr(importlib.import_module(job.module), job.attr)
        return compile_kernel(kernel, job.signature, job.constexprs, job.arch, job.num_warps, job.num_stages,
                              job.options)
    except Exception as err:  # reported per job: one bad config must not hide the others
        return AotResult(name=job.attr, arch=job.arch, shared=-1, sass="", ptx="",
                         error=f"{type(err).__name__}: {err}")


def _workers(n_jobs: int) -> int:
    """Worker processes for ``n_jobs`` compilations: ``FASTPEFT_AOT_WORKERS``, else the usable CPUs."""
    env = os.environ.get("FASTPEFT_AOT_WORKERS")
    cpus = int(env) if env else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(n_jobs, cpus or 1))


def compile_kernels(jobs: list[AotJob]) -> list[AotResult]:
    """Compile every job, in results' order the jobs'; a job that fails to compile comes back
    with ``error`` set. One job compiles in this process (unless it interprets); more are dealt
    round-robin to worker subprocesses, one per CPU, that run without TRITON_INTERPRET."""
    jobs = list(jobs)
    if not jobs:
        return []
    n = _workers(len(jobs))
    if n == 1 and not _interpreting():
        return [_run_job(job) for job in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shares = [jobs[i::n] for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in shares]
    with ThreadPoolExecutor(n) as pool:   # one thread a worker feeds its stdin and reads its stdout
        outputs = list(pool.map(lambda ps: ps[0].communicate(json.dumps([asdict(j) for j in ps[1]])),
                                zip(procs, shares)))
    results: list = [None] * len(jobs)
    for w, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise RuntimeError(f"ahead-of-time compilation subprocess failed:\n{stderr[-4000:]}")
        results[w::n] = [AotResult(**r) for r in json.loads(stdout)]
    return results


if __name__ == "__main__":   # worker: JSON list of jobs on stdin, JSON list of results on stdout
    _jobs = [AotJob(**j) for j in json.loads(sys.stdin.read())]
    json.dump([asdict(_run_job(j)) for j in _jobs], sys.stdout)

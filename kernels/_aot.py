"""Compile Triton kernels ahead of time for a named GPU, without a GPU, exactly as a launch would.

Two halves, and the only code of the package that touches Triton's version-sensitive internals:

* :func:`capture` turns the launches a host launcher makes into :class:`AotJob` records instead
  of running them. The specialisation of each one (argument types, constexprs, and the
  divisibility attributes of pointers *and* integers, unit strides turned into constants) is
  computed by Triton's own ``JITFunction.run`` on the real arguments, for the target
  architecture: a stand-in driver names the target, and ``knobs.runtime.jit_cache_hook`` (called
  by ``run`` just before it would compile) records what it would compile and stops it. An
  autotuned launch is captured once for every config that the autotuner's prune function keeps.
* :func:`compile_kernels` compiles each job with ``triton.compile`` for
  ``GPUTarget("cuda", arch, 32)`` and disassembles the cubin with Triton's bundled
  ``cuobjdump``: registers, shared memory, local-memory spills, the SASS.

Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` function of the process is an interpreted one
that the compiler cannot use: capture and compilation then run in subprocesses without the
variable (see :mod:`fastpeft.kernels.inspect`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

__all__ = ["SMEM_LIMIT", "SM_COUNT", "AotJob", "AotResult", "capture", "jit_function", "compile_kernel",
           "compile_kernels", "cuobjdump", "dtype_name", "interpreting"]

# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# H100 (sm_90) 227 KB of the SM's 228 KB; A100 (sm_80) 163 KB of the SM's 164 KB.
SMEM_LIMIT = {90: 232448, 80: 166912}
# Streaming multiprocessors of the reference device of each architecture (H100 SXM, A100 SXM):
# the launchers size split-k / split-M grids by it.
SM_COUNT = {90: 132, 80: 108}

_TRITON_DTYPE = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32",
                 "fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


def dtype_name(dtype) -> str:
    """Triton's name for a torch dtype (or pass a name through): ``"fp16"``, ``"bf16"``, ``"fp32"``."""
    return _TRITON_DTYPE[str(dtype)]


def interpreting() -> bool:
    """Whether this process runs Triton kernels under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class AotJob:
    """One compilation, as a launch specialised it.

    ``signature``: every argument's Triton type (``"*bf16"``, ``"i32"``, ``"constexpr"``);
    ``constexprs``: the values of the ``"constexpr"`` ones (meta-parameters, and arguments Triton
    specialised to a value, e.g. a unit stride); ``attrs``: the attributes the launch derived per
    argument (``[["tt.divisibility", 16]]`` for a pointer or an integer divisible by 16);
    ``options``: the compile options that differ from the backend's defaults (``num_warps``,
    ``num_stages``, ``enable_fp_fusion``...). ``config``: the autotune config's meta-parameters
    (``None`` for a launch without autotuning); ``launch``: the index of the launch in the captured
    sequence (the configs of one autotuned launch share it); ``args``: the launch's integer
    arguments and, for tensors, ``[storage bytes, storage address]`` (for traffic estimates).
    """
    module: str
    attr: str
    name: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: dict | None = None
    launch: int = 0
    args: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """What determines the binary: equal keys compile to the same cubin."""
        return json.dumps([self.module, self.attr, self.arch, self.signature, self.constexprs, self.attrs,
                           self.options], sort_keys=True, default=str)


@dataclass
class AotResult:
    name: str
    arch: int
    shared: int                     # bytes of shared memory per block
    sass: str
    ptx: str
    cubin: str = ""                 # hex of the cubin
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


def jit_function(kernel):
    """The ``JITFunction`` under an autotuner / heuristics wrapper."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)
        if inner is None:
            raise TypeError(f"{kernel!r} is not a compiled @triton.jit kernel (under TRITON_INTERPRET=1 "
                            "capture and compile in a subprocess)")
        fn = inner
    return fn


# --------------------------------------------------------------------------------------------
# Capturing launches
# --------------------------------------------------------------------------------------------

class _TargetDriver:
    """Triton's active driver while capturing: it names a GPU this machine does not have."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"fastpeft-aot-sm{arch}"      # a device key no real launch uses

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0


class _Capture:
    """State of one :func:`capture` block (Triton calls the hook from the launching thread)."""

    def __init__(self, arch: int):
        self.arch = arch
        self.jobs: list[AotJob] = []
        self.launches = 0
        self.config: dict | None = None
        self.args: dict = {}
        self.in_tuner = False

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        data = json.loads(compile["specialization_data"])
        jit = fn.jit_function
        names = jit.arg_names
        signature = dict(data["signature"])
        constexprs = {names[path[0]]: value for path, value in zip(data["constant_keys"], data["constant_vals"])}
        attrs = {names[path[0]]: value for path, value in zip(data["attrs_keys"], data["attrs_vals"])}
        constexprs = {k: v["constexpr"] if isinstance(v, dict) and "constexpr" in v else v
                      for k, v in constexprs.items()}
        attrs = {k: v for k, v in attrs.items() if v}
        options = {k: v for k, v in data["options"].items() if _default_options(self.arch).get(k) != v}
        self.jobs.append(AotJob(module=jit.fn.__module__, attr=_module_attr(jit), name=jit.__name__,
                                arch=self.arch, signature=signature, constexprs=constexprs, attrs=attrs,
                                options=options, config=self.config, launch=self.launches - 1,
                                args=dict(self.args)))
        return True                          # do not compile, do not launch


_DEFAULTS: dict[int, dict] = {}


def _default_options(arch: int) -> dict:
    if arch not in _DEFAULTS:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        _DEFAULTS[arch] = dict(make_backend(GPUTarget("cuda", arch, 32)).parse_options({}).__dict__)
        _DEFAULTS[arch] = json.loads(json.dumps(_DEFAULTS[arch], default=str))
    return _DEFAULTS[arch]


def _module_attr(jit) -> str:
    """The module attribute that holds ``jit`` (the autotuner around it, or itself)."""
    module = sys.modules[jit.fn.__module__]
    for attr, value in vars(module).items():
        if value is jit or getattr(value, "fn", None) is jit or getattr(getattr(value, "fn", None), "fn", None) is jit:
            return attr
    raise LookupError(f"{jit.__name__} is not an attribute of {module.__name__}")


def _describe_args(jit, args: tuple, kwargs: dict) -> dict:
    """The launch's ints, and [storage bytes, storage address] of each tensor."""
    out = {}
    for name, value in list(zip(jit.arg_names, args)) + list(kwargs.items()):
        if hasattr(value, "untyped_storage"):
            storage = value.untyped_storage()
            out[name] = [int(storage.nbytes()), int(storage.data_ptr())]
        elif isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
    return out


@contextlib.contextmanager
def capture(arch: int) -> Iterator[list[AotJob]]:
    """Inside the block, Triton launches compile and run nothing: each is recorded as the
    :class:`AotJob` that a launch on a GPU of ``arch`` (80 or 90) would compile, specialised by
    Triton's own ``JITFunction.run`` from the real arguments (tensors on any device). An autotuned
    launch yields one job per config its prune function keeps. Yields the list of jobs, filled
    as launches happen.
    """
    if interpreting():
        raise RuntimeError("capture needs compiled @triton.jit kernels: run it in a process without "
                           "TRITON_INTERPRET (fastpeft.kernels.inspect does so by itself)")
    if arch not in SMEM_LIMIT:
        raise ValueError(f"arch must be one of {sorted(SMEM_LIMIT)}, got {arch!r}")
    from triton import knobs
    from triton.runtime import autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    state = _Capture(arch)
    stand_in = _TargetDriver(arch)
    jit_run, tuner_run = JITFunction.run, autotuner.Autotuner.run
    touched: list = []

    def run(self, *args, grid, warmup, **kwargs):
        touched.append(self)
        if not state.in_tuner:
            state.launches += 1
        state.args = _describe_args(self, args, kwargs)
        return jit_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def tuned_run(self, *args, **kwargs):
        # what Autotuner.run does up to benchmarking, then one (captured) compile per kept config
        self.nargs = dict(zip(self.arg_names, args))
        state.launches += 1
        state.in_tuner = True
        try:
            configs = self.prune_configs(kwargs)
            if not configs:      # a real launch could not run either
                raise RuntimeError(f"{self.base_fn.__name__}: the prune function kept no config for this launch")
            for config in configs:
                clash = kwargs.keys() & config.kwargs.keys()
                if clash:
                    raise ValueError(f"conflicting meta-parameters: {', '.join(clash)}")
                state.config = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
                self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
        finally:
            self.nargs = None
            state.in_tuner = False
            state.config = None

    previous_hook = knobs.runtime.jit_cache_hook
    previous_driver = driver._active
    JITFunction.run, autotuner.Autotuner.run = run, tuned_run
    knobs.runtime.jit_cache_hook = state.hook
    driver.set_active(stand_in)
    try:
        yield state.jobs
    finally:
        JITFunction.run, autotuner.Autotuner.run = jit_run, tuner_run
        knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver
        for fn in touched:   # drop the stand-in device's binders
            fn.device_caches.pop(stand_in.device, None)


# --------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------

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


def compile_kernel(job: AotJob) -> AotResult:
    """Compile one job for ``GPUTarget("cuda", job.arch, 32)`` with exactly its specialisation.

    Any failure raises (there is no fallback to a build without the launch's attributes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(getattr(importlib.import_module(job.module), job.attr))
    index = {name: (i,) for i, name in enumerate(fn.arg_names)}
    missing = [n for n in fn.arg_names if n not in job.signature]
    if missing:
        raise KeyError(f"{fn.__name__}: no type for {missing}")
    src = ASTSource(fn=fn, signature=dict(job.signature),
                    constexprs={index[k]: v for k, v in job.constexprs.items()},
                    attrs={index[k]: v for k, v in job.attrs.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
    cubin = ck.asm["cubin"]
    return AotResult(name=fn.__name__, arch=job.arch, shared=int(ck.metadata.shared), sass=cuobjdump(cubin),
                     ptx=ck.asm.get("ptx", ""), cubin=cubin.hex(), resources=_resources(cubin))


def _run_job(job: AotJob) -> AotResult:
    try:
        return compile_kernel(job)
    except Exception as err:  # reported per job: one bad config must not hide the others
        return AotResult(name=job.name, arch=job.arch, shared=-1, sass="", ptx="",
                         error=f"{type(err).__name__}: {err}")


def workers(n_jobs: int) -> int:
    """Worker processes for ``n_jobs`` compilations: ``FASTPEFT_AOT_WORKERS``, else the usable CPUs."""
    env = os.environ.get("FASTPEFT_AOT_WORKERS")
    cpus = int(env) if env else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(n_jobs, cpus or 1))


def clean_env() -> dict:
    """This process's environment without ``TRITON_INTERPRET`` (for compiling subprocesses)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def compile_kernels(jobs: list[AotJob]) -> list[AotResult]:
    """Compile every job (jobs with equal :attr:`AotJob.key` once), results in the jobs' order;
    a job that fails to compile comes back with ``error`` set. One job compiles in this process
    (unless it interprets); more are dealt round-robin to worker subprocesses, one per CPU, that
    run without TRITON_INTERPRET."""
    jobs = list(jobs)
    if not jobs:
        return []
    unique = list({job.key: job for job in jobs}.values())
    n = workers(len(unique))
    if n == 1 and not interpreting():
        done = [_run_job(job) for job in unique]
    else:
        shares = [unique[i::n] for i in range(n)]
        procs = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=clean_env()) for _ in shares]
        with ThreadPoolExecutor(n) as pool:   # one thread a worker feeds its stdin and reads its stdout
            outputs = list(pool.map(lambda ps: ps[0].communicate(json.dumps([asdict(j) for j in ps[1]])),
                                    zip(procs, shares)))
        done = [None] * len(unique)
        for w, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
            if proc.returncode != 0:
                raise RuntimeError(f"ahead-of-time compilation subprocess failed:\n{stderr[-4000:]}")
            done[w::n] = [AotResult(**r) for r in json.loads(stdout)]
    by_key = {job.key: result for job, result in zip(unique, done)}
    return [by_key[job.key] for job in jobs]


if __name__ == "__main__":   # worker: JSON list of jobs on stdin, JSON list of results on stdout
    _jobs = [AotJob(**j) for j in json.loads(sys.stdin.read())]
    json.dump([asdict(_run_job(j)) for j in _jobs], sys.stdout)

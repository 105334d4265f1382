"""``fastpeft inspect``: the binaries one training step (or one decode call) would run on a GPU,
compiled without one.

For a problem (op, architecture, k×d, M, r, dtype, dropout, method) the op itself runs on CPU
stand-in tensors of the real shapes inside :func:`fastpeft.kernels._aot.capture`: every Triton
launch it makes is specialised by Triton's own JIT code from the real arguments (pointers and
integers divisible by 16, unit strides as constants) and recorded, once per config the
autotuner's prune function keeps for the target architecture, instead of running. Torch ops that
would each launch a device kernel (fills, copies, reductions) are counted beside them. Each
recording is compiled for ``GPUTarget("cuda", arch)`` and its SASS read:

* registers, shared memory, spills (LDL/STL instructions, local bytes);
* tensor-core instructions (HGMMA = wgmma on sm_90, HMMA = mma.sync), TMA (UTMALDG/UTMASTG) and
  cp.async (LDGSTS) instructions;
* the main loop (the backward branch whose body holds the most tensor-core instructions): its
  instructions per k-step, split into MMA / memory / other; for kernels that read a 4-bit weight,
  the non-MMA instructions per weight (each thread runs the body once per k-step over a
  BLOCK_N × BLOCK_K tile of weights);
* 4-bit problems run with W dequantised in registers at every M (the in-register kernels, whose
  instructions per weight set the dense-buffer crossover) unless ``FASTPEFT_4BIT_BUFFER_MIN_M``
  is set, e.g. to 1 to capture the buffered path the op takes by default from M = 640;
* HBM traffic from the shapes: every distinct tensor storage an argument points at, read or
  written once (tiles read again by other programs are taken to hit L2), and the roofline floor
  ``max(bytes / bandwidth, flops / tensor-core peak)`` on the reference devices of the arch.

>>> from fastpeft.kernels.inspect import inspect_kernels                # doctest: +SKIP
>>> report = inspect_kernels(op="dense", arch=90, k=4096, d=4096, M=8192, r=16, dropout=0.1)
>>> print(report.table())
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

from . import _aot

__all__ = ["Problem", "Report", "inspect_kernels", "capture_problem", "capture_problems", "analyse_sass",
           "main_loop", "run_step", "DEVICES", "add_arguments", "validate", "run"]

OPS = ("dense", "4bit", "group")
MODES = ("auto", "train", "decode")
DECODE_MAX_M = 16
# (HBM bytes/s, dense 16-bit tensor-core flop/s, TF32 flop/s): the reference devices of an arch
DEVICES = {90: {"H100": (3.35e12, 989e12, 494e12), "H200": (4.8e12, 989e12, 494e12)},
           80: {"A100": (2.039e12, 312e12, 156e12)}}
_MMA = re.compile(r"^(HGMMA|HMMA|IMMA|DMMA|WGMMA|UTCHMMA|UTCQMMA)\b")
_MEMORY = re.compile(r"^(LDG|STG|LDS|STS|LDSM|STSM|LDGSTS|UTMALDG|UTMASTG|UTMAPF|UBLKCP|LD|ST|ATOM|ATOMS|ATOMG|RED"
                     r"|LDL|STL|LDC|ULDC)\b")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[\w.]+)?)(.*?);")
# torch ops that launch nothing on a device (allocation without a fill, views, metadata)
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "is_same_size",
              "_to_copy_noop", "set_"}


@dataclass(frozen=True)
class Problem:
    """One problem: ``op`` on a [d, k] weight, M rows, rank r, in ``dtype`` with ``dropout``.

    ``mode``: ``"train"`` (forward + backward, x and the method's trainable tensors requiring
    grad), ``"decode"`` (forward without grad), ``"auto"``: decode at M ≤ 16, else train.
    ``group``: the number of projections of one input for ``op="group"`` (q/k/v: 3)."""
    op: str = "dense"
    arch: int = 90
    k: int = 4096
    d: int = 4096
    M: int = 8192
    r: int = 16
    dtype: str = "bf16"
    dropout: float = 0.1
    method: str = "lora"
    mode: str = "auto"
    quant_type: str = "nf4"
    blocksize: int = 64
    group: int = 3

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.arch not in _aot.SMEM_LIMIT:
            raise ValueError(f"arch must be one of {sorted(_aot.SMEM_LIMIT)}, got {self.arch!r}")
        for name in ("k", "d", "M", "r", "group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        from fastpeft.config import method_spec
        if not method_spec(self.method).has_adapter:
            raise ValueError(f"method {self.method!r} has no adapter op to inspect")
        if method_spec(self.method).magnitude and self.op == "group":
            raise ValueError(f"method {self.method!r} (a row magnitude) runs on op dense or 4bit, not group")

    @property
    def training(self) -> bool:
        return self.mode == "train" or (self.mode == "auto" and self.M > DECODE_MAX_M)

    @property
    def torch_dtype(self):
        import torch
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    def describe(self) -> str:
        what = "training step" if self.training else "decode call"
        return (f"{self.op} {self.method} {what}, sm_{self.arch}, k={self.k} -> d={self.d}, M={self.M}, r={self.r}, "
                f"{self.dtype}, dropout {self.dropout:g}")


# --------------------------------------------------------------------------------------------
# Running the op on stand-in tensors
# --------------------------------------------------------------------------------------------

class _TorchKernels:
    """Counts the torch ops that would each launch a device kernel (a dispatch mode). The zero
    fill of a workspace allocated at its first use (the kernels' reduction counters, which every
    launch leaves at 0) runs once per device, not per step, and is not counted."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from ._common import _Allocating

        seen = self.ops = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in _NO_KERNEL and not func.is_view and not _Allocating.active:
                    seen.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def _adapter_tensors(problem: Problem, k: int, d: int, grad: bool, device="cpu"):
    import torch
    from fastpeft.config import method_spec

    spec = method_spec(problem.method)
    dt, r = problem.torch_dtype, problem.r
    a = torch.empty(r, k, dtype=dt, device=device).requires_grad_(grad and spec.train_A)
    b = torch.empty(d, r, dtype=dt, device=device).requires_grad_(grad and spec.train_B)
    core = None if spec.core is None else torch.empty(*((r,) if spec.core == "diag" else (r, r)), dtype=dt,
                                                      device=device)
    if core is not None:
        core.requires_grad_(grad)
    out_scale = torch.empty(d, dtype=dt, device=device).requires_grad_(grad) if spec.out_scale else None
    return a, b, core, out_scale, spec.activation


def _quant_state(problem: Problem, device="cpu"):
    import torch
    from fastpeft.quant import QuantState, dynamic_map, four_bit_code

    n = problem.d * problem.k
    blocks = -(-n // problem.blocksize)
    state2 = QuantState(absmax=torch.empty(-(-blocks // 256), dtype=torch.float32, device=device), blocksize=256,
                        code=dynamic_map(device), dtype=torch.float32)
    state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, device=device),
                       shape=torch.Size((problem.d, problem.k)), code=four_bit_code(problem.quant_type, device),
                       blocksize=problem.blocksize, quant_type=problem.quant_type, dtype=problem.torch_dtype,
                       offset=torch.tensor(0.0, device=device), state2=state2)
    return torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device), state


@contextlib.contextmanager
def _registers_unless_set() -> Iterator[None]:
    """The 4-bit op with W dequantised in registers at every M (the kernels whose cost decides the
    dense-buffer crossover, bench/NOTES.md), unless FASTPEFT_4BIT_BUFFER_MIN_M is set: then as
    it says (e.g. 1 to capture the buffered path)."""
    from .lowrank_4bit import BUFFER_MIN_M_ENV

    if os.environ.get(BUFFER_MIN_M_ENV, "").strip():
        yield
        return
    os.environ[BUFFER_MIN_M_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(BUFFER_MIN_M_ENV, None)


def _step(problem: Problem, device="cpu", weight4=None) -> None:
    """One forward (+ backward when training) of the op at the problem's shapes, on stand-in
    tensors (uninitialised: only shapes, dtypes and alignment matter) on ``device``; ``weight4``:
    the packed weight and quant state of ``op="4bit"`` when the caller built them."""
    import torch
    import fastpeft
    from fastpeft.config import method_spec

    grad = problem.training
    dt, k, d = problem.torch_dtype, problem.k, problem.d
    p, scale = float(problem.dropout), 2.0
    x = torch.empty(problem.M, k, dtype=dt, device=device).requires_grad_(grad)
    with torch.set_grad_enabled(grad), fastpeft.use_backend("triton"), _registers_unless_set():
        if problem.op == "group":
            parts = [_adapter_tensors(problem, k, d, grad, device) for _ in range(problem.group)]
            weights = [torch.empty(d, k, dtype=dt, device=device) for _ in parts]
            ys = fastpeft.lowrank_linear_group(
                x, weights, None, [q[0] for q in parts], [q[1] for q in parts], cores=[q[2] for q in parts],
                out_scales=[q[3] for q in parts], scales=scale, dropout_p=p, activation=parts[0][4], seed=1234)
        else:
            a, b, core, out_scale, act = _adapter_tensors(problem, k, d, grad, device)
            kw = dict(core=core, out_scale=out_scale, scale=scale, dropout_p=p, activation=act, seed=1234)
            if method_spec(problem.method).magnitude:   # DoRA: the norm kernel, then the row-scale epilogue
                kw = dict(scale=scale, dropout_p=p, seed=1234,
                          magnitude=torch.empty(d, dtype=dt, device=device).requires_grad_(grad))
            if problem.op == "dense":
                fn = fastpeft.dora_linear if "magnitude" in kw else fastpeft.lowrank_linear
                ys = [fn(x, torch.empty(d, k, dtype=dt, device=device), None, a, b, **kw)]
            else:
                packed, state = weight4 if weight4 is not None else _quant_state(problem, device)
                fn = fastpeft.dora_linear_4bit if "magnitude" in kw else fastpeft.lowrank_linear_4bit
                ys = [fn(x, packed, state, None, a, b, **kw)]
        if grad:
            torch.autograd.backward(list(ys), [torch.empty_like(y) for y in ys])


def run_step(problem: Problem, device) -> None:
    """One real step of ``problem`` on ``device`` (a GPU): what :func:`capture_problem` records
    without running (bench/inspect_vs_gpu.py compares the two)."""
    _step(problem, device)


@contextlib.contextmanager
def _stand_in_device(arch: int) -> Iterator[None]:
    """The launchers see a GPU of ``arch`` (its shared memory and SM count), the Triton backend
    accepts CPU tensors, and the ops run their Python implementations under the dispatch mode."""
    from fastpeft import _backend
    from . import _common

    saved = _common._limits_of, _backend.triton_available, _backend.plain_eager
    _common._limits_of = lambda tensor: (arch, _aot.SMEM_LIMIT[arch], _aot.SM_COUNT[arch])
    _backend.triton_available = lambda device: None
    _backend.plain_eager = lambda first: True
    try:
        yield
    finally:
        _common._limits_of, _backend.triton_available, _backend.plain_eager = saved


def capture_problem(problem: Problem) -> tuple[list[_aot.AotJob], list[str]]:
    """The Triton compilations (one per launch × kept config) and the torch kernel launches of
    one step of ``problem``. Runs in this process, which must not interpret Triton."""
    if os.environ.get("FASTPEFT_AUTOTUNE", "1") == "0":
        raise RuntimeError("FASTPEFT_AUTOTUNE=0 launches one heuristic config: unset it to inspect every "
                           "config autotuning can choose")
    counter = _TorchKernels()
    weight4 = _quant_state(problem) if problem.op == "4bit" else None   # built outside the count
    with _stand_in_device(problem.arch), _aot.capture(problem.arch) as jobs, counter.mode:
        _step(problem, weight4=weight4)
    return list(jobs), counter.ops


def capture_problems(problems: Sequence[Problem]) -> list[tuple[list[_aot.AotJob], list[str]]]:
    """:func:`capture_problem` for each problem; in a subprocess without TRITON_INTERPRET when
    this process interprets Triton."""
    if not _aot.interpreting():
        return [capture_problem(p) for p in problems]
    out = subprocess.run([sys.executable, "-m", __name__, "--capture-stdin"], input=json.dumps(
        [asdict(p) for p in problems]), capture_output=True, text=True, env=_aot.clean_env())
    if out.returncode != 0:
        raise RuntimeError(f"capturing the launches failed:\n{out.stderr[-4000:]}")
    return [([_aot.AotJob(**j) for j in jobs], ops) for jobs, ops in json.loads(out.stdout)]


# --------------------------------------------------------------------------------------------
# Reading the SASS
# --------------------------------------------------------------------------------------------

def _instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every SASS instruction."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTR.finditer(sass)]


def _kind(opcode: str) -> str:
    base = opcode.split(".")[0]
    if _MMA.match(base):
        return "mma"
    if _MEMORY.match(base):
        return "memory"
    return "other"


def main_loop(sass: str) -> Optional[dict]:
    """The main loop: the innermost loop (backward branch) with the most tensor-core
    instructions, i.e. one that holds no other loop with tensor-core instructions (then the most
    memory instructions, then the shortest; without tensor cores anywhere, the same order over
    every loop). Returns its instruction counts per iteration ``{"total", "mma", "memory",
    "other"}`` (of the memory ones, ``"tma_load"`` UTMALDG and ``"ldgsts"`` cp.async), the tensor-core instruction kinds in it (``"mma_kind"``), its address range and
    ``"body"``, the instructions between its ends; or ``None`` for straight-line code.

    Per iteration, regions that a predicated forward branch inside the loop skips are left out:
    a persistent kernel whose loop over tiles and k-steps is flattened into one loop runs its
    once-per-tile prologue and epilogue under such branches, not once per k-step."""
    instrs = _instructions(sass)
    predicated = {int(m.group(1), 16) for m in _INSTR.finditer(sass) if m.group(2)}
    loops = []
    for addr, opcode, operands in instrs:
        target = re.match(r"\s*(0x[0-9a-f]+)", operands)
        if opcode.split(".")[0] == "BRA" and target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            body = [(a, op, rest) for a, op, rest in instrs if start <= a <= addr]
            loops.append({"start": start, "end": addr, "body": body,
                          "mma_all": sum(_kind(op) == "mma" for _, op, _ in body)})
    # a wait stub placed after the code returns into the middle of a loop with a backward branch:
    # of two ranges that overlap without nesting, the later-ending one is such a return, no loop
    loops = [lp for lp in loops if not any(o["start"] < lp["start"] <= o["end"] < lp["end"] for o in loops)]
    if not loops:
        return None
    with_mma = [lp for lp in loops if lp["mma_all"]]
    innermost = [lp for lp in with_mma if not any(
        o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in with_mma)]
    candidates = []
    for lp in innermost or loops:
        skipped = []
        for a, op, rest in lp["body"]:
            target = re.match(r"\s*(0x[0-9a-f]+)", rest)
            if op.split(".")[0] == "BRA" and target and a in predicated and a < int(target.group(1), 16) <= lp["end"]:
                skipped.append((a, int(target.group(1), 16)))
        ops = [op for a, op, _ in lp["body"] if not any(lo < a < hi for lo, hi in skipped)]
        kinds = [_kind(op) for op in ops]
        base = [op.split(".")[0] for op in ops]
        candidates.append({"total": len(ops), "mma": kinds.count("mma"), "memory": kinds.count("memory"),
                           "other": kinds.count("other"), "tma_load": base.count("UTMALDG"),
                           "ldgsts": base.count("LDGSTS"), "start": lp["start"], "end": lp["end"],
                           "body": len(lp["body"]),
                           "mma_kind": "/".join(sorted({op.split(".")[0] for op in ops if _MMA.match(op)})) or "-"})
    return max(candidates, key=lambda lp: (lp["mma"], lp["memory"], -lp["total"]))


def analyse_sass(sass: str) -> dict:
    """Counts over the whole kernel: tensor-core, TMA, cp.async and local-memory instructions."""
    ops = [op for _, op, _ in _instructions(sass)]
    base = [op.split(".")[0] for op in ops]
    mma = [op for op in ops if _MMA.match(op)]
    kinds = sorted({op.split(".")[0] for op in mma})
    return {"mma_kind": "/".join(kinds) or "-", "mma": len(mma), "mma_shapes": sorted(set(mma)),
            "tma_load": base.count("UTMALDG"), "tma_store": base.count("UTMASTG"), "ldgsts": base.count("LDGSTS"),
            "ldl": base.count("LDL"), "stl": base.count("STL"), "instructions": len(ops)}


# flops of each kernel from its integer arguments (2 per multiply-add)
_FLOPS = {
    "_lowrank_fwd_t_kernel": lambda a: 2 * a["M"] * a["K"] * a["R"],
    "_lowrank_fwd_gemm_kernel": lambda a: 2 * a["M"] * a["N"] * (a["K"] + a["R"]),
    "_lowrank_bwd_dy_kernel": lambda a: 4 * a["M"] * a["N"] * a["R"],
    "_lowrank_bwd_dx_kernel": lambda a: 2 * a["M"] * a["N"] * (a["K"] + a["R"]),
    "_lowrank_fwd_gemm_tma_kernel": lambda a: 2 * a["M"] * a["N"] * (a["K"] + a["R"]),
    "_lowrank_bwd_dx_tma_kernel": lambda a: 2 * a["M"] * a["N"] * (a["K"] + a["R"]),
    "_lowrank_bwd_da_kernel": lambda a: 2 * a["M"] * a["K"] * a["R"],
    "_lowrank4_fwd_gemm_kernel": lambda a: 2 * a["M"] * a["N"] * (a["K"] + a["R"]),
    "_lowrank4_fwd_gemm_tma_kernel": lambda a: 2 * a["M"] * a["N"] * (a["K"] + a["R"]),
    "_lowrank4_decode_kernel": lambda a: 2 * a["M"] * a["N"] * a["K"],
    "_lowrank4_decode_epilogue_kernel": lambda a: 2 * a["M"] * a["N"] * a["R"],
    "_lowrank4_bwd_dx_kernel": lambda a: 2 * a["M"] * a["N"] * (a["K"] + a["R"]),
    "_lowrank4_bwd_dx_tma_kernel": lambda a: 2 * a["M"] * a["N"] * (a["K"] + a["R"]),
    "_lowrank_group_bwd_dx_kernel": lambda a: 2 * a["M"] * a["N"] * (sum(a.get(f"D{j}", 0) for j in range(8)) + a["R"]),
}


def _traffic(job: _aot.AotJob) -> int:
    """Bytes of every distinct storage the launch's tensor arguments point at."""
    storages = {v[1]: v[0] for v in job.args.values() if isinstance(v, list)}
    return int(sum(storages.values()))


def _floors(job: _aot.AotJob, hbm: int, flops: int, dtype: str) -> dict:
    out = {}
    for device, (bandwidth, peak16, peak32) in DEVICES[job.arch].items():
        peak = peak32 if dtype == "fp32" else peak16
        out[device] = round(max(hbm / bandwidth, flops / peak) * 1e6, 3)
    return out


def _record(job: _aot.AotJob, result: _aot.AotResult, dtype: str) -> dict:
    sass = analyse_sass(result.sass) if not result.error else {}
    loop = main_loop(result.sass) if not result.error else None
    threads = 32 * int(job.options.get("num_warps", 4))
    config = job.config or {k: v for k, v in job.constexprs.items() if k.startswith("BLOCK")}
    per_weight = None
    if loop and "packed_ptr" in job.signature and "BLOCK_N" in config and "BLOCK_K" in config:
        per_weight = round((loop["total"] - loop["mma"]) * threads / (config["BLOCK_N"] * config["BLOCK_K"]), 2)
    flops = int(_FLOPS[job.name](job.args)) if job.name in _FLOPS else 0
    hbm = _traffic(job)
    return {
        "launch": job.launch, "kernel": job.name, "arch": job.arch,
        "config": {**config, "num_warps": int(job.options.get("num_warps", 4)),
                   "num_stages": int(job.options.get("num_stages", 3))},
        "autotuned": job.config is not None,
        "specialisation": {"signature": job.signature, "attrs": job.attrs, "options": job.options,
                           "constexprs": job.constexprs},
        "error": result.error,
        "registers": result.resources.get("REG"), "shared": result.shared,
        "spills": {"ldl": sass.get("ldl"), "stl": sass.get("stl"), "local_bytes": result.resources.get("LOCAL")},
        "mma_kind": sass.get("mma_kind"), "mma": sass.get("mma"), "mma_shapes": sass.get("mma_shapes"),
        "tma": {"load": sass.get("tma_load"), "store": sass.get("tma_store")}, "ldgsts": sass.get("ldgsts"),
        "instructions": sass.get("instructions"), "main_loop": loop, "non_mma_per_weight": per_weight,
        "hbm_bytes": hbm, "flops": flops, "floor_us": _floors(job, hbm, flops, dtype),
        "cubin": None,
    }


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

@dataclass
class Report:
    """What :func:`inspect_kernels` found: ``records`` (one per kernel × config, see the module
    docstring), ``launches`` (Triton launches of the step), ``torch_kernels`` (torch ops that
    launch a device kernel, in order), ``results`` (the :class:`~fastpeft.kernels._aot.AotResult`
    of each record, SASS included)."""
    problem: Problem
    records: list
    launches: int
    torch_kernels: list
    results: list = field(default_factory=list, repr=False)

    @property
    def kernel_launches(self) -> int:
        """Device kernel launches of the step: Triton launches plus torch kernels."""
        return self.launches + len(self.torch_kernels)

    def floor_us(self, device: str) -> float:
        """Sum over the launches of their floor (the first config of each)."""
        first = {}
        for rec in self.records:
            first.setdefault(rec["launch"], rec)
        return round(sum(rec["floor_us"][device] for rec in first.values()), 2)

    def table(self) -> str:
        devices = list(DEVICES[self.problem.arch])
        head = ["#", "kernel", "config", "regs", "smem KB", "LDL/STL", "MMA", "TMA ld/st", "LDGSTS", "instrs",
                "loop mma/mem/oth", "loop TMA/LDGSTS", "non-MMA/w", "HBM MB", *(f"floor {d} us" for d in devices)]
        rows = []
        for rec in self.records:
            c = rec["config"]
            tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK") if k in c)
            loop = rec["main_loop"]
            if rec["error"]:
                rows.append([str(rec["launch"]), rec["kernel"], tile, "ERROR: " + rec["error"][:60]])
                continue
            rows.append([
                str(rec["launch"]), rec["kernel"].strip("_").replace("_kernel", ""),
                f"{tile} w{c['num_warps']}s{c['num_stages']}", str(rec["registers"]), f"{rec['shared'] / 1024:.0f}",
                f"{rec['spills']['ldl']}/{rec['spills']['stl']}", f"{rec['mma_kind']} {rec['mma']}",
                f"{rec['tma']['load']}/{rec['tma']['store']}", str(rec["ldgsts"]), str(rec["instructions"]),
                f"{loop['mma']}/{loop['memory']}/{loop['other']}" if loop else "-",
                f"{loop['tma_load']}/{loop['ldgsts']}" if loop else "-",
                "-" if rec["non_mma_per_weight"] is None else f"{rec['non_mma_per_weight']:g}",
                f"{rec['hbm_bytes'] / 1e6:.1f}", *(f"{rec['floor_us'][d]:.1f}" for d in devices)])
        widths = [max(len(r[i]) if i < len(r) else 0 for r in [head] + rows) for i in range(len(head))]
        lines = [self.problem.describe(),
                 f"launches per {'step' if self.problem.training else 'call'}: {self.kernel_launches} "
                 f"({self.launches} Triton + {len(self.torch_kernels)} torch: {', '.join(self.torch_kernels) or '-'}); "
                 + "; ".join(f"floor {d} {self.floor_us(d):.1f} us" for d in devices),
                 "  ".join(h.ljust(w) for h, w in zip(head, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"problem": asdict(self.problem), "launches": self.launches, "torch_kernels": self.torch_kernels,
                "kernel_launches": self.kernel_launches, "records": self.records}


def inspect_kernels(problem: Optional[Problem] = None, *, dump: Optional[str] = None, **fields) -> Report:
    """Compile and read every kernel × choosable config of one step of ``problem`` (or of
    ``Problem(**fields)``). ``dump``: a folder that receives each ``.cubin`` and its ``.sass``;
    the records then name their cubin."""
    problem = problem if problem is not None else Problem(**fields)
    (jobs, torch_ops), = capture_problems([problem])
    results = _aot.compile_kernels(jobs)
    records = [_record(job, res, problem.dtype) for job, res in zip(jobs, results)]
    if dump:
        os.makedirs(dump, exist_ok=True)
        for i, (rec, res) in enumerate(zip(records, results)):
            if res.error:
                continue
            c = rec["config"]
            tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK") if k in c)
            stem = f"{i:03d}-{rec['kernel'].strip('_')}-sm{rec['arch']}-{tile}-w{c['num_warps']}s{c['num_stages']}"
            with open(os.path.join(dump, stem + ".cubin"), "wb") as f:
                f.write(bytes.fromhex(res.cubin))
            with open(os.path.join(dump, stem + ".sass"), "w") as f:
                f.write(res.sass)
            rec["cubin"] = os.path.join(dump, stem + ".cubin")
    launches = len({job.launch for job in jobs})
    return Report(problem, records, launches, torch_ops, results)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--shape must be KxD (input features x output features), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", choices=OPS, default="dense", help="the op: dense base weight, 4-bit (NF4/FP4) "
                        "base weight, or a group of projections of one input (q/k/v)")
    parser.add_argument("--arch", type=int, choices=sorted(_aot.SMEM_LIMIT), default=90,
                        help="target architecture: 90 (H100/H200) or 80 (A100)")
    parser.add_argument("--shape", type=_shape, default=(4096, 4096), help="KxD: input features x output features")
    parser.add_argument("--M", type=int, default=8192, help="rows of the flattened input (tokens)")
    parser.add_argument("--r", type=int, default=16, help="adapter rank")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="compute dtype")
    parser.add_argument("--dropout", type=float, default=0.1, help="adapter dropout probability, in [0, 1)")
    parser.add_argument("--method", default="lora", help="adapter preset (lora, lora_fa, lamda, vera, adalora, "
                        "parallel, dora): what trains, the core and the activation (dora: the norm "
                        "kernel and the row scale in the GEMM's epilogue)")
    parser.add_argument("--mode", choices=MODES, default="auto", help="train: forward + backward; decode: "
                        "forward without grad; auto: decode at M <= 16, else train")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit format (--op 4bit)")
    parser.add_argument("--blocksize", type=int, default=64, help="4-bit quantisation blocksize (--op 4bit)")
    parser.add_argument("--json", metavar="FILE", help="write the records (one per kernel x config) as JSON")
    parser.add_argument("--dump", metavar="DIR", help="write each .cubin and its SASS into DIR")


def _problem(args) -> Problem:
    k, d = args.shape
    return Problem(op=args.op, arch=args.arch, k=k, d=d, M=args.M, r=args.r, dtype=args.dtype,
                   dropout=args.dropout, method=args.method, mode=args.mode, quant_type=args.quant_type,
                   blocksize=args.blocksize)


def validate(args) -> Optional[str]:
    """A one-line complaint about the flags, or None."""
    try:
        _problem(args)
    except ValueError as err:
        return str(err)
    for flag in ("json", "dump"):
        path = getattr(args, flag)
        if path:
            folder = path if flag == "dump" else (os.path.dirname(os.path.abspath(path)) or ".")
            probe = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
            if not os.access(probe, os.W_OK):
                return f"--{flag} {path}: not writable"
    return None


def run(args) -> int:
    report = inspect_kernels(_problem(args), dump=args.dump)
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_json(), f, indent=1)
    return 1 if any(rec["error"] for rec in report.records) else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--capture-stdin"]:      # worker of capture_problems
        _problems = [Problem(**p) for p in json.loads(sys.stdin.read())]
        json.dump([([asdict(j) for j in jobs], ops) for jobs, ops in (capture_problem(p) for p in _problems)],
                  sys.stdout)
    else:
        _parser = argparse.ArgumentParser(prog="python -m fastpeft.kernels.inspect")
        add_arguments(_parser)
        _args = _parser.parse_args()
        _problem_error = validate(_args)
        if _problem_error:
            _parser.error(_problem_error)
        sys.exit(run(_args))

"""Every kernel × every config autotune could choose compiles clean for sm_80 and sm_90, as a
launch would specialise it, without a GPU (``fastpeft inspect``'s machinery).

The problems: bf16; M ∈ {1, 16, 4096, 8192}; 4096→4096, 4096→11008, 11008→4096; r ∈ {8, 16, 64};
dropout 0 and 0.1; the dense, 4-bit and grouped ops (LoRA), plus the other presets' features
(full and diagonal cores, out_scale, an activation) at one shape. Each problem's training step
(decode call at M ≤ 16) runs on CPU stand-in tensors and its launches are captured with Triton's
own specialisation of the real arguments; every distinct specialisation × kept config is
compiled once. Checks on each binary: no compile error (there is no fallback build), shared
memory within the device's per-block limit, no local-memory spills, tensor cores in every GEMM
(wgmma in the main loop on sm_90, with the exceptions listed below and their reasons), and on
sm_90 the forward GEMM's and dX's main loops loading through TMA.

Compilation runs in worker subprocesses (the interpreter is on in this process) and is cached by
Triton on disk, so a second run is fast.
"""

import functools
import itertools
import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from fastpeft.kernels import _aot  # noqa: E402
from fastpeft.kernels.inspect import Problem, capture_problems, main_loop  # noqa: E402

ARCHS = (80, 90)
OPS = ("dense", "4bit", "group")
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
PROBLEMS = [Problem(op=op, arch=arch, k=k, d=d, M=M, r=r, dtype="bf16", dropout=p)
            for op, arch, M, (k, d), r, p in itertools.product(OPS, ARCHS, (1, 16, 4096, 8192), SHAPES, (8, 16, 64),
                                                               (0.0, 0.1))]
PROBLEMS += [Problem(op=op, arch=arch, M=M, r=r, dropout=0.1, method=method)
             for op, arch, M, r, method in itertools.product(OPS, ARCHS, (16, 8192), (16, 64),
                                                             ("lamda", "vera", "adalora", "parallel"))]

# sm_90 kernels whose tensor-core work may run on mma.sync (HMMA) rather than wgmma, and why
NOT_WGMMA = {
    "_lowrank_bwd_da_kernel": "dA = s·dTᵀ·D(X) is an r-wide skinny product: its tiles have r rows (BLOCK_R), "
                              "fewer than the 64 a warpgroup's wgmma takes at r < 64",
    "_lowrank_bwd_dy_kernel": "G = dY·B and dYᵀ·Z are r-wide skinny products; at r = 64 the pass takes 32 rows "
                              "(G [BLOCK_M, r] stays in registers across d), under wgmma's 64 (at r ≤ 32, 64 "
                              "rows and wgmma); dcore and dB's core product (P_Z·Sᵀ) are r × r products",
    "_lowrank4_decode_kernel": "decode: M ≤ 16 rows, a 64-row wgmma tile would be three-quarters padding",
    "_dora_norm_kernel": "W·Aᵀ for DoRA's norms is an r-wide skinny product, run when the adapter changes",
}
SMALL_M = "BLOCK_M < 64 is kept only for M < 64 (decode-sized), where a 64-row wgmma tile would be mostly padding"
# sm_90 GEMMs whose main loop loads its operands through TMA (UTMALDG), without cp.async; at the
# grid's shapes (all 16-byte aligned) the forward GEMM and dX run them, never the pointer kernels
TMA_KERNELS = {"_lowrank_fwd_gemm_tma_kernel", "_lowrank_bwd_dx_tma_kernel", "_lowrank4_fwd_gemm_tma_kernel",
               "_lowrank4_bwd_dx_tma_kernel"}
POINTER_ON_SM90 = {"_lowrank_fwd_gemm_kernel", "_lowrank_bwd_dx_kernel"}


def _block_m(job):
    return (job.config or {}).get("BLOCK_M", job.constexprs.get("BLOCK_M", 64))


@functools.lru_cache(maxsize=None)
def _problems_of(op, arch):
    """[(problem, job, result)] for every captured job of the problems of one op and arch (so
    that a ``-k`` subset compiles only its share)."""
    problems = [p for p in PROBLEMS if p.op == op and p.arch == arch]
    captured = capture_problems(problems)
    triples = [(problem, job) for problem, (jobs, _) in zip(problems, captured) for job in jobs]
    results = _aot.compile_kernels([job for _, job in triples])
    return [(problem, job, result) for (problem, job), result in zip(triples, results)]


def _compiled():
    """[(problem, job, result)] for every captured job of every problem."""
    return [t for op in OPS for arch in ARCHS for t in _problems_of(op, arch)]


def _describe(problem, job):
    c = job.config or {}
    tile = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
    return (f"{job.name} {tile} w{c.get('num_warps', job.options.get('num_warps', 4))}"
            f"s{c.get('num_stages', job.options.get('num_stages', 3))} [{problem.describe()}]")


def _problem_with_binary(arch, problem, job, result):
    """What is wrong with one binary, or None."""
    if result.error:
        return f"does not compile: {result.error[:300]}"
    if not 0 <= result.shared <= _aot.SMEM_LIMIT[arch]:
        return f"{result.shared} bytes of shared memory (limit {_aot.SMEM_LIMIT[arch]})"
    if result.spills or result.resources.get("LOCAL", 0):
        return f"{len(result.spills)} local-memory instructions, e.g. {result.spills[:2]}, {result.resources}"
    loop = main_loop(result.sass)
    if job.name in TMA_KERNELS and not (loop and loop["tma_load"] and not loop["ldgsts"]):
        return f"main loop without TMA loads ({loop and {k: loop[k] for k in ('tma_load', 'ldgsts')}})"
    if not result.uses_tensor_cores:
        return None
    # straight-line kernels (an unrolled r-wide product) have no loop: their MMA anywhere counts
    kinds = loop["mma_kind"] if loop and loop["mma"] else "/".join(result.tensor_core_ops)
    if arch == 80 and "HMMA" not in kinds:
        return f"no HMMA in the main loop ({kinds})"
    if arch == 90 and "HGMMA" not in kinds and job.name not in NOT_WGMMA:
        if not (_block_m(job) < 64 and problem.M < 64):
            return f"no wgmma (HGMMA) in the main loop ({kinds})"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_choosable_config_compiles_clean(op, arch):
    failures, seen = [], set()
    for problem, job, result in _problems_of(op, arch):
        if job.key in seen:
            continue
        seen.add(job.key)
        what = _problem_with_binary(arch, problem, job, result)
        if what:
            failures.append(f"{_describe(problem, job)}: {what}")
    assert seen, f"nothing captured for {op} on sm_{arch}"
    assert not failures, f"{len(failures)} binaries fail:\n" + "\n".join(failures[:25])


@pytest.mark.slow
def test_the_grid_covers_every_kernel_and_several_configs():
    """Every Triton kernel of the three ops is launched by some problem, and autotuned ones offer
    autotune more than one config at the large problems."""
    names = {job.name for _, job, _ in _compiled()}
    assert {"_lowrank_fwd_t_kernel", "_lowrank_fwd_gemm_kernel", "_lowrank_bwd_dy_kernel", "_lowrank_bwd_dx_kernel",
            "_lowrank_bwd_da_kernel", "_lowrank4_fwd_gemm_kernel", "_lowrank4_bwd_dx_kernel",
            "_lowrank4_decode_kernel", "_lowrank_group_bwd_dx_kernel"} | TMA_KERNELS <= names
    big = [(p, j) for p, j, _ in _compiled() if p.M == 8192 and j.name in {"_lowrank_fwd_gemm_kernel"} | TMA_KERNELS]
    per_launch = {}
    for p, j in big:
        per_launch.setdefault((p, j.launch), []).append(j)
    assert all(len(v) >= 2 for v in per_launch.values())


@pytest.mark.slow
@pytest.mark.parametrize("op", ["dense", "group"])
def test_sm90_forward_gemm_and_dx_load_through_tma(op):
    """On sm_90, at the grid's (aligned) shapes, every launch of the dense forward GEMM and dX
    (the grouped op's forward GEMM too) is a TMA kernel, each config's main loop with UTMALDG and
    no cp.async (checked per binary by ``_problem_with_binary``); on sm_80 the pointer kernels."""
    names = {job.name for _, job, _ in _problems_of(op, 90)}
    assert "_lowrank_fwd_gemm_tma_kernel" in names and not names & POINTER_ON_SM90, names
    if op == "dense":
        assert "_lowrank_bwd_dx_tma_kernel" in names
    tma = [(p, j, r) for p, j, r in _problems_of(op, 90) if j.name in TMA_KERNELS]
    assert all(not _problem_with_binary(90, p, j, r) for p, j, r in tma)
    assert any(j.config["BLOCK_N"] == 256 for _, j, _ in tma) and any(j.config["PERSISTENT"] for _, j, _ in tma)
    assert not {job.name for _, job, _ in _problems_of(op, 80)} & TMA_KERNELS


def test_wgmma_exceptions_name_real_kernels():
    from fastpeft.kernels import dora, lowrank_4bit_decode, lowrank_bwd
    for name in NOT_WGMMA:
        assert any(hasattr(m, name) for m in (lowrank_bwd, lowrank_4bit_decode, dora)), name


# -- the specialisation is Triton's own --------------------------------------------------------

_SPECIALISATION_SCRIPT = textwrap.dedent("""
    import json, torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from fastpeft.kernels import _aot, _common, inspect
    from fastpeft.kernels.inspect import Problem

    launches = []
    original = _common._launch
    def recording(kernel, grid, args, fallback):
        launches.append((kernel, dict(args)))
        return original(kernel, grid, args, fallback)
    _common._launch = recording
    out = []
    for shape in ({"k": 4096, "d": 4096, "M": 8192, "r": 16}, {"k": 123, "d": 77, "M": 333, "r": 12}):
        launches.clear()
        jobs, _ = inspect.capture_problem(Problem(op="dense", arch=90, dropout=0.1, **shape))
        backend = make_backend(GPUTarget("cuda", 90, 32))
        for (kernel, args), launch in zip(launches, sorted({j.launch for j in jobs if j.config})):
            job = next(j for j in jobs if j.launch == launch)
            fn = _aot.jit_function(kernel)
            kwargs = {**args, **job.config, "debug": False}
            bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(**kwargs)
            _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
            direct = {"signature": signature,
                      "constexprs": {fn.arg_names[p[0]]: v for p, v in constexprs.items()},
                      "attrs": {fn.arg_names[p[0]]: v for p, v in attrs.items() if v}}
            captured = {"signature": job.signature, "constexprs": job.constexprs, "attrs": job.attrs}
            ints = {k: v for k, v in args.items() if isinstance(v, int) and not isinstance(v, bool)
                    and fn.params[fn.arg_names.index(k)].is_constexpr is False}
            out.append({"shape": shape, "kernel": job.name, "direct": direct, "captured": captured, "ints": ints})
    print(json.dumps(out, default=str))
""")


@functools.lru_cache(maxsize=None)
def _specialisations():
    res = subprocess.run([sys.executable, "-c", _SPECIALISATION_SCRIPT], capture_output=True, text=True,
                         env=_aot.clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.mark.slow
def test_captured_specialisation_equals_tritons_binder():
    """What inspect compiles (recorded inside Triton's JITFunction.run) equals what Triton's
    binder and argument packer compute directly from the same arguments, for every autotuned
    launch of a dense training step, at aligned and at odd shapes."""
    cases = _specialisations()
    assert len(cases) >= 8
    for case in cases:
        assert json.loads(json.dumps(case["captured"])) == json.loads(json.dumps(case["direct"])), case["kernel"]


@pytest.mark.slow
def test_integers_divisible_by_16_are_specialised():
    """A real launch specialises integers as well as pointers: at 8192 x 4096 every size and
    stride divisible by 16 carries ``tt.divisibility`` 16 and unit strides become constants; at
    k = 123, d = 77, M = 333 the odd ones do not."""
    for case in _specialisations():
        attrs, cex, ints = case["captured"]["attrs"], case["captured"]["constexprs"], case["ints"]
        for name, value in ints.items():
            if name == "seed":
                continue
            if value == 1:
                assert cex.get(name) == 1, (case["kernel"], name)
            elif value % 16 == 0:
                assert attrs.get(name) == [["tt.divisibility", 16]], (case["kernel"], name, value)
            else:
                assert name not in attrs, (case["kernel"], name, value)
        if case["shape"]["k"] == 4096:
            assert any(v % 16 == 0 and v > 1 for v in ints.values())
        else:
            assert any(v % 16 and v > 1 for k, v in ints.items() if k != "seed")


# -- DoRA's norm kernel (outside a training step's op: it runs when the adapter changes) and its
# fused forward (the low-rank GEMM with the row-scale epilogue) ------------------------------

_DORA_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import fastpeft
    from dataclasses import asdict
    from fastpeft.kernels import _aot, dora
    from fastpeft.kernels.inspect import Problem, _quant_state, _stand_in_device

    jobs = []
    for arch in (80, 90):
        for (k, d), r in [((4096, 4096), 8), ((4096, 11008), 16), ((11008, 4096), 64), ((4096, 4096), 128)]:
            a, b = torch.empty(r, k, dtype=torch.bfloat16), torch.empty(d, r, dtype=torch.bfloat16)
            with _stand_in_device(arch), _aot.capture(arch) as captured:
                try:
                    dora.dora_norm(torch.empty(d, k, dtype=torch.bfloat16), a, b, 2.0)
                except Exception:      # finishing n on stand-in tensors is not the point
                    pass
                for quant in ("nf4", "fp4"):
                    packed, state = _quant_state(Problem(op="4bit", k=k, d=d, r=r, quant_type=quant))
                    try:
                        dora.dora_norm_4bit(packed, state, a, b, 2.0)
                    except Exception:
                        pass
            jobs += [asdict(j) for j in captured]
        # the fused forward: the low-rank GEMM with the row-scale epilogue, Z stored beside Y
        for M, r in [(8192, 16), (8192, 64)]:
            x, w = torch.empty(M, 4096, dtype=torch.bfloat16), torch.empty(4096, 4096, dtype=torch.bfloat16)
            a, b = torch.empty(r, 4096, dtype=torch.bfloat16), torch.empty(4096, r, dtype=torch.bfloat16)
            with _stand_in_device(arch), _aot.capture(arch) as captured:
                try:
                    dora.dora_fwd(x, w, torch.empty(4096, dtype=torch.bfloat16), a, b,
                                  torch.empty(4096), 2.0, 0.1, 1, True)
                except Exception:
                    pass
            jobs += [asdict(j) for j in captured]
    json.dump(jobs, sys.stdout)
""")


@pytest.mark.slow
def test_dora_kernels_compile_clean():
    res = subprocess.run([sys.executable, "-c", _DORA_SCRIPT], capture_output=True, text=True, env=_aot.clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = [_aot.AotJob(**j) for j in json.loads(res.stdout)]
    assert {j.name for j in jobs} >= {"_dora_norm_kernel", "_lowrank_fwd_gemm_kernel"} and {j.arch for j in jobs} == {80, 90}
    assert any(j.constexprs.get("HAS_ROW_SCALE") and j.constexprs.get("STORE_Z") for j in jobs)
    failures = []
    for job, result in zip(jobs, _aot.compile_kernels(jobs)):
        what = _problem_with_binary(job.arch, Problem(M=8192), job, result)
        if what:
            failures.append(f"{job.name} sm_{job.arch} {job.constexprs.get('BLOCK_R')}: {what}")
    assert not failures, "\n".join(failures)


# QDoRA: a step of the 4-bit op with the row scale c as the epilogue vector of the 4-bit GEMM
# (Z stored beside Y while the magnitude trains) or of the decode kernel, and dY scaled by c in
# the dX kernel's loads (HAS_ROW_SCALE), as launched
DORA_4BIT_PROBLEMS = [Problem(op="4bit", method="dora", arch=arch, M=M, r=r, mode=mode, quant_type=quant)
                      for arch, (M, mode), r, quant in itertools.product(
                          ARCHS, ((1, "decode"), (1, "train"), (16, "train"), (8192, "train")), (16, 64),
                          ("nf4", "fp4"))
                      if quant == "nf4" or (M, r) == (8192, 64)]


@pytest.mark.slow
def test_dora_4bit_fused_kernels_compile_clean():
    captured = capture_problems(DORA_4BIT_PROBLEMS)
    triples = [(problem, job) for problem, (jobs, _) in zip(DORA_4BIT_PROBLEMS, captured) for job in jobs]
    row_scaled = {job.name for _, job in triples if job.constexprs.get("HAS_ROW_SCALE")}
    assert row_scaled >= {"_lowrank4_fwd_gemm_kernel", "_lowrank4_decode_kernel", "_lowrank4_bwd_dx_kernel"}
    assert any(job.constexprs.get("STORE_Z") for _, job in triples if job.name == "_lowrank4_decode_kernel")
    failures, seen = [], {}
    for problem, job in triples:
        seen.setdefault(job.key, (problem, job))
    for (problem, job), result in zip(seen.values(), _aot.compile_kernels([j for _, j in seen.values()])):
        what = _problem_with_binary(job.arch, problem, job, result)
        if what:
            failures.append(f"{_describe(problem, job)}: {what}")
    assert not failures, f"{len(failures)} binaries fail:\n" + "\n".join(failures[:25])


# -- autotune keys -----------------------------------------------------------------------------

def test_autotune_keys_hold_every_argument_the_prune_reads(monkeypatch):
    """A config chosen for one launch is reused for every launch with the same key: each
    non-tensor argument a prune function reads must therefore be in the key (HAS_DROPOUT
    included). The launches of a dense, a grouped and a 4-bit training step with dropout are
    recorded (not run) and each autotuned kernel's prune function is replayed on them."""
    import torch
    import fastpeft
    from fastpeft.kernels import _common

    launches = []
    monkeypatch.setattr(_common, "_launch", lambda kernel, grid, args, fallback: launches.append((kernel, args)))
    x = torch.randn(40, 24, requires_grad=True)
    a, b = torch.randn(8, 24, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    w = torch.randn(16, 24)
    with fastpeft.use_backend("triton"):
        y = fastpeft.lowrank_linear(x, w, None, a, b, dropout_p=0.1, seed=3)
        y.backward(torch.randn_like(y))
        packed, state = fastpeft.quantize_4bit(w, quant_type="nf4", blocksize=64)
        y = fastpeft.lowrank_linear_4bit(x, packed, state, None, a, b, dropout_p=0.1, seed=3)
        y.backward(torch.randn_like(y))
        ys = fastpeft.lowrank_linear_group(x, [w, w], None, [a, a], [b, b], dropout_p=0.1, seed=3)
        torch.autograd.backward(list(ys), [torch.randn_like(v) for v in ys])

    class Reads(dict):
        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

    monkeypatch.setattr(_common, "_prune_args", lambda named, kwargs: Reads({**named, **kwargs}))
    monkeypatch.setattr(_common, "_limits_of", lambda t: (90, _aot.SMEM_LIMIT[90], _aot.SM_COUNT[90]))
    checked = set()
    for kernel, args in launches:
        prune = getattr(kernel, "early_config_prune", None)
        if prune is None:
            continue
        read = set()
        assert prune(kernel.configs, {}, **args)
        assert read, f"{kernel.base_fn.__name__}: its prune read nothing through _common._prune_args"
        scalars = {k for k in read if not isinstance(args[k], torch.Tensor)}
        assert scalars <= set(kernel.keys), f"{kernel.base_fn.__name__}: prune reads {scalars - set(kernel.keys)} " \
                                            f"outside its key {kernel.keys}"
        checked.add(kernel.base_fn.__name__)
    assert {"_lowrank_fwd_t_kernel", "_lowrank_bwd_dx_kernel", "_lowrank_bwd_da_kernel",
            "_lowrank4_fwd_gemm_kernel", "_lowrank_group_bwd_dx_kernel"} <= checked


# -- 4-bit dequantisation by byte permutes (PRMT) -----------------------------------------------

# non-MMA instructions per weight per thread in the main loop (fastpeft inspect's measure) of the
# config autotune prefers (its first), at inspect's default problem (bf16 NF4, k = d = 4096, r = 16,
# dropout 0.1: decode's loop also draws the Philox mask): the lowest reached, not the <= 4 aimed at
PRMT_PER_WEIGHT = {90: {"_lowrank4_fwd_gemm_tma_kernel": 5.1, "_lowrank4_bwd_dx_tma_kernel": 5.8,
                        "_lowrank4_decode_kernel": 41},
                   80: {"_lowrank4_fwd_gemm_kernel": 8.0, "_lowrank4_bwd_dx_kernel": 9.4,
                        "_lowrank4_decode_kernel": 40.6}}
PRMT_PROBLEMS = [Problem(op="4bit", arch=arch, k=4096, d=4096, M=M, r=16, dtype="bf16", dropout=0.1)
                 for arch in ARCHS for M in (1, 8192)]


@functools.lru_cache(maxsize=None)
def _prmt_compiled():
    """[(job, result, preferred)] for every 4-bit kernel job of PRMT_PROBLEMS; ``preferred``: the
    first config captured for its launch (the one autotune falls back to)."""
    jobs, preferred, seen = [], [], set()
    for jobs_of, _ in capture_problems(PRMT_PROBLEMS):
        launches = set()
        for job in jobs_of:
            if "packed_ptr" in job.signature and job.key not in seen:
                seen.add(job.key)
                jobs.append(job)
                preferred.append(job.launch not in launches)
            launches.add(job.launch)
    return list(zip(jobs, _aot.compile_kernels(jobs), preferred))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_main_loops_dequantise_by_prmt(arch):
    """The 4-bit GEMM, dX and decode binaries of sm_80 / sm_90 (k a multiple of the blocksize,
    every config autotune may choose) dequantise by byte permutes: PRMT in the main loop and (almost)
    no FSEL (the select tree is the interpreter's path), no spills; the preferred config's non-MMA
    instructions per weight per thread within PRMT_PER_WEIGHT."""
    from fastpeft.kernels.inspect import _instructions, _record

    checked = set()
    for job, result, preferred in _prmt_compiled():
        if job.arch != arch:
            continue
        dtype = job.signature.get("x_ptr") or job.signature.get("dy_ptr")
        name = f"{job.name} {job.config} QUANT={job.constexprs.get('QUANT')} {dtype}"
        assert not result.error, f"{name}: {result.error[:300]}"
        assert not result.spills and not result.resources.get("LOCAL", 0), f"{name}: spills"
        loop = main_loop(result.sass)
        body = [op.split(".")[0] for a, op, _ in _instructions(result.sass) if loop["start"] <= a <= loop["end"]]
        # the select tree puts ~160 FSEL in a k-step; the TMA kernels keep <= 4 (the masks of the
        # nested scales they load a step ahead)
        assert "PRMT" in body and body.count("FSEL") <= 4, f"{name}: {body.count('PRMT')} PRMT, {body.count('FSEL')} FSEL"
        if preferred:
            per_weight = _record(job, result, "bf16")["non_mma_per_weight"]
            assert per_weight <= PRMT_PER_WEIGHT[arch][job.name], f"{name}: {per_weight} non-MMA per weight"
            checked.add(job.name)
    assert checked == set(PRMT_PER_WEIGHT[arch])


def test_dequantisation_kernel_uses_prmt():
    """The dense-buffer kernel (bf16 out, k a multiple of the blocksize) compiles to PRMT and
    no FSEL for sm_80 and sm_90."""
    script = textwrap.dedent("""
        import json, sys, torch
        from dataclasses import asdict
        from fastpeft.kernels import _aot, lowrank_4bit as L4
        from fastpeft.kernels.inspect import Problem, _quant_state, _stand_in_device
        jobs = []
        for arch in (80, 90):
            for quant in ("nf4", "fp4"):
                packed, state = _quant_state(Problem(op="4bit", k=4096, d=64, quant_type=quant))
                with _stand_in_device(arch), _aot.capture(arch) as captured:
                    L4.dequantize_4bit_dense(packed, state, torch.bfloat16)
                jobs += [asdict(j) for j in captured]
        json.dump(jobs, sys.stdout)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_aot.clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = [_aot.AotJob(**j) for j in json.loads(res.stdout)]
    assert len(jobs) == 4 and {j.constexprs["LAYOUT"] for j in jobs} == {2}
    for job, result in zip(jobs, _aot.compile_kernels(jobs)):
        assert not result.error and not result.spills, (job.arch, result.error)
        assert "PRMT" in result.sass and "FSEL" not in result.sass, job.arch

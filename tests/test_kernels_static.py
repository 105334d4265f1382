"""Every kernel x every autotune config compiles for sm_80 and sm_90, without a GPU.

For each kernel, architecture and config, the config is compiled at the largest r (BLOCK_R in
16..128) for which the module's prune function keeps it on that architecture (the worst case
for registers and shared memory), with every optional feature on (dropout, full core, gelu,
out_scale, bias), in fp16 or bf16 (alternating, so each kernel is checked in both). The heuristic
config of each kernel is also compiled in fp32. Checks: the compiler accepts it; shared memory
within the device's per-block limit (H100 227 KB, A100 163 KB); no local-memory spills (no
LDL/STL in the SASS); tensor-core instructions in the kernels that do GEMM work (HGMMA or HMMA on
sm_90, HMMA on sm_80).

Compilation runs once for the whole file (in a subprocess when the interpreter is on) and is
cached by Triton on disk, so a second run is fast.
"""

import dataclasses
import functools
import itertools

import pytest

pytest.importorskip("triton")

from fastpeft.kernels import _aot  # noqa: E402
from fastpeft.kernels import dora  # noqa: E402
from fastpeft.kernels import lowrank  # noqa: E402
from fastpeft.kernels import lowrank_group  # noqa: E402
from fastpeft.kernels import lowrank_4bit  # noqa: E402

ARCHS = (80, 90)
BLOCK_RS = (16, 32, 64, 128)
BIG = dict(M=8192, N=8192, K=8192)
TENSOR_CORE_OPS = {90: ("HGMMA", "HMMA"), 80: ("HMMA",)}
MODULES = [lowrank, lowrank_group, lowrank_4bit, dora]


def _config_key(config):
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def _tile_id(config):
    kw = "x".join(str(v) for v in config.kwargs.values())
    return f"{kw}-w{config.num_warps}s{config.num_stages}"


def _plan():
    """(id, spec, arch, config, problem) for every compilation."""
    plan = []
    for module in MODULES:
        for spec in module.KERNELS:
            for arch, variant in itertools.product(ARCHS, spec.variants):
                tag = "".join(f"-{k}{int(v)}" for k, v in variant.items())
                worst = {}
                for br in BLOCK_RS:
                    for config in spec.configs_for(arch, {**BIG, **variant, "R": br, "dtype": "bf16"}):
                        worst[_config_key(config)] = (config, br)
                for i, (config, br) in enumerate(worst.values()):
                    dtype = ("fp16", "bf16")[i % 2]
                    plan.append((f"{spec.name}-sm{arch}{tag}-{_tile_id(config)}-r{br}-{dtype}", spec, arch,
                                 config, {**BIG, **variant, "R": br, "dtype": dtype}))
                fp32 = {**BIG, **variant, "R": 16, "dtype": "fp32"}
                for config in spec.configs_for(arch, fp32)[:1]:
                    plan.append((f"{spec.name}-sm{arch}{tag}-{_tile_id(config)}-r16-fp32", spec, arch, config, fp32))
    return plan


PLAN = _plan()


@functools.lru_cache(maxsize=None)
def _results():
    jobs = [spec.job(arch, problem, config) for _, spec, arch, config, problem in PLAN]
    return {entry[0]: result for entry, result in zip(PLAN, _aot.compile_kernels(jobs))}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_config_is_planned(module):
    """Each autotune config declared on a kernel is kept by its prune function on some
    architecture for some r (no dead configs), so the compilations below cover all of them; and
    every (arch, r, dtype) keeps at least one config."""
    for spec in module.KERNELS:
        declared = {_config_key(c) for c in spec.configs}
        planned = {_config_key(config) for _, s, _, config, _ in PLAN if s is spec}
        assert declared <= planned, f"{spec.name}: configs never kept: {declared - planned}"
        for arch, variant, br, dtype in itertools.product(ARCHS, spec.variants, BLOCK_RS, ("fp16", "bf16", "fp32")):
            problem = {**BIG, **variant, "R": br, "dtype": dtype}
            assert spec.configs_for(arch, problem), f"{spec.name}: no config for sm_{arch} {problem}"
            small = {**problem, "M": 1, "N": 24, "K": 40}
            assert spec.configs_for(arch, small), f"{spec.name}: no config for sm_{arch} {small}"


@pytest.mark.slow
@pytest.mark.parametrize("case", PLAN, ids=[p[0] for p in PLAN])
def test_compiles_without_spills(case):
    name, spec, arch, config, problem = case
    res = _results()[name]
    assert not res.error, f"{name}: {res.error}"
    assert 0 <= res.shared <= _aot.SMEM_LIMIT[arch], f"{name}: {res.shared} bytes of shared memory"
    assert not res.spills, f"{name}: {len(res.spills)} local-memory instructions, e.g. {res.spills[:3]}"
    assert res.resources.get("LOCAL", 0) == 0, f"{name}: local memory {res.resources}"
    if spec.tensor_cores and problem["dtype"] != "fp32":
        ops = res.tensor_core_ops
        assert any(op in TENSOR_CORE_OPS[arch] for op in ops), f"{name}: no tensor-core instruction ({ops})"


@pytest.mark.slow
def test_kernels_without_fp_fusion_round_every_operation():
    """A kernel launched with ``enable_fp_fusion=False`` (the nested-absmax expansion, which must
    round its multiply and its add apart, as bitsandbytes does) has no fused multiply-add in its
    PTX, where the same kernel compiled with fusion has one (so this check can fail)."""
    unfused = [(name, spec, arch, config, problem) for name, spec, arch, config, problem in PLAN
               if dict(spec.options).get("enable_fp_fusion") is False]
    assert unfused
    for name, *_ in unfused:
        ptx = _results()[name].ptx
        assert "fma.rn.f32" not in ptx and "mul.rn.f32" in ptx, name
    _, spec, arch, config, problem = unfused[0]
    fused = _aot.compile_kernels([dataclasses.replace(spec.job(arch, problem, config), options={})])[0]
    assert not fused.error and "fma.rn.f32" in fused.ptx

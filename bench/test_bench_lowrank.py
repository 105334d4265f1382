"""The low-rank layer, every provider side by side (pytest-benchmark).

    pytest bench/test_bench_lowrank.py --benchmark-only --benchmark-group-by=param:case,param:mode

Providers and cases come from :mod:`fastpeft.benchmark` (the harness behind ``fastpeft bench``);
a provider that cannot run here (no GPU, no peft or bitsandbytes) is a skipped test naming why.
"""

import pytest
import torch

from fastpeft.benchmark.lowrank import MODES, input_sets, step_function
from fastpeft.benchmark.providers import PROVIDERS, Case, bytes_moved, flops
from fastpeft.benchmark.runner import Skip

if torch.cuda.is_available():
    SHAPES, TOKENS, DTYPE = [(4096, 4096), (4096, 11008)], [16, 4096], torch.bfloat16
else:   # CPU: small shapes, CPU timings
    SHAPES, TOKENS, DTYPE = [(512, 512)], [16, 256], torch.float32

CASES = [Case(op, m, k, d, 16, DTYPE) for op in ("dense", "4bit") for (k, d) in SHAPES for m in TOKENS]
PAIRS = [(p, c) for c in CASES for p in PROVIDERS if p.op == c.op or p.floor]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider, case", PAIRS, ids=[f"{c.label.replace(' ', '-')}-{p.name}" for p, c in PAIRS])
def test_lowrank_layer(provider, case, mode, device, timed, benchmark):
    try:
        built = provider.build(case, device)
    except Skip as reason:
        pytest.skip(f"{provider.name}: {reason}")
    sets = input_sets(case, device)
    benchmark.group = f"{case.label} {mode}"
    benchmark.extra_info.update(provider=provider.name, device=str(device), flops=flops(provider, case, mode),
                                bytes=bytes_moved(provider, case, mode))
    with built.scope():
        timed(step_function(built, sets, mode), clear=built.grads + [x for x, _ in sets])
    if benchmark.stats is None:   # --benchmark-disable: the call ran once, untimed
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(tflops=benchmark.extra_info["flops"] / seconds / 1e12,
                                gbps=benchmark.extra_info["bytes"] / seconds / 1e9)

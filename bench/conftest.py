"""pytest-benchmark suites of fastpeft: ``pytest bench/ --benchmark-only``.

Kept out of the default test run (pyproject's ``testpaths`` is ``tests``). They time the same
providers and cases as ``fastpeft bench`` with pytest-benchmark's timer (each call synchronised
on a GPU) and record the work counts in ``extra_info``, so ``--benchmark-json`` files carry
TFLOP/s and GB/s. On a CPU they run small shapes: CPU timings, not kernel speed.
"""

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def timed(benchmark, device):
    """``timed(fn, clear=[...])``: benchmark ``fn`` with the ``.grad`` of ``clear`` reset before
    each call and, on a GPU, a synchronisation after it."""
    def run(fn, clear=()):
        clear = list(clear)

        def call():
            for t in clear:
                t.grad = None
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        call()   # warm-up (autotuning, first-call allocations)
        return benchmark.pedantic(call, rounds=20 if device.type == "cuda" else 5,
                                  iterations=1, warmup_rounds=2)
    return run

"""The benchmark times the providers of one case side by side: on a CPU their blocks of calls
interleave, each provider's scope is entered around its blocks (outside the timed region) and its
gradients are cleared before each call; a provider that fails costs the others nothing."""

import contextlib

import torch

from fastpeft.benchmark import lowrank as bench_lowrank
from fastpeft.benchmark.providers import Built, Case, Provider
from fastpeft.benchmark.runner import CPU_MIN_SAMPLES, time_side_by_side

CPU = torch.device("cpu")


def _blocks(log):
    """The run of callable names in ``log`` with repeats collapsed: one entry per block."""
    return [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]


def test_blocks_interleave_and_reverse_every_other_round():
    log = []
    fns = [lambda name=name: log.append(name) for name in "abc"]
    timings = time_side_by_side(fns, CPU, quick=True)
    assert len(timings) == 3
    rounds = min(t.samples for t in timings)
    assert rounds >= CPU_MIN_SAMPLES[True]
    assert all(t.samples == rounds for t in timings)
    # after the block-size calls (two per callable, a, b, c), rounds alternate a b c / c b a
    blocks = _blocks(log[6:])
    expected = []
    for i in range(rounds):
        expected += list("abc") if i % 2 == 0 else list("cba")
    collapsed = [name for j, name in enumerate(expected) if j == 0 or expected[j - 1] != name]
    assert blocks == collapsed
    assert all(t.ms >= 0 and t.q20 <= t.ms <= t.q80 for t in timings)


def test_scopes_wrap_blocks_and_grads_are_cleared_before_each_call():
    entered, inside = [], [None]

    def scope(name):
        @contextlib.contextmanager
        def enter():
            entered.append(name)
            inside[0] = name
            try:
                yield
            finally:
                inside[0] = None
        return enter

    weights = [torch.ones(2, requires_grad=True) for _ in range(2)]
    seen = []

    def step(i):
        def call():
            seen.append((i, inside[0], weights[i].grad is None))
            (weights[i] * 3).sum().backward()
        return call

    time_side_by_side([step(0), step(1)], CPU, quick=True, grads_to_none=[[weights[0]], [weights[1]]],
                      scopes=[scope(0), scope(1)])
    assert seen and all(owner == i and cleared for i, owner, cleared in seen)
    # entered once per block (and around the block-size calls), never once per call
    assert len(entered) < len(seen)
    assert set(entered) == {0, 1}


def test_bench_measures_the_providers_of_a_case_together_and_survives_a_broken_one():
    order = []

    def build(name, fail=None):
        def make(case, device):
            if fail == "build":
                raise RuntimeError("cannot build")
            weight = torch.randn(case.d, case.k, requires_grad=True)

            def forward(x):
                order.append(name)
                if fail == "call" and len(order) > 3:
                    raise RuntimeError("broken mid-run")
                return x @ weight.t()
            return Built(forward, [weight], [weight])
        return make

    case = Case("dense", 4, 8, 8, 2, torch.float32)
    p0, p1 = Provider("p0", "dense", build("p0")), Provider("p1", "dense", build("p1"))
    bad = Provider("bad", "dense", build("bad", "build"))
    rows = bench_lowrank.measure_side_by_side([p0, bad, p1], case, CPU, modes=("fwd", "fwd+bwd"), quick=True)
    assert [(r["provider"], r["mode"], r["status"]) for r in rows] == [
        ("p0", "fwd", "ok"), ("p0", "fwd+bwd", "ok"), ("bad", "fwd", "error"), ("bad", "fwd+bwd", "error"),
        ("p1", "fwd", "ok"), ("p1", "fwd+bwd", "ok")]
    assert all(r["ms"] > 0 for r in rows if r["status"] == "ok")
    # p0 and p1 ran in alternating blocks, not one after the other
    blocks = _blocks(order)
    # (with two providers each round boundary repeats one: p0 p1 | p1 p0)
    assert blocks.count("p0") >= CPU_MIN_SAMPLES[True] and blocks.count("p1") >= CPU_MIN_SAMPLES[True]

    # a provider that breaks while timed: its rows are errors, the others' are timed alone
    order.clear()
    flaky = Provider("flaky", "dense", build("flaky", "call"))
    rows = bench_lowrank.measure_side_by_side([p0, flaky], case, CPU, modes=("fwd",), quick=True)
    assert [(r["provider"], r["status"]) for r in rows] == [("p0", "ok"), ("flaky", "error")]
    assert "broken mid-run" in rows[1]["reason"]

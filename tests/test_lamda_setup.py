"""LaMDA set-up without a full SVD: the initialisation, LaMDA++'s energy curves, and what the
PMB freezer keeps."""

import io
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.lamda import energy_curve


def _decaying(d, k, seed):
    gen = torch.Generator().manual_seed(seed)
    n = min(d, k)
    u = torch.linalg.qr(torch.randn(d, n, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(k, n, generator=gen))[0]
    return (u * 0.85 ** torch.arange(n)) @ v.t()


def test_lamda_init_is_the_top_singular_pair_of_w():
    linear = nn.Linear(160, 200)
    with torch.no_grad():
        linear.weight.copy_(_decaying(200, 160, 0))
    u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
    layer = fastpeft.LowRankLinear.from_linear(linear, fastpeft.AdapterConfig(method="lamda", r=8))
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    assert a.shape == (8, 160) and b.shape == (200, 8) and a.is_contiguous() and b.is_contiguous()
    for i in range(8):   # each vector equals the full SVD's up to a common sign
        sign = torch.sign(b[:, i] @ u[:, i])
        assert (b[:, i] - sign * u[:, i]).abs().max() < 1e-4
        assert (a[i] - sign * vh[i]).abs().max() < 1e-4


def test_truncated_energy_curve_is_the_full_curves_prefix():
    linear = nn.Linear(150, 120)
    with torch.no_grad():
        linear.weight.copy_(_decaying(120, 150, 1))
    full = energy_curve("w", linear)
    part = energy_curve("w", linear, max_rank=12)
    assert full.shape == (121,) and part.shape == (13,)
    assert full[-1] == 1.0
    assert torch.allclose(part, full[:13], rtol=1e-9, atol=1e-12)


def test_pmb_freezer_drops_its_copy_once_b_is_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
    model = fastpeft.inject(model, fastpeft.AdapterConfig(method="lamda", r=4, freeze_b_steps=4,
                                                          target_modules=["0", "1"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    freezer = fastpeft.PMBFreezer(model)
    snapshots = []
    for step in range(8):
        model(torch.randn(5, 16)).pow(2).sum().backward()
        opt.step()
        freezer.step()
        opt.zero_grad()
        if step == 1:   # half frozen: the copy of the frozen columns is kept
            assert all(s.values is not None and s.values.shape[1] == 2 for s in freezer._layers)
        if step == 3:
            snapshots = [m.lora_B.detach().clone() for m in (model[0], model[1])]
            state = freezer.state_dict()
    assert freezer.done
    assert all(s.values is None for s in freezer._layers)           # no copy kept
    for layer, snap in zip((model[0], model[1]), snapshots):
        assert torch.equal(layer.lora_B, snap)                      # B never moved again
        assert not layer.lora_B.requires_grad
    assert all(torch.equal(state["frozen"][n], snap) for n, snap in zip(("0", "1"), snapshots))
    assert all(torch.equal(v, s) for v, s in zip(freezer.state_dict()["frozen"].values(), snapshots))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _model(n, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(300, 260 + 16 * (i % 3)) for i in range(n)])   # Krylov, not full SVD


def test_parallel_set_up_matches_one_thread_and_restores_torch_threads():
    """With torch on 2 threads, inject builds LaMDA layers on 2 worker threads of one torch
    thread each: the same adapters, bit for bit, as one layer at a time on one thread; module
    order kept; torch's thread count restored."""
    cfg = fastpeft.AdapterConfig(method="lamda", r=8, target_modules="all-linear")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastpeft.inject(_model(6), cfg)
        ref = [fastpeft.svd.top_singular_triplets(m.weight.detach(), 8) for m in _model(6)]
        torch.set_num_threads(2)
        two = fastpeft.inject(_model(6), cfg)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for a, b, (u, _, vh) in zip(one, two, ref):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
        assert torch.equal(b.lora_A, vh) and torch.equal(b.lora_B, u)      # in module order


def test_parallel_build_raises_the_first_error_in_order():
    from fastpeft.inject import _build_layers

    def build(i):
        time.sleep(0.01 * (5 - i))           # later items finish first
        if i in (2, 4):
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 2"):
        _build_layers(build, list(range(6)), "test", workers=2)
    assert _build_layers(lambda i: i * i, list(range(6)), "test", workers=2) == [i * i for i in range(6)]


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_bar_only_when_the_set_up_takes_over_a_second(monkeypatch, workers):
    pytest.importorskip("tqdm")
    from fastpeft.inject import _build_layers

    for pause, shown in ((0.0, False), (0.35, True)):
        err = _Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        _build_layers(lambda i: time.sleep(pause), list(range(8)), "fastpeft.inject (lamda)", workers)
        assert ("fastpeft.inject (lamda)" in err.getvalue()) == shown


_RSS_SCRIPT = r"""
import ctypes, gc, torch, torch.nn as nn, fastpeft
def rss():
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 2**10
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(1024, 1024) if i % 3 else nn.Linear(1024, 2048) for i in range(24)])
cfg = fastpeft.AdapterConfig(method="lamda", r=16, target_modules="all-linear")
fastpeft.inject(nn.Sequential(nn.Linear(512, 512)), cfg)          # torch's lazily built state
before = rss()
model = fastpeft.inject(model, cfg)
grown = rss() - before
adapters = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n) / 2**20
print(grown, adapters)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc, glibc malloc_trim")
def test_inject_keeps_no_memory_beyond_the_adapters():
    """RSS after inject (the C heap's free pages returned) grows by the adapters and a few MiB
    of fixed overhead, not by anything of a weight's size (4-8 MiB per layer here)."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    grown, adapters = map(float, out.stdout.split())
    assert adapters > 3
    assert grown < adapters + 12, (grown, adapters)


def test_lamda_setup_bench_writes_its_row(tmp_path):
    pytest.importorskip("transformers")
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "lamda_setup", os.path.join(os.path.dirname(__file__), "..", "bench", "lamda_setup.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--layers", "1", "--r", "4", "--threads", "1", "--out", str(tmp_path), "--label", "t"]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("lamda-setup-cpu-") and "-t-" in path.name
    row = json.loads(path.read_text())["rows"][0]
    assert row["layers"] == 16 and row["cpu_s"] > 0 and row["wall_s"] > 0 and row["adapter_mib"] > 0

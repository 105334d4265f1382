"""The ``fastpeft`` command: bench and memory on CPU, result files, plots, flags, skipped providers,
and the memory claim (what the adapters add to the frozen base model's saved activations)."""

import contextlib
import csv
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from fastpeft.cli import main

META_FIELDS = {"device", "device_name", "timestamp", "torch", "triton", "peft", "transformers",
               "bitsandbytes", "fastpeft", "python", "git_commit"}
BENCH_FIELDS = {"op", "provider", "status", "reason", "mode", "M", "k", "d", "r", "dtype", "ms",
                "ms_q20", "ms_q80", "ratio", "tflops", "gbps", "saved_bytes"}
MEMORY_FIELDS = {"method", "batch", "seq", "status", "reason", "saved_bytes", "base_saved_bytes",
                 "added_bytes", "param_bytes", "grad_bytes", "optim_bytes", "total_bytes",
                 "tokens_per_s", "trainable"}


def _one(folder, pattern):
    paths = glob.glob(os.path.join(folder, pattern))
    assert len(paths) == 1, (pattern, os.listdir(folder))
    return paths[0]


def _check_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100 and len(data) > 5000, (path, width, height, len(data))


def _load(folder, kind):
    data = json.load(open(_one(folder, f"{kind}-*.json")))
    with open(_one(folder, f"{kind}-*.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    return data, table


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    assert main(["bench", "--quick", "--out", out, "--plot", "--threads", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("memory"))
    assert main(["memory", "--preset", "tiny", "--out", out, "--plot", "--threads", "1",
                 "--no-progress", "--steps", "1"]) == 0
    return out


def test_bench_quick_writes_json_csv_and_table(bench_dir, capsys):
    data, table = _load(bench_dir, "bench")
    assert META_FIELDS <= set(data["meta"]) and data["meta"]["device"] == "cpu"
    rows = data["rows"]
    assert rows and all(BENCH_FIELDS <= set(r) or r["status"] != "ok" for r in rows)
    ok = {(r["provider"], r["mode"]) for r in rows if r["status"] == "ok"}
    for provider in ("torch-linear", "peft-lora", "fastpeft-torch"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert (provider, mode) in ok
    for r in rows:
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["ms_q20"] <= r["ms"] * 1.0001 and r["ms_q80"] >= r["ms"] * 0.9999
            assert r["tflops"] > 0 and r["gbps"] > 0 and r["ratio"] > 0
            # the process's CPU time beside the wall time (a CPU run)
            assert r["cpu_ms"] > 0 and r["cpu_q20"] <= r["cpu_ms"] * 1.0001 <= r["cpu_q80"] * 1.0002
            assert r["cpu_ratio"] > 0
            if r["provider"] == "torch-linear":
                assert r["ratio"] == 1.0 and r["cpu_ratio"] == 1.0
    # without a GPU the kernels are skipped rows with the reason, not dropped
    triton = [r for r in rows if r["provider"] == "fastpeft-triton"]
    assert triton and all(r["status"] == "skipped" and r["reason"] == "no GPU" for r in triton)
    assert len(table) == len(rows) and META_FIELDS | BENCH_FIELDS <= set(table[0])
    assert {row["device_name"] for row in table} == {data["meta"]["device_name"]}


def test_bench_plots_are_pngs(bench_dir):
    for name in ("time_vs_M", "time_vs_r", "ratio"):
        _check_png(_one(bench_dir, f"bench-*-{name}.png"))


def test_memory_tiny_writes_json_csv_and_plot(memory_dir):
    data, table = _load(memory_dir, "memory")
    assert META_FIELDS <= set(data["meta"])
    assert data["settings"]["r"] == 16 and data["settings"]["dropout"] == 0.1
    assert len(data["settings"]["targets"]) == 7
    rows = data["rows"]
    methods = {r["method"] for r in rows if r["status"] == "ok"}
    assert {"base", "peft-lora", "fastpeft-lora", "fastpeft-lora_fa", "fastpeft-lamda"} <= methods
    assert all(MEMORY_FIELDS <= set(r) for r in rows if r["status"] == "ok")
    assert len({(r["batch"], r["seq"]) for r in rows}) >= 4     # several batch sizes and lengths
    for r in rows:
        if r["status"] == "ok":
            assert r["total_bytes"] == r["saved_bytes"] + r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]
            assert r["tokens_per_s"] > 0
    assert len(table) == len(rows)
    _check_png(_one(memory_dir, "memory-*.png"))


def test_memory_claim_adapters_added_bytes(memory_dir):
    """All seven projections at r=16, dropout 0.1: fastpeft lamda adds at most 1/20 of the bytes HF
    PEFT LoRA adds to the base model's saved activations, and fastpeft lora at most 0.6× of it;
    fastpeft dora at most 0.5× of what HF PEFT DoRA adds."""
    rows = json.load(open(_one(memory_dir, "memory-*.json")))["rows"]
    added = {(r["method"], r["batch"], r["seq"]): r["added_bytes"] for r in rows if r["status"] == "ok"}
    points = {(b, s) for (m, b, s) in added if m == "peft-lora"}
    assert len(points) >= 4
    for b, s in sorted(points):
        peft = added[("peft-lora", b, s)]
        assert peft > 0
        assert added[("base", b, s)] == 0
        assert added[("fastpeft-lamda", b, s)] <= peft / 20, (b, s, added[("fastpeft-lamda", b, s)], peft)
        assert added[("fastpeft-lora_fa", b, s)] <= peft / 20, (b, s)
        assert added[("fastpeft-lora", b, s)] <= 0.6 * peft, (b, s, added[("fastpeft-lora", b, s)], peft)
        # DoRA: the bytes fastpeft's DoRA adds are at most half of what HF PEFT's DoRA adds
        peft_dora, ours = added[("peft-dora", b, s)], added[("fastpeft-dora", b, s)]
        assert 0 < ours <= 0.5 * peft_dora, (b, s, ours, peft_dora)


def test_memory_added_bytes_match_the_contract(memory_dir):
    """The measured bytes against SPEC section 3 for the tiny preset (fp32, h=256, i=688, 2 blocks,
    r=16), each distinct storage counted once:

    - lamda (A frozen) adds T [M, r] per projection and nothing of size M × k (an eager call keeps
      its dropout seed as a Python int on the autograd node: no seed tensor is saved);
    - lora (A trainable) adds the same, plus a reference to each projection's input X where the base
      does not already save that storage. q/k/v share one input (the attention norm's output) and
      gate/up another (the MLP norm's output); the base saves neither (a frozen weight's matmul
      keeps only the weight). down's input (act(gate)·up) is a fresh product the base does not
      save. o's input is the output of scaled_dot_product_attention, which the base already saves
      for the attention's own backward, so referencing it adds nothing: 2h + i per token per block.
    """
    rows = json.load(open(_one(memory_dir, "memory-*.json")))["rows"]
    by = {(r["method"], r["batch"], r["seq"]): r for r in rows if r["status"] == "ok"}
    assert {r["attention"] for r in by.values()} == {"sdpa"}
    h, i, r, layers, e, seed = 256, 688, 16, 2, 4, 0
    checked = 0
    for (method, b, s), row in by.items():
        tokens = b * s
        per_projection = tokens * r * e + seed
        if method == "fastpeft-lamda":
            assert row["added_bytes"] == layers * 7 * per_projection, (b, s)
            checked += 1
        if method == "fastpeft-lora":
            inputs = tokens * (h + h + i) * e       # q/k/v input, gate/up input, down input
            assert row["added_bytes"] == layers * (7 * per_projection + inputs), (b, s)
            checked += 1
    assert checked >= 8


def test_missing_providers_are_skipped_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)           # import peft -> ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    out = str(tmp_path)
    assert main(["bench", "--shapes", "64x48", "--M", "16", "--r", "8", "--modes", "fwd", "--out", out,
                 "--no-progress", "--threads", "1",
                 "--providers", "torch-linear,peft-lora,fastpeft-torch,bnb-4bit+peft-lora"]) == 0
    printed = capsys.readouterr().out
    rows = json.load(open(_one(out, "bench-*.json")))["rows"]
    status = {(r["provider"], r["op"]): (r["status"], r["reason"]) for r in rows}
    assert status[("peft-lora", "dense")][0] == "skipped" and "peft" in status[("peft-lora", "dense")][1]
    assert status[("bnb-4bit+peft-lora", "4bit")][0] == "skipped"
    assert "bitsandbytes" in status[("bnb-4bit+peft-lora", "4bit")][1]
    assert status[("fastpeft-torch", "dense")][0] == "ok"
    assert "skipped: peft-lora: peft is not installed" in printed

    assert main(["memory", "--preset", "tiny", "--batch-sizes", "1", "--seq-lens", "16", "--out", out,
                 "--methods", "peft-lora,fastpeft-lamda,peft-qlora", "--no-progress", "--threads", "1",
                 "--steps", "1"]) == 0
    rows = json.load(open(_one(out, "memory-*.json")))["rows"]
    status = {r["method"]: (r["status"], r["reason"]) for r in rows}
    assert status["peft-lora"][0] == "skipped" and "peft" in status["peft-lora"][1]
    assert status["base-4bit"][0] == "skipped" and "bitsandbytes" in status["base-4bit"][1]
    assert status["fastpeft-lamda"][0] == "ok" and status["base"][0] == "ok"



def test_provider_scope_holds_through_backward(monkeypatch):
    """A provider's scope (the buffered 4-bit provider sets its environment there) is active in
    every forward and every backward the harness runs, the memory probe's included."""
    from fastpeft.benchmark import lowrank as bench_lowrank
    from fastpeft.benchmark.providers import Built, Case, Provider

    inside, seen = [False], []

    @contextlib.contextmanager
    def scope():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", inside[0]))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", inside[0]))
            return g * 2

    provider = Provider("probe", "dense", lambda case, device: Built(Probe.apply, [], [], scope))
    rows = bench_lowrank.measure(provider, Case("dense", 4, 8, 8, 2, torch.float32), torch.device("cpu"),
                                 quick=True)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert {kind for kind, _ in seen} == {"fwd", "bwd"} and all(flag for _, flag in seen)
    assert not inside[0]


def test_buffered_4bit_provider_skips_without_a_gpu_and_at_decode_sizes(monkeypatch):
    from fastpeft.benchmark.providers import PROVIDERS, Case
    from fastpeft.benchmark.runner import Skip
    from fastpeft.kernels import lowrank_4bit

    provider = next(p for p in PROVIDERS if p.name == "fastpeft-4bit-triton-buffered")
    monkeypatch.delenv(lowrank_4bit.BUFFER_MIN_M_ENV, raising=False)
    with pytest.raises(Skip, match="no GPU"):
        provider.build(Case("4bit", 32, 64, 48, 8, torch.float32), torch.device("cpu"))
    device = type("Device", (), {"type": "cuda"})()     # past the GPU check, then the M check
    with pytest.raises(Skip, match="M > 16"):
        provider.build(Case("4bit", 16, 64, 48, 8, torch.float32), device)


def test_bench_decode_rows_eager_and_graph_skipped_on_cpu(tmp_path, capsys):
    """--op 4bit at M = 1 and 32 with the decode modes: eager decode rows (no dropout, ratio to the
    floor's decode row) at M = 1 only; the graph rows are skipped rows saying why; the training
    mode still runs at both M."""
    out = str(tmp_path)
    assert main(["bench", "--op", "4bit", "--shapes", "64x48", "--M", "1,32", "--r", "8", "--quick",
                 "--modes", "fwd,decode,decode-graph", "--providers", "fastpeft-4bit-torch,fastpeft-4bit-cuda",
                 "--out", out, "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    rows = json.load(open(_one(out, "bench-*.json")))["rows"]
    by = {(r["provider"], r["M"], r["mode"]): r for r in rows}
    for provider in ("torch-linear", "fastpeft-4bit-torch"):
        decode = by[(provider, 1, "decode")]
        assert decode["status"] == "ok" and decode["ms"] > 0 and decode["ratio"] > 0
        graph = by[(provider, 1, "decode-graph")]
        assert graph["status"] == "skipped" and "CUDA graphs need a GPU" in graph["reason"]
        assert (provider, 32, "decode") not in by and (provider, 32, "decode-graph") not in by
        assert by[(provider, 32, "fwd")]["status"] == "ok"
    assert by[("fastpeft-4bit-torch", 1, "decode")]["dropout"] == 0.0
    assert by[("fastpeft-4bit-torch", 1, "fwd")]["dropout"] == 0.1
    assert by[("torch-linear", 1, "decode")]["ratio"] == 1.0
    assert all(r["status"] == "skipped" and r["reason"] == "no GPU" for r in rows if r["provider"] == "fastpeft-4bit-cuda")
    assert "CUDA graphs need a GPU" in printed
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--op", "4bit", "--M", "32", "--modes", "decode", "--out", out])
    assert exc.value.code == 2 and "M <= 16" in capsys.readouterr().err


def test_decode_modes_run_without_grad_and_replay_captured_graphs(monkeypatch):
    """decode calls the forward without grad; decode-graph (CUDA mocked) warms up on a side stream
    before any capture, captures one graph per input set (without grad, sharing one memory pool)
    and replays them in turn."""
    from fastpeft.benchmark import lowrank as bench_lowrank
    from fastpeft.benchmark.providers import Built

    calls, events = [], []
    built = Built(lambda x: calls.append((x.shape[0], torch.is_grad_enabled())))
    sets = [(torch.randn(i + 1, 4, requires_grad=True), None) for i in range(3)]
    step = bench_lowrank.decode_function(built, sets, "decode", torch.device("cpu"))
    for _ in range(4):
        step()
    assert calls == [(1, False), (2, False), (3, False), (1, False)]
    with pytest.raises(bench_lowrank.Skip, match="CUDA graphs need a GPU"):
        bench_lowrank.decode_function(built, sets, "decode-graph", torch.device("cpu"))

    class Stream:
        def __init__(self, device=None):
            events.append("stream")

        def wait_stream(self, other):
            pass

    class Graph:
        count = 0

        def __init__(self):
            Graph.count += 1
            self.id = Graph.count

        def pool(self):
            return ("pool", 1)

        def replay(self):
            events.append(("replay", self.id))

    @contextlib.contextmanager
    def capture(graph, pool=None):
        events.append(("capture", graph.id, pool, len(calls)))
        yield
        events.append("captured")

    fake = type("cuda", (), dict(Stream=Stream, CUDAGraph=Graph, graph=staticmethod(capture),
                                 current_stream=staticmethod(lambda device=None: Stream()),
                                 stream=staticmethod(lambda s: contextlib.nullcontext())))
    monkeypatch.setattr(bench_lowrank.torch, "cuda", fake)
    calls.clear()
    replay = bench_lowrank.decode_function(built, sets, "decode-graph", type("D", (), {"type": "cuda"})())
    warm, captured = calls[:9], calls[9:]
    assert [c[0] for c in warm] == [1, 2, 3] * 3 and all(not grad for _, grad in warm)
    assert captured == [(1, False), (2, False), (3, False)]
    captures = [e for e in events if isinstance(e, tuple) and e[0] == "capture"]
    assert [c[2] for c in captures] == [None, ("pool", 1), ("pool", 1)]
    assert [c[3] for c in captures] == [9, 10, 11]     # every warm-up call before the first capture
    n = len(calls)
    for _ in range(4):
        replay()
    assert len(calls) == n                       # replays run no Python forward
    assert [e for e in events if isinstance(e, tuple) and e[0] == "replay"] == \
        [("replay", 1), ("replay", 2), ("replay", 3), ("replay", 1)]


README = ("# title\n\nintro\n\n## Results\n\n<!-- results:start -->\nstale\n<!-- results:end -->\n\n"
          "## Licence\n\ntail\n")


def test_report_rewrites_only_the_marked_section(bench_dir, memory_dir, tmp_path, capsys):
    import shutil

    results = str(tmp_path / "results")      # beside the README: the plots are linked relative to it
    for folder in (bench_dir, memory_dir):
        shutil.copytree(folder, results, dirs_exist_ok=True)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    # a quick CPU run on a shared machine may well be noisy: shown, flagged
    assert main(["report", "--results", results, "--readme", str(readme), "--allow-noisy"]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n## Results\n\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\n\n## Licence\n\ntail\n") and "stale" not in text
    section = text[text.index("<!-- results:start -->"):]
    bench = json.load(open(_one(results, "bench-*.json")))
    memory = json.load(open(_one(results, "memory-*.json")))
    for data in (bench, memory):
        meta = data["meta"]
        assert meta["device_name"] in section and meta["timestamp"][:10] in section
        assert f"torch {meta['torch']}" in section and f"peft {meta['peft']}" in section
    assert section.count("CPU timings, not kernel speed") == 2 and "**CPU numbers.**" in section
    # every timing shown is one the harness wrote: "ms (ratio x)" cells of the dense table
    measured = {f"{r['ms']:.4g}" for r in bench["rows"] if r["status"] == "ok"}
    dense = section[section.index("Dense base weight"):section.index("4-bit (NF4) base weight")]
    cells = [c.strip() for line in dense.splitlines()[4:] if line.startswith("|")
             for c in line.strip("|").split("|")[4:]]
    assert cells and all(c.split(" ")[0] in measured for c in cells if c != "-"), cells
    assert "`fastpeft-triton` (skipped: no GPU)" in section
    lamda = next(r for r in memory["rows"] if r["method"] == "fastpeft-lamda" and r["batch"] == 4
                 and r["seq"] == 128)
    assert f"| fastpeft-lamda | {lamda['trainable']:,} | {lamda['saved_mib']:.4g} |" in section
    for name in ("time_vs_M", "time_vs_r", "ratio"):
        assert f"](results/{os.path.basename(_one(results, f'bench-*-{name}.png'))})" in section
    assert f"](results/{os.path.basename(_one(results, 'memory-*.png'))})" in section
    # the text depends on the files alone: a second run changes nothing, --check agrees
    capsys.readouterr()
    assert main(["report", "--results", results, "--readme", str(readme), "--allow-noisy"]) == 0
    assert readme.read_text() == text and "unchanged" in capsys.readouterr().out
    assert main(["report", "--results", results, "--readme", str(readme), "--check", "--allow-noisy"]) == 0
    readme.write_text(text.replace("fastpeft-lamda", "fastpeft-lambda"))
    assert main(["report", "--results", results, "--readme", str(readme), "--check", "--allow-noisy"]) == 1


def test_report_without_markers_prints_the_section(bench_dir, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no section here\n")
    assert main(["report", "--results", bench_dir, "--readme", str(readme), "--allow-noisy"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("<!-- results:start -->") and out.rstrip().endswith("<!-- results:end -->")
    assert "Layer microbenchmark" in out and "<!-- results:start -->" in err
    assert readme.read_text() == "# no section here\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--results", str(empty), "--readme", str(readme)]) == 0
    assert "No results yet" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["bench", "--bogus"], "unrecognized arguments"),
    (["bench", "--M", "0"], "--M"),
    (["bench", "--M", "x,1"], "--M"),
    (["bench", "--shapes", "64by48"], "KxD"),
    (["bench", "--providers", "nope"], "nope"),
    (["bench", "--dropout", "1.5"], "--dropout"),
    (["memory", "--preset", "huge"], "invalid choice"),
    (["memory", "--methods", "fastpeft-nope"], "fastpeft-nope"),
    (["memory", "--model", "/no/such/folder"], "/no/such/folder"),
    (["memory", "--r", "0"], "--r"),
    (["report", "--bogus"], "unrecognized"),
    (["report", "--results", "/no/such/folder"], "--results"),
    (["report", "--readme", "/no/such/README.md"], "--readme"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_bad_flags_exit_nonzero_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err


def test_module_entry_point_and_bad_flag():
    proc = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--quik"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr and "--quik" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fastpeft", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert all(cmd in proc.stdout for cmd in ("demo", "bench", "memory", "report"))


def test_demo_delegates_its_arguments(monkeypatch):
    import fastpeft.demo

    seen = []
    monkeypatch.setattr(fastpeft.demo, "main", lambda argv=None: seen.append(argv) or 0)
    assert main(["demo", "--steps", "3", "--r", "4"]) == 0
    assert seen == [["--steps", "3", "--r", "4"]]


def test_threads_flag_and_progress_bar(tmp_path, capsys):
    before = torch.get_num_threads()
    assert main(["bench", "--shapes", "32x32", "--M", "4", "--r", "4", "--modes", "fwd", "--op", "dense",
                 "--providers", "torch-linear", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert torch.get_num_threads() == before
    assert "fastpeft bench" in capsys.readouterr().err      # the tqdm bar, on stderr


def test_gpu_script_parses_and_rejects_bad_options():
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--bogus" in proc.stderr
    proc = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "RESULTS_DIR" in proc.stdout


def test_sanitize_program_runs_every_kernel_under_the_interpreter():
    """bench/sanitize.py (the program compute-sanitizer runs on a GPU) passes interpreted, at its
    smoke shapes, against float64; and refuses CPU tensors without the interpreter."""
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "sanitize.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, script, "--smoke", "--device", "cpu", "--dtypes", "fp32"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert len(lines) == 18 and all(ln.startswith("ok") for ln in lines), proc.stdout
    assert {"dense", "group", "4bit-nf4", "4bit-fp4"} <= {ln.split()[1] for ln in lines}
    assert sum("(buffer)" in ln for ln in lines) == 2
    env.pop("TRITON_INTERPRET")
    proc = subprocess.run([sys.executable, script, "--smoke", "--device", "cpu"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["bench", "--shapes", "100000000x100000000"], "choose a smaller --shapes or --M"),
    (["memory", "--batch-sizes", "1000000"], "choose a smaller --batch-sizes or --seq-lens"),
    (["bench", "--out", "/proc/no-such-folder"], "is not a writable folder"),
], ids=["bench-huge-shape", "memory-huge-batch", "bench-unwritable-out"])
def test_refused_before_the_run(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not list(tmp_path.rglob("*.json"))      # nothing ran, nothing written


def test_help_is_plain_text_and_lists_commands_once(capsys):
    for argv in (["--help"], ["bench", "--help"], ["memory", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out
        if argv == ["--help"]:
            assert out.count("regenerate the README") == 1


def test_every_flag_has_help_text():
    import argparse

    from fastpeft.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            assert action.help, f"fastpeft {name} {action.option_strings} has no help text"


def test_demo_flags_refused_up_front(capsys):
    from fastpeft import demo
    for argv, message in ((["--dropout", "5"], "--dropout must be in [0, 1)"), (["--lr", "0"], "--lr"),
                          (["--json", "/proc/x/y.json"], "writable")):
        with pytest.raises(SystemExit) as exc:
            demo.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err

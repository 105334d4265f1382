"""``auto``'s dispatch table: the shipped file, M buckets, the static prediction, the lookup for
CUDA problems (a fake device and arch: no GPU needed), damaged tables, and
``fastpeft bench --update-dispatch`` from GPU results (refused for CPU results)."""

import json
import os
import warnings

import pytest
import torch

from fastpeft import _backend, _dispatch
from fastpeft.cli import main
from fastpeft.ops.lowrank import OP_NAME

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda", 0)   # never touched: only its type and index are read


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A table path of its own (via the environment variable), the GPU faked as sm_90."""
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv(_dispatch.TABLE_ENV, str(path))
    monkeypatch.setattr(_dispatch, "device_arch", lambda device: "sm_90")
    _dispatch.clear_cache()
    yield path
    _dispatch.clear_cache()


def _row(backend_fwd, backend_train=None, **key):
    row = dict(op="dense", arch="sm_90", dtype="bfloat16", M_bucket=4096, k=4096, d=4096, r=16, dropout=True)
    row.update(key)
    row["fwd"] = {"triton_ms": [1.0], "torch_ms": [1.0], "backend": backend_fwd}
    if backend_train:
        row["fwd+bwd"] = {"triton_ms": [3.0], "torch_ms": [3.0], "backend": backend_train}
    return row


def _write(path, rows):
    path.write_text(json.dumps({"format": 1, "about": ["test"], "rows": rows}))
    _dispatch.clear_cache()


def _problem(M=4096, k=4096, d=4096, r=16, dropout_p=0.1, dtype=torch.bfloat16, grad=True):
    return dict(M=M, k=k, d=d, r=r, dropout_p=dropout_p, dtype=dtype, grad=grad)


def _auto(problem):
    pytest.importorskip("triton")
    return _backend.resolve_backend(OP_NAME, CUDA, "auto", problem)


def test_shipped_table_is_valid_and_packaged():
    data, lookup = _dispatch.read_table(_dispatch.DEFAULT_TABLE)
    assert data["format"] == _dispatch.FORMAT and any("static prediction" in line for line in data["about"])
    assert isinstance(lookup, dict)
    pyproject = open(os.path.join(REPO, "pyproject.toml")).read()
    assert 'fastpeft = ["dispatch.json"]' in pyproject


@pytest.mark.parametrize("M,bucket", [(1, 16), (16, 16), (17, 64), (256, 256), (1024, 1024), (1025, 4096),
                                      (4096, 4096), (8192, 16384), (16384, 16384), (16385, "inf")])
def test_m_buckets(M, bucket):
    assert _dispatch.m_bucket(M) == bucket


@pytest.mark.parametrize("M,dropout_p,grad,want", [
    (1, 0.1, True, "torch"), (256, 0.1, True, "torch"), (1024, 0.1, True, "torch"),
    (1025, 0.1, True, "triton"), (8192, 0.0, True, "triton"), (8192, 0.1, False, "triton"),
    (8192, 0.0, False, "torch"), (100000, 0.0, False, "torch"), (100000, 0.1, False, "triton"),
])
def test_static_prediction(table, monkeypatch, M, dropout_p, grad, want):
    # fp32 on sm_90 (no TMA forward) and bf16 on sm_80 predict alike
    _write(table, [])
    for arch, dtype in (("sm_90", torch.float32), ("sm_80", torch.bfloat16)):
        problem = _problem(M=M, dropout_p=dropout_p, grad=grad, dtype=dtype)
        assert _dispatch.static_choice(problem, arch) == want
        monkeypatch.setattr(_dispatch, "device_arch", lambda device: arch)
        _dispatch.clear_cache()
        assert _auto(problem) == want   # no row: auto follows it


@pytest.mark.parametrize("arch,dtype,k,d,want", [
    ("sm_90", torch.bfloat16, 4096, 4096, "triton"), ("sm_90", torch.float16, 4096, 1024, "triton"),
    ("sm_90", torch.float32, 4096, 4096, "torch"), ("sm_90", torch.bfloat16, 4095, 4096, "torch"),
    ("sm_90", torch.bfloat16, 4096, 4100, "torch"), ("sm_80", torch.bfloat16, 4096, 4096, "torch"),
    (None, torch.bfloat16, 4096, 4096, "torch"),
])
def test_static_prediction_forward_only_follows_the_main_loop(table, monkeypatch, arch, dtype, k, d, want):
    # forward only, no dropout, M > 1024: fused only where the TMA forward GEMM runs (sm_90, 16-bit,
    # 16-byte rows); its prediction (1.05-1.10x F.linear) is below the composed path's 1.15-1.21x
    _write(table, [])
    problem = _problem(M=8192, k=k, d=d, dtype=dtype, dropout_p=0.0, grad=False)
    assert _dispatch.static_choice(problem, arch) == want
    assert _dispatch.static_choice(_problem(M=1024, k=k, d=d, dtype=dtype, dropout_p=0.0, grad=False),
                                   arch) == "torch"
    if arch is not None:
        monkeypatch.setattr(_dispatch, "device_arch", lambda device: arch)
        assert _auto(problem) == want


def test_measured_rows_override_the_prediction(table):
    # static says triton at M = 4096 with dropout; the row measured triton slower
    _write(table, [_row("torch", "torch"), _row("triton", M_bucket=256)])
    assert _auto(_problem(M=4096)) == "torch"
    assert _auto(_problem(M=2000)) == "torch"                      # same bucket, same row
    assert _auto(_problem(M=256)) == "triton"                      # static would say torch
    assert _auto(_problem(M=200, grad=False)) == "triton"
    # every other key field is part of the key: the prediction again
    assert _auto(_problem(M=4096, r=8)) == "triton"
    assert _auto(_problem(M=4096, k=4095)) == "triton"
    assert _auto(_problem(M=4096, dtype=torch.float16)) == "triton"
    assert _auto(_problem(M=256, dropout_p=0.0)) == "torch"
    assert _auto(_problem(M=16384)) == "triton"


def test_mode_of_the_call_picks_the_entry(table):
    _write(table, [_row("torch", "triton", dropout=False)])
    assert _auto(_problem(dropout_p=0.0, grad=True)) == "triton"
    assert _auto(_problem(dropout_p=0.0, grad=False)) == "torch"
    _write(table, [_row("triton", dropout=False)])                 # only fwd measured: used for training too
    assert _auto(_problem(dropout_p=0.0, grad=True)) == "triton"


def test_arch_is_part_of_the_key(table, monkeypatch):
    _write(table, [_row("torch", "torch")])
    assert _auto(_problem()) == "torch"
    monkeypatch.setattr(_dispatch, "device_arch", lambda device: "sm_80")
    assert _auto(_problem()) == "torch"                            # the choice is remembered ...
    _dispatch.clear_cache()
    assert _auto(_problem()) == "triton"                           # ... until the cache is cleared


def test_cpu_tensors_and_other_ops_never_consult_the_table(table):
    table.write_text("not json")
    _dispatch.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve_backend(OP_NAME, torch.device("cpu"), "auto", _problem()) == "torch"
        # an explicit backend is never overridden
        assert _backend.resolve_backend(OP_NAME, torch.device("cpu"), "torch", _problem()) == "torch"


@pytest.mark.parametrize("text,fault", [
    ("{", "not valid JSON"),
    ('{"format": 2, "rows": []}', "format must be 1"),
    ('{"format": 1, "rows": {}}', "rows must be a list"),
    ('{"format": 1, "rows": [{"op": "dense"}]}', "rows[0] lacks arch"),
    (json.dumps({"format": 1, "rows": [{**_row("torch"), "M_bucket": 100}]}), "M_bucket must be one of"),
    (json.dumps({"format": 1, "rows": [{**_row("torch"), "fwd": {"backend": "cuda"}}]}), "backend is one of"),
    (json.dumps({"format": 1, "rows": [_row("torch"), _row("triton")]}), "repeats the problem"),
])
def test_damaged_table_warns_once_and_follows_the_prediction(table, text, fault):
    table.write_text(text)
    _dispatch.clear_cache()
    with pytest.warns(RuntimeWarning, match="static prediction") as caught:
        assert _auto(_problem(M=4096)) == "triton"
    assert str(table) in str(caught[0].message) and fault in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # once: cached
        assert _auto(_problem(M=64)) == "torch"


def test_missing_table_warns(table):
    _dispatch.clear_cache()
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert _auto(_problem(M=64)) == "torch"


# -- fastpeft bench --update-dispatch ---------------------------------------------------------------

def _results(tmp_path, device="cuda", arch="sm_90", times=None, name="bench-gpu.json"):
    """A bench results file: {(M, r, dropout): {(provider, mode): ms}}."""
    rows = []
    for (M, r, dropout), by_provider in (times or {}).items():
        for (provider, mode), ms in by_provider.items():
            rows.append(dict(op="dense", provider=provider, method="lora", dtype="bfloat16", M=M, k=4096,
                             d=4096, shape="4096x4096", r=r, dropout=dropout, mode=mode, status="ok",
                             reason=None, ms=ms))
    rows.append(dict(op="dense", provider="fastpeft-cuda", method="lora", dtype="bfloat16", M=16, k=4096,
                     d=4096, r=16, dropout=0.1, mode="fwd", status="skipped", reason="no extension"))
    meta = dict(device=device, device_name="NVIDIA H200" if device == "cuda" else "CPU x", arch=arch,
                timestamp="2026-12-02T03:00:00Z", git_commit="abc")
    path = tmp_path / name
    path.write_text(json.dumps({"kind": "bench", "meta": meta, "args": {"method": "lora"}, "rows": rows}))
    return path


def _times(triton_fwd, torch_fwd, triton_train, torch_train):
    return {("fastpeft-triton", "fwd"): triton_fwd, ("fastpeft-torch", "fwd"): torch_fwd,
            ("fastpeft-triton", "fwd+bwd"): triton_train, ("fastpeft-torch", "fwd+bwd"): torch_train,
            ("torch-linear", "fwd"): 0.1}


def test_update_dispatch_writes_rows_and_auto_follows(table, tmp_path, capsys):
    _write(table, [_row("triton", "triton", arch="sm_80")])       # another GPU's row is kept
    results = _results(tmp_path, times={
        (1, 16, 0.1): _times(0.010, 0.020, 0.05, 0.06),           # triton faster at M = 1 ...
        (16, 16, 0.1): _times(0.030, 0.020, 0.05, 0.06),          # ... slower at M = 16: same bucket
        (4096, 16, 0.1): _times(0.40, 0.45, 1.1, 1.0),
        (4096, 64, 0.1): {("fastpeft-triton", "fwd"): 0.5, ("fastpeft-triton", "bwd"): 1.0,
                          ("fastpeft-torch", "fwd"): 0.6, ("fastpeft-torch", "bwd"): 0.8},
        (256, 16, 0.1): {("fastpeft-torch", "fwd"): 0.1},          # torch alone: no row
    })
    assert main(["bench", "--update-dispatch", str(results)]) == 0  # the table of the environment variable
    assert "3 problems" in capsys.readouterr().out
    data = json.loads(table.read_text())
    rows = {(r["arch"], r["M_bucket"], r["r"]): r for r in data["rows"]}
    assert set(rows) == {("sm_80", 4096, 16), ("sm_90", 16, 16), ("sm_90", 4096, 16), ("sm_90", 4096, 64)}
    small = rows[("sm_90", 16, 16)]
    assert small["M"] == [1, 16] and small["fwd"] == {"triton_ms": [0.010, 0.030], "torch_ms": [0.020, 0.020],
                                                      "backend": "torch"}
    assert small["fwd+bwd"]["backend"] == "triton" and small["device_name"] == "NVIDIA H200"
    assert small["method"] == "lora" and small["git_commit"] == "abc"
    assert rows[("sm_90", 4096, 16)]["fwd"]["backend"] == "triton"
    assert rows[("sm_90", 4096, 16)]["fwd+bwd"]["backend"] == "torch"
    assert rows[("sm_90", 4096, 64)]["fwd+bwd"] == {"triton_ms": [1.5], "torch_ms": [1.4], "backend": "torch"}
    assert small["source"] == "bench-gpu.json" and small["measured"] == "2026-12-02T03:00:00Z"
    # auto reads the new table at once
    assert _auto(_problem(M=4, grad=False)) == "torch"
    assert _auto(_problem(M=4, grad=True)) == "triton"
    assert _auto(_problem(M=4096, grad=True)) == "torch"
    assert _auto(_problem(M=4096, grad=False)) == "triton"
    # a second run replaces its problems' rows, keeps the rest
    again = _results(tmp_path, times={(4096, 16, 0.1): _times(0.40, 0.45, 0.9, 1.0)}, name="bench-gpu2.json")
    assert main(["bench", "--update-dispatch", str(again), "--dispatch-table", str(table)]) == 0
    rows = {(r["arch"], r["M_bucket"], r["r"]): r for r in json.loads(table.read_text())["rows"]}
    assert len(rows) == 4 and rows[("sm_90", 4096, 16)]["fwd+bwd"]["backend"] == "triton"
    assert _auto(_problem(M=4096, grad=True)) == "triton"


def test_update_dispatch_creates_a_missing_table(tmp_path, capsys):
    target = tmp_path / "sub" / "table.json"
    target.parent.mkdir()
    results = _results(tmp_path, times={(4096, 16, 0.0): _times(0.4, 0.5, 1.0, 1.2)})
    assert main(["bench", "--update-dispatch", str(results), "--dispatch-table", str(target)]) == 0
    data, lookup = _dispatch.read_table(str(target))
    assert len(lookup) == 1 and data["rows"][0]["dropout"] is False
    assert not any(line.startswith("No row has been measured") for line in data["about"])
    assert os.listdir(target.parent) == ["table.json"]


def _refused(argv, table, capsys, reason):
    before = table.read_bytes() if table.exists() else None
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert reason in err and "not changed" in err
    assert (table.read_bytes() if table.exists() else None) == before


def test_update_dispatch_refuses_cpu_results(table, tmp_path, capsys):
    _write(table, [_row("torch")])
    cpu = _results(tmp_path, device="cpu", arch=None, times={(4096, 16, 0.1): _times(0.4, 0.5, 1.0, 1.2)})
    _refused(["bench", "--update-dispatch", str(cpu)], table, capsys, "nothing measured on a GPU")
    committed = sorted(p for p in os.listdir(os.path.join(REPO, "bench", "results"))
                       if p.startswith("bench-cpu") and p.endswith(".json"))
    if committed:                                                 # a real CPU run of fastpeft bench
        path = os.path.join(REPO, "bench", "results", committed[-1])
        _refused(["bench", "--update-dispatch", path], table, capsys, "nothing measured on a GPU")


def test_update_dispatch_refuses_a_cpu_run_before_benchmarking(table, tmp_path, capsys):
    _write(table, [_row("torch")])
    _refused(["bench", "--update-dispatch", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"],
             table, capsys, "nothing measured on a GPU")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")   # nothing was benchmarked


def test_update_dispatch_refusals(table, tmp_path, capsys):
    times = {(4096, 16, 0.1): _times(0.4, 0.5, 1.0, 1.2)}
    _write(table, [_row("torch")])
    _refused(["bench", "--update-dispatch", str(_results(tmp_path, arch=None, times=times))], table, capsys,
             "do not name the GPU architecture")
    only_triton = {(4096, 16, 0.1): {("fastpeft-triton", "fwd"): 0.4}}
    _refused(["bench", "--update-dispatch", str(_results(tmp_path, times=only_triton))], table, capsys,
             "with both fastpeft-triton and fastpeft-torch")
    not_results = tmp_path / "x.json"
    not_results.write_text("[1, 2]")
    _refused(["bench", "--update-dispatch", str(not_results)], table, capsys, "not a fastpeft bench results file")
    table.write_text('{"format": 1, "rows": [{"op": 1}]}')        # a damaged table is not overwritten
    _refused(["bench", "--update-dispatch", str(_results(tmp_path, times=times))], table, capsys,
             "fix or delete it")


@pytest.mark.parametrize("argv,message", [
    (["--dispatch-table", "t.json"], "--dispatch-table goes with --update-dispatch"),
    (["--update-dispatch", "missing-results.json"], "no such results file"),
    (["--update-dispatch", "--op", "4bit"], "give --op dense"),
    (["--update-dispatch", "--providers", "fastpeft-triton"], "add fastpeft-torch to --providers"),
    (["--update-dispatch", "--modes", "bwd"], "needs the fwd or fwd+bwd mode"),
])
def test_update_dispatch_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_lowrank_linear_consults_the_table_on_cuda(table, monkeypatch):
    import fastpeft

    seen = []
    resolve = _backend.resolve_backend
    monkeypatch.setattr(_backend, "resolve_backend",
                        lambda *args, **kw: seen.append((kw.get("problem"), resolve(*args, **kw))) or seen[-1][1])
    monkeypatch.setattr(_dispatch, "device_arch", lambda device: "sm_test")
    # static: torch at M = 3000 without dropout or grad; the row says triton
    _write(table, [_row("triton", arch="sm_test", dtype="float32", M_bucket=4096, k=64, d=32, r=4, dropout=False)])
    x = torch.randn(2, 1500, 64, device="cuda")
    w, a, b = (torch.randn(*s, device="cuda") for s in ((32, 64), (4, 64), (32, 4)))
    y = fastpeft.lowrank_linear(x, w, None, a, b, scale=0.5)
    assert seen[-1] == (dict(M=3000, k=64, d=32, r=4, dropout_p=0.0, dtype=torch.float32, grad=False), "triton")
    want = x.double() @ w.double().t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    assert ((y.double() - want).norm() / want.norm()).item() < 1e-2
    fastpeft.lowrank_linear(x[:, :8], w, None, a, b, scale=0.5)
    assert seen[-1][1] == "torch"                                  # M = 16: the static prediction


def test_auto_provider_runs_on_gpus_only():
    from fastpeft.benchmark.providers import PROVIDERS, Case
    from fastpeft.benchmark.runner import Skip

    provider = {p.name: p for p in PROVIDERS}["fastpeft-auto"]
    case = Case("dense", 4, 8, 8, 2, torch.float32)
    if torch.cuda.is_available():
        built = provider.build(case, torch.device("cuda"))
        with built.scope():
            y = built.forward(torch.randn(4, 8, device="cuda"))
            assert y.shape == (4, 8) and _backend.get_backend() == "auto"
    else:
        with pytest.raises(Skip, match="no GPU"):
            provider.build(case, torch.device("cpu"))


def test_lookup_traces_under_torch_compile_fullgraph(table):
    """torch.compile(fullgraph=True) keeps the table's answer as a constant (the file is read while
    tracing, not traced) and guards on M's bucket."""
    _write(table, [_row("triton", M_bucket=16, k=4, d=8, r=2, dtype="float32", dropout=False)])

    def f(x):
        problem = dict(M=x.shape[0], k=4, d=8, r=2, dropout_p=0.0, dtype=x.dtype, grad=False)
        return x * (2.0 if _dispatch.choose(OP_NAME, CUDA, problem) == "triton" else 3.0)

    compiled = torch.compile(f, fullgraph=True, backend="eager", dynamic=True)
    assert compiled(torch.ones(9, 4))[0, 0] == 2.0        # the row (static would say torch)
    assert compiled(torch.ones(17, 4))[0, 0] == 3.0       # another bucket: the prediction
    assert compiled(torch.ones(5, 4))[0, 0] == 2.0

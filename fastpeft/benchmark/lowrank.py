"""``fastpeft bench``: the low-rank layer microbenchmark, every provider side by side.

For each case (shape ``k → d``, tokens ``M``, rank ``r``, dtype) and each provider of
:mod:`fastpeft.benchmark.providers`, times the training forward (autograd recording), the
backward (``y.backward(dy)`` on a retained graph) and both, on random data, with input sets
rotated so that together they exceed the last-level cache. At M ≤ 16 it also times decoding (the
forward without grad and without dropout) eagerly (``decode``: launch overhead and host time
included) and replayed from a CUDA graph (``decode-graph``: the kernels' own time; GPU only, a
skipped row on a CPU). Rows carry ms (median, 20/80 %
quantiles), the ratio to the floor (the base ``F.linear`` of the same shape), TFLOP/s, GB/s,
the bytes saved for backward and, on a GPU, the peak memory of one step.

Shapes (SPEC section 6): Llama-2-7B / Llama-3-8B projections, ``M`` swept at ``r = 16`` and
``r`` swept at ``M = 4096``. On a CPU the default set is the same projections scaled down 8×;
CPU timings are CPU timings, never kernel speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import sys
import time
from typing import Optional

import torch

from .providers import PROVIDERS, Built, Case, Provider, bytes_moved, flops
from .runner import (SavedBytes, Skip, add_common_arguments, cache_bytes, environment, fits_in_memory, format_table, num_threads,
                     progress, resolve_device, time_side_by_side, validate_common, write_results)

__all__ = ["LLAMA_SHAPES", "MODES", "DECODE_MODES", "add_arguments", "validate", "make_cases", "input_sets",
           "step_function", "decode_function", "measure", "measure_side_by_side", "run", "main_table", "case_bytes"]

LLAMA_SHAPES = [(4096, 4096), (4096, 1024), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]
CPU_SHAPES = [(512, 512), (512, 128), (512, 1376), (1376, 512)]
MODES = ("fwd", "bwd", "fwd+bwd")                 # training
DECODE_MODES = ("decode", "decode-graph")         # M <= DECODE_MAX_M, no grad, no dropout
DECODE_MAX_M = 16
GRAPH_SKIP = "CUDA graphs need a GPU: decode-graph is timed on CUDA devices only (the decode row is eager)"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# (shapes, M sweep, r sweep, M of the r sweep) per device and size
DEFAULTS = {
    ("cuda", False): (LLAMA_SHAPES, [1, 16, 256, 4096, 16384], [8, 16, 64, 128], 4096),
    ("cuda", True): ([(4096, 4096), (4096, 11008)], [16, 4096], [16, 64], 4096),
    ("cpu", False): (CPU_SHAPES, [1, 16, 256, 1024], [8, 16, 64], 256),
    ("cpu", True): ([(512, 512)], [16, 256], [8, 16], 256),
}
COLUMNS = [("op", "op"), ("M", "M"), ("shape", "k->d"), ("r", "r"), ("dtype", "dtype"),
           ("mode", "mode"), ("provider", "provider"), ("ms", "ms"), ("q20_q80", "q20-q80"),
           ("ratio", "x floor"), ("cpu_ms", "cpu ms"), ("cpu_ratio", "cpu x floor"), ("tflops", "TFLOP/s"),
           ("gbps", "GB/s")]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shape_list(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"shapes are KxD (in x out), e.g. 4096x11008; got {item!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def _choice_list(choices):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(choices)}")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastpeft bench`` flags."""
    from ..config import METHODS

    parser.add_argument("--quick", action="store_true", help="a small set (under a minute on a CPU)")
    from .mixed import PROVIDERS as MIXED_PROVIDERS

    parser.add_argument("--op", type=_choice_list(("dense", "4bit", "mixed")), default=["dense", "4bit"],
                        help="dense, 4bit or both (default); mixed (alone): several adapters in one batch")
    names = list(dict.fromkeys([p.name for p in PROVIDERS] + MIXED_PROVIDERS))
    parser.add_argument("--providers", type=_choice_list(names), default=None,
                        help="comma-separated subset of: " + ", ".join(p.name for p in PROVIDERS)
                        + "; with --op mixed: " + ", ".join(MIXED_PROVIDERS))
    parser.add_argument("--adapters", type=_int_list, default=None,
                        help="--op mixed: numbers of adapters in one batch (default 1,4,16,64)")
    parser.add_argument("--method", choices=sorted(m for m in METHODS if m != "bitfit"), default="lora",
                        help="fastpeft preset benchmarked (HF PEFT is always LoRA)")
    parser.add_argument("--shapes", type=_shape_list, default=None, help="KxD list, e.g. 4096x4096,4096x11008")
    parser.add_argument("--M", type=_int_list, default=None, help="tokens per call, swept at r=16")
    parser.add_argument("--r", type=_int_list, default=None, help="ranks, swept at M=4096 (CPU: 256)")
    parser.add_argument("--dtype", type=_choice_list(list(DTYPES)), default=None,
                        help="fp32, fp16, bf16 (default: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--modes", type=_choice_list(MODES + DECODE_MODES), default=list(MODES + DECODE_MODES),
                        help="comma-separated subset of fwd, bwd, fwd+bwd (training) and decode, decode-graph "
                        f"(M <= {DECODE_MAX_M}: the forward without grad or dropout, eager and replayed from a CUDA "
                        "graph, GPU only) (default all)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop starting new cases after this long (the rest are skipped rows)")
    parser.add_argument("--update-dispatch", nargs="?", const="", default=None, metavar="RESULTS",
                        help="rewrite auto's dispatch table from this run's dense rows (a GPU run); given a bench "
                        "results JSON, from that file without benchmarking")
    parser.add_argument("--dispatch-table", default=None, metavar="PATH",
                        help="the table --update-dispatch rewrites (default: $FASTPEFT_DISPATCH_TABLE, else the "
                        "package's fastpeft/dispatch.json)")
    add_common_arguments(parser, plot_help="also draw PNG charts")


def validate(args) -> Optional[str]:
    """A message for flag values argparse cannot check, else ``None``."""
    if args.max_minutes is not None and args.max_minutes <= 0:
        return f"--max-minutes must be positive, got {args.max_minutes:g}"
    from .mixed import PROVIDERS as MIXED_PROVIDERS

    if "mixed" in args.op:
        if len(args.op) > 1:
            return f"--op mixed runs its own sweep: give it alone, got --op {','.join(args.op)}"
        bad = [p for p in args.providers or [] if p not in MIXED_PROVIDERS]
        if bad:
            return f"--providers {','.join(bad)} do not run with --op mixed; choose from {', '.join(MIXED_PROVIDERS)}"
    else:
        bad = [p for p in args.providers or [] if p not in {q.name for q in PROVIDERS}]
        if bad:
            return f"--providers {','.join(bad)} run only with --op mixed"
        if args.adapters is not None:
            return "--adapters is a flag of --op mixed"
    if args.M is not None and not any(m in MODES for m in args.modes) and min(args.M) > DECODE_MAX_M:
        return f"--modes {','.join(args.modes)} times M <= {DECODE_MAX_M} only; give --M with such values"
    problem = _validate_dispatch(args) or validate_common(args)
    if problem or "mixed" in args.op or args.update_dispatch:   # a results file: nothing runs
        return problem
    device = resolve_device(args.device, "fastpeft bench")
    # a CPU run builds every provider of a case at once (timed side by side), a GPU run one
    held = 1 if device.type == "cuda" else len(_providers(args))
    largest = max(make_cases(args, device), key=case_bytes)
    return fits_in_memory(case_bytes(largest, held), device, f"the case M={largest.M}, k->d={largest.k}x{largest.d}",
                          "--shapes or --M")


def case_bytes(case: Case, held: int = 1) -> int:
    """An estimate of the memory one case holds with ``held`` providers built at once: their
    copies of W and the floor's, up to 8 rotated input sets each, and a step's activations and
    gradients (y, dx, mask)."""
    e = torch.finfo(case.dtype).bits // 8
    return e * ((held + 1) * case.k * case.d + case.M * (case.k + case.d) * (8 * held + 4))


def _validate_dispatch(args) -> Optional[str]:
    if args.update_dispatch is None:
        return "--dispatch-table goes with --update-dispatch" if args.dispatch_table is not None else None
    if args.update_dispatch:   # from a results file: nothing is run
        return None if os.path.isfile(args.update_dispatch) else \
            f"--update-dispatch {args.update_dispatch}: no such results file"
    if "dense" not in args.op:
        return "--update-dispatch measures the dense op: give --op dense"
    missing = [p for p in ("fastpeft-triton", "fastpeft-torch") if args.providers and p not in args.providers]
    if missing:
        return f"--update-dispatch compares fastpeft-triton with fastpeft-torch: add {','.join(missing)} to --providers"
    if "fwd" not in args.modes and "fwd+bwd" not in args.modes:
        return "--update-dispatch needs the fwd or fwd+bwd mode"
    return None


def make_cases(args, device: torch.device) -> list[Case]:
    """The cases of ``args``: ``M`` swept at the base rank, ``r`` swept at one ``M``."""
    shapes, ms, rs, m_for_r = DEFAULTS[(device.type if device.type == "cuda" else "cpu", bool(args.quick))]
    shapes = args.shapes or shapes
    ms = args.M or ms
    rs = args.r or rs
    if args.M is not None:
        m_for_r = m_for_r if m_for_r in ms else max(ms)
    r0 = 16 if 16 in rs else rs[0]
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"]))]
    points = list(dict.fromkeys([(m, r0) for m in ms] + [(m_for_r, r) for r in rs]))
    # shape-major, the ops side by side: a run cut short by --max-minutes has whole shapes
    return [Case(op, m, k, d, r, dtype, args.method, args.dropout, args.seed)
            for dtype in dtypes for (k, d) in shapes for (m, r) in points for op in args.op]


def input_sets(case: Case, device, n: Optional[int] = None):
    """Random (x, dy) pairs, enough that together they exceed the last-level cache."""
    e = torch.finfo(case.dtype).bits // 8
    per_set = e * case.M * (case.k + case.d)
    if n is None:
        n = max(1, min(8 if device.type == "cuda" else 4, math.ceil(2 * cache_bytes(device) / per_set)))
    gen = torch.Generator().manual_seed(case.seed + 3)
    sets = []
    for _ in range(n):
        x = torch.randn(case.M, case.k, generator=gen).to(device=device, dtype=case.dtype)
        dy = torch.randn(case.M, case.d, generator=gen).to(device=device, dtype=case.dtype)
        sets.append((x.requires_grad_(), dy))
    return sets


def measure(provider: Provider, case: Case, device: torch.device, modes=MODES,
            quick: bool = False) -> list[dict]:
    """Rows for one provider and case, one per mode (skipped rows carry the reason); the decode
    modes only at M <= 16."""
    return measure_side_by_side([provider], case, device, modes, quick)


def measure_side_by_side(providers: list[Provider], case: Case, device: torch.device, modes=MODES,
                         quick: bool = False) -> list[dict]:
    """Rows for several providers of one case, provider by provider and mode by mode as
    :func:`measure` gives them; each mode times the providers against each other
    (:func:`time_side_by_side`: on a CPU their blocks interleaved, so that they share the
    machine's load; all of them built at once). On a GPU they are built and timed one after
    another, so that only one provider's weights and inputs are in device memory at a time."""
    if device.type == "cuda" and len(providers) > 1:   # one at a time: only one provider's tensors held
        return [row for p in providers for row in measure_side_by_side([p], case, device, modes, quick)]
    train = [m for m in modes if m in MODES]
    decode = [m for m in modes if m in DECODE_MODES] if case.M <= DECODE_MAX_M else []
    rows = {p.name: [] for p in providers}
    if train:
        _measure_modes(providers, case, device, train, quick, rows, decode=False)
    if decode:
        _measure_modes(providers, dataclasses.replace(case, dropout=0.0), device, decode, quick, rows, decode=True)
    return [row for p in providers for row in rows[p.name]]


def _row(base: dict, mode: str, status: str, reason: str) -> dict:
    """A result row that carries no timing: a skipped or failed provider × mode."""
    return {**base, "mode": mode, "status": status, "reason": reason}


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"[:300]


def _measure_modes(providers: list[Provider], case: Case, device: torch.device, modes, quick: bool,
                   rows: dict, decode: bool) -> None:
    """Append to ``rows[name]`` each provider's rows for ``modes``: training modes (with the
    bytes saved for backward) or, with ``decode``, the decode modes (the providers built without
    dropout and called without grad)."""
    ready = []   # (provider, built, sets, base row)
    for provider in providers:
        base = measure_stub(provider, case)
        if decode:
            base = {**base, "saved_bytes": None, "peak_mb": None}
        try:
            built = provider.build(case, device)
            sets = input_sets(case, device)
            if not decode:
                with built.scope():
                    base = {**base, **_memory_probe(built, sets[0], device)}
        except Skip as reason:
            rows[provider.name] += [_row(base, m, "skipped", str(reason)) for m in modes]
            continue
        except Exception as err:  # a provider that breaks is reported, not fatal
            _release(device)
            rows[provider.name] += [_row(base, m, "error", _reason(err)) for m in modes]
            continue
        ready.append((provider, built, sets, base))
    for mode in modes:
        timed, fns = [], []
        for provider, built, sets, base in ready:
            try:
                with built.scope():
                    fns.append(decode_function(built, sets, mode, device) if decode
                               else step_function(built, sets, mode))
                timed.append((provider, built, sets, base))
            except Skip as reason:
                rows[provider.name].append(_row(base, mode, "skipped", str(reason)))
            except Exception as err:
                rows[provider.name].append(_row(base, mode, "error", _reason(err)))
                _release(device)
        for (provider, built, sets, base), timing in zip(timed, _time_all(timed, fns, device, quick, decode)):
            if isinstance(timing, Exception):
                rows[provider.name].append(_row(base, mode, "error", _reason(timing)))
            else:
                rows[provider.name].append({**base, "mode": mode, **_timing_fields(provider, case, mode, timing)})
    del ready
    _release(device)


def _time_all(timed: list, fns: list, device: torch.device, quick: bool, decode: bool) -> list:
    """The timings of ``fns`` side by side; if that fails, each alone, a failing one giving its
    exception (so that one broken provider does not cost the others their rows)."""
    grads = [None if decode else built.grads + [x for x, _ in sets] for _, built, sets, _ in timed]
    scopes = [built.scope for _, built, _, _ in timed]
    try:
        return time_side_by_side(fns, device, quick=quick, grads_to_none=grads, scopes=scopes)
    except Exception:
        _release(device)
    timings = []
    for fn, clear, scope in zip(fns, grads, scopes):
        try:
            timings.append(time_side_by_side([fn], device, quick=quick, grads_to_none=[clear], scopes=[scope])[0])
        except Exception as err:
            timings.append(err)
            _release(device)
    return timings


def _timing_fields(provider: Provider, case: Case, mode: str, timing) -> dict:
    seconds = timing.ms * 1e-3
    work = "fwd" if mode in DECODE_MODES else mode
    return {"status": "ok", "reason": None, "ms": timing.ms, "ms_q20": timing.q20, "ms_q80": timing.q80,
            "samples": timing.samples, "tflops": flops(provider, case, work) / seconds / 1e12,
            "gbps": bytes_moved(provider, case, work) / seconds / 1e9,
            "cpu_ms": timing.cpu_ms, "cpu_q20": timing.cpu_q20, "cpu_q80": timing.cpu_q80}


def decode_function(built: Built, sets, mode: str, device: torch.device):
    """A no-argument callable decoding the next input set without grad: ``"decode"`` calls the
    forward eagerly; ``"decode-graph"`` replays it from a CUDA graph captured here (one per input
    set, after warm-up calls on a side stream so that autotuning and allocations happen outside
    the capture). :class:`Skip` for ``"decode-graph"`` off CUDA."""
    xs = [x.detach() for x, _ in sets]
    cycle = itertools.cycle(range(len(xs)))
    if mode == "decode":
        def decode():
            with torch.no_grad():
                built.forward(xs[next(cycle)])
        return decode
    if device.type != "cuda":
        raise Skip(GRAPH_SKIP)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            for x in xs:
                built.forward(x)
    torch.cuda.current_stream(device).wait_stream(side)
    graphs, pool = [], None
    for x in xs:
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
            built.forward(x)
        pool = graph.pool()
        graphs.append(graph)

    def replay():
        graphs[next(cycle)].replay()
    return replay


def _release(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _memory_probe(built: Built, pair, device) -> dict:
    """One training step: bytes saved for backward (parameters excluded) and, on a GPU, the
    peak memory above what was allocated before it."""
    x, dy = pair
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with SavedBytes(exclude=built.params) as saved:
        y = built.forward(x)
    y.backward(dy)
    out = {"saved_bytes": saved.nbytes, "peak_mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    for t in built.grads + [x]:
        t.grad = None
    return out


def step_function(built: Built, sets, mode: str):
    """A no-argument callable running ``mode`` ("fwd", "bwd" or "fwd+bwd") on the next input set
    (for "bwd", the graphs are built once here and kept)."""
    cycle = itertools.cycle(range(len(sets)))
    if mode == "fwd":
        def fwd():
            built.forward(sets[next(cycle)][0])
        return fwd
    if mode == "fwd+bwd":
        def fwd_bwd():
            x, dy = sets[next(cycle)]
            built.forward(x).backward(dy)
        return fwd_bwd
    outputs = [built.forward(x) for x, _ in sets]

    def bwd():
        i = next(cycle)
        outputs[i].backward(sets[i][1], retain_graph=True)
    return bwd


def _add_ratios(rows: list[dict]) -> None:
    floors = {(r["M"], r["k"], r["d"], r["dtype"], r["mode"]): r for r in rows
              if r["provider"] == "torch-linear" and r["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok":
            floor = floors.get((row["M"], row["k"], row["d"], row["dtype"], row["mode"]))
            row["ratio"] = row["ms"] / floor["ms"] if floor else None
            # CPU: the same ratio of process CPU times (steadier than wall time on a shared machine)
            row["cpu_ratio"] = row["cpu_ms"] / floor["cpu_ms"] if floor and row.get("cpu_ms") \
                and floor.get("cpu_ms") else None
            # an adapter layer cannot beat its own base GEMM: below 1 the timing is noise
            row["below_floor"] = bool(row["ratio"] is not None and row["ratio"] < 1.0
                                      and row["provider"] != "torch-linear")


def main_table(rows: list[dict]) -> str:
    """The printed table: measured rows, then one line per skipped provider and reason."""
    ok = [{**r, "q20_q80": f"{r['ms_q20']:.3g}-{r['ms_q80']:.3g}"} for r in rows if r["status"] == "ok"]
    lines = [format_table(ok, COLUMNS)] if ok else ["(no measured rows)"]
    notes: dict[tuple, int] = {}
    for r in rows:
        if r["status"] != "ok":
            key = (r["provider"], r["status"], r["reason"])
            notes[key] = notes.get(key, 0) + 1
    for (name, status, reason), count in notes.items():
        lines.append(f"{status}: {name}: {reason} ({count} rows)")
    below = [r for r in rows if r.get("below_floor")]
    if below:
        lines.append(f"warning: {len(below)} rows run faster than the floor (ratio < 1), which no adapter layer "
                     "can: timing noise (a busy machine?); rerun before reading ratios: "
                     + ", ".join(f"{r['provider']} M={r['M']} {r['shape']} {r['mode']} ({r['ratio']:.2f}x)"
                                 for r in below[:5]))
    return "\n".join(lines)


def run(args) -> int:
    """Run with parsed ``args`` (CPU threads as ``--threads`` says, restored afterwards)."""
    if getattr(args, "update_dispatch", None):   # a results file given: update only
        return _update_dispatch(args.update_dispatch, args.dispatch_table)
    with num_threads(args.threads):
        if args.op == ["mixed"]:
            from .mixed import run as run_mixed
            return run_mixed(args)
        return _run(args)


def _providers(args) -> list[Provider]:
    """The providers ``args`` selects for its ops, the floor always among them."""
    providers = [p for p in PROVIDERS if p.op in args.op or p.floor]
    if args.providers:
        providers = [p for p in providers if p.name in args.providers or p.floor]
    return providers


def _run(args) -> int:
    """Run ``fastpeft bench`` with parsed ``args``; prints the table, writes the files."""
    device = resolve_device(args.device, "fastpeft bench")
    if getattr(args, "update_dispatch", None) == "" and device.type != "cuda":
        print(f"fastpeft bench --update-dispatch: nothing measured on a GPU (this run is on {device.type}); the "
              "dispatch table changes only from a GPU run and was not changed", file=sys.stderr)
        return 1
    torch.manual_seed(args.seed)
    cases = make_cases(args, device)
    providers = _providers(args)
    jobs, seen = [], set()
    for case in cases:
        for provider in providers:
            if provider.op != case.op and not provider.floor:
                continue
            key = (provider.name, case.M, case.k, case.d, case.dtype, case.r if provider.per_rank else None)
            if key not in seen:
                seen.add(key)
                jobs.append((provider, case))
    meta = environment(device)
    rows: list[dict] = []
    start = time.monotonic()
    bar = progress(len(jobs), "fastpeft bench", enabled=not args.no_progress)
    # the providers of one case are measured together (side by side on a CPU)
    for case, group in itertools.groupby(jobs, key=lambda job: job[1]):
        group = [provider for provider, _ in group]
        bar.set_postfix_str(f"{','.join(p.name for p in group)} {case.label}")
        if args.max_minutes is not None and time.monotonic() - start > 60 * args.max_minutes:
            rows += [{**measure_stub(provider, case), "mode": m, "status": "skipped",
                      "reason": f"time budget exhausted (--max-minutes {args.max_minutes:g})"}
                     for provider in group for m in args.modes if m in MODES or case.M <= DECODE_MAX_M]
        else:
            rows += measure_side_by_side(group, case, device, args.modes, quick=args.quick)
        bar.update(len(group))
    bar.close()
    _add_ratios(rows)
    cpu_note = "" if device.type == "cuda" else " (CPU timings: not kernel speed)"
    print(f"fastpeft bench on {meta['device_name']}{cpu_note}; torch {meta['torch']}, "
          f"method {args.method}, dropout {args.dropout:g}")
    print(main_table(rows))
    paths = write_results("bench", meta, rows, args.out, extra={"args": _args_dict(args)})
    print(f"wrote {paths['json']} and {paths['csv']}")
    if getattr(args, "update_dispatch", None) == "":
        status = _update_dispatch(paths["json"], args.dispatch_table)
        if status:
            return status
    if args.plot:
        from .plots import plot_bench
        for path in plot_bench(rows, meta, paths["json"][:-5]):
            print(f"wrote {path}")
    return 0


def _update_dispatch(results: str, table: Optional[str]) -> int:
    """Rewrite the dispatch table from ``results``; 1 with the reason on stderr if refused."""
    from .dispatch import DispatchError, update_table

    try:
        path, rows = update_table(results, table)
    except DispatchError as err:
        print(f"fastpeft bench --update-dispatch: {err}; the table was not changed", file=sys.stderr)
        return 1
    fused = sum(1 for r in rows for m in ("fwd", "fwd+bwd") if r.get(m, {}).get("backend") == "triton")
    total = sum(1 for r in rows for m in ("fwd", "fwd+bwd") if m in r)
    print(f"wrote {path}: {len(rows)} problems from {results} (fused Triton faster in {fused} of {total} "
          "problem-modes, the composed torch path in the rest)")
    return 0


def measure_stub(provider: Provider, case: Case) -> dict:
    """The identifying fields of a row that was not measured."""
    return {"op": case.op, "provider": provider.name, "method": case.method if provider.adapter else None,
            "dtype": str(case.dtype).replace("torch.", ""), "M": case.M, "k": case.k, "d": case.d,
            "shape": f"{case.k}x{case.d}", "r": case.r if provider.per_rank else None,
            "dropout": case.dropout if provider.adapter else None}


def _args_dict(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}

"""``fastpeft bench --op mixed``: several adapters in one batch (serving, evaluation).

One projection ``k → d`` holding ``n`` LoRA adapters of rank ``r`` (n in 1, 4, 16, 64 by
default), a batch of B = 64 samples of L tokens, sample b using adapter ``b mod n``; the
inference forward (no autograd), every provider side by side on the same adapters:

- ``fastpeft``: ``fastpeft.mixed_batch`` over the layer (the auto backend: the Triton kernels
  on a GPU, the torch implementation on a CPU);
- ``fastpeft-torch``: the same on the torch backend (GPU runs only; on a CPU it is ``fastpeft``);
- ``peft-mixed``: HF PEFT's LoRA layer called with ``adapter_names=`` (its mixed-batch forward);
- ``loop``: a Python loop over the adapters: each adapter's samples gathered, run through the
  fastpeft layer with that adapter active, written back;
- ``torch-linear``: the base ``F.linear`` alone (the floor).

Every provider's output is checked against ``fastpeft``'s before it is timed (a row with a
mismatch is an error row, not a timing). On a GPU each provider is timed with
``triton.testing.do_bench``; on a CPU, shared and with a load that drifts, the providers are
called in turn, round after round, and each one's median and 20/80 % quantiles reported, of the
wall time (``ms``) and of the process's CPU time (``cpu_ms``: the time it computed, without the
time other jobs held the cores; with ``--threads 1`` the steadier measure on a busy machine).
``vs_peft`` and ``vs_peft_cpu`` are PEFT's median over the provider's. CPU timings are CPU
timings, never kernel speed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runner import Skip, environment, format_table, optional_import, progress, resolve_device, time_fn, \
    time_side_by_side, write_results

__all__ = ["ADAPTER_COUNTS", "MixedCase", "PROVIDERS", "make_cases", "measure", "run"]

ADAPTER_COUNTS = [1, 4, 16, 64]
BATCH = 64
PROVIDERS = ["fastpeft", "fastpeft-torch", "peft-mixed", "loop", "torch-linear"]
# (shape, tokens per sample L, r) per device and size
DEFAULTS = {("cuda", False): ((4096, 4096), 64, 16), ("cuda", True): ((4096, 4096), 16, 16),
            ("cpu", False): ((512, 512), 16, 16), ("cpu", True): ((512, 512), 4, 16)}
COLUMNS = [("adapters", "adapters"), ("M", "M"), ("shape", "k->d"), ("r", "r"), ("dtype", "dtype"),
           ("provider", "provider"), ("ms", "ms"), ("q20_q80", "q20-q80"), ("ratio", "x floor"),
           ("vs_peft", "x peft"), ("cpu_ms", "cpu ms"), ("vs_peft_cpu", "x peft (cpu)")]


@dataclass(frozen=True)
class MixedCase:
    n_adapters: int
    batch: int
    tokens: int          # L, per sample
    k: int
    d: int
    r: int
    dtype: torch.dtype
    seed: int = 0

    @property
    def names(self) -> list[str]:
        return [f"a{b % self.n_adapters}" for b in range(self.batch)]


def make_cases(args, device: torch.device) -> list[MixedCase]:
    from .lowrank import DTYPES

    shape, tokens, r = DEFAULTS[(device.type if device.type == "cuda" else "cpu", bool(args.quick))]
    shapes = args.shapes or [shape]
    if args.M:
        tokens = None
    rs = args.r or [r]
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"]))]
    counts = args.adapters or ADAPTER_COUNTS
    cases = []
    for dtype in dtypes:
        for k, d in shapes:
            for rank in rs:
                for m in (args.M or [BATCH * tokens]):
                    batch = min(BATCH, m)
                    for n in counts:
                        cases.append(MixedCase(n, batch, max(1, m // batch), k, d, rank, dtype, args.seed))
    return cases


def _peft_layer(case: MixedCase, device):
    """A PEFT LoRA layer over a random Linear holding ``case.n_adapters`` adapters with random
    A and B, in eval mode, and the PeftModel around it."""
    peft = optional_import("peft", "bench")
    torch.manual_seed(case.seed)
    base = nn.Sequential(nn.Linear(case.k, case.d)).to(device=device, dtype=case.dtype)
    config = lambda: peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=["0"])
    model = peft.get_peft_model(base, config(), adapter_name="a0")
    for i in range(1, case.n_adapters):
        model.add_adapter(f"a{i}", config())
    gen = torch.Generator().manual_seed(case.seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return model.eval()


def _build(provider: str, case: MixedCase, device, peft_model) -> Callable[[torch.Tensor], torch.Tensor]:
    import fastpeft

    names = case.names
    if provider == "peft-mixed":
        layer = peft_model.base_model.model[0]
        return lambda x: layer(x, adapter_names=names)
    inner = fastpeft.from_peft(copy.deepcopy(peft_model))
    layer = inner[0]
    if provider == "torch-linear":
        return lambda x: F.linear(x, layer.weight, layer.bias)
    if provider in ("fastpeft", "fastpeft-torch"):
        if provider == "fastpeft-torch" and device.type != "cuda":
            raise Skip("on a CPU the fastpeft provider runs the torch backend already")
        backend = "torch" if provider == "fastpeft-torch" else "auto"

        def mixed(x):
            with fastpeft.use_backend(backend), fastpeft.mixed_batch(inner, names):
                return layer(x)
        return mixed
    if provider == "loop":
        groups = {}
        for b, name in enumerate(names):
            groups.setdefault(name, []).append(b)
        index = {n: torch.tensor(g, device=device) for n, g in groups.items()}

        def loop(x):
            out = x.new_empty(x.shape[:-1] + (case.d,))
            for name, idx in index.items():
                fastpeft.set_adapter(inner, name)
                out.index_copy_(0, idx, layer(x.index_select(0, idx)))
            return out
        return loop
    raise ValueError(f"unknown provider {provider!r}")


def measure(case: MixedCase, device, providers, quick: bool = False) -> list[dict]:
    """Rows of one case, one per provider; every output checked against fastpeft's first."""
    base = {"op": "mixed", "adapters": case.n_adapters, "B": case.batch, "L": case.tokens,
            "M": case.batch * case.tokens, "k": case.k, "d": case.d, "shape": f"{case.k}x{case.d}",
            "r": case.r, "dtype": str(case.dtype).replace("torch.", ""), "mode": "fwd"}
    try:
        peft_model = _peft_layer(case, device)
    except Skip as reason:
        return [{**base, "provider": p, "status": "skipped", "reason": str(reason)} for p in providers]
    gen = torch.Generator().manual_seed(case.seed + 2)
    x = torch.randn(case.batch, case.tokens, case.k, generator=gen).to(device=device, dtype=case.dtype)
    rows, reference, ready = [], None, {}
    tol = 1e-4 if case.dtype == torch.float32 else 2e-2
    for provider in ["fastpeft"] + [p for p in providers if p != "fastpeft"]:
        row = {**base, "provider": provider}
        try:
            fn = _build(provider, case, device, peft_model)
            with torch.no_grad():
                y = fn(x)
                if reference is None:
                    reference = y.float()
                elif provider != "torch-linear":
                    err = ((y.float() - reference).norm() / reference.norm()).item()
                    if not err <= tol:
                        raise AssertionError(f"output differs from fastpeft's by {err:.2e} (relative)")
                if device.type == "cuda":
                    timing = time_fn(lambda: fn(x), device, quick=quick)
                    row.update(ms=timing.ms, ms_q20=timing.q20, ms_q80=timing.q80)
                else:
                    ready[provider] = fn
        except Skip as reason:
            rows.append({**row, "status": "skipped", "reason": str(reason)})
            continue
        except Exception as err:  # a provider that breaks is reported, not fatal
            rows.append({**row, "status": "error", "reason": f"{type(err).__name__}: {err}"[:300]})
            continue
        rows.append({**row, "status": "ok", "reason": None})
    if ready:                      # CPU: providers interleaved block by block (a shared CPU's load drifts)
        with torch.no_grad():
            timings = time_side_by_side([lambda fn=fn: fn(x) for fn in ready.values()], device, quick=quick)
        by_name = dict(zip(ready, timings))
        for row in rows:
            timing = by_name.get(row["provider"])
            if timing is not None:
                row.update(ms=timing.ms, ms_q20=timing.q20, ms_q80=timing.q80, cpu_ms=timing.cpu_ms,
                           cpu_q20=timing.cpu_q20, cpu_q80=timing.cpu_q80)
    rows = [r for r in rows if r["provider"] in providers]
    ms = {r["provider"]: r.get("ms") for r in rows if r["status"] == "ok"}
    cpu = {r["provider"]: r.get("cpu_ms") for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok":
            r["ratio"] = r["ms"] / ms["torch-linear"] if ms.get("torch-linear") else None
            r["vs_peft"] = ms["peft-mixed"] / r["ms"] if ms.get("peft-mixed") else None
            if r.get("cpu_ms"):
                r["vs_peft_cpu"] = cpu["peft-mixed"] / r["cpu_ms"] if cpu.get("peft-mixed") else None
    return rows


def run(args) -> int:
    """``fastpeft bench --op mixed``: prints the table, writes JSON/CSV (and a plot)."""
    device = resolve_device(args.device, "fastpeft bench")
    providers = [p for p in PROVIDERS if not args.providers or p in args.providers] or PROVIDERS
    cases = make_cases(args, device)
    meta = environment(device)
    rows: list[dict] = []
    start = time.monotonic()
    bar = progress(len(cases), "fastpeft bench --op mixed", enabled=not args.no_progress)
    for case in cases:
        bar.set_postfix_str(f"{case.n_adapters} adapters")
        if args.max_minutes is not None and time.monotonic() - start > 60 * args.max_minutes:
            rows += [{"op": "mixed", "adapters": case.n_adapters, "provider": p, "status": "skipped",
                      "reason": f"time budget exhausted (--max-minutes {args.max_minutes:g})"} for p in providers]
        else:
            rows += measure(case, device, providers, quick=args.quick)
        bar.update(1)
    bar.close()
    cpu_note = "" if device.type == "cuda" else " (CPU timings: not kernel speed)"
    print(f"fastpeft bench --op mixed on {meta['device_name']}{cpu_note}; torch {meta['torch']}; "
          f"LoRA adapters, batch of {BATCH} samples, sample b uses adapter b mod n")
    ok = [{**r, "q20_q80": f"{r['ms_q20']:.3g}-{r['ms_q80']:.3g}"} for r in rows if r["status"] == "ok"]
    print(format_table(ok, COLUMNS) if ok else "(no measured rows)")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['status']}: {r['provider']} ({r['adapters']} adapters): {r['reason']}")
    paths = write_results("mixed", meta, rows, args.out,
                          extra={"args": {k: v for k, v in vars(args).items() if k != "func"}})
    print(f"wrote {paths['json']} and {paths['csv']}")
    if args.plot:
        from .plots import plot_mixed
        for path in plot_mixed(rows, meta, paths["json"][:-5]):
            print(f"wrote {path}")
    return 0

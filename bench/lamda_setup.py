"""LaMDA set-up time: ``fastpeft.inject`` with method "lamda" / "lamda++" on BART-large, every
linear layer of the encoder and decoder (192 layers: d_model 1024, 12 + 12 layers, ffn 4096).

The model is built from transformers' ``BartConfig`` with random weights (no download; the set-up
time depends on the shapes, not on the values: random weights have flat spectra, the slowest case
for the SVD's early stop). Building the model is not timed. Prints the number of adapted layers,
the wall and process CPU seconds ``inject`` took (CPU time counts every thread; on a shared
machine wall time also counts other jobs' share, so the load average is printed too), and the
resident memory before and after it (Linux ``/proc/self/status``) against the adapters' own size.
With ``--out DIR`` the row is also written to DIR/lamda-setup-<cpu>-<time>.json.

    .venv/bin/python bench/lamda_setup.py                     # lamda, r = 16, torch's threads
    .venv/bin/python bench/lamda_setup.py --method lamda++ --threads 2 --r 16 --out bench/results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch


def rss_mib() -> float:
    """Resident memory of this process in MiB (0 where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; nothing
    elsewhere), so that RSS counts live memory rather than what the allocator keeps: building
    the model leaves over a GiB of freed heap in the process."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bart_large(layers: int = 12):
    import transformers

    config = transformers.BartConfig(d_model=1024, encoder_layers=layers, decoder_layers=layers,
                                     encoder_attention_heads=16, decoder_attention_heads=16,
                                     encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=1024)
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(config).eval()


def measure(method: str = "lamda", r: int = 16, layers: int = 12) -> dict:
    """One timed ``inject`` on a freshly built model: a result row."""
    import fastpeft
    from fastpeft.inject import lowrank_layers

    model = bart_large(layers)
    release_free_heap()
    before, load_before = rss_mib(), load_average()
    wall, cpu = time.perf_counter(), time.process_time()
    model = fastpeft.inject(model, fastpeft.AdapterConfig(method=method, r=r, target_modules="all-linear"))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    release_free_heap()
    after = rss_mib()
    found = lowrank_layers(model)
    adapter_mib = sum(p.numel() * p.element_size() for _, m in found for n, p in m.named_parameters()
                      if n.startswith("lora_")) / 2**20
    return {"method": method, "r": r, "layers": len(found), "threads": torch.get_num_threads(),
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "load_before": load_before,
            "load_after": load_average(), "rss_before_mib": round(before, 1), "rss_after_mib": round(after, 1),
            "rss_growth_mib": round(after - before, 1), "adapter_mib": round(adapter_mib, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lamda", choices=["lamda", "lamda++"], help="adapter method")
    parser.add_argument("--r", type=int, default=16, help="rank (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--layers", type=int, default=12, help="encoder and decoder layers (default 12)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs, each on a fresh model (default 1)")
    parser.add_argument("--out", default=None, help="write the rows to a JSON file in this folder")
    parser.add_argument("--label", default="", help="a note stored with the rows (which code ran)")
    args = parser.parse_args(argv)
    from fastpeft.benchmark.runner import device_name, slug

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for _ in range(args.repeat):
        row = measure(args.method, args.r, args.layers)
        rows.append(row)
        print(f"method {row['method']}, r {row['r']}, {row['threads']} threads: {row['layers']} layers in "
              f"{row['wall_s']:.2f} s wall, {row['cpu_s']:.2f} s CPU (load average {row['load_before'][:1]} -> "
              f"{row['load_after'][:1]}); RSS {row['rss_before_mib']:.0f} -> {row['rss_after_mib']:.0f} MiB "
              f"(+{row['rss_growth_mib']:.0f}; adapters {row['adapter_mib']:.1f} MiB)", flush=True)
    if args.out:
        device = device_name(torch.device("cpu"))
        os.makedirs(args.out, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = os.path.join(args.out, f"lamda-setup-{slug(device)}{'-' + slug(args.label) if args.label else ''}-{stamp}.json")
        with open(path, "w") as f:
            json.dump({"device": device, "label": args.label, "torch": torch.__version__,
                       "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

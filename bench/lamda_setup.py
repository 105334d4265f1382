"""LaMDA set-up time: ``fastpeft.inject`` with method "lamda" / "lamda++" on BART-large, every
linear layer of the encoder and decoder (192 layers: d_model 1024, 12 + 12 layers, ffn 4096).

The model is built from transformers' ``BartConfig`` with random weights (no download; the set-up
time depends on the shapes, not on the values). Prints the number of adapted layers, the seconds
``inject`` took, and the resident memory before and after it (Linux ``/proc/self/status``).

    .venv/bin/python bench/lamda_setup.py                     # lamda, r = 8, torch's threads
    .venv/bin/python bench/lamda_setup.py --method lamda++ --threads 2 --r 16
"""

from __future__ import annotations

import argparse
import gc
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


def bart_large(layers: int = 12):
    import transformers

    config = transformers.BartConfig(d_model=1024, encoder_layers=layers, decoder_layers=layers,
                                     encoder_attention_heads=16, decoder_attention_heads=16,
                                     encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=1024)
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(config).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lamda", choices=["lamda", "lamda++"], help="adapter method")
    parser.add_argument("--r", type=int, default=8, help="rank (lamda++: the mean rank)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--layers", type=int, default=12, help="encoder and decoder layers (default 12)")
    args = parser.parse_args(argv)
    import fastpeft
    from fastpeft.inject import lowrank_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    model = bart_large(args.layers)
    gc.collect()
    before = rss_mib()
    start = time.perf_counter()
    model = fastpeft.inject(model, fastpeft.AdapterConfig(method=args.method, r=args.r, target_modules="all-linear"))
    seconds = time.perf_counter() - start
    gc.collect()
    after = rss_mib()
    layers = lowrank_layers(model)
    adapter_mib = sum(p.numel() * p.element_size() for _, m in layers for n, p in m.named_parameters()
                      if n.startswith("lora_")) / 2**20
    print(f"method {args.method}, r {args.r}, {torch.get_num_threads()} threads: {len(layers)} layers in "
          f"{seconds:.2f} s; RSS {before:.0f} -> {after:.0f} MiB (+{after - before:.0f}; adapters "
          f"{adapter_mib:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

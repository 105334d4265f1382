"""On a GPU: the kernels one training step really compiled, against what `fastpeft inspect`
compiles for the same problem without running it (registers, spills, shared memory must agree).

    python bench/inspect_vs_gpu.py [--out FILE]

Runs the flagship step (dense LoRA, bf16, M = 8192, k = d = 4096, r = 16, dropout 0.1) with the
Triton backend and autotuning, so every config the autotuner benchmarks is compiled by Triton's
own launch path; then inspects the same problem for the device's architecture. Each compiled
kernel is matched to inspect's record of the same kernel, warps, stages and shared memory.
Prints one row per kernel and config; exits 1 if registers or spills disagree, or if a compiled
kernel has no inspected twin.
"""

import argparse
import json
import sys

import torch

from fastpeft.kernels import _aot, _common, dora, inspect, lowrank, lowrank_4bit, lowrank_bwd, lowrank_group


def compiled_on_device(device_index: int) -> list[dict]:
    """Every kernel of the fastpeft kernel modules compiled for the device, with its resources."""
    rows, seen = [], set()
    for module in (_common, lowrank, lowrank_bwd, lowrank_4bit, lowrank_group, dora):
        for value in vars(module).values():
            try:
                fn = _aot.jit_function(value)
            except TypeError:
                continue
            if id(fn) in seen:       # a kernel module imports the jit functions of another
                continue
            seen.add(id(fn))
            cache = fn.device_caches.get(device_index)
            for kernel in (cache[0].values() if cache else ()):
                kernel._init_handles()
                md = kernel.metadata
                rows.append({"kernel": fn.__name__, "num_warps": md.num_warps, "num_stages": md.num_stages,
                             "shared": md.shared, "registers": kernel.n_regs, "spill_bytes": kernel.n_spills})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the comparison as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("inspect vs GPU: no GPU, nothing to compare")
        return 0
    major, minor = torch.cuda.get_device_capability()
    arch = 90 if major >= 9 else 80
    problem = inspect.Problem(op="dense", arch=arch, k=4096, d=4096, M=8192, r=16, dtype="bf16", dropout=0.1)
    inspect.run_step(problem, "cuda")
    torch.cuda.synchronize()
    compiled = compiled_on_device(torch.cuda.current_device())
    report = inspect.inspect_kernels(problem)
    by_key = {}
    for rec in report.records:
        key = (rec["kernel"], rec["config"]["num_warps"], rec["config"]["num_stages"], rec["shared"])
        by_key.setdefault(key, rec)
    rows, bad = [], 0
    for row in compiled:
        twin = by_key.get((row["kernel"], row["num_warps"], row["num_stages"], row["shared"]))
        agree = twin is not None and twin["registers"] == row["registers"] and (
            (twin["spills"]["local_bytes"] or 0) == 0) == (row["spill_bytes"] == 0)
        bad += not agree
        rows.append({**row, "inspect_registers": twin and twin["registers"],
                     "inspect_local_bytes": twin and twin["spills"]["local_bytes"], "agree": agree})
        print(f"{row['kernel']:34s} w{row['num_warps']}s{row['num_stages']} smem {row['shared']:6d}  "
              f"regs GPU {row['registers']:3d} inspect {rows[-1]['inspect_registers']}  "
              f"spill bytes {row['spill_bytes']}  {'agree' if agree else 'DISAGREE'}")
    print(f"{len(rows) - bad} of {len(rows)} compiled kernels agree with fastpeft inspect ({torch.cuda.get_device_name()})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "problem": problem.describe(), "rows": rows}, f, indent=1)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())

"""Microbenchmark of the dense low-rank op, every provider side by side in one run.

Providers: the floor ``F.linear`` (cuBLAS on a GPU), HF PEFT's LoRA layer
(``peft.tuners.lora.Linear`` around an ``nn.Linear``), the fastpeft op on its torch backend and
on its Triton backend. This script only chooses the op and the providers; the shared runner
(:mod:`fastpeft.benchmark.lowrank`, also ``fastpeft bench``) builds the cases, times them with
``triton.testing.do_bench`` on a GPU (median and 20/80 % quantiles, inputs rotated past the L2)
or ``torch.utils.benchmark`` on a CPU, and writes JSON and CSV rows keyed by device name under
``bench/results/``.

    python bench/bench_lowrank.py                      # default Llama projections (GPU)
    python bench/bench_lowrank.py --quick              # a small set
    python bench/bench_lowrank.py --shapes 64x48 --M 16 --r 8 --modes fwd+bwd   # CPU smoke run

Every ``fastpeft bench`` flag is accepted. Without a GPU the runner skips the Triton provider
(CPU timings are never kernel speed); the script then runs the Triton path once under the Triton
interpreter on a tiny case and checks it against the torch path, so the harness and the kernels
are exercised end to end on any machine.
"""

import os
import sys

PROVIDERS = "torch-linear,peft-lora,fastpeft-torch,fastpeft-triton"


def main(argv=None) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from fastpeft.cli import main as cli

    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = [] if "--providers" in argv else ["--providers", PROVIDERS]
    status = cli(["bench", "--op", "dense", *defaults, *argv])
    if status == 0 and not torch.cuda.is_available() and "-h" not in argv and "--help" not in argv:
        status = interpreter_check()
    return status


def interpreter_check(M: int = 16, k: int = 64, d: int = 48, r: int = 8) -> int:
    """Forward and backward of a LoRA layer on the Triton backend (interpreter) against the
    torch backend; prints the largest relative error. Not a timing."""
    import torch

    import fastpeft

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, k, generator=gen, requires_grad=True)
    w = torch.randn(d, k, generator=gen) / k ** 0.5
    a = (torch.randn(r, k, generator=gen) / k ** 0.5).requires_grad_()
    b = torch.randn(d, r, generator=gen).requires_grad_()
    results = {}
    for backend in ("torch", "triton"):
        for t in (x, a, b):
            t.grad = None
        with fastpeft.use_backend(backend):
            y = fastpeft.lowrank_linear(x, w, None, a, b, scale=2.0)
        y.square().sum().backward()
        results[backend] = [y.detach()] + [t.grad.clone() for t in (x, a, b)]
    err = max(((u - v).norm() / v.norm()).item() for u, v in zip(results["triton"], results["torch"]))
    ok = err < 1e-4
    print(f"fastpeft-triton under the Triton interpreter (M={M}, k={k}, d={d}, r={r}): "
          f"y, dx, dA, dB within {err:.1e} of fastpeft-torch: {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

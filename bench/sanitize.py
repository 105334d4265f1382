"""Every kernel once at odd shapes, checked against float64: the program to run under
compute-sanitizer (memcheck, racecheck) on a GPU.

    compute-sanitizer --tool memcheck  python3 bench/sanitize.py
    compute-sanitizer --tool racecheck python3 bench/sanitize.py
    TRITON_INTERPRET=1 python3 bench/sanitize.py --smoke --device cpu    # the same, interpreted

Cases: the dense op, the grouped op (three projections) and the 4-bit op (NF4, nested, and FP4;
and NF4 through the transient dense buffer at the larger M), each forward and backward with every feature on (full core, out_scale, gelu, bias, dropout 0.1,
A trainable), at k = 123, d = 77, r = 12 and M = 1 and M = 4097 (``--smoke``: M = 1 and 33), in
the backend's fast mode and in deterministic mode. Deterministic mode also turns on PyTorch's
filling of fresh memory with NaN, so an output element a kernel never wrote shows up as NaN.
The backend is forced (``use_backend``): "triton", and "cuda" for the 4-bit decode shape when
the extension ``fastpeft._C`` is built. Autotuning is off (one heuristic config per kernel:
under the sanitizer every autotune candidate would run many times).

Prints one line per case (relative error of the output and of every gradient against the
float64 torch reference) and exits 1 if any is NaN or over its dtype's tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("FASTPEFT_AUTOTUNE", "0")

import torch  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.benchmark.runner import env_vars  # noqa: E402

K, D, R = 123, 77, 12
TOLERANCE = {torch.float32: 3e-3, torch.float16: 2e-2, torch.bfloat16: 3e-2}   # tf32 / 16-bit dots
DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _rand(*shape, scale=1.0, device, dtype, grad=False):
    return (torch.randn(*shape, device=device, dtype=torch.float64) * scale).to(dtype).requires_grad_(grad)


def _rel(got, ref) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


SEED, P, SCALE = 7, 0.1, 2.0


def _reference(x, w, b, a, bb, core, out_scale, scale, keep):
    """The op in float64 with plain torch (gelu, full core), ``keep`` the kernels' mask or None."""
    xd = x if keep is None else x * keep.double() / (1.0 - P)
    delta = (torch.nn.functional.gelu(xd @ a.t()) @ core.t()) @ bb.t()
    if out_scale is not None:
        delta = delta * out_scale
    return x @ w.t() + b + scale * delta


def _keep(M: int, device):
    from fastpeft.kernels.lowrank import dropout_keep_mask
    return dropout_keep_mask(SEED, M, K, P, device).cpu()


def _errors(fn, ref_fn, leaves: dict, backend: str) -> dict:
    """Relative errors of fn's outputs (run with ``backend``) and of the gradients of every leaf
    that requires grad, against ``ref_fn`` on float64 CPU copies of the leaves."""
    ref_leaves = {k: v.detach().double().cpu().requires_grad_(v.requires_grad) for k, v in leaves.items()}
    with fastpeft.use_backend(backend):
        outs = fn(**leaves)
    ref_outs = ref_fn(**ref_leaves)
    gen = torch.Generator().manual_seed(1)
    probes = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref_outs]
    sum((o.float() * p.to(o.device, torch.float32)).sum() for o, p in zip(outs, probes)).backward()
    sum((o * p).sum() for o, p in zip(ref_outs, probes)).backward()
    errs = {f"y{i}": _rel(o.detach(), r.detach()) for i, (o, r) in enumerate(zip(outs, ref_outs))}
    for name, leaf in leaves.items():
        if leaf.requires_grad:
            errs[f"d{name}"] = _rel(leaf.grad, ref_leaves[name].grad)
    return errs


def dense_case(M, dtype, device):
    mk = dict(device=device, dtype=dtype)
    leaves = dict(x=_rand(M, K, grad=True, **mk), weight=_rand(D, K, scale=K ** -0.5, **mk),
                  bias=_rand(D, **mk), lora_A=_rand(R, K, scale=K ** -0.5, grad=True, **mk),
                  lora_B=_rand(D, R, grad=True, **mk), core=_rand(R, R, grad=True, **mk),
                  out_scale=_rand(D, grad=True, **mk))
    keep = _keep(M, device)

    def fn(x, weight, bias, lora_A, lora_B, core, out_scale):
        return (fastpeft.lowrank_linear(x, weight, bias, lora_A, lora_B, core=core, out_scale=out_scale,
                                        scale=SCALE, dropout_p=P, activation="gelu", seed=SEED),)

    def ref(x, weight, bias, lora_A, lora_B, core, out_scale):
        return (_reference(x, weight, bias, lora_A, lora_B, core, out_scale, SCALE, keep),)
    return fn, ref, leaves, "triton"


def group_case(M, dtype, device):
    mk = dict(device=device, dtype=dtype)
    ds, rs, scales = (D, 40, D), (R, 8, R), (2.0, 1.0, 0.5)
    n = len(ds)
    leaves = {"x": _rand(M, K, grad=True, **mk)}
    for i, (d, r) in enumerate(zip(ds, rs)):
        leaves.update({f"w{i}": _rand(d, K, scale=K ** -0.5, **mk), f"b{i}": _rand(d, **mk),
                       f"a{i}": _rand(r, K, scale=K ** -0.5, grad=True, **mk),
                       f"bb{i}": _rand(d, r, grad=True, **mk), f"c{i}": _rand(r, r, grad=True, **mk)})
    keep = _keep(M, device)

    def fn(x, **p):
        return fastpeft.lowrank_linear_group(
            x, [p[f"w{i}"] for i in range(n)], [p[f"b{i}"] for i in range(n)], [p[f"a{i}"] for i in range(n)],
            [p[f"bb{i}"] for i in range(n)], cores=[p[f"c{i}"] for i in range(n)], scales=list(scales),
            dropout_p=P, activation="gelu", seed=SEED)

    def ref(x, **p):
        return tuple(_reference(x, p[f"w{i}"], p[f"b{i}"], p[f"a{i}"], p[f"bb{i}"], p[f"c{i}"], None, scales[i], keep)
                     for i in range(n))
    return fn, ref, leaves, "triton"


def four_bit_case(M, dtype, device, quant_type="nf4", backend="triton"):
    mk = dict(device=device, dtype=dtype)
    w = torch.randn(D, K, device=device, dtype=torch.float64).mul(K ** -0.5).to(dtype)
    packed, state = fastpeft.quantize_4bit(w, quant_type=quant_type, blocksize=64, compress_statistics=True)
    w64 = fastpeft.dequantize_4bit(packed, state).double().cpu()
    decode = backend == "cuda"     # the CUDA kernel: small-M forward without dropout
    leaves = dict(x=_rand(M, K, grad=True, **mk), bias=_rand(D, **mk),
                  lora_A=_rand(R, K, scale=K ** -0.5, grad=True, **mk), lora_B=_rand(D, R, grad=True, **mk),
                  core=_rand(R, R, grad=True, **mk), out_scale=_rand(D, grad=True, **mk))
    keep = None if decode else _keep(M, device)

    def fn(x, bias, lora_A, lora_B, core, out_scale):
        return (fastpeft.lowrank_linear_4bit(x, packed, state, bias, lora_A, lora_B, core=core, out_scale=out_scale,
                                             scale=SCALE, dropout_p=0.0 if decode else P, activation="gelu",
                                             seed=SEED),)

    def ref(x, bias, lora_A, lora_B, core, out_scale):
        return (_reference(x, w64, bias, lora_A, lora_B, core, out_scale, SCALE, keep),)
    return fn, ref, leaves, backend


def _has_cuda_extension() -> bool:
    try:
        import fastpeft._C  # noqa: F401
    except ImportError:
        return False
    return True


BUFFER = {"FASTPEFT_4BIT_BUFFER_MIN_M": "1"}     # the 4-bit op through a transient dense W (M > 16)
REGISTERS = {"FASTPEFT_4BIT_BUFFER_MIN_M": "0"}  # W dequantised in registers at every M


def cases(device, smoke: bool, dtypes):
    """(name, make, dtype, environment) for every case."""
    ms = (1, 33) if smoke else (1, 4097)
    for dtype in dtypes:
        for M in ms:
            yield f"dense M={M}", lambda M=M, dt=dtype: dense_case(M, dt, device), dtype, {}
            yield f"group M={M}", lambda M=M, dt=dtype: group_case(M, dt, device), dtype, {}
            for qt in ("nf4", "fp4"):
                yield f"4bit-{qt} M={M}", lambda M=M, dt=dtype, qt=qt: four_bit_case(M, dt, device, qt), dtype, REGISTERS
        yield f"4bit-nf4 M={ms[-1]} (buffer)", lambda dt=dtype: four_bit_case(ms[-1], dt, device), dtype, BUFFER
        if device.type == "cuda" and _has_cuda_extension():
            yield "4bit-nf4 M=1 (cuda)", lambda dt=dtype: four_bit_case(1, dt, device, "nf4", "cuda"), dtype, {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="M = 1 and 33 (for the Triton interpreter)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: fp32, fp16, bf16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1")
    dtypes = [DTYPE[name] for name in args.dtypes.split(",")]
    failed = 0
    for name, make, dtype, environment in cases(device, args.smoke, dtypes):
        for mode in ("fast", "deterministic"):
            torch.manual_seed(0)
            fn, ref, leaves, backend = make()
            torch.use_deterministic_algorithms(mode == "deterministic", warn_only=True)
            try:
                with env_vars(environment):
                    errs = _errors(fn, ref, leaves, backend)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            finally:
                torch.use_deterministic_algorithms(False)
            worst = max(errs.values(), key=lambda e: float("inf") if e != e else e)
            ok = worst == worst and worst <= TOLERANCE[dtype]
            failed += not ok
            detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            print(f"{'ok  ' if ok else 'FAIL'} {name:<22} {str(dtype)[6:]:<9} {mode:<13} {backend:<6} {detail}",
                  flush=True)
    print(f"{failed} case(s) failed" if failed else "every case within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

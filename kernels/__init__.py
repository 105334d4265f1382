"""Triton kernel launchers of fastpeft (shipped as ``fastpeft.kernels``).

One module per op family, each with private ``@triton.jit`` kernels followed by plain host
launchers on 2-D tensors (the autograd Functions live in ``fastpeft.ops``):

* :mod:`fastpeft.kernels.lowrank`: the dense low-rank adapter op's forward (the Y GEMM) and its
  public launchers, ``lowrank_fwd`` / ``lowrank_bwd`` / ``dropout_keep_mask``.
* :mod:`fastpeft.kernels.lowrank_bwd`: its backward kernels (the pass over dY, dX, dA) and their
  launchers, with the gradient derivation.
* :mod:`fastpeft.kernels._common`: what the kernel modules share: config choice, ``@triton.jit``
  helpers (operands, activations, the Philox dropout mask, tile order, epilogues), the T pass
  (T = D(X)Aᵀ and U in one pass over X) and launching.
* :mod:`fastpeft.kernels.lowrank_sm90`: sm_90 main loops of the dense op's forward GEMM and dX
  (TMA tensor descriptors feeding wgmma, a persistent grouped tile schedule, tiles up to
  128×256), chosen by the dense launchers on sm_90 for aligned fp16/bf16 operands.
* :mod:`fastpeft.kernels.lowrank_group`: several projections of one input (q/k/v, gate/up),
  ``lowrank_group_fwd`` / ``lowrank_group_bwd``.
* :mod:`fastpeft.kernels.lowrank_mixed`: several adapters in one batch, each row tile with its
  own, ``lowrank_mixed_fwd``.
* :mod:`fastpeft.kernels.lowrank_4bit`: the op over a bitsandbytes 4-bit weight,
  ``lowrank_4bit_fwd`` / ``lowrank_4bit_bwd``: the W tile loader, the GEMM and dX kernels, the
  dense-buffer path; :mod:`fastpeft.kernels.lowrank_4bit_decode`, its one-launch forward at
  M <= 16; :mod:`fastpeft.kernels.lowrank_4bit_format`, the packed weight's select-tree
  dequantisation and launch arguments.
* :mod:`fastpeft.kernels.lowrank_4bit_sm90`: sm_90 main loops of the 4-bit forward GEMM and dX
  (X / dY, the packed weight's words and B through TMA descriptors), chosen by the 4-bit
  launchers on sm_90 where the byte-permute decode applies and the operands are aligned.
* :mod:`fastpeft.kernels.inspect`: ``fastpeft inspect``, the kernels a training step or decode
  call launches, compiled for sm_80 / sm_90 without a GPU exactly as a launch specialises them,
  with registers, shared memory, spills, tensor-core/TMA/cp.async use, the main loop's
  instruction mix, HBM bytes and roofline floors (:func:`~fastpeft.kernels.inspect.inspect_kernels`).
* :mod:`fastpeft.kernels._aot`: the capture of launches and the compilation behind it (the only
  code that touches Triton's version-sensitive internals).

Nothing is imported here: importing ``fastpeft.kernels`` does not import triton. On CPU tensors
the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported). ``FASTPEFT_AUTOTUNE=0`` replaces autotuning by one heuristic config per kernel.
"""

__all__ = ["inspect_kernels", "InspectProblem"]


def __getattr__(name):
    # the inspection API, imported on first use (it imports no triton until it compiles)
    if name == "inspect_kernels":
        from .inspect import inspect_kernels
        return inspect_kernels
    if name == "InspectProblem":
        from .inspect import Problem
        return Problem
    raise AttributeError(f"module 'fastpeft.kernels' has no attribute {name!r}")

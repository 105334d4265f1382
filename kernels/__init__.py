"""Triton kernel launchers of fastpeft (shipped as ``fastpeft.kernels``).

One module per op family, each with private ``@triton.jit`` kernels followed by plain host
launchers on 2-D tensors (the autograd Functions live in ``fastpeft.ops``):

* :mod:`fastpeft.kernels.lowrank`: the dense low-rank adapter op, ``lowrank_fwd`` /
  ``lowrank_bwd`` / ``dropout_keep_mask``.
* :mod:`fastpeft.kernels.lowrank_group`: several projections of one input (q/k/v, gate/up),
  ``lowrank_group_fwd`` / ``lowrank_group_bwd``.
* :mod:`fastpeft.kernels.lowrank_mixed`: several adapters in one batch, each row tile with its
  own, ``lowrank_mixed_fwd``.
* :mod:`fastpeft.kernels._aot`: ahead-of-time compilation for sm_80 / sm_90 without a GPU and the
  static checks on the result (shared memory, spills, tensor-core instructions).

Nothing is imported here: importing ``fastpeft.kernels`` does not import triton. On CPU tensors
the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported). ``FASTPEFT_AUTOTUNE=0`` replaces autotuning by one heuristic config per kernel.
"""

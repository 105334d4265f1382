"""Shared test set-up.

Without a GPU, Triton kernels run under the Triton interpreter on CPU tensors: the variable must
be set before triton is first imported, so it is set here, at collection time. With a GPU the
kernels run for real and nothing is set.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

"""Triton kernel launchers of fastpeft (shipped as ``fastpeft.kernels``)."""

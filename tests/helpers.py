"""Reference math and comparison helpers for the tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["reference_lowrank", "rel_err", "assert_close_rel", "saved_tensors", "TOLERANCES"]

# relative error bounds (output, gradients) by input dtype, against the float64 reference
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
              torch.float16: (1e-3, 4e-3), torch.bfloat16: (8e-3, 1.6e-2)}


def reference_lowrank(x, weight, bias, lora_A, lora_B, core=None, out_scale=None, scale=1.0,
                      keep_mask=None, dropout_p=0.0, activation=None):
    """The op in float64 with plain autograd-able torch ops (the oracle)."""
    x64 = x.double()
    y = F.linear(x64, weight.double(), None if bias is None else bias.double())
    xd = x64
    if keep_mask is not None:
        xd = x64 * keep_mask.reshape(x.shape).double() / (1.0 - dropout_p)
    t = xd @ lora_A.double().t()
    z = {None: lambda v: v, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation](t)
    if core is not None:
        z = z * core.double() if core.dim() == 1 else z @ core.double().t()
    delta = z @ lora_B.double().t()
    if out_scale is not None:
        delta = delta * out_scale.double()
    return y + scale * delta


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; inf when actual has NaN/Inf where expected
    is finite."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.equal(torch.isfinite(a), torch.isfinite(e)):
        return math.inf
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_rel(actual, expected, tol, name="tensor"):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    if not err <= tol:
        diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; worst at {idx}: "
                             f"{actual.flatten()[0] if not idx else actual[idx].item()} vs "
                             f"{expected[idx].item() if idx else ''}")


class saved_tensors:
    """Collects every tensor autograd saves inside the block (saved_tensors_hooks)."""

    def __init__(self):
        self.tensors = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        self.tensors.append(t)
        return t

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    def shapes(self):
        return [tuple(t.shape) for t in self.tensors]

    def storage_bytes(self):
        """Bytes of the distinct storages saved (each storage counted once)."""
        seen = {}
        for t in self.tensors:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def peft_layer(base: torch.nn.Linear, method: str = "lora", **config_kwargs):
    """HF PEFT's adapter layer around ``base`` (built through get_peft_model, as users do)."""
    import peft

    config_cls = {"lora": peft.LoraConfig, "vera": peft.VeraConfig, "adalora": peft.AdaLoraConfig}[method]
    model = torch.nn.Sequential(base)
    wrapped = peft.get_peft_model(model, config_cls(target_modules=["0"], **config_kwargs))
    return wrapped.base_model.model[0]

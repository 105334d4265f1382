"""SPEC section 3: what backward keeps, checked with saved_tensors_hooks."""

import pytest
import torch

import fastpeft
from helpers import peft_layer as make_peft_layer, saved_tensors

M, K, D, R = 24, 40, 32, 4


def _op_inputs(train_a, core_kind, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)
    x = rnd(2, M // 2, K).requires_grad_()
    core = {None: None, "diag": rnd(R), "full": rnd(R, R)}[core_kind]
    if core is not None:
        core.requires_grad_()
    params = dict(weight=rnd(D, K), bias=rnd(D), lora_A=rnd(R, K).requires_grad_(train_a),
                  lora_B=rnd(D, R).requires_grad_(), core=core)
    return x, params


def _run(x, p, dropout_p, activation=None):
    with saved_tensors() as saved:
        y = fastpeft.lowrank_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"],
                                    core=p["core"], scale=2.0, dropout_p=dropout_p,
                                    activation=activation)
    y.sum().backward()
    return saved


def _activations(saved, params):
    """Saved tensors that are not parameters."""
    ptrs = {q.data_ptr() for q in params.values() if q is not None}
    return [t for t in saved.tensors if t.data_ptr() not in ptrs or t.numel() == 1]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("core_kind", [None, "diag", "full"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_a_frozen_saves_nothing_of_size_m_by_k(dropout_p, core_kind, activation):
    x, p = _op_inputs(False, core_kind)
    saved = _run(x, p, dropout_p, activation)
    activations = _activations(saved, p)
    big = [tuple(t.shape) for t in activations if t.numel() >= M * K]
    assert big == [], f"tensors of size M×k saved: {big}"
    # T [M, r] alone; the rest are parameters (an eager call's dropout seed is a Python int on
    # the autograd node, not a saved tensor)
    assert sorted(tuple(t.shape) for t in activations) == [(M, R)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("core_kind", [None, "diag"])
def test_a_trainable_saves_the_callers_x_only(dropout_p, core_kind):
    x, p = _op_inputs(True, core_kind)
    saved = _run(x, p, dropout_p)
    big = [t for t in _activations(saved, p) if t.numel() >= M * K]
    assert len(big) == 1, [tuple(t.shape) for t in big]
    # the very storage of the caller's x: no dropped copy, no mask
    assert big[0].data_ptr() == x.data_ptr() and big[0].untyped_storage().nbytes() == x.untyped_storage().nbytes()
    assert not any(t.dtype == torch.bool for t in saved.tensors)


def test_module_bytes_versus_peft_lora():
    """A LoRA layer with dropout: PEFT keeps a dropped copy of x, its mask and lora_A's output;
    fastpeft keeps x (already the caller's) and T."""
    pytest.importorskip("peft")
    torch.manual_seed(0)
    x = torch.randn(M, K, requires_grad=True)
    peft_layer = make_peft_layer(torch.nn.Linear(K, D), r=R, lora_alpha=8, lora_dropout=0.1)
    peft_layer.train()
    with saved_tensors() as peft_saved:
        peft_layer(x).sum().backward()
    base2 = torch.nn.Linear(K, D)
    ours = fastpeft.LowRankLinear.from_linear(base2, fastpeft.AdapterConfig(method="lora", r=R, dropout=0.1))
    with saved_tensors() as our_saved:
        ours(x).sum().backward()
    ours_fa = fastpeft.LowRankLinear.from_linear(torch.nn.Linear(K, D), fastpeft.AdapterConfig(method="lora_fa", r=R, dropout=0.1))
    with saved_tensors() as fa_saved:
        ours_fa(x).sum().backward()
    params = lambda mod: {p.untyped_storage().data_ptr() for p in mod.parameters()}
    act_bytes = lambda s, mod: sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                                    for t in s.tensors if t.untyped_storage().data_ptr() not in params(mod)}.values())
    peft_bytes = act_bytes(peft_saved, peft_layer)
    assert peft_bytes >= M * K * 4 + M * K  # dropped x (fp32) and the mask
    assert act_bytes(our_saved, ours) <= M * K * 4 + M * R * 4 + 8
    assert act_bytes(fa_saved, ours_fa) <= M * R * 4 + 8

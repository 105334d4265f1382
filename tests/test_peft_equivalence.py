"""fastpeft layers equal HF PEFT's LoRA, VeRA and AdaLoRA layers given the same weights."""

import pytest
import torch

import fastpeft
from helpers import assert_close_rel, peft_layer

pytest.importorskip("peft")

K, D, R = 48, 36, 6


def _compare(peft_mod, ours, peft_params, our_params, x_shape=(3, 7, K)):
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_ours = peft_mod(x1), ours(x2)
    assert_close_rel(y_ours, y_peft, 1e-5, "y")
    grad = torch.randn_like(y_peft)
    got = torch.autograd.grad(y_ours, [x2, *our_params], grad)
    want = torch.autograd.grad(y_peft, [x1, *peft_params], grad)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_rel(g.reshape(w.shape), w, 1e-5, f"grad {i}")


def test_lora_matches_peft():
    torch.manual_seed(0)
    base = torch.nn.Linear(K, D)
    ref = peft_layer(torch.nn.Linear(K, D), "lora", r=R, lora_alpha=12, lora_dropout=0.0)
    ref.base_layer.load_state_dict(base.state_dict())
    with torch.no_grad():
        ref.lora_B["default"].weight.normal_()
    ours = fastpeft.LowRankLinear.from_linear(base, fastpeft.AdapterConfig(method="lora", r=R, alpha=12))
    with torch.no_grad():
        ours.lora_A.copy_(ref.lora_A["default"].weight)
        ours.lora_B.copy_(ref.lora_B["default"].weight)
    _compare(ref, ours, [ref.lora_A["default"].weight, ref.lora_B["default"].weight],
             [ours.lora_A, ours.lora_B])


def test_rslora_scale_matches_peft():
    ref = peft_layer(torch.nn.Linear(K, D), "lora", r=R, lora_alpha=12, use_rslora=True)
    ours = fastpeft.LowRankLinear.from_linear(torch.nn.Linear(K, D),
                                              fastpeft.AdapterConfig(r=R, alpha=12, use_rslora=True))
    assert ours.scale == pytest.approx(ref.scaling["default"])


def test_vera_matches_peft():
    torch.manual_seed(0)
    base = torch.nn.Linear(K, D)
    ref = peft_layer(torch.nn.Linear(K, D), "vera", r=R, vera_dropout=0.0, d_initial=0.1)
    ref.base_layer.load_state_dict(base.state_dict())
    with torch.no_grad():
        ref.vera_lambda_b["default"].normal_()
        ref.vera_lambda_d["default"].normal_()
    ours = fastpeft.LowRankLinear.from_linear(base, fastpeft.AdapterConfig(method="vera", r=R))
    assert ours.lora_core.shape == (R,) and ours.lora_out_scale.shape == (D,)
    assert not ours.lora_A.requires_grad and not ours.lora_B.requires_grad
    with torch.no_grad():
        ours.lora_A.copy_(ref.vera_A["default"][:, :K])
        ours.lora_B.copy_(ref.vera_B["default"][:D, :])
        ours.lora_core.copy_(ref.vera_lambda_d["default"])
        ours.lora_out_scale.copy_(ref.vera_lambda_b["default"])
    _compare(ref, ours, [ref.vera_lambda_d["default"], ref.vera_lambda_b["default"]],
             [ours.lora_core, ours.lora_out_scale])


def test_adalora_matches_peft():
    torch.manual_seed(0)
    base = torch.nn.Linear(K, D)
    ref = peft_layer(torch.nn.Linear(K, D), "adalora", init_r=R, target_r=R // 2, lora_alpha=12,
                     total_step=100, lora_dropout=0.0)
    ref.base_layer.load_state_dict(base.state_dict())
    with torch.no_grad():
        ref.lora_E["default"].normal_()
    ours = fastpeft.LowRankLinear.from_linear(base, fastpeft.AdapterConfig(method="adalora", r=R, alpha=12))
    assert ours.lora_core.shape == (R,)
    with torch.no_grad():
        ours.lora_A.copy_(ref.lora_A["default"])
        ours.lora_B.copy_(ref.lora_B["default"])
        ours.lora_core.copy_(ref.lora_E["default"].squeeze(1))
    # PEFT divides by (ranknum + 1e-5); the preset's scale is alpha / r
    ours.scale = ref.scaling["default"] / (ref.ranknum["default"].item() + 1e-5)
    _compare(ref, ours,
             [ref.lora_A["default"], ref.lora_B["default"], ref.lora_E["default"]],
             [ours.lora_A, ours.lora_B, ours.lora_core])

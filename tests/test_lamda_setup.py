"""LaMDA set-up without a full SVD: the initialisation, LaMDA++'s energy curves, and what the
PMB freezer keeps."""

import torch
import torch.nn as nn

import fastpeft
from fastpeft.lamda import energy_curve


def _decaying(d, k, seed):
    gen = torch.Generator().manual_seed(seed)
    n = min(d, k)
    u = torch.linalg.qr(torch.randn(d, n, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(k, n, generator=gen))[0]
    return (u * 0.85 ** torch.arange(n)) @ v.t()


def test_lamda_init_is_the_top_singular_pair_of_w():
    linear = nn.Linear(160, 200)
    with torch.no_grad():
        linear.weight.copy_(_decaying(200, 160, 0))
    u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
    layer = fastpeft.LowRankLinear.from_linear(linear, fastpeft.AdapterConfig(method="lamda", r=8))
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    assert a.shape == (8, 160) and b.shape == (200, 8) and a.is_contiguous() and b.is_contiguous()
    for i in range(8):   # each vector equals the full SVD's up to a common sign
        sign = torch.sign(b[:, i] @ u[:, i])
        assert (b[:, i] - sign * u[:, i]).abs().max() < 1e-4
        assert (a[i] - sign * vh[i]).abs().max() < 1e-4


def test_truncated_energy_curve_is_the_full_curves_prefix():
    linear = nn.Linear(150, 120)
    with torch.no_grad():
        linear.weight.copy_(_decaying(120, 150, 1))
    full = energy_curve("w", linear)
    part = energy_curve("w", linear, max_rank=12)
    assert full.shape == (121,) and part.shape == (13,)
    assert full[-1] == 1.0
    assert torch.allclose(part, full[:13], rtol=1e-9, atol=1e-12)


def test_pmb_freezer_drops_its_copy_once_b_is_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
    model = fastpeft.inject(model, fastpeft.AdapterConfig(method="lamda", r=4, freeze_b_steps=4,
                                                          target_modules=["0", "1"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    freezer = fastpeft.PMBFreezer(model)
    snapshots = []
    for step in range(8):
        model(torch.randn(5, 16)).pow(2).sum().backward()
        opt.step()
        freezer.step()
        opt.zero_grad()
        if step == 1:   # half frozen: the copy of the frozen columns is kept
            assert all(s.values is not None and s.values.shape[1] == 2 for s in freezer._layers)
        if step == 3:
            snapshots = [m.lora_B.detach().clone() for m in (model[0], model[1])]
            state = freezer.state_dict()
    assert freezer.done
    assert all(s.values is None for s in freezer._layers)           # no copy kept
    for layer, snap in zip((model[0], model[1]), snapshots):
        assert torch.equal(layer.lora_B, snap)                      # B never moved again
        assert not layer.lora_B.requires_grad
    assert all(torch.equal(state["frozen"][n], snap) for n, snap in zip(("0", "1"), snapshots))
    assert all(torch.equal(v, s) for v, s in zip(freezer.state_dict()["frozen"].values(), snapshots))

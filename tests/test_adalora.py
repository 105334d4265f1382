"""AdaLoRA budget: cubic schedule, importance scores, pruning to the target rank, masks that
stay zero under optimisers, and the orthogonality regulariser."""


import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.inject import lowrank_layers


def _model(r=6, layers=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(16, 16), nn.Tanh())])
    return fastpeft.inject(model, fastpeft.AdapterConfig(method="adalora", r=r))


def _loss(model, gen):
    x = torch.randn(10, 16, generator=gen)
    return (model(x) - x.flip(-1)).pow(2).mean()


@pytest.mark.parametrize("tinit,tfinal", [(0, 10), (5, 25), (3, 4)], ids=lambda v: str(v))
def test_budget_schedule_is_cubic(tinit, tfinal):
    b0, bt = 120, 40
    for t in range(0, tfinal + 5):
        b = fastpeft.budget_schedule(t, b0, bt, tinit, tfinal)
        if t <= tinit:
            assert b == b0
        elif t >= tfinal:
            assert b == bt
        else:
            assert b == max(bt, int(bt + (b0 - bt) * (1 - (t - tinit) / (tfinal - tinit)) ** 3))
        assert bt <= b <= b0


def test_importance_scores_follow_formula():
    model = _model(layers=1)
    budget = fastpeft.AdaLoRABudget(model, 3, tinit=100, tfinal=200, beta1=0.8, beta2=0.7)
    layer = model[0]
    gen = torch.Generator().manual_seed(0)
    ipt = {id(p): torch.zeros_like(p) for p in (layer.lora_A, layer.lora_B, layer.lora_core)}
    unc = {k: torch.zeros_like(v) for k, v in ipt.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        _loss(model, gen).backward()
        opt.step()
        for p in (layer.lora_A, layer.lora_B, layer.lora_core):
            sens = (p * p.grad).abs().detach()
            ipt[id(p)] = 0.8 * ipt[id(p)] + 0.2 * sens
            unc[id(p)] = 0.7 * unc[id(p)] + 0.3 * (sens - ipt[id(p)]).abs()
        budget.step()
        opt.zero_grad()
    s = {k: ipt[k] * unc[k] for k in ipt}
    expected = s[id(layer.lora_core)] + s[id(layer.lora_B)].mean(0) + s[id(layer.lora_A)].mean(1)
    torch.testing.assert_close(budget.triplet_scores()["0"], expected, rtol=1e-5, atol=1e-12)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd-momentum"])
def test_pruning_reaches_target_rank_and_stays_pruned(optimizer):
    r, layers, target = 6, 3, 2
    model = _model(r=r, layers=layers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=5e-2, momentum=0.9, weight_decay=0.01))
    budget = fastpeft.AdaLoRABudget(model, target, tinit=2, tfinal=12, deltaT=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # start from nonzero cores, so pruning is visible
        for _, m in lowrank_layers(model):
            m.lora_core.uniform_(0.5, 1.0)
    live = []
    for step in range(1, 20):
        (_loss(model, gen) + 0.1 * fastpeft.orthogonality_loss(model)).backward()
        opt.step()
        budget.step()
        opt.zero_grad()
        total_live = sum(budget.ranks().values())
        nonzero = sum(int((m.lora_core != 0).sum()) for _, m in lowrank_layers(model))
        assert nonzero <= max(total_live, 0) or step <= 2
        live.append(total_live)
        assert budget.budget == fastpeft.budget_schedule(step, r * layers, target * layers, 2, 12)
    assert live[0] == r * layers and live[-1] == target * layers      # reaches the target
    assert all(a >= b for a, b in zip(live[9:], live[10:]))             # final mask fixed
    # pruned entries are exactly zero, after further steps with weight decay and momentum
    for name, m in lowrank_layers(model):
        mask = budget.masks[name]
        assert torch.all(m.lora_core[~mask] == 0)
    assert sum(int((m.lora_core != 0).sum()) for _, m in lowrank_layers(model)) == target * layers


def test_optimizer_hook_and_target_total():
    model = _model(r=4, layers=2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    budget = fastpeft.AdaLoRABudget(model, target_total=3, tinit=0, tfinal=3, optimizer=opt)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        _loss(model, gen).backward()
        opt.step()                       # the budget steps from the optimiser's post-hook
        opt.zero_grad()
    assert budget.step_count == 5 and sum(budget.ranks().values()) == 3
    budget.remove()


def test_orthogonality_loss_formula_and_gradient():
    model = _model(r=4, layers=2)
    expected = 0.0
    for _, m in lowrank_layers(model):
        a, b = m.lora_A.double(), m.lora_B.double()
        eye = torch.eye(4, dtype=torch.float64)
        expected += (torch.linalg.matrix_norm(a @ a.t() - eye) ** 2 + torch.linalg.matrix_norm(b.t() @ b - eye) ** 2).item()
    loss = fastpeft.orthogonality_loss(model)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert fastpeft.orthogonality_loss(model, reduction="mean").item() == pytest.approx(expected / 2, rel=1e-5)
    loss.backward()
    assert all(m.lora_A.grad is not None and m.lora_B.grad is not None for _, m in lowrank_layers(model))
    # minimising it makes P and Q orthogonal
    params = [p for _, m in lowrank_layers(model) for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.Adam(params, lr=2e-2)
    for _ in range(300):
        opt.zero_grad()
        fastpeft.orthogonality_loss(model).backward()
        opt.step()
    assert fastpeft.orthogonality_loss(model).item() < 1e-3


def test_adalora_errors():
    lora = fastpeft.inject(nn.Sequential(nn.Linear(8, 8)), fastpeft.AdapterConfig(method="lora", r=2))
    with pytest.raises(ValueError, match="diagonal core"):
        fastpeft.AdaLoRABudget(lora, 1, tinit=0, tfinal=2)
    with pytest.raises(ValueError, match="adalora"):
        fastpeft.orthogonality_loss(lora)
    model = _model(r=4, layers=2)
    with pytest.raises(ValueError, match="tfinal must be greater than tinit"):
        fastpeft.AdaLoRABudget(model, 2, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="exactly one of target_rank"):
        fastpeft.AdaLoRABudget(model, 2, target_total=3, tinit=0, tfinal=5)
    with pytest.raises(ValueError, match="target_total must be an int in \\[0, 8\\]"):
        fastpeft.AdaLoRABudget(model, 5, tinit=0, tfinal=5)
    with pytest.raises(ValueError, match="beta1"):
        fastpeft.AdaLoRABudget(model, 2, tinit=0, tfinal=5, beta1=1.0)
    with pytest.raises(ValueError, match="reduction"):
        fastpeft.orthogonality_loss(model, reduction="max")

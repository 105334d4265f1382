"""LaMDA: PMB gradual freezing (schedule, memory, frozen columns under optimisers, Trainer) and
LaMDA++ rank allocation on weights with a known spectrum."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.inject import lowrank_layers
from fastpeft.lamda import pmb_freeze_step

from helpers import saved_tensors


def _model(r=4, freeze_b_steps=6, d=24, k=20, layers=2, seed=0):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(k, d), nn.Tanh(), nn.Linear(d, k)]
    model = nn.Sequential(*mods)
    config = fastpeft.AdapterConfig(method="lamda", r=r, alpha=2 * r, freeze_b_steps=freeze_b_steps)
    return fastpeft.inject(model, config)


def _train(model, optimizer, freezer, steps, seed=1, zero_to_none=True):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(7, model[0].in_features, generator=gen)
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        if freezer is not None:
            freezer.step()
        optimizer.zero_grad(set_to_none=zero_to_none)


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


# -- schedule --------------------------------------------------------------------------------

@pytest.mark.parametrize("r,T", [(4, 10), (8, 3), (5, 5), (3, 0), (1, 7)], ids=lambda v: str(v))
def test_freeze_schedule_is_documented_formula(r, T):
    model = _model(r=r, freeze_b_steps=T, layers=1)
    freezer = fastpeft.PMBFreezer(model)
    names = [n for n, _ in lowrank_layers(model)]
    opt = torch.optim.SGD(_params(model), lr=0.0)
    for step in range(T + 2):
        expected = sum(1 for j in range(r) if math.ceil((j + 1) * T / r) <= step)
        for n in names:
            assert freezer.frozen_columns(n) == expected, (step, n)
            assert model.get_submodule(n).lora_B.requires_grad == (expected < r)
        _train(model, opt, freezer, 1)
    assert freezer.done
    assert [pmb_freeze_step(j, r, T) for j in range(r)] == [math.ceil((j + 1) * T / r) for j in range(r)]


def test_after_freeze_b_steps_b_is_frozen_and_only_cores_train():
    r, T = 4, 6
    model = _model(r=r, freeze_b_steps=T)
    opt = torch.optim.AdamW(_params(model), lr=1e-2, weight_decay=0.1)
    freezer = fastpeft.PMBFreezer(model)
    layers = lowrank_layers(model)
    before = fastpeft.trainable_parameter_count(model)
    assert before == sum(r * r + m.out_features * r for _, m in layers)
    assert freezer.trainable_adapter_parameters() == before
    _train(model, opt, freezer, T)
    for _, m in layers:
        assert m.lora_B.requires_grad is False and m.lora_B.grad is None
        assert m.lora_A.requires_grad is False and m.lora_core.requires_grad
    # LaMDA after freezing trains r² numbers per layer
    assert fastpeft.trainable_parameter_count(model) == r * r * len(layers)
    assert freezer.trainable_adapter_parameters() == r * r * len(layers)
    # backward computes no dB any more
    model(torch.randn(5, 20)).sum().backward()
    for _, m in layers:
        assert m.lora_B.grad is None and m.lora_core.grad is not None


def test_saved_for_backward_is_T_only_after_freezing():
    r, T, M = 4, 4, 9
    model = _model(r=r, freeze_b_steps=T, layers=1)
    layer = model[0]
    opt = torch.optim.AdamW(_params(model), lr=1e-2, weight_decay=0.1)
    freezer = fastpeft.PMBFreezer(model)
    x = torch.randn(M, 20)

    def saved_by_layer():
        with saved_tensors() as s:
            y = layer(x)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        extra = [t for t in s.tensors if t.untyped_storage().data_ptr() not in params and t.dim() > 0]
        return y, s, extra

    y, s_before, extra_before = saved_by_layer()
    assert [tuple(t.shape) for t in extra_before] == [(M, r)]          # T only (A frozen)
    _train(model, opt, freezer, T)
    assert not layer.lora_B.requires_grad
    y, s_after, extra_after = saved_by_layer()
    # per layer: T [M, r] and nothing else of size M × anything, no copy of x
    assert [tuple(t.shape) for t in extra_after] == [(M, r)]
    assert all(t.numel() < M * 20 or t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
               for t in s_after.tensors)
    assert s_after.storage_bytes() <= s_before.storage_bytes()
    y.sum().backward()
    assert layer.lora_B.grad is None and layer.lora_core.grad.shape == (r, r)


def _frozen_columns_stay(opt_factory, zero_to_none=True, use_optimizer_hook=False):
    r, T = 4, 8
    model = _model(r=r, freeze_b_steps=T)
    opt = opt_factory(_params(model))
    freezer = fastpeft.PMBFreezer(model, optimizer=opt if use_optimizer_hook else None)
    layers = dict(lowrank_layers(model))
    initial = {n: m.lora_B.detach().clone() for n, m in layers.items()}
    snap = {}
    step_freezer = None if use_optimizer_hook else freezer
    for step in range(1, T + 6):
        _train(model, opt, step_freezer, 1, seed=step, zero_to_none=zero_to_none)
        for n, m in layers.items():
            k = freezer.frozen_columns(n)
            for j in range(k):
                if (n, j) not in snap:
                    snap[(n, j)] = m.lora_B[:, j].detach().clone()
                assert torch.equal(m.lora_B[:, j], snap[(n, j)]), f"{n} column {j} moved at step {step}"
    # column 0 froze at step 2 (after moving in steps 1-2), the last column moved until step 8
    for n, m in layers.items():
        assert not torch.equal(m.lora_B[:, -1], initial[n][:, -1])
    return model


@pytest.mark.parametrize("name,factory", [
    ("adamw-wd", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    ("sgd-momentum-wd", lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9, weight_decay=0.01)),
    ("adam-foreach", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05, foreach=True)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_frozen_columns_bit_identical_under_optimisers(name, factory):
    _frozen_columns_stay(factory)


def test_frozen_columns_stay_with_zeroed_not_none_grads_and_optimizer_hook():
    factory = lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)
    _frozen_columns_stay(factory, zero_to_none=False)
    _frozen_columns_stay(factory, use_optimizer_hook=True)


def test_freezer_state_dict_resumes():
    r, T = 4, 8
    model = _model(r=r, freeze_b_steps=T)
    opt = torch.optim.AdamW(_params(model), lr=1e-2, weight_decay=0.1)
    freezer = fastpeft.PMBFreezer(model)
    _train(model, opt, freezer, 3)
    state = freezer.state_dict()
    saved = {n: m.lora_B.detach().clone() for n, m in lowrank_layers(model)}
    # a fresh model with the trained B in place resumes with the same frozen columns
    other = _model(r=r, freeze_b_steps=T)
    with torch.no_grad():
        for n, m in lowrank_layers(other):
            m.lora_B.copy_(saved[n])
    resumed = fastpeft.PMBFreezer(other)
    resumed.load_state_dict(state)
    assert resumed.step_count == 3
    for n, _ in lowrank_layers(other):
        assert resumed.frozen_columns(n) == freezer.frozen_columns(n) == 1
    with pytest.raises(ValueError, match="freeze_b_steps"):
        fastpeft.PMBFreezer(_model(r=r, freeze_b_steps=5)).load_state_dict(state)


def test_freezer_errors():
    model = _model(freeze_b_steps=None)
    with pytest.raises(ValueError, match="freeze_b_steps"):
        fastpeft.PMBFreezer(model)
    with pytest.raises(ValueError, match="freeze_b_steps must be an int >= 0"):
        fastpeft.PMBFreezer(model, -1)
    vera = fastpeft.inject(nn.Sequential(nn.Linear(8, 8)), fastpeft.AdapterConfig(method="vera", r=2))
    with pytest.raises(ValueError, match="trainable lora_B"):
        fastpeft.PMBFreezer(vera, 3)
    with pytest.raises(ValueError, match="not fastpeft layers"):
        fastpeft.PMBFreezer(model, 3, layers=["nope"])
    with pytest.raises(TypeError, match="optimizer"):
        fastpeft.PMBFreezer(model, 3, optimizer="adam")


def test_trainer_callback_with_transformers_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastpeft.lamda import PMBFreezerCallback

    cb = fastpeft.pmb_freezer_callback(4)
    assert isinstance(cb, transformers.TrainerCallback) and isinstance(cb, PMBFreezerCallback)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48,
                                     max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    model = fastpeft.inject(model, fastpeft.AdapterConfig(method="lamda", r=4,
                                                          target_modules=["query", "value"]))
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (8,), generator=gen), "labels": int(i % 2)}
            for i in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=7, per_device_train_batch_size=4,
                                          learning_rate=1e-2, weight_decay=0.1, report_to=[],
                                          logging_strategy="no", save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    layers = lowrank_layers(model)
    initial = {n: m.lora_B.detach().clone() for n, m in layers}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert cb.freezer.step_count == 7 and cb.freezer.done
    for n, m in layers:
        assert not m.lora_B.requires_grad
        # column 0 froze at step 1 and never moved afterwards; the last one trained until step 4
        assert torch.equal(m.lora_B[:, 0], cb.freezer.state_dict()["frozen"][n][:, 0])
        assert not torch.equal(m.lora_B[:, -1], initial[n][:, -1])


def test_callback_catches_up_when_resuming():
    model = _model(r=4, freeze_b_steps=4)
    cb = fastpeft.pmb_freezer_callback()
    cb.on_train_begin(None, SimpleNamespace(global_step=2), None, model=model)
    assert cb.freezer.step_count == 2 and cb.freezer.frozen_columns("0") == 2
    cb.on_optimizer_step(None, None, None)
    assert cb.freezer.frozen_columns("0") == 3
    with pytest.raises(ValueError, match="freeze_b_steps"):
        fastpeft.pmb_freezer_callback(-2)


# -- LaMDA++ ----------------------------------------------------------------------------------

def _with_spectrum(sigma, d=None, k=None, seed=0):
    """A Linear layer whose weight has exactly the singular values ``sigma``."""
    n = len(sigma)
    d, k = d or n, k or n
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, n, generator=gen, dtype=torch.float64))
    layer = nn.Linear(k, d, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.t())
    return layer


def _flat(rank, n=64):
    """A flat spectrum of the given rank: e(k) = k / rank for k ≤ rank."""
    return [1.0] * rank + [0.0] * (n - rank)


def _curve(sigma):
    sq = [x * x for x in sigma]
    total, acc, out = sum(sq), 0.0, [0.0]
    for v in sq:
        acc += v
        out.append(acc / total)
    return out


def _inverse(curve, tau):
    for k in range(1, len(curve)):
        if curve[k] >= tau:
            return (k - 1) + (tau - curve[k - 1]) / (curve[k] - curve[k - 1])
    return len(curve) - 1


def test_energy_scores_follow_formula():
    gen = torch.Generator().manual_seed(3)
    sigmas = [sorted(torch.rand(48, generator=gen).tolist(), reverse=True) for _ in range(3)]
    model = nn.Sequential(*[_with_spectrum(s, seed=i) for i, s in enumerate(sigmas)])
    scores = fastpeft.energy_scores(model, ["0", "1", "2"], energy_rank=8)
    for i, s in enumerate(sigmas):
        sq = torch.tensor(s, dtype=torch.float64) ** 2
        assert scores[str(i)] == pytest.approx((sq[:8].sum() / sq.sum()).item(), rel=1e-10)


def test_lamda_plus_ranks_on_known_spectrum_exact():
    # flat spectra of rank 16, 32, 32, 48: e(k) = k / rank; R = 64 → τ = ½ → 8, 16, 16, 24
    model = nn.Sequential(*[_with_spectrum(_flat(n), seed=i) for i, n in enumerate([16, 32, 32, 48])])
    ranks = fastpeft.lamda_plus_ranks(model, ["0", "1", "2", "3"], mean_rank=16)
    assert ranks == {"0": 8, "1": 16, "2": 16, "3": 24}
    assert fastpeft.energy_scores(model, ["0", "1", "2", "3"], energy_rank=16) == pytest.approx(
        {"0": 1.0, "1": 0.5, "2": 0.5, "3": 1 / 3}, rel=1e-9)
    # the layer whose energy concentrates in its top singular values gets the least rank
    adapted = fastpeft.inject(model, fastpeft.AdapterConfig(method="lamda", target_modules=["0", "1", "2", "3"]),
                              ranks=ranks)
    assert [adapted[i].lora_core.shape for i in range(4)] == [(8, 8), (16, 16), (16, 16), (24, 24)]


@pytest.mark.parametrize("mean_rank,L,seed", [(16, 7, 0), (24, 5, 1), (12, 9, 2), (8, 6, 3)],
                         ids=lambda v: str(v))
def test_lamda_plus_ranks_sum_to_budget_and_track_targets(mean_rank, L, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 96
    sigmas = []
    for _ in range(L):
        decay = 0.02 + 0.3 * torch.rand((), generator=gen).item()   # fast decay: concentrated energy
        sigmas.append([math.exp(-decay * i) for i in range(n)])
    model = nn.Sequential(*[_with_spectrum(s, seed=i) for i, s in enumerate(sigmas)])
    names = [str(i) for i in range(L)]
    q, cap = 8, 4 * mean_rank
    ranks = fastpeft.lamda_plus_ranks(model, names, mean_rank=mean_rank)
    assert ranks == fastpeft.lamda_plus_ranks(model, names, mean_rank=mean_rank)  # deterministic
    budget = mean_rank * L
    assert abs(sum(ranks.values()) - budget) <= q / 2
    assert sum(ranks.values()) == q * math.floor(budget / q + 0.5)
    assert all(r % q == 0 and q <= r <= cap for r in ranks.values())
    # the documented formula: t = clip(e⁻¹(τ), q, cap) with Σ t = q·round(R/q), |r − t| < q
    curves = [_curve(sg) for sg in sigmas]
    total = q * math.floor(budget / q + 0.5)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        tau = (lo + hi) / 2
        if sum(min(cap, max(q, _inverse(c, tau))) for c in curves) < total:
            lo = tau
        else:
            hi = tau
    t = [min(cap, max(q, _inverse(c, hi))) for c in curves]
    for i, name in enumerate(names):
        assert abs(ranks[name] - t[i]) < q, (name, ranks[name], t[i])
    e = [c[mean_rank] for c in curves]
    # monotone: more concentrated energy never gets more rank
    order = sorted(range(L), key=lambda i: e[i])
    assert all(ranks[names[a]] >= ranks[names[b]] for a, b in zip(order, order[1:]))


def test_lamda_plus_ranks_clamps_to_floor_and_cap():
    # a rank-2 weight (all energy in the top ρ) gets the floor; flat spectra share the rest
    model = nn.Sequential(_with_spectrum([1.0, 0.5] + [0.0] * 62),
                          _with_spectrum([1.0] * 64, seed=1), _with_spectrum([1.0] * 64, seed=2))
    ranks = fastpeft.lamda_plus_ranks(model, ["0", "1", "2"], mean_rank=16, max_rank=24)
    assert ranks == {"0": 8, "1": 24, "2": 16} or ranks == {"0": 8, "1": 16, "2": 24}
    assert sum(ranks.values()) == 48
    # a cap by the layer's size: min(d, k) = 20 → at most 16
    small = nn.Sequential(_with_spectrum([1.0] * 20, d=20, k=40), _with_spectrum([1.0, 0.1] + [0.0] * 30))
    ranks = fastpeft.lamda_plus_ranks(small, ["0", "1"], mean_rank=16, max_rank=64)
    assert ranks["0"] == 16 and ranks["1"] == 16


def test_lamda_plus_ranks_on_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, intermediate_size=128))
    config = fastpeft.AdapterConfig(method="lamda", target_modules=["query", "key", "value", "dense"])
    ranks = fastpeft.lamda_plus_ranks(model, config, mean_rank=16)
    assert len(ranks) == 13 and sum(ranks.values()) == 16 * 13       # 2 × (q, k, v, 3 dense) + pooler
    fastpeft.inject(model, config, ranks=ranks)
    for name, r in ranks.items():
        assert model.get_submodule(name).r == r


def test_lamda_plus_ranks_errors():
    model = nn.Sequential(_with_spectrum([1.0] * 32), _with_spectrum([1.0] * 32, seed=1))
    with pytest.raises(ValueError, match="mean_rank must be an int >= 1"):
        fastpeft.lamda_plus_ranks(model, ["0", "1"], mean_rank=0)
    with pytest.raises(ValueError, match="min_rank must be a positive multiple"):
        fastpeft.lamda_plus_ranks(model, ["0", "1"], mean_rank=16, min_rank=4)
    with pytest.raises(ValueError, match="budget"):
        fastpeft.lamda_plus_ranks(model, ["0", "1"], mean_rank=4)          # below the floor
    with pytest.raises(ValueError, match="max_rank"):
        fastpeft.lamda_plus_ranks(model, ["0", "1"], mean_rank=16, max_rank=4)
    with pytest.raises(ValueError, match="no Linear layer"):
        fastpeft.lamda_plus_ranks(model, ["nope"], mean_rank=16)
    with pytest.raises(ValueError, match="energy_rank"):
        fastpeft.energy_scores(model, ["0"], energy_rank=0)

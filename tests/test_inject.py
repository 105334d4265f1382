"""inject / save_adapter / load_adapter on whole models."""

import json
import os

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import AdapterConfig, LowRankLinear
from fastpeft.inject import lowrank_layers


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim // 2)
        self.v_proj = nn.Linear(dim, dim // 2, bias=False)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h = self.norm(x)
        a = self.q_proj(h) + torch.cat([self.k_proj(h), self.v_proj(h)], -1)
        return x + a + self.down(torch.relu(self.up(h)))


class Net(nn.Module):
    def __init__(self, dim=16, layers=2):
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.lm_head = nn.Linear(dim, 50)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _adapted_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LowRankLinear))


def test_targets_by_names_and_regex():
    model = fastpeft.inject(_net(), AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert _adapted_names(model) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    model = fastpeft.inject(_net(), AdapterConfig(r=4, target_modules=r"layers\.1\..*_proj"))
    assert _adapted_names(model) == ["layers.1.k_proj", "layers.1.q_proj", "layers.1.v_proj"]
    # all-linear, as PEFT: a plain nn.Module has no output layer to leave out (transformers models
    # leave out get_output_embeddings(); see test_hardening.py)
    model = fastpeft.inject(_net(), AdapterConfig(r=4))
    assert len(_adapted_names(model)) == 11 and "lm_head" in _adapted_names(model)
    model = fastpeft.inject(_net(), AdapterConfig(r=4, target_modules="all-linear", exclude_modules=["down", "lm_head"]))
    assert len(_adapted_names(model)) == 8


def test_only_adapter_tensors_train_and_output_unchanged():
    model = _net()
    ids = torch.randint(0, 50, (2, 5))
    before = model(ids)
    fastpeft.inject(model, AdapterConfig(method="lora", r=4, target_modules=["q_proj", "up"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.lora_{ab}" for i in range(2) for m in ("q_proj", "up") for ab in "AB"}
    torch.testing.assert_close(model(ids), before)
    model(ids).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_bitfit_alone_and_with_a_preset():
    model = fastpeft.inject(_net(), AdapterConfig(method="bitfit"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") for n in trainable) and not _adapted_names(model)
    assert "layers.0.norm.bias" not in trainable  # biases of the Linear layers
    model = fastpeft.inject(_net(), AdapterConfig(method="lora_fa", r=2, target_modules=["q_proj"], train_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.q_proj.{t}" for i in range(2) for t in ("lora_B", "bias")}


def test_vera_projections_are_shared_across_layers():
    model = fastpeft.inject(_net(), AdapterConfig(method="vera", r=4, target_modules=["q_proj", "k_proj", "up"]))
    layers = [m for _, m in lowrank_layers(model)]
    assert len({m.lora_A.untyped_storage().data_ptr() for m in layers}) == 1
    assert len({m.lora_B.untyped_storage().data_ptr() for m in layers}) == 1
    again = fastpeft.inject(_net(), AdapterConfig(method="vera", r=4, target_modules=["q_proj", "k_proj", "up"]))
    torch.testing.assert_close(again.layers[1].up.lora_A, model.layers[1].up.lora_A)  # from the seed


def test_per_layer_ranks():
    model = fastpeft.inject(_net(), AdapterConfig(method="lamda", r=4, target_modules=["q_proj"],
                                                  rank_pattern={"layers.1.q_proj": 2}))
    assert [model.layers[i].q_proj.r for i in range(2)] == [4, 2]
    model = fastpeft.inject(_net(), AdapterConfig(method="lamda", r=4, target_modules=["q_proj"]),
                            ranks={"layers.0.q_proj": 8})
    assert [model.layers[i].q_proj.r for i in range(2)] == [8, 4]
    with pytest.raises(ValueError, match="not adapted"):
        fastpeft.inject(_net(), AdapterConfig(r=4, target_modules=["q_proj"]), ranks={"layers.0.up": 8})


def test_inject_errors_change_nothing():
    model = _net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no Linear layer matched"):
        fastpeft.inject(model, AdapterConfig(r=4, target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"r=20 for 'layers.0.k_proj' must be in \[1, min\(d=8, k=16\)\]"):
        fastpeft.inject(model, AdapterConfig(method="lamda", r=20, target_modules=["k_proj"]))
    assert not _adapted_names(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _train_a_bit(model, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()
    return ids


@pytest.mark.parametrize("method", ["lora", "lamda", "vera", "adalora", "lora_fa"])
def test_save_load_round_trip(tmp_path, method):
    config = AdapterConfig(method=method, r=4, alpha=8, target_modules=["q_proj", "up"], train_bias=True)
    model = fastpeft.inject(_net(), config)
    ids = _train_a_bit(model)
    want = model(ids)
    fastpeft.save_adapter(model, tmp_path / "a")
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == ["fastpeft_adapter.safetensors", "fastpeft_config.json"]
    assert json.load(open(tmp_path / "a" / "fastpeft_config.json"))["method"] == method
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "a" / "fastpeft_adapter.safetensors"))
    assert all(".lora_" in k or k.endswith(".bias") for k in keys)   # adapter tensors only

    fresh = _net()  # same base weights, no adapter: load injects it
    fastpeft.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(ids), want)
    fastpeft.save_adapter(fresh, tmp_path / "b")
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    injected = fastpeft.inject(_net(), config)  # already adapted: load copies values in
    fastpeft.load_adapter(injected, tmp_path / "a")
    torch.testing.assert_close(injected(ids), want)


def test_load_mismatch_fails_and_changes_nothing(tmp_path):
    model = fastpeft.inject(_net(), AdapterConfig(r=4, target_modules=["q_proj"]))
    _train_a_bit(model)
    fastpeft.save_adapter(model, tmp_path)

    class Wider(Net):
        def __init__(self):
            super().__init__(dim=24)

    for target in (fastpeft.inject(Wider(), AdapterConfig(r=4, target_modules=["q_proj"])), Wider(),
                   fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q_proj"])),
                   fastpeft.inject(_net(), AdapterConfig(r=4, target_modules=["k_proj"]))):
        modules = {n: type(m) for n, m in target.named_modules()}
        state = {k: v.clone() for k, v in target.state_dict().items()}
        grads = {n: p.requires_grad for n, p in target.named_parameters()}
        with pytest.raises(ValueError, match="do not match|does not fit"):
            fastpeft.load_adapter(target, tmp_path)
        assert {n: type(m) for n, m in target.named_modules()} == modules
        assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
        assert {n: p.requires_grad for n, p in target.named_parameters()} == grads


def test_load_never_unpickles(tmp_path, monkeypatch):
    import pickle
    model = fastpeft.inject(_net(), AdapterConfig(r=4, target_modules=["q_proj"]))
    fastpeft.save_adapter(model, tmp_path)

    def refuse(*a, **k):
        raise AssertionError("unpickling during load_adapter")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fastpeft.load_adapter(_net(), tmp_path)


def test_transformers_llama_inject():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 7))
    before = model(ids).logits
    fastpeft.inject(model, AdapterConfig(method="lamda", r=4, dropout=0.1,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"]))
    assert len(_adapted_names(model)) == 14
    model.eval()
    torch.testing.assert_close(model(ids).logits, before)
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_core.grad is not None

"""fastpeft.from_peft / fastpeft.to_peft: PEFT-trained adapters through fastpeft and back."""

import json
import os

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import LowRankLinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
TOL = 1e-6


def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(seed=0):
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _train_peft(model, steps=3):
    """A few Adam steps on PEFT's own model, so that B != 0 and every adapter tensor moved."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _peft_trained(tmp_path, config, make=_llama):
    model = peft.get_peft_model(make(), config)
    _train_peft(model)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def _round_trip(tmp_path, saved, make=_llama, per_layer_alpha=False, **to_peft_kwargs):
    """PEFT folder → PeftModel → from_peft → to_peft → PeftModel; returns (fastpeft model, the
    three logits)."""
    loaded = peft.PeftModel.from_pretrained(make(), saved)
    want = _logits(loaded)
    if per_layer_alpha:
        with pytest.warns(UserWarning, match="scale that fastpeft's AdapterConfig cannot record"):
            model = fastpeft.from_peft(loaded)
    else:
        model = fastpeft.from_peft(loaded)
    got = _logits(model)
    fastpeft.to_peft(model, tmp_path / "again", **to_peft_kwargs)
    assert sorted(os.listdir(tmp_path / "again")) == ["adapter_config.json", "adapter_model.safetensors"]
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "again").eval()
    if to_peft_kwargs.get("task_type") == "CAUSAL_LM":
        assert isinstance(back, peft.PeftModelForCausalLM) and isinstance(loaded, peft.PeftModelForCausalLM)
    return model, want, got, _logits(back)


@pytest.mark.parametrize("kwargs", [
    dict(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM"),
    dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
], ids=["lora-causal-lm", "rslora-patterns"])
def test_lora_trained_by_peft_round_trip(tmp_path, kwargs):
    saved = _peft_trained(tmp_path, peft.LoraConfig(target_modules=TARGETS, **kwargs))
    model, want, got, back = _round_trip(tmp_path, saved, per_layer_alpha="alpha_pattern" in kwargs,
                                         task_type=kwargs.get("task_type"))
    if "task_type" in kwargs:
        assert json.load(open(tmp_path / "again" / "adapter_config.json"))["task_type"] == "CAUSAL_LM"
    assert not isinstance(model, peft.PeftModel)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 12 and all(m.lora_B.abs().max() > 0 for m in layers)
    assert _max_diff(got, want) <= TOL
    assert _max_diff(back, want) <= TOL
    assert model.model.layers[0].self_attn.k_proj.dropout_p == kwargs.get("lora_dropout", 0.0)


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2-conv1d"])
def test_dora_trained_by_peft_round_trip(tmp_path, make):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                             target_modules=TARGETS if make is _llama else ["c_attn", "c_fc"])
    saved = _peft_trained(tmp_path, config, make=make)
    model, want, got, back = _round_trip(tmp_path, saved, make=make)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers and {m.method for m in layers} == {"dora"} and model.fastpeft_config.method == "dora"
    assert all(m.lora_magnitude is not None and m.lora_magnitude.requires_grad is False for m in layers)
    assert _max_diff(got, want) <= TOL and _max_diff(back, want) <= TOL
    assert json.load(open(tmp_path / "again" / "adapter_config.json"))["use_dora"] is True


def test_dora_one_step_equals_peft():
    """The same DoRA model through PEFT and through fastpeft: equal logits, and equal again after
    one Adam step on each."""
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS))
    _train_peft(pm, steps=1)
    twin = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS))
    twin.load_state_dict(pm.state_dict())
    magnitude = twin.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    model = fastpeft.from_peft(twin)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.method == "dora" and layer.lora_magnitude is magnitude
    assert _max_diff(_logits(model), _logits(pm)) <= TOL
    _train_peft(pm, steps=1)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    model.eval()
    assert _max_diff(_logits(model), _logits(pm)) <= 1e-5
    mags = [m.lora_magnitude_vector["default"].weight for m in pm.modules() if hasattr(m, "lora_magnitude_vector")
            and "default" in m.lora_magnitude_vector]
    ours = [m.lora_magnitude for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(mags) == len(ours) == 12
    assert max(_max_diff(a, b) for a, b in zip(ours, mags)) <= 1e-5


def test_dora_merged_by_peft_unmerges():
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]))
    _train_peft(pm, steps=2)
    want = _logits(pm)
    pm.merge_adapter()
    model = fastpeft.from_peft(pm)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.merged
    assert _max_diff(_logits(model), want) <= 1e-5
    layer.unmerge()
    model.model.layers[1].self_attn.q_proj.unmerge()
    assert _max_diff(_logits(model), want) <= 1e-5


def test_from_peft_shares_storage_and_flags():
    base = _llama()
    q = base.model.layers[0].self_attn.q_proj
    weight_ptr, bias = q.weight.data_ptr(), q.bias
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peft_layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    lora_a, lora_b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    state = torch.random.get_rng_state()
    model = fastpeft.from_peft(pm)
    assert torch.equal(torch.random.get_rng_state(), state)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LowRankLinear) and layer.weight.data_ptr() == weight_ptr and layer.bias is bias
    assert layer.lora_A is lora_a and layer.lora_B is lora_b
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad and not layer.weight.requires_grad
    assert model.fastpeft_config.method == "lora" and model.fastpeft_config.r == 4
    assert not any("lora_" in n for n, _ in model.named_modules() if "q_proj" not in n)


def test_vera_trained_by_peft_round_trip(tmp_path):
    config = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], d_initial=0.5)
    saved = _peft_trained(tmp_path, config)
    model, want, got, back = _round_trip(tmp_path, saved)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert {m.method for m in layers} == {"vera"}
    # the shared projections stay shared (views of PEFT's buffers)
    assert len({m.lora_A.untyped_storage().data_ptr() for m in layers}) == 1
    assert _max_diff(got, want) <= TOL and _max_diff(back, want) <= TOL
    assert json.load(open(tmp_path / "again" / "adapter_config.json"))["peft_type"] == "VERA"


def test_adalora_trained_by_peft_round_trip(tmp_path):
    config = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=100, tinit=50, tfinal=10,
                                target_modules=["q_proj", "v_proj", "down_proj"])
    saved = _peft_trained(tmp_path, config)
    model, want, got, back = _round_trip(tmp_path, saved)
    layer = model.model.layers[1].mlp.down_proj
    assert layer.method == "adalora" and layer.lora_core.shape == (4,)
    assert _max_diff(got, want) <= TOL and _max_diff(back, want) <= TOL
    assert json.load(open(tmp_path / "again" / "adapter_config.json"))["peft_type"] == "ADALORA"


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    saved = _peft_trained(tmp_path, config, make=_gpt2)
    model, want, got, back = _round_trip(tmp_path, saved, make=_gpt2)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LowRankLinear) and layer.weight.shape == (96, 32)
    assert _max_diff(got, want) <= TOL and _max_diff(back, want) <= TOL
    # merging writes through the shared (transposed) storage and keeps the outputs
    layer_out = _logits(model)
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.merge()
    assert _max_diff(_logits(model), layer_out) <= 1e-5


def test_active_adapter_of_several(tmp_path):
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="one")
    pm.add_adapter("two", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _randomise_lora_B(pm)
    pm.set_adapter("two")
    want = _logits(pm)
    model = fastpeft.from_peft(pm)
    assert model.model.layers[0].self_attn.q_proj.r == 2
    assert isinstance(model.model.layers[0].self_attn.v_proj, LowRankLinear)
    assert _max_diff(_logits(model), want) <= TOL


def test_merged_peft_layer_stays_merged():
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    _randomise_lora_B(pm)
    unmerged = _logits(pm)
    pm.merge_adapter()
    model = fastpeft.from_peft(pm)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.merged
    layer.unmerge()
    model.model.layers[1].self_attn.q_proj.unmerge()
    assert _max_diff(_logits(model), unmerged) <= 1e-5


def _randomise_lora_B(model):
    for m in model.modules():
        if isinstance(getattr(m, "lora_B", None), nn.ModuleDict):
            for lin in m.lora_B.values():
                nn.init.normal_(lin.weight)


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_unchanged(model, snap):
    modules, params = snap
    assert {n: type(m) for n, m in model.named_modules()} == modules
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (value, flag) in params.items():
        assert torch.equal(now[n], value) and now[n].requires_grad == flag, n


@pytest.mark.parametrize("case", ["lora_bias", "embedding", "two_active", "prefix"])
def test_from_peft_refusals_change_nothing(case):
    if case == "lora_bias":
        pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
        match = "lora_bias"
    elif case == "embedding":
        pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
        match = "Embedding"
    elif case == "two_active":
        pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="first")
        pm.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
        pm.base_model.set_adapter(["first", "second"])
        match = "exactly one active adapter"
    else:
        pm = peft.get_peft_model(_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
        match = "PREFIX_TUNING"
    snap = _snapshot(pm)
    with pytest.raises(ValueError, match=match):
        fastpeft.from_peft(pm)
    _assert_unchanged(pm, snap)
    with pytest.raises(TypeError, match="peft.PeftModel"):
        fastpeft.from_peft(_llama())


def test_modules_to_save_are_unwrapped():
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    pm = peft.get_peft_model(_llama(), config)
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
    want = _logits(pm)
    model = fastpeft.from_peft(pm)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.requires_grad
    assert _max_diff(_logits(model), want) <= TOL


# -- to_peft from fastpeft presets ---------------------------------------------------------

def _trained_fastpeft(config, ranks=None):
    model = fastpeft.inject(_llama(), config, ranks=ranks)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("method,kwargs,peft_type", [
    ("lora", dict(alpha=16, use_rslora=True), None),
    ("lora_fa", dict(alpha=4), None),
    ("lamda", dict(alpha=8), None),                 # full r×r core folded: B' = B·S
    ("vera", dict(), None),
    ("vera", dict(), "lora"),                       # λ_b, λ_d folded into B
    ("adalora", dict(alpha=8), None),
    ("adalora", dict(alpha=8), "lora"),
    ("lora", dict(alpha=8, train_bias=True), None),  # BitFit beside LoRA: bias="all"
], ids=["lora-rslora-ranks", "lora_fa", "lamda-ranks", "vera", "vera-as-lora", "adalora", "adalora-as-lora",
     "lora-bitfit"])
def test_to_peft_presets(tmp_path, method, kwargs, peft_type):
    config = fastpeft.AdapterConfig(method=method, r=4, target_modules=["q_proj", "v_proj", "up_proj"], **kwargs)
    ranks = {"model.layers.1.mlp.up_proj": 2} if method in ("lamda", "lora") else None
    model = _trained_fastpeft(config, ranks)
    want = _logits(model)
    fastpeft.to_peft(model, tmp_path, peft_type=peft_type)
    back = peft.PeftModel.from_pretrained(_llama(), tmp_path).eval()
    assert _max_diff(_logits(back), want) <= TOL


def test_to_peft_refusals(tmp_path):
    parallel = fastpeft.inject(_llama(), fastpeft.AdapterConfig(method="parallel", r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="activation 'relu'.*non-linear"):
        fastpeft.to_peft(parallel, tmp_path)
    bitfit = fastpeft.inject(_gpt2(), fastpeft.AdapterConfig(method="bitfit", target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="no fastpeft layers"):
        fastpeft.to_peft(bitfit, tmp_path)
    lamda = fastpeft.inject(_llama(), fastpeft.AdapterConfig(method="lamda", r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not VeRA-shaped"):
        fastpeft.to_peft(lamda, tmp_path, peft_type="vera")
    with pytest.raises(ValueError, match="peft_type must be one of"):
        fastpeft.to_peft(lamda, tmp_path, peft_type="ia3")
    assert not os.listdir(tmp_path)


def test_to_peft_is_deterministic(tmp_path):
    model = _trained_fastpeft(fastpeft.AdapterConfig(method="lamda", r=4, target_modules=["q_proj"]))
    fastpeft.to_peft(model, tmp_path / "a")
    fastpeft.to_peft(model, tmp_path / "b")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_4bit_base(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    quant = nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4"), nn.ReLU(),
                          bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4"))
    quant.load_state_dict(base.state_dict())
    quant = quant.to("cpu")  # quantises
    pm = peft.get_peft_model(quant, peft.LoraConfig(r=4, target_modules=["0", "2"]))
    _randomise_lora_B(pm)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = pm(x)
    if not hasattr(fastpeft, "LowRankLinear4bit"):
        snap = _snapshot(pm)
        with pytest.raises(NotImplementedError, match="LowRankLinear4bit.from_bnb"):
            fastpeft.from_peft(pm)
        _assert_unchanged(pm, snap)
        return
    model = fastpeft.from_peft(pm)
    assert isinstance(model[0], fastpeft.LowRankLinear4bit)
    with torch.no_grad():
        assert _max_diff(model(x), want) <= 1e-5


def test_qdora_4bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    quant = nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4"), nn.ReLU(),
                          bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="fp4"))
    quant.load_state_dict(base.state_dict())
    quant = quant.to("cpu")  # quantises
    pm = peft.get_peft_model(quant, peft.LoraConfig(r=4, target_modules=["0", "2"], use_dora=True))
    _randomise_lora_B(pm)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = pm(x)
    model = fastpeft.from_peft(pm)
    assert isinstance(model[0], fastpeft.LowRankLinear4bit) and model[0].lora_magnitude is not None
    with torch.no_grad():
        assert _max_diff(model(x), want) <= 1e-5

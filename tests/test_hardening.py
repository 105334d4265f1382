"""Hostile input to the library API: a failing call changes nothing (model, files, config), a
load gives the saved model exactly or a clear refusal, configs are checked when built, and
inject adapts what PEFT adapts (Conv1D, Linear subclasses, "all-linear", ranks above min(d, k))."""

import builtins
import json
import os

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import AdapterConfig, LowRankLinear
from fastpeft.inject import ADAPTER_FILE, CONFIG_FILE, lowrank_layers

transformers = pytest.importorskip("transformers")


class Net(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Embedding(20, dim)
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim, bias=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.q(h) + self.v(h)
        return self.head(h + self.down(torch.relu(self.up(h))))


IDS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _state(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            getattr(model, "fastpeft_config", None))


def _assert_same(model, before):
    modules, params, config = _state(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for n, (value, flag) in params.items():
        old = before[1][n][0]
        assert value.shape == old.shape and torch.allclose(value, old, rtol=0, atol=0, equal_nan=True), n
        assert flag == before[1][n][1], n
    assert config == before[2]


def _randomise(model, seed=1):
    """Non-zero adapter values, so that outputs depend on every adapter tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lowrank_layers(model):
            for t in (layer.lora_A, layer.lora_B, layer.lora_core, layer.lora_out_scale):
                if t is not None:
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return model


def _files(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


# -- configuration is checked when it is built ---------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(seed="x"), "seed"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
    (dict(train_bias="no"), "train_bias"), (dict(use_rslora="no"), "use_rslora"),
    (dict(vera_d_initial=float("nan")), "vera_d_initial"), (dict(alpha=float("inf")), "alpha"),
    (dict(alpha=True), "alpha"), (dict(dropout=float("nan")), "dropout"),
    (dict(target_modules=5), "target_modules"), (dict(target_modules="("), "target_modules"),
    (dict(target_modules=["q", 3]), "target_modules"), (dict(exclude_modules="[a-"), "exclude_modules"),
    (dict(rank_pattern={"(": 2}), "rank_pattern"), (dict(rank_pattern=[("q", 2)]), "rank_pattern"),
    (dict(method=["lora"]), "method"), (dict(freeze_b_steps=True), "freeze_b_steps"),
    (dict(modules_to_save=7), "modules_to_save"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_config_fields_are_checked_at_construction(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        AdapterConfig(**kwargs)


def test_config_keeps_a_dtype_as_its_name():
    config = AdapterConfig(adapter_dtype=torch.bfloat16)
    assert config.adapter_dtype == "bfloat16" and json.loads(config.to_json())["adapter_dtype"] == "bfloat16"


@pytest.mark.parametrize("text", ["[]", "null", "5", '{"method": ["lora"]}', "{not json"])
def test_damaged_config_file_is_a_clear_error_and_changes_nothing(tmp_path, text):
    model = fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q"]))
    fastpeft.save_adapter(model, tmp_path)
    (tmp_path / CONFIG_FILE).write_text(text)
    fresh = _net()
    before = _state(fresh)
    with pytest.raises((TypeError, ValueError), match=CONFIG_FILE):
        fastpeft.load_adapter(fresh, tmp_path)
    _assert_same(fresh, before)


# -- a failing inject or load changes nothing ------------------------------------------------

@pytest.mark.parametrize("case", ["vera-rank-pattern", "fractional-rank", "lamda-nonfinite", "lamda-rank",
                                  "unknown-rank-name"])
def test_failed_inject_changes_nothing(case):
    model = _net()
    if case == "lamda-nonfinite":
        with torch.no_grad():
            model.up.weight[0, 0] = float("nan")
    before = _state(model)
    config, ranks = {
        "vera-rank-pattern": (AdapterConfig(method="vera", r=2, rank_pattern={"up": 4}), None),
        "fractional-rank": (AdapterConfig(r=2, target_modules=["q"]), {"q": 2.5}),
        "lamda-nonfinite": (AdapterConfig(method="lamda", r=2, target_modules=["q", "up"]), None),
        "lamda-rank": (AdapterConfig(method="lamda", r=2, target_modules=["q", "head"]), {"head": 4}),
        "unknown-rank-name": (AdapterConfig(r=2, target_modules=["q"]), {"nope": 2}),
    }[case]
    with pytest.raises((TypeError, ValueError)) as info:
        fastpeft.inject(model, config, ranks=ranks)
    if case in ("lamda-nonfinite", "lamda-rank"):  # the error names the layer
        assert ("'up'" if case == "lamda-nonfinite" else "'head'") in str(info.value)
    _assert_same(model, before)


def test_failed_injection_inside_load_changes_nothing(tmp_path):
    model = fastpeft.inject(_net(), AdapterConfig(method="lamda", r=2, target_modules=["q", "up"]))
    fastpeft.save_adapter(model, tmp_path)
    fresh = _net()
    with torch.no_grad():
        fresh.up.weight[1, 2] = float("inf")   # the injection's SVD initialisation refuses it
    before = _state(fresh)
    with pytest.raises(ValueError, match="'up'.*NaN or Inf"):
        fastpeft.load_adapter(fresh, tmp_path)
    _assert_same(fresh, before)


def _tampered(tmp_path, edit, config=None):
    from safetensors.torch import load_file, save_file
    model = _randomise(fastpeft.inject(_net(), config or AdapterConfig(r=2, target_modules=["q", "up"])))
    fastpeft.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / ADAPTER_FILE)
    edit(tensors)
    save_file(tensors, tmp_path / ADAPTER_FILE)
    return model


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.bool, torch.uint16, torch.float8_e4m3fn],
                         ids=str)
@pytest.mark.parametrize("target", ["fresh", "adapted"])
def test_adapter_tensors_must_be_floating_point(tmp_path, dtype, target):
    def edit(tensors):  # the last key, so that a load that copies in order has copied the others
        key = sorted(tensors)[-1]
        tensors[key] = (tensors[key] * 4).to(dtype) if dtype != torch.bool else tensors[key] > 0

    _tampered(tmp_path, edit)
    victim = _net(1) if target == "fresh" else fastpeft.inject(_net(1), AdapterConfig(r=2, target_modules=["q", "up"]))
    before = _state(victim)
    with pytest.raises(ValueError, match=str(dtype).replace("torch.", "")):
        fastpeft.load_adapter(victim, tmp_path)
    _assert_same(victim, before)


def test_one_dimensional_lora_a_is_refused(tmp_path):
    _tampered(tmp_path, lambda t: t.__setitem__("q.lora_A", t["q.lora_A"].reshape(-1)))
    fresh = _net()
    before = _state(fresh)
    with pytest.raises(ValueError, match="q.lora_A is 1-D, expected 2-D"):
        fastpeft.load_adapter(fresh, tmp_path)
    _assert_same(fresh, before)


def test_save_adapter_is_atomic(tmp_path, monkeypatch):
    model = _randomise(fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q"])))
    fastpeft.save_adapter(model, tmp_path)
    old = _files(tmp_path)
    _randomise(model, seed=7)
    model.fastpeft_config = AdapterConfig(r=2, dropout=0.1, target_modules=["q"])
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(CONFIG_FILE) and "w" in mode:
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(OSError, match="No space"):
        fastpeft.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == old    # both old files, nothing left behind

    real_rename = os.rename
    calls = []

    def failing_rename(src, dst):      # the last rename (the new config into place) fails, once
        if str(dst) == str(tmp_path / CONFIG_FILE) and not calls:
            calls.append(dst)
            raise OSError(5, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="I/O error"):
        fastpeft.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == old
    fastpeft.save_adapter(model, tmp_path)
    assert _files(tmp_path) != old and sorted(os.listdir(tmp_path)) == [ADAPTER_FILE, CONFIG_FILE]


def test_save_adapter_creates_a_folder_as_makedirs_does(tmp_path):
    model = fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q"]))
    fastpeft.save_adapter(model, tmp_path / "new" / "adapter")
    os.makedirs(tmp_path / "reference")
    assert os.stat(tmp_path / "new" / "adapter").st_mode == os.stat(tmp_path / "reference").st_mode
    assert sorted(os.listdir(tmp_path / "new")) == ["adapter"]
    with pytest.raises(NotADirectoryError):
        fastpeft.save_adapter(model, tmp_path / "new" / "adapter" / CONFIG_FILE)


def test_save_adapter_never_writes_through_a_symlink(tmp_path):
    outside = tmp_path / "precious.json"
    outside.write_text("keep me")
    folder = tmp_path / "adapter"
    folder.mkdir()
    os.symlink(outside, folder / CONFIG_FILE)
    os.symlink(tmp_path / "precious.bin", folder / ADAPTER_FILE)
    model = fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q"]))
    fastpeft.save_adapter(model, folder)
    assert outside.read_text() == "keep me" and not (tmp_path / "precious.bin").exists()
    assert not os.path.islink(folder / CONFIG_FILE) and not os.path.islink(folder / ADAPTER_FILE)
    fastpeft.load_adapter(_net(), folder)


# -- a load gives the saved model exactly, or a clear refusal ---------------------------------

def test_load_applies_the_saved_scale(tmp_path):
    saved = _randomise(fastpeft.inject(_net(), AdapterConfig(r=2, alpha=32, use_rslora=True, target_modules=["q"])))
    want = saved(IDS)
    fastpeft.save_adapter(saved, tmp_path)
    other = fastpeft.inject(_net(), AdapterConfig(r=2, alpha=8, target_modules=["q"]))
    fastpeft.load_adapter(other, tmp_path)
    torch.testing.assert_close(other(IDS), want, rtol=0, atol=0)
    assert other.q.scale == saved.q.scale and other.fastpeft_config.alpha == 32


def test_load_of_another_method_is_refused(tmp_path):
    fastpeft.save_adapter(fastpeft.inject(_net(), AdapterConfig(method="lora_fa", r=2, target_modules=["q"])), tmp_path)
    model = fastpeft.inject(_net(), AdapterConfig(method="lora", r=2, target_modules=["q"]))
    before = _state(model)
    with pytest.raises(ValueError, match="lora_fa adapter but the model's layers are not"):
        fastpeft.load_adapter(model, tmp_path)
    _assert_same(model, before)


def test_load_into_merged_layers_is_refused_and_unmerge_restores(tmp_path):
    original = _net().q.weight.detach().clone()
    fastpeft.save_adapter(_randomise(fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q"])), 3), tmp_path)
    model = _randomise(fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q"])))
    fastpeft.merge(model)
    before = _state(model)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        fastpeft.load_adapter(model, tmp_path)
    _assert_same(model, before)
    fastpeft.unmerge(model)
    torch.testing.assert_close(model.q.weight, original, rtol=0, atol=1e-6)


def test_vera_file_with_layers_that_do_not_share_projections_is_refused(tmp_path):
    config = AdapterConfig(method="vera", r=2, target_modules=["q", "v"])

    def edit(tensors):
        tensors["v.lora_A"] = tensors["v.lora_A"] + 1.0

    _tampered(tmp_path, edit, config)
    for victim in (_net(), fastpeft.inject(_net(), config)):
        before = _state(victim)
        with pytest.raises(ValueError, match="shares its projections.*v.lora_A"):
            fastpeft.load_adapter(victim, tmp_path)
        _assert_same(victim, before)


# -- inject: bare layers, bitfit, twice ------------------------------------------------------

def test_inject_on_a_bare_linear_returns_a_fastpeft_layer(tmp_path):
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = fastpeft.inject(base, AdapterConfig(r=2))
    assert isinstance(layer, LowRankLinear) and layer.weight is base.weight
    assert not [n for n, _ in layer.named_children()]
    _randomise(layer)
    x = torch.randn(3, 8)
    assert not torch.allclose(layer(x), base(x))       # the adapter is in the forward
    fastpeft.save_adapter(layer, tmp_path)
    torch.manual_seed(0)
    again = fastpeft.load_adapter(nn.Linear(8, 6), tmp_path)
    assert isinstance(again, LowRankLinear)
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)


def test_bitfit_without_a_match_is_an_error_and_ignores_r():
    for targets in (["nope"], ["down"]):   # nothing matched; matched, without a bias
        model = _net()
        before = _state(model)
        with pytest.raises(ValueError, match="no Linear layer matched|none of the 1 layers"):
            fastpeft.inject(model, AdapterConfig(method="bitfit", target_modules=targets))
        _assert_same(model, before)
    model = fastpeft.inject(_net(), AdapterConfig(method="bitfit", r=64, target_modules=["head"]))  # r > d = 3
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.bias"}


def test_injecting_twice_is_refused():
    model = fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q"]))
    before = _state(model)
    with pytest.raises(ValueError, match="already has 1 fastpeft layers"):
        fastpeft.inject(model, AdapterConfig(r=2, target_modules=["v"]))
    _assert_same(model, before)


# -- interop with PEFT: what inject adapts ---------------------------------------------------

peft = pytest.importorskip("peft")


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert_classifier(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


HF_IDS = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))


def _peft_adapted(model, **kwargs):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, **kwargs))
    from peft.tuners.lora import LoraLayer
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer))


def _adapted(model):
    return sorted(n for n, _ in lowrank_layers(model))


@pytest.mark.parametrize("make", [_bert_classifier, _llama, _gpt2], ids=["bert-seq-cls", "llama", "gpt2"])
def test_all_linear_selects_peft_layers(make):
    want = _peft_adapted(make(), target_modules="all-linear")
    got = _adapted(fastpeft.inject(make(), AdapterConfig(r=2, target_modules="all-linear")))
    assert got == want
    assert _adapted(fastpeft.inject(make(), AdapterConfig(r=2))) == want   # None means all-linear
    if make is _bert_classifier:
        assert "classifier" in got


def test_gpt2_conv1d_layers_are_adapted_as_peft(tmp_path):
    targets = ["c_attn", "c_proj", "c_fc", "lm_head"]
    want = _peft_adapted(_gpt2(), target_modules=targets, fan_in_fan_out=True)
    model = fastpeft.inject(_gpt2(), AdapterConfig(r=2, alpha=4, target_modules=targets))
    assert _adapted(model) == want and len(want) == 9
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.weight.shape == (48, 16)
    base = _gpt2()
    with torch.no_grad():
        torch.testing.assert_close(model(HF_IDS).logits, base(HF_IDS).logits)   # B = 0: the base model
    _randomise(model)
    with torch.no_grad():
        logits = model(HF_IDS).logits
    fastpeft.to_peft(model, tmp_path)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_gpt2(), tmp_path).eval()
    with torch.no_grad():
        assert (back(HF_IDS).logits - logits).abs().max() <= 1e-5


class PlainSubclass(nn.Linear):
    pass


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_linear_subclasses_are_adapted_or_refused_by_name():
    model = nn.Sequential(PlainSubclass(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert _adapted(fastpeft.inject(model, AdapterConfig(r=2, target_modules=["0", "2"]))) == ["0", "2"]
    cases = {
        "own forward": (nn.Sequential(OwnForward(8, 8), nn.Linear(8, 4)), ["0", "1"], "'0' is a OwnForward"),
        "embedding": (_net(), ["q", "embed"], "'embed' is a Embedding"),
        "container": (nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 4)), ["0", "1"], "'0' is a Sequential"),
        "mha out_proj": (nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)}),
                         ["out_proj", "fc"], "out_proj of an nn.MultiheadAttention"),
    }
    for what, (model, targets, message) in cases.items():
        before = _state(model)
        with pytest.raises(ValueError, match=message):
            fastpeft.inject(model, AdapterConfig(r=2, target_modules=targets))
        _assert_same(model, before)


def test_ranks_above_min_d_k_match_peft(tmp_path):
    model = _randomise(fastpeft.inject(_net(), AdapterConfig(r=6, alpha=3, target_modules=["head", "q"])))
    assert model.head.lora_A.shape == (6, 8) and model.head.lora_B.shape == (3, 6)    # d = 3 < r
    want = model(IDS)
    fastpeft.to_peft(model, tmp_path)
    back = peft.PeftModel.from_pretrained(_net(), tmp_path).eval()
    torch.testing.assert_close(back(IDS), want, rtol=1e-5, atol=1e-6)


# -- merging whole models, tied weights ----------------------------------------------------------

def test_model_level_merge_and_unmerge():
    model = _randomise(fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q", "up", "down"])))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    want = model(IDS)
    assert fastpeft.merge(model) is model and all(layer.merged for _, layer in lowrank_layers(model))
    torch.testing.assert_close(model(IDS), want, rtol=1e-5, atol=1e-5)
    before = _state(model)
    with pytest.raises(ValueError, match="already merged"):
        fastpeft.merge(model)
    _assert_same(model, before)
    fastpeft.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not merged"):
        fastpeft.unmerge(model)
    # one layer that cannot merge: nothing merges
    mixed = _randomise(fastpeft.inject(_net(), AdapterConfig(method="parallel", r=2, target_modules=["q", "up"])))
    before = _state(mixed)
    with pytest.raises(ValueError, match="cannot merge.*activation"):
        fastpeft.merge(mixed)
    _assert_same(mixed, before)
    with pytest.raises(ValueError, match="no fastpeft layers"):
        fastpeft.merge(_net())


def test_merging_a_tied_weight_is_refused():
    tied = _net()
    tied.v.weight = tied.q.weight                     # two adapted layers, one weight
    model = _randomise(fastpeft.inject(tied, AdapterConfig(r=2, target_modules=["q", "v"])))
    before = _state(model)
    with pytest.raises(ValueError, match="shared with v.weight"):
        fastpeft.merge(model)
    _assert_same(model, before)
    with pytest.raises(RuntimeError, match="tied weights"):
        model.q.merge()
    gpt2 = _randomise(fastpeft.inject(_gpt2(), AdapterConfig(r=2, target_modules=["c_attn", "lm_head"])))
    embedding = gpt2.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match="lm_head.*transformer.wte.weight"):
        fastpeft.merge(gpt2)
    assert torch.equal(gpt2.transformer.wte.weight, embedding)
    assert not any(layer.merged for _, layer in lowrank_layers(gpt2))


# -- modules_to_save ---------------------------------------------------------------------------

def test_modules_to_save_are_saved_and_exported(tmp_path):
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    pm = peft.get_peft_model(_llama(), config)
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    with torch.no_grad():
        want = pm(HF_IDS).logits
    model = fastpeft.from_peft(pm)
    assert model.fastpeft_config.modules_to_save == ["lm_head"]
    fastpeft.save_adapter(model, tmp_path / "fp")
    fresh = fastpeft.load_adapter(_llama(), tmp_path / "fp")
    assert fresh.lm_head.weight.requires_grad
    fastpeft.to_peft(model, tmp_path / "peft")
    back = peft.PeftModel.from_pretrained(_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        for other in (fresh, back):
            assert (other(HF_IDS).logits - want).abs().max() <= 1e-5


def test_inject_trains_modules_to_save():
    model = fastpeft.inject(_net(), AdapterConfig(r=2, modules_to_save=["head"]))
    assert "head" not in _adapted(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert {"head.weight", "head.bias"} <= set(fastpeft.adapter_state_dict(model))
    with pytest.raises(ValueError, match="modules_to_save names \\['nope'\\]"):
        fastpeft.inject(_net(), AdapterConfig(r=2, modules_to_save=["nope"]))


# -- fastpeft report on damaged result files ------------------------------------------------------

RESULTS = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "results")


def _results_copy(tmp_path):
    import glob
    import shutil
    folder = tmp_path / "results"
    folder.mkdir()
    for path in glob.glob(os.path.join(RESULTS, "bench-*.json")) + glob.glob(os.path.join(RESULTS, "memory-*.json")):
        shutil.copy(path, folder)
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n<!-- results:start -->\nold results\n<!-- results:end -->\n")
    return folder, readme


def _newest(folder, kind):
    """The result file of ``kind`` that ``report`` shows: the newest by its own timestamp (file
    names also carry the device and thread count, so they do not sort by time)."""
    names = [p for p in os.listdir(folder) if p.startswith(kind + "-") and p.endswith(".json")]
    return max(names, key=lambda p: json.loads((folder / p).read_text())["meta"]["timestamp"])


def test_report_skips_a_damaged_file_names_it_and_fails(tmp_path, capsys):
    from fastpeft.cli import main
    folder, readme = _results_copy(tmp_path)
    good = folder / _newest(folder, "bench")
    data = json.loads(good.read_text())
    assert main(["report", "--results", str(folder), "--readme", str(readme), "--allow-noisy"]) == 0
    # a newer bench file cut short, and a memory file whose rows lack a field
    stamp = data["meta"]["timestamp"]
    truncated = folder / "bench-zz-truncated.json"
    truncated.write_text(good.read_text()[: len(good.read_text()) // 2])
    memory = folder / _newest(folder, "memory")
    mdata = json.loads(memory.read_text())
    mdata["meta"]["timestamp"] = "9999"
    for row in mdata["rows"]:
        row.pop("status", None)
    broken = folder / "memory-zz-missing-field.json"
    broken.write_text(json.dumps(mdata))
    capsys.readouterr()
    assert main(["report", "--results", str(folder), "--readme", str(readme), "--allow-noisy"]) == 1
    err = capsys.readouterr().err
    assert "bench-zz-truncated.json" in err and "memory-zz-missing-field.json" in err and "status" in err
    text = readme.read_text()
    assert "Layer microbenchmark" in text and stamp[:10] in text   # the good bench file is still shown
    assert main(["report", "--results", str(folder), "--readme", str(readme), "--check", "--allow-noisy"]) == 1


def _quiet_rows(rows):
    """The rows with tight quantiles, enough samples and ratios at or above the floor."""
    for r in rows:
        if r["status"] == "ok":
            r.update(ms_q20=r["ms"] * 0.95, ms_q80=r["ms"] * 1.05, samples=20)
            if r.get("ratio") is not None:
                r["ratio"] = max(r["ratio"], 1.0)
    return rows


@pytest.mark.parametrize("spoil, why", [
    (dict(ms_q20=0.5, ms_q80=2.0), "20-80 % range"),          # spread 1.5 of a median of 1
    (dict(samples=3), "3 timed samples"),
    (dict(ratio=0.8), "0.80x the floor"),
])
def test_report_refuses_noisy_rows_unless_allowed(tmp_path, capsys, spoil, why):
    from fastpeft.cli import main
    folder, readme = _results_copy(tmp_path)
    newest = folder / _newest(folder, "bench")
    data = json.loads(newest.read_text())
    _quiet_rows(data["rows"])
    newest.write_text(json.dumps(data))
    assert main(["report", "--results", str(folder), "--readme", str(readme)]) == 0   # quiet: written
    quiet = readme.read_text()
    assert "Layer microbenchmark" in quiet and "Noisy run" not in quiet
    row = next(r for r in data["rows"] if r["provider"] == "fastpeft-torch" and r["status"] == "ok")
    row.update({"ms": 1.0, "ms_q20": 0.95, "ms_q80": 1.05, "ratio": 2.0, **spoil})
    newest.write_text(json.dumps(data))
    readme.write_text("# t\n\n<!-- results:start -->\nold results\n<!-- results:end -->\n")
    before = readme.read_text()
    capsys.readouterr()
    assert main(["report", "--results", str(folder), "--readme", str(readme)]) == 1
    err = capsys.readouterr().err
    name = f"fastpeft-torch M={row['M']} {row['shape']} r={row['r']} {row['mode']}"
    assert "refused" in err and name in err and why in err and newest.name in err
    assert readme.read_text() == before                                     # untouched
    assert main(["report", "--results", str(folder), "--readme", str(readme), "--check"]) == 1
    assert main(["report", "--results", str(folder), "--readme", str(readme), "--allow-noisy"]) == 0
    text = readme.read_text()
    assert "**Noisy run.** 1 of" in text and name in text


def test_report_never_replaces_results_with_nothing(tmp_path, capsys):
    from fastpeft.cli import main
    folder, readme = _results_copy(tmp_path)
    for name in os.listdir(folder):
        (folder / name).write_text("{")     # every file damaged
    before = readme.read_text()
    assert main(["report", "--results", str(folder), "--readme", str(readme)]) == 1
    assert readme.read_text() == before and "old results" in before
    assert "left as it is" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--results", str(empty), "--readme", str(readme)]) == 1
    assert readme.read_text() == before


def test_save_refuses_per_layer_scales_it_cannot_restore(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 8})
    pm = peft.get_peft_model(_llama(), config)
    with pytest.warns(UserWarning, match="save_adapter refuses it"):
        model = fastpeft.from_peft(pm)
    with pytest.raises(ValueError, match="v_proj.*to_peft"):
        fastpeft.save_adapter(model, tmp_path)
    assert not os.path.exists(tmp_path / CONFIG_FILE)
    fastpeft.to_peft(model, tmp_path / "peft")   # PEFT's format keeps per-layer alphas


def test_named_adapters_accept_ranks_above_min_d_k(tmp_path):
    model = fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["head"]))
    fastpeft.add_adapter(model, AdapterConfig(r=6, target_modules=["head"]), "wide")     # d = 3 < r
    assert model.head.lora_slots["wide"].lora_A.shape == (6, 8)
    with pytest.raises(ValueError, match="'head'.*SVD"):
        fastpeft.add_adapter(model, AdapterConfig(method="lamda", r=6, target_modules=["head"]), "svd")
    wide = _randomise(fastpeft.inject(_net(), AdapterConfig(r=6, target_modules=["head"])))
    fastpeft.save_adapter(wide, tmp_path)
    fastpeft.load_adapter(model, tmp_path, adapter_name="loaded")
    fastpeft.set_adapter(model, "loaded")
    torch.testing.assert_close(model(IDS), wide(IDS), rtol=0, atol=0)


def test_from_peft_marks_tied_weights():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn", "lm_head"],
                                                          fan_in_fan_out=True))
    model = fastpeft.from_peft(pm)
    embedding = model.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match="lm_head.*transformer.wte.weight"):
        fastpeft.merge(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    assert not getattr(model.transformer.h[0].attn.c_attn, "weight_shared_with", None)


def test_to_peft_never_writes_through_a_symlink(tmp_path):
    outside = tmp_path / "precious.json"
    outside.write_text("keep me")
    folder = tmp_path / "peft"
    folder.mkdir()
    os.symlink(outside, folder / "adapter_config.json")
    fastpeft.to_peft(fastpeft.inject(_net(), AdapterConfig(r=2, target_modules=["q"])), folder)
    assert outside.read_text() == "keep me" and not os.path.islink(folder / "adapter_config.json")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]


class MLP(nn.Module):
    """PEFT's own small test model: layers narrower than the ranks of its default test configs."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.mark.parametrize("make_config", [
    lambda: peft.VeraConfig(r=256, target_modules=["lin0", "lin1"]),
    lambda: peft.AdaLoraConfig(init_r=12, target_r=12, total_step=1, target_modules=["lin0", "lin1"]),
    lambda: peft.LoraConfig(r=8, target_modules=["lin0", "lin1"]),
], ids=["vera-r256", "adalora-r12", "lora-r8"])
def test_from_peft_accepts_peft_default_ranks_above_min_d_k(make_config):
    torch.manual_seed(0)
    pm = peft.get_peft_model(MLP(), make_config())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and ("lora_" in name or "vera_" in name):
                p.copy_(torch.randn_like(p) * 0.1)
    pm.eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        want = pm(x)
    model = fastpeft.from_peft(pm)
    assert model.lin1.r > 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)

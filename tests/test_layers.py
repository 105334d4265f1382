"""LowRankLinear: storage sharing, presets, merge/unmerge, errors."""

import pytest
import torch

from fastpeft import AdapterConfig, LowRankLinear
from helpers import assert_close_rel

K, D = 40, 24


def _layer(method="lora", r=4, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    base = torch.nn.Linear(K, D, dtype=dtype)
    return base, LowRankLinear.from_linear(base, AdapterConfig(method=method, r=r, **kw))


def test_from_linear_shares_storage_and_keeps_state_dict_keys():
    base, layer = _layer()
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    lamda = _layer("lamda")[1]
    assert set(lamda.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_core"}
    vera = _layer("vera")[1]
    assert set(vera.state_dict()) >= {"lora_core", "lora_out_scale"}


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lamda", "vera", "adalora", "parallel"])
def test_presets_start_as_the_base_layer(method):
    base, layer = _layer(method)
    x = torch.randn(5, K)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("method,trainable", [
    ("lora", {"lora_A", "lora_B"}),
    ("lora_fa", {"lora_B"}),
    ("lamda", {"lora_B", "lora_core"}),
    ("vera", {"lora_core", "lora_out_scale"}),
    ("adalora", {"lora_A", "lora_B", "lora_core"}),
    ("parallel", {"lora_A", "lora_B"}),
])
def test_preset_trainable_tensors(method, trainable):
    layer = _layer(method)[1]
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == trainable
    with_bias = _layer(method, train_bias=True)[1]
    assert {n for n, p in with_bias.named_parameters() if p.requires_grad} == trainable | {"bias"}


def test_lamda_svd_initialisation():
    base, layer = _layer("lamda", r=5)
    u, s, vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    torch.testing.assert_close(layer.lora_A.detach(), vh[:5])
    torch.testing.assert_close(layer.lora_B.detach(), u[:, :5])
    assert torch.count_nonzero(layer.lora_core) == 0 and layer.lora_core.shape == (5, 5)
    assert layer.scale == 1.0


def test_parallel_adapter_applies_activation():
    base, layer = _layer("parallel")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, K)
    want = base(x) + torch.relu(x @ layer.lora_A.t()) @ layer.lora_B.t() * layer.scale
    torch.testing.assert_close(layer(x), want)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        layer.merge()


def test_dropout_only_in_training():
    base, layer = _layer(dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, K)
    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    layer.train()
    assert not torch.equal(layer(x), y1)


@pytest.mark.parametrize("method", ["lora", "lamda", "vera", "adalora"])
def test_merge_unmerge_fp32(method):
    base, layer = _layer(method)
    with torch.no_grad():
        for p in (layer.lora_B, layer.lora_core, layer.lora_out_scale):
            if p is not None:
                p.normal_()
    x = torch.randn(4, K)
    w0 = base.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert_close_rel(layer(x), y, 1e-5, "merged")
    assert_close_rel(base(x), y, 1e-5, "base layer sees the merge")  # storage is shared
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert (base.weight - w0).abs().max() <= 1e-6 * (w0.abs().max() + layer.delta_weight().abs().max())
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("dtype,ulp", [(torch.float16, 2.0 ** -10), (torch.bfloat16, 2.0 ** -7)])
def test_merge_round_trip_drift_is_bounded(dtype, ulp):
    base, layer = _layer("lora", dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = base.weight.detach().float().clone()
    delta = layer.delta_weight()
    layer.merge()
    layer.unmerge()
    drift = (base.weight.float() - w0).abs()
    bound = ulp * (w0.abs() + delta.abs())      # documented: one ulp of |W| + |ΔW|
    assert (drift <= bound).all(), (drift / bound).max()


def test_adapter_in_fp32_with_half_base():
    base, layer = _layer("lora", dtype=torch.bfloat16, adapter_dtype="float32")
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(3, K, dtype=torch.bfloat16)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_B.grad.dtype == torch.float32


class TestErrors:
    @pytest.mark.parametrize("r", [0, -1, 2.5])
    def test_bad_rank(self, r):
        with pytest.raises(ValueError, match=r"r must be"):
            LowRankLinear.from_linear(torch.nn.Linear(K, D), AdapterConfig(r=4), r=r)
        with pytest.raises(ValueError, match=r"r must be"):
            AdapterConfig(r=r)

    def test_rank_above_min_dk_only_refused_for_svd_init(self):
        big = min(K, D) + 1
        with pytest.raises(ValueError, match=r"r must be .* SVD"):
            LowRankLinear(K, D, config=AdapterConfig(method="lamda", r=big))
        assert LowRankLinear(K, D, config=AdapterConfig(method="lora", r=big)).lora_A.shape == (big, K)

    def test_unknown_method(self):
        with pytest.raises(ValueError, match=r"unknown method 'boft'"):
            AdapterConfig(method="boft")

    @pytest.mark.parametrize("p", [1.0, -0.2, 2])
    def test_bad_dropout(self, p):
        with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
            AdapterConfig(dropout=p)

    def test_bad_activation_and_dtype(self):
        with pytest.raises(ValueError, match="activation"):
            AdapterConfig(activation="tanh")
        with pytest.raises(ValueError, match="adapter_dtype"):
            AdapterConfig(adapter_dtype="int8")

    def test_failed_call_changes_nothing(self):
        base, layer = _layer()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with pytest.raises(ValueError):
            layer(torch.randn(3, K + 1))
        with pytest.raises(TypeError):
            layer(torch.randn(3, K, dtype=torch.float64))
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key])

    def test_not_a_linear(self):
        with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
            LowRankLinear.from_linear(torch.nn.Conv1d(3, 3, 1), AdapterConfig())

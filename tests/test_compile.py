"""torch.compile: no graph breaks through fastpeft layers (alone and inside a transformers model),
Inductor results equal eager ones, and the custom ops pass ``torch.library.opcheck``."""

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import AdapterConfig

PRESETS = [
    dict(method="lora", dropout=0.1),
    dict(method="lora_fa"),
    dict(method="lamda", dropout=0.2),
    dict(method="vera"),
    dict(method="adalora"),
    dict(method="parallel", activation="silu"),
    dict(method="lora", train_bias=True),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _stack(preset, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 8))
    model = fastpeft.inject(model, AdapterConfig(r=4, alpha=8, target_modules=["0", "2", "4"], **preset))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, fastpeft.LowRankLinear):
                layer.lora_B.normal_(std=0.3)
                if layer.lora_core is not None:
                    layer.lora_core.normal_()
    return model


def _explain(fn, *args, **kwargs):
    return torch._dynamo.explain(fn)(*args, **kwargs)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: "-".join(str(v) for v in p.values()))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lowrank_layers_have_no_graph_breaks(preset, autocast):
    model = _stack(preset).train()
    x = torch.randn(3, 5, 24)

    def step(x):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return model(x).float().square().mean()

    explanation = _explain(step, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # forward and backward traced whole (AOT autograd through the custom ops' autograd)
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_inductor_matches_eager_lowrank_stack():
    preset = dict(method="lamda")
    eager, compiled = _stack(preset).train(), _stack(preset).train()
    x = torch.randn(4, 24)
    step = lambda m: m(x).square().mean()
    step(eager).backward()
    loss = torch.compile(step, fullgraph=True)(compiled)
    loss.backward()
    torch.testing.assert_close(loss, eager(x).square().mean(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_autograd_regenerates_each_steps_dropout_mask():
    """Eager forward, backward traced by compiled autograd: the seed an eager call keeps on its
    autograd node (a Python int) must not be baked into the traced backward. Each step draws a
    new seed; every gradient equals plain eager autograd's, step after step."""
    model = _stack(dict(method="lora", dropout=0.3)).train()
    x0 = torch.randn(6, 24)

    def grads(seed, compiled):
        model.zero_grad()
        x = x0.clone().requires_grad_()
        torch.manual_seed(seed)
        loss = model(x).square().sum()
        if compiled:
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
                loss.backward()
        else:
            loss.backward()
        return [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    per_seed = []
    for seed in (1, 2, 3):
        expected, got = grads(seed, False), grads(seed, True)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        per_seed.append(expected[0])
    assert not torch.equal(per_seed[0], per_seed[1])   # the masks did change from step to step


def test_transformers_model_compiles_fullgraph():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        model = fastpeft.inject(model, AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj",
                                                                                        "down_proj"]))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, fastpeft.LowRankLinear):
                    m.lora_B.normal_(std=0.3)
        models.append(model.train())
    eager, compiled = models
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    explanation = _explain(compiled, input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()

    want = eager(input_ids=ids, labels=ids)
    want.loss.backward()
    got = torch.compile(compiled, fullgraph=True)(input_ids=ids, labels=ids)  # Inductor on CPU
    got.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _op_args(core_kind, with_os, with_bias, dropout_p, activation, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)
    m, k, d, r = 6, 10, 7, 3
    core = {None: None, "diag": rnd(r), "full": rnd(r, r)}[core_kind]
    return dict(x=rnd(m, k), weight=rnd(d, k), bias=rnd(d) if with_bias else None, lora_A=rnd(r, k),
                lora_B=rnd(d, r), core=core, out_scale=rnd(d) if with_os else None, scale=0.5,
                dropout_p=dropout_p, seed=torch.tensor(17), activation=activation)


OP_CASES = [
    (None, False, True, 0.0, None),
    ("diag", True, False, 0.0, None),
    ("full", False, True, 0.25, None),
    ("full", True, True, 0.1, "gelu"),
    (None, False, False, 0.0, "relu"),
]


@pytest.mark.parametrize("core_kind,with_os,with_bias,dropout_p,activation", OP_CASES)
def test_opcheck_lowrank_fwd(core_kind, with_os, with_bias, dropout_p, activation):
    a = _op_args(core_kind, with_os, with_bias, dropout_p, activation)
    for name in ("x", "lora_A", "lora_B", "core", "out_scale", "bias"):
        if a[name] is not None:
            a[name].requires_grad_()
    args = (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["core"], a["out_scale"], a["scale"],
            a["dropout_p"], a["seed"], a["activation"], "torch")
    torch.library.opcheck(torch.ops.fastpeft.lowrank_fwd.default, args)


@pytest.mark.parametrize("core_kind,with_os,with_bias,dropout_p,activation", OP_CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_lowrank_bwd(core_kind, with_os, with_bias, dropout_p, activation, deterministic):
    a = _op_args(core_kind, with_os, with_bias, dropout_p, activation)
    _, t = torch.ops.fastpeft.lowrank_fwd(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["core"],
                                          a["out_scale"], a["scale"], a["dropout_p"], a["seed"],
                                          a["activation"], "torch")
    grad_y = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    needs = [True, True, True, core_kind is not None, with_os, with_bias]
    args = (grad_y, a["x"], a["weight"], t, a["lora_A"], a["lora_B"], a["core"], a["out_scale"], a["scale"],
            a["dropout_p"], a["seed"], a["activation"], needs, "torch", deterministic)
    torch.library.opcheck(torch.ops.fastpeft.lowrank_bwd.default, args)
    # some gradients not needed: empty tensors in their places, in eager and fake modes alike
    partial = [True, False, True, False, False, with_bias]
    args = args[:12] + (partial,) + args[13:]
    torch.library.opcheck(torch.ops.fastpeft.lowrank_bwd.default, args)


# -- the 4-bit op -------------------------------------------------------------------------------

def _stack_4bit(preset, seed=0):
    """A fastpeft model over a 4-bit (NF4, nested) base: the 4-bit layers of ``preset``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 8))
    config = AdapterConfig(r=4, alpha=8, **preset)
    for i in (0, 2, 4):
        layer = fastpeft.LowRankLinear4bit.from_linear(model[i], config)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.3)
            if layer.lora_core is not None:
                layer.lora_core.normal_()
        model[i] = layer
    return model


@pytest.mark.parametrize("preset", [dict(method="lora"), dict(method="lamda"), dict(method="vera"),
                                    dict(method="lora", train_bias=True), dict(method="dora")],
                         ids=lambda p: "-".join(map(str, p.values())))
def test_4bit_layers_compile_fullgraph_and_match_eager(preset):
    """Models of 4-bit layers: no graph break, one graph, and Inductor's loss and gradients equal
    eager ones (the op is a pair of custom ops; the quant state crosses as tensors)."""
    eager, compiled = _stack_4bit(preset).train(), _stack_4bit(preset).train()
    x = torch.randn(3, 5, 24)

    def step(model):
        return model(x).square().mean()

    explanation = _explain(step, compiled)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    want = step(eager)
    want.backward()
    got = torch.compile(step, fullgraph=True)(compiled)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    trained = [(n, p) for n, p in eager.named_parameters() if p.requires_grad]
    assert trained
    for (name, p), (_, q) in zip(trained, [(n, q) for n, q in compiled.named_parameters() if q.requires_grad]):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _op_args_4bit(core_kind, with_os, with_bias, dropout_p, activation, nested):
    from fastpeft.ops.lowrank_4bit import _state_meta, _state_tensors

    a = _op_args(core_kind, with_os, with_bias, dropout_p, activation)
    packed, state = fastpeft.quantize_4bit(a.pop("weight"), blocksize=32, compress_statistics=nested)
    return a, (packed, *_state_tensors(state), *_state_meta(state))


@pytest.mark.parametrize("core_kind,with_os,with_bias,dropout_p,activation", OP_CASES)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_opcheck_lowrank_4bit(core_kind, with_os, with_bias, dropout_p, activation, nested):
    a, weight = _op_args_4bit(core_kind, with_os, with_bias, dropout_p, activation, nested)
    rest = (a["lora_A"], a["lora_B"], a["core"], a["out_scale"], a["scale"], a["dropout_p"], a["seed"],
            a["activation"])
    fwd = (a["x"], *weight, a["bias"], *rest, "torch")
    torch.library.opcheck(torch.ops.fastpeft.lowrank_4bit_fwd.default, fwd)
    _, t = torch.ops.fastpeft.lowrank_4bit_fwd(*fwd)
    grad_y = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    for needs in ([True, True, True, core_kind is not None, with_os, with_bias],
                  [True, False, True, False, False, with_bias]):
        bwd = (grad_y, a["x"], *weight, t, *rest, needs, "torch", False)
        torch.library.opcheck(torch.ops.fastpeft.lowrank_4bit_bwd.default, bwd)


def test_compiled_graphs_hold_the_custom_ops():
    """Eager calls skip the custom-op dispatcher; traced ones must not: the forward and backward
    graphs AOT autograd builds hold fastpeft's ops as single opaque nodes, dense and 4-bit."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
            return gm.forward
        return compiler

    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    dense, four_bit = _stack(dict(method="lora", dropout=0.1)), _stack_4bit(dict(method="lora"))
    x = torch.randn(3, 5, 24, requires_grad=True)
    for model, name in ((dense, "lowrank"), (four_bit, "lowrank_4bit")):
        graphs["fw"].clear(), graphs["bw"].clear()
        torch.compile(lambda x: model(x).square().mean(), fullgraph=True, backend=backend)(x).backward()
        assert f"fastpeft.{name}_fwd.default" in set().union(*graphs["fw"]), graphs["fw"]
        assert f"fastpeft.{name}_bwd.default" in set().union(*graphs["bw"]), graphs["bw"]

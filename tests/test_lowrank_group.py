"""``lowrank_linear_group``: several projections of one input (q/k/v, gate/up) against float64.

Both backends: "torch", and "triton" forced through ``use_backend`` (on CPU tensors the kernels run
under the Triton interpreter, TRITON_INTERPRET=1 from tests/conftest.py). Output and every
gradient against a float64 reference built per projection with the backend's own dropout mask,
equality with separate ``lowrank_linear`` calls sharing the seed, one mask for the group, the
memory contract and gradients only where needed.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastpeft  # noqa: E402
from fastpeft.ops.lowrank import dropout_keep_mask_torch  # noqa: E402
from helpers import TOLERANCES, assert_close_rel, reference_lowrank, saved_tensors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    import triton  # noqa: F401
    from fastpeft.kernels import lowrank as L
    BACKENDS = ["torch", "triton"]
except ImportError:                                  # no triton: the torch backend only
    L = None
    BACKENDS = ["torch"]


def keep_mask(backend, seed, m, k, p):
    if p == 0.0:
        return None
    if backend == "triton":
        return L.dropout_keep_mask(seed, m, k, p, DEVICE).cpu()
    return dropout_keep_mask_torch(seed, m, k, p, DEVICE).cpu()


def make_group(shape, k, ds, rs, dtype, core_kinds, train_a, with_os=(), with_bias=(), seed=0):
    """Tensors of a group: one x, per projection W (frozen), bias, A (trainable per ``train_a``),
    B, core ("diag", "full" or None) and out_scale."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0, grad=True):
        t = (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)
        return t.requires_grad_(grad)

    x = rnd(*shape, k)
    g = dict(weights=[], biases=[], lora_As=[], lora_Bs=[], cores=[], out_scales=[])
    for i, (d, r, core_kind) in enumerate(zip(ds, rs, core_kinds)):
        g["weights"].append(rnd(d, k, scale=k ** -0.5, grad=False))
        g["biases"].append(rnd(d) if i in with_bias else None)
        g["lora_As"].append(rnd(r, k, scale=k ** -0.5, grad=train_a[i]))
        g["lora_Bs"].append(rnd(d, r, scale=r ** -0.5))
        g["cores"].append(None if core_kind is None else
                          (rnd(r) if core_kind == "diag" else rnd(r, r, scale=r ** -0.5)))
        g["out_scales"].append(rnd(d) if i in with_os else None)
    return x, g


def leaves_of(x, g):
    """Every tensor that requires grad, by name."""
    named = {"x": x}
    for key, tensors in g.items():
        for i, t in enumerate(tensors):
            if t is not None and t.requires_grad:
                named[f"{key}[{i}]"] = t
    return named


def reference(x, g, scales, keep, p, act, grad_ys):
    """(outputs, {name: grad}) in float64 by autograd, one lowrank op per projection."""
    named = leaves_of(x, g)
    f64 = {name: t.detach().cpu().double().requires_grad_() for name, t in named.items()}

    def get(key, i):
        t = g[key][i]
        if t is None:
            return None
        return f64.get(f"{key}[{i}]", t.detach().cpu().double())

    x64 = f64["x"] if "x" in f64 else x.detach().cpu().double()
    ys = [reference_lowrank(x64, get("weights", i), get("biases", i), get("lora_As", i), get("lora_Bs", i),
                            get("cores", i), get("out_scales", i), scales[i], keep_mask=keep, dropout_p=p,
                            activation=act) for i in range(len(g["weights"]))]
    pairs = [(y, gy.cpu().double()) for y, gy in zip(ys, grad_ys) if gy is not None]
    torch.autograd.backward([y for y, _ in pairs], [gy for _, gy in pairs])
    return [y.detach() for y in ys], {name: t.grad for name, t in f64.items()}


def run_group(backend, x, g, scales, p, act, seed, grad_ys=None):
    with fastpeft.use_backend(backend):
        ys = fastpeft.lowrank_linear_group(x, g["weights"], g["biases"], g["lora_As"], g["lora_Bs"],
                                           cores=g["cores"], out_scales=g["out_scales"], scales=scales,
                                           dropout_p=p, activation=act, seed=seed)
    if grad_ys is None:
        gen = torch.Generator().manual_seed(1)
        grad_ys = [torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEVICE, y.dtype) for y in ys]
    pairs = [(y, gy) for y, gy in zip(ys, grad_ys) if gy is not None]
    torch.autograd.backward([y for y, _ in pairs], [gy for _, gy in pairs])
    return ys, grad_ys


def check_against_reference(backend, shape, k, ds, rs, dtype, core_kinds, train_a, p, act, with_os=(),
                            with_bias=(), scales=None, seed=4321):
    x, g = make_group(shape, k, ds, rs, dtype, core_kinds, train_a, with_os, with_bias)
    scales = scales or [0.5 + 0.25 * i for i in range(len(ds))]
    ys, grad_ys = run_group(backend, x, g, scales, p, act, seed)
    keep = keep_mask(backend, seed, math.prod(shape), k, p)
    y_ref, g_ref = reference(x, g, scales, keep, p, act, grad_ys)
    tol_y, tol_g = TOLERANCES[dtype]
    for i, (y, yr) in enumerate(zip(ys, y_ref)):
        assert y.shape == (*shape, ds[i]) and y.dtype == dtype
        assert_close_rel(y, yr, tol_y, f"y[{i}]")
    for name, t in leaves_of(x, g).items():
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.dtype == t.dtype, f"{name}: gradient dtype {t.grad.dtype}"
        assert_close_rel(t.grad, g_ref[name], tol_g, f"d{name}")
    for t in g["weights"]:
        assert t.grad is None                       # frozen: never computed


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (x shape, k, ds, rs, cores, A trainable, p, activation, with out_scale, with bias)
CASES = [
    ((2, 7), 123, (77, 45), (12, 8), (None, None), (True, True), 0.0, None, (), (0,)),
    ((1,), 123, (77, 45), (12, 8), ("full", "diag"), (False, False), 0.1, None, (1,), (0, 1)),
    ((3, 4), 123, (77, 45, 45), (12, 8, 8), ("diag", None, "full"), (True, False, True), 0.1, "gelu", (0,), (2,)),
    ((5,), 64, (33, 20), (8, 12), ("diag", "diag"), (False, True), 0.2, "silu", (), ()),
]


def _case_id(c):
    cores = "/".join(str(v) for v in c[4])
    return f"x{'x'.join(map(str, c[0]))}-k{c[1]}-d{'/'.join(map(str, c[2]))}-r{'/'.join(map(str, c[3]))}-{cores}-p{c[6]}-{c[7]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_float64(backend, dtype, case):
    shape, k, ds, rs, cores, train_a, p, act, with_os, with_bias = case
    if backend == "torch" and dtype != torch.float32 and DEVICE == "cpu" and case is not CASES[2]:
        pytest.skip("half precision on the CPU torch backend: one case is enough")
    check_against_reference(backend, shape, k, ds, rs, dtype, cores, train_a, p, act, with_os, with_bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_separate_calls_with_one_seed(backend):
    """Group == lowrank_linear per projection with the same seed: outputs and every gradient."""
    x, g = make_group((3, 5), 123, (77, 45, 45), (12, 8, 8), torch.float32, ("full", None, "diag"),
                      (True, False, True), with_os=(1,), with_bias=(0, 2))
    scales, p, act, seed = [0.5, 2.0, 1.0], 0.1, "gelu", 99
    ys, grad_ys = run_group(backend, x, g, scales, p, act, seed)
    grads = {name: t.grad.clone() for name, t in leaves_of(x, g).items()}
    for t in leaves_of(x, g).values():
        t.grad = None
    with fastpeft.use_backend(backend):
        singles = [fastpeft.lowrank_linear(x, g["weights"][i], g["biases"][i], g["lora_As"][i], g["lora_Bs"][i],
                                           core=g["cores"][i], out_scale=g["out_scales"][i], scale=scales[i],
                                           dropout_p=p, activation=act, seed=seed) for i in range(3)]
    torch.autograd.backward(singles, grad_ys)
    for i, (y, ys_) in enumerate(zip(ys, singles)):
        assert_close_rel(y, ys_, 1e-6, f"y[{i}]")
    for name, t in leaves_of(x, g).items():
        assert_close_rel(grads[name], t.grad, 1e-6, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dropout_mask_for_the_group(backend):
    """Two identical adapters on one x give identical outputs under dropout (the mask belongs to x),
    and the mask is the one of ``seed``; backward regenerates it (dA of both equal)."""
    x, g = make_group((6, 3), 40, (24, 24), (8, 8), torch.float32, (None, None), (True, True))
    with torch.no_grad():
        g["weights"][1].copy_(g["weights"][0])
        g["lora_As"][1].copy_(g["lora_As"][0])
        g["lora_Bs"][1].copy_(g["lora_Bs"][0])
    y0, y1 = run_group(backend, x, g, [1.0, 1.0], 0.5, None, seed=None,
                       grad_ys=[torch.ones(6, 3, 24, device=DEVICE)] * 2)[0]
    assert torch.equal(y0, y1)
    assert_close_rel(g["lora_As"][0].grad, g["lora_As"][1].grad, 1e-6, "dA[0] vs dA[1]")
    # and it is a real mask: the outputs differ from those without dropout
    with fastpeft.use_backend(backend):
        y_nodrop = fastpeft.lowrank_linear(x, g["weights"][0], None, g["lora_As"][0], g["lora_Bs"][0])
    assert not torch.allclose(y0, y_nodrop)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_memory_contract(backend, p):
    """A frozen everywhere: T [M, Σr] and the seed, nothing of size M×k. A trainable somewhere: the
    caller's x itself (its storage), still no dropped copy or mask."""
    shape, k, ds, rs = (4, 9), 64, (32, 24, 24), (8, 4, 4)
    m = math.prod(shape)
    for train_a in ((False, False, False), (True, False, False)):
        x, g = make_group(shape, k, ds, rs, torch.float32, ("full", "diag", None), train_a, with_bias=(0,))
        params = {t.data_ptr() for ts in g.values() for t in ts if t is not None}
        with fastpeft.use_backend(backend), saved_tensors() as saved:
            ys = fastpeft.lowrank_linear_group(x, g["weights"], g["biases"], g["lora_As"], g["lora_Bs"],
                                               cores=g["cores"], scales=2.0, dropout_p=p, seed=3)
        acts = [t for t in saved.tensors if t.data_ptr() not in params]
        big = [t for t in acts if t.numel() >= m * k]
        if not any(train_a):
            assert not big, f"tensors of size M×k saved with A frozen: {[tuple(t.shape) for t in big]}"
            assert sorted(tuple(t.shape) for t in acts) == [(), (m, sum(rs))]
        else:
            assert big and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in big)
            assert sorted(tuple(t.shape) for t in acts if t.numel() < m * k) == [(), (m, sum(rs))]
        sum(y.sum() for y in ys).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_where_needed(backend):
    """An output that takes no gradient adds nothing: its projection's parameters get none, and dX
    is the other projections' alone; frozen tensors get no gradient."""
    x, g = make_group((2, 5), 40, (24, 16, 16), (8, 4, 4), torch.float32, ("diag", None, "full"),
                      (True, True, False), with_bias=(1,))
    g["lora_Bs"][2].requires_grad_(False)
    grad_ys = [torch.randn(2, 5, 24, dtype=torch.float32, device=DEVICE), None,
               torch.randn(2, 5, 16, dtype=torch.float32, device=DEVICE)]
    run_group(backend, x, g, [1.0, 1.0, 0.5], 0.0, None, seed=0, grad_ys=grad_ys)
    assert g["lora_As"][1].grad is None and g["lora_Bs"][1].grad is None and g["biases"][1].grad is None
    assert g["lora_Bs"][2].grad is None and g["lora_As"][2].grad is None
    assert g["cores"][2].grad is not None and g["lora_As"][0].grad is not None
    _, g_ref = reference(x, g, [1.0, 1.0, 0.5], None, 0.0, None, grad_ys)
    assert_close_rel(x.grad, g_ref["x"], 1e-5, "dx")
    assert_close_rel(g["cores"][2].grad, g_ref["cores[2]"], 1e-5, "dcore[2]")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_large_total_rank_and_many_projections():
    """Σ r > MAX_RANK (two T passes) and more projections than one dX kernel takes (5 > 4)."""
    rs = (64, 64, 16, 8, 8)
    ds = (20, 18, 16, 17, 19)
    check_against_reference("triton", (5,), 40, ds, rs, torch.float32, ("full", None, "diag", None, "full"),
                            (True, False, True, False, True), 0.1, None, scales=[1.0, 0.5, 2.0, 1.0, 0.25])


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_deterministic_mode_is_bit_identical():
    x, g = make_group((3, 7), 48, (32, 16), (8, 8), torch.float32, ("full", "diag"), (True, True), with_bias=(0,))
    runs = []
    for _ in range(2):
        for t in leaves_of(x, g).values():
            t.grad = None
        torch.use_deterministic_algorithms(True)
        try:
            run_group("triton", x, g, [1.0, 2.0], 0.1, "relu", seed=5)
        finally:
            torch.use_deterministic_algorithms(False)
        runs.append([t.grad.clone() for t in leaves_of(x, g).values()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triton_launchers_are_used(monkeypatch):
    """One T pass over X for the whole group (one launch of the T kernel), one dX GEMM."""
    if "triton" not in BACKENDS:
        pytest.skip("triton is not installed")
    from fastpeft.kernels import lowrank_group as G
    seen = {"t": 0, "gemm": 0, "dx": 0}
    from fastpeft.kernels import _common
    t_pass, gemm, group_dx = _common._t_pass, L._fwd_gemm, G._group_dx

    def count(key, fn):
        def wrapped(*args, **kwargs):
            seen[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(_common, "_t_pass", count("t", t_pass))
    monkeypatch.setattr(L, "_fwd_gemm", count("gemm", gemm))
    monkeypatch.setattr(G, "_group_dx", count("dx", group_dx))
    x, g = make_group((4,), 40, (24, 16, 16), (8, 4, 4), torch.float32, (None, None, None), (False,) * 3)
    run_group("triton", x, g, [1.0] * 3, 0.1, None, seed=1)
    assert seen == {"t": 1, "gemm": 3, "dx": 1}


# -- arguments --------------------------------------------------------------------------------

def test_bad_arguments_name_the_projection():
    x, g = make_group((3,), 16, (8, 6), (2, 3), torch.float32, (None, None), (True, True))
    w, b, a, bb = g["weights"], g["biases"], g["lora_As"], g["lora_Bs"]
    with pytest.raises(ValueError, match=r"projection 1 .*lora_B must have shape \[d=6, r=3\]"):
        fastpeft.lowrank_linear_group(x, w, b, a, [bb[0], bb[0]])
    with pytest.raises(ValueError, match=r"lora_As must have one entry per projection: length 2"):
        fastpeft.lowrank_linear_group(x, w, b, a[:1], bb)
    with pytest.raises(ValueError, match=r"scales must have one entry per projection"):
        fastpeft.lowrank_linear_group(x, w, b, a, bb, scales=[1.0])
    with pytest.raises(TypeError, match=r"weights must be a non-empty list"):
        fastpeft.lowrank_linear_group(x, w[0], b, a, bb)
    with pytest.raises(TypeError, match=r"projection 0 .*lora_A dtype torch.float64 must equal x dtype"):
        fastpeft.lowrank_linear_group(x, w, b, [a[0].double(), a[1]], bb)
    with pytest.raises(ValueError, match=r"projection 1 .*x must have last dimension k=20"):
        fastpeft.lowrank_linear_group(x, [w[0], torch.randn(6, 20, device=DEVICE)], b, a, bb)
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
        fastpeft.lowrank_linear_group(x, w, b, a, bb, dropout_p=1.0)


def test_autocast_and_empty_batch():
    x, g = make_group((0, 4), 16, (8, 6), (2, 3), torch.float32, (None, "diag"), (True, True))
    ys = fastpeft.lowrank_linear_group(x, g["weights"], None, g["lora_As"], g["lora_Bs"], cores=g["cores"])
    assert [tuple(y.shape) for y in ys] == [(0, 4, 8), (0, 4, 6)]
    x, g = make_group((3,), 16, (8, 6), (2, 3), torch.float32, (None, None), (True, True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = fastpeft.lowrank_linear_group(x, g["weights"], None, g["lora_As"], g["lora_Bs"])
    assert all(y.dtype == torch.bfloat16 for y in ys)
    sum(y.float().sum() for y in ys).backward()
    assert g["lora_As"][0].grad.dtype == torch.float32


def test_opcheck_and_compile():
    x, g = make_group((6,), 16, (8, 6), (4, 2), torch.float32, ("full", "diag"), (False, False), with_bias=(0,))
    plain = {k: [None if t is None else t.detach() for t in v] for k, v in g.items()}
    seed = torch.tensor(3)
    args = (x.detach(), plain["weights"], plain["biases"], plain["lora_As"], plain["lora_Bs"], plain["cores"],
            plain["out_scales"], [1.0, 0.5], 0.1, seed, "gelu", "torch")
    torch.library.opcheck(torch.ops.fastpeft.lowrank_group_fwd.default, args)
    *_, t = torch.ops.fastpeft.lowrank_group_fwd(*args)
    grad_ys = [torch.randn(6, 8), None]
    needs = [True, True, False, True, False, True, True, False, False, True, False]
    bargs = (grad_ys, x.detach(), plain["weights"], t, plain["lora_As"], plain["lora_Bs"], plain["cores"],
             plain["out_scales"], [1.0, 0.5], 0.1, seed, "gelu", needs, "torch", False)
    torch.library.opcheck(torch.ops.fastpeft.lowrank_group_bwd.default, bargs)

    def f(x):
        q, k = fastpeft.lowrank_linear_group(x, g["weights"], g["biases"], g["lora_As"], g["lora_Bs"],
                                             cores=g["cores"], scales=[1.0, 0.5], seed=0)
        return q.sum() + 2 * k.sum()

    torch._dynamo.reset()
    try:
        with fastpeft.use_backend("torch"):
            compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
            loss = compiled(x)
            loss.backward()
            grads = [g["lora_Bs"][0].grad.clone(), x.grad.clone()]
            for t in (g["lora_Bs"][0], x):
                t.grad = None
            f(x).backward()
        assert torch.allclose(grads[0], g["lora_Bs"][0].grad, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grads[1], x.grad, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


# -- modules: LowRankLinearGroup, group_projections ------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomise_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, fastpeft.LowRankLinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
                if layer.lora_core is not None:
                    layer.lora_core.copy_(torch.randn(layer.lora_core.shape, generator=gen))
    return model


def _llama(method="lamda", dropout=0.0, seed=0, dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model = fastpeft.inject(model, fastpeft.AdapterConfig(method=method, r=4, alpha=8, dropout=dropout,
                                                          target_modules=TARGETS))
    return _randomise_adapters(model, seed)


@pytest.fixture
def group_calls(monkeypatch):
    import fastpeft.nn.group as G
    seen = []
    real = G.lowrank_linear_group

    def counted(x, weights, *args, **kwargs):
        seen.append(len(weights))
        return real(x, weights, *args, **kwargs)

    monkeypatch.setattr(G, "lowrank_linear_group", counted)
    return seen


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [None, True, False], ids=["plain", "ckpt-reentrant", "ckpt-nonreentrant"])
def test_group_projections_equals_ungrouped_model(group_calls, checkpointing):
    """A Llama-like model: grouped (q/k/v and gate/up in one op each) == ungrouped, logits and
    every gradient, with gradient checkpointing too; nothing kept once the forward is over."""
    model = _llama()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    logits_ref, grads_ref = _loss_and_grads(model, ids)
    assert group_calls == []
    fastpeft.group_projections(model)
    logits, grads = _loss_and_grads(model, ids)
    per_pass = [3, 2] * 2                           # two decoder layers: q/k/v, then gate/up
    assert group_calls == per_pass * (2 if checkpointing is not None else 1)
    assert_close_rel(logits, logits_ref, 1e-12, "logits")
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert_close_rel(g, grads_ref[name], 1e-10, name)
    from fastpeft.nn.linear import SIBLING_GROUPS
    groups = {id(g): g for g in SIBLING_GROUPS.values()}.values()
    assert all(g.enabled and not g._pending for g in groups if any(
        ref() is not None and any(ref() is m for m in model.modules()) for ref in g._layers))

    fastpeft.ungroup_projections(model)
    group_calls.clear()
    _loss_and_grads(model, ids)
    assert group_calls == []


def test_group_projections_with_dropout_shares_one_mask(group_calls):
    """Training with dropout: one op per group (one mask on x), gradients flow to every adapter."""
    model = fastpeft.group_projections(_llama(method="lora", dropout=0.2))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    _, grads = _loss_and_grads(model, ids)
    assert group_calls == [3, 2, 3, 2]
    for name in TARGETS:
        assert any(name in n and "lora_A" in n for n in grads), f"no gradient for {name}.lora_A"


def test_siblings_on_different_inputs_turn_grouping_off():
    """q on one tensor, k and v on another (cross-attention): correct outputs, a warning, and the
    layers run one by one from then on."""
    cfg = fastpeft.AdapterConfig(method="lora", r=4)

    class Cross(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(16, 16) for _ in range(3))

        def forward(self, x, memory):
            return self.q_proj(x), self.k_proj(memory), self.v_proj(memory)

    model = _randomise_adapters(fastpeft.inject(Cross(), fastpeft.AdapterConfig(
        method="lora", r=4, target_modules=["q_proj", "k_proj", "v_proj"])))
    del cfg
    x, memory = torch.randn(3, 16), torch.randn(5, 16)
    expected = model(x, memory)
    fastpeft.group_projections(model)
    with pytest.warns(UserWarning, match="grouping of q_proj/k_proj/v_proj turned off"):
        got = model(x, memory)
    for a, b in zip(got, expected):
        assert_close_rel(a, b, 1e-6, "output")
    from fastpeft.nn.linear import SIBLING_GROUPS
    assert not SIBLING_GROUPS[model.q_proj].enabled
    for a, b in zip(model(x, memory), expected):
        assert torch.equal(a, b)


def test_inference_mode_runs_layers_alone(group_calls):
    model = fastpeft.group_projections(_llama())
    model.eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert group_calls == [3, 2, 3, 2]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert group_calls == [3, 2, 3, 2]
    assert_close_rel(logits, expected, 1e-12, "logits")


def test_cached_output_not_used_after_in_place_change():
    """x modified in place between two siblings' calls: the sibling recomputes (never a stale value)."""
    model = _randomise_adapters(fastpeft.inject(torch.nn.ModuleDict(
        {"gate_proj": torch.nn.Linear(8, 12), "up_proj": torch.nn.Linear(8, 12)}),
        fastpeft.AdapterConfig(method="lora", r=2, target_modules=["gate_proj", "up_proj"])))
    fastpeft.group_projections(model)
    x = torch.randn(4, 8)
    model["gate_proj"](x)
    x.mul_(2.0)
    with pytest.warns(UserWarning, match="turned off"):
        up = model["up_proj"](x)
    assert_close_rel(up, model["up_proj"]._forward_alone(x), 1e-6, "up")


def test_lowrank_linear_group_module_and_copies():
    import copy
    cfg = fastpeft.AdapterConfig(method="lamda", r=4)
    layers = [fastpeft.LowRankLinear.from_linear(torch.nn.Linear(24, d), cfg) for d in (24, 8, 8)]
    _randomise_adapters(torch.nn.ModuleList(layers))
    group = fastpeft.LowRankLinearGroup(layers)
    x = torch.randn(2, 3, 24, requires_grad=True)
    outs = group(x)
    sum((i + 1) * y.square().sum() for i, y in enumerate(outs)).backward()
    grads = [x.grad.clone()] + [layer.lora_core.grad.clone() for layer in layers]
    x.grad = None
    for layer in layers:
        layer.lora_core.grad = None
    alone = [layer(x) for layer in layers]
    sum((i + 1) * y.square().sum() for i, y in enumerate(alone)).backward()
    for a, b in zip(outs, alone):
        assert_close_rel(a, b, 1e-6, "output")
    for a, b in zip(grads, [x.grad] + [layer.lora_core.grad for layer in layers]):
        assert_close_rel(a, b, 1e-5, "grad")
    assert list(group.state_dict())[:2] == ["layers.0.weight", "layers.0.bias"]
    with pytest.raises(ValueError, match="in_features=16"):
        fastpeft.LowRankLinearGroup([layers[0], fastpeft.LowRankLinear.from_linear(torch.nn.Linear(16, 8), cfg)])

    # a copy of a grouped model is not linked to the original's layers
    model = fastpeft.group_projections(_llama())
    clone = copy.deepcopy(model)
    from fastpeft.nn.linear import SIBLING_GROUPS
    assert all(m not in SIBLING_GROUPS for m in clone.modules())
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    model.eval(), clone.eval()
    with torch.no_grad():
        assert_close_rel(clone(input_ids=ids).logits, model(input_ids=ids).logits, 1e-5, "logits")


def test_grouped_model_compiles_without_graph_breaks(group_calls):
    """Under torch.compile the layers run one by one (no grouping, no graph break)."""
    model = fastpeft.group_projections(_llama())
    model.eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    group_calls.clear()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            logits = compiled(input_ids=ids).logits
    finally:
        torch._dynamo.reset()
    assert group_calls == []
    assert_close_rel(logits, eager, 1e-5, "logits")

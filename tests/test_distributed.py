"""fastpeft-adapted models under torch DDP and FSDP2 (``fully_shard``): two CPU processes with
the gloo backend; the gradients (and the parameters after one SGD step) equal a single-process
run on the whole batch.

FSDP2 note: ``fully_shard`` shards each parameter on its own and raises NotImplementedError for a
non-contiguous parameter. VeRA's frozen shared projections are views (``A[:, :k]``, ``B[:d]``) of
one pair shared by all layers, which are strided wherever a layer is narrower than the widest
one; before ``fully_shard`` give each layer a contiguous copy (see ``_unshare_vera_projections``).
Every other preset shards as it is. DDP needs nothing."""

import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpeft
from fastpeft import AdapterConfig

transformers = pytest.importorskip("transformers")

WORLD = 2
TIMEOUT_S = 180
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
METHODS = ["lora", "lamda", "vera", "adalora"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, timeout=TIMEOUT_S):
    """Run ``fn(rank, *args)`` in WORLD processes; fail the test on an error or after ``timeout``."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def _model(method, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    config = AdapterConfig(method=method, r=4, alpha=8, target_modules=TARGETS)
    model = fastpeft.inject(model, config)
    with torch.no_grad():  # start away from B = 0 / core = 0 so every gradient is informative
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _unshare_vera_projections(model):
    """FSDP2 shards every parameter on its own and refuses strided ones, while VeRA's frozen
    projections are slices (views) of one shared pair: give each layer a contiguous copy
    (r·(d + k) numbers per layer, frozen) before ``fully_shard``."""
    for layer in model.modules():
        if isinstance(layer, fastpeft.LowRankLinear) and layer.method == "vera":
            layer.lora_A = torch.nn.Parameter(layer.lora_A.detach().clone(), requires_grad=False)
            layer.lora_B = torch.nn.Parameter(layer.lora_B.detach().clone(), requires_grad=False)


def _batch():
    return torch.randint(0, 64, (2 * WORLD, 10), generator=torch.Generator().manual_seed(0))


def _reference(method):
    """(grads, params after one SGD step) of a single process on the whole batch."""
    model = _model(method)
    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.sub_(0.1 * p.grad)
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check(got, want, what):
    assert got.keys() == want.keys(), f"{what}: names differ"
    for name in want:
        torch.testing.assert_close(_full(got[name]).detach(), want[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what} {name}: {m}")


def _worker(rank, port, mode, status_dir):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))
        ids = _batch().chunk(WORLD)[rank]
        for method in METHODS:
            want_grads, want_params = _reference(method)
            model = _model(method)
            if mode == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard
                mesh = init_device_mesh("cpu", (WORLD,))
                if method == "vera":
                    _unshare_vera_projections(model)
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            wrapped(input_ids=ids, labels=ids).loss.backward()
            _check({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, want_grads,
                   f"{mode}/{method} grad")
            opt.step()
            _check({n: p for n, p in model.named_parameters()}, want_params, f"{mode}/{method} param")
        dist.barrier()
        open(os.path.join(status_dir, f"ok{rank}"), "w").close()
    except BaseException:
        with open(os.path.join(status_dir, f"error{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_gradients_equal_single_process(tmp_path, mode):
    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
        from torch.distributed import fsdp
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("torch.distributed.fsdp.fully_shard is not available")
    try:
        _spawn(_worker, _free_port(), mode, str(tmp_path))
    except mp.ProcessRaisedException as err:
        errors = [open(tmp_path / f).read() for f in sorted(os.listdir(tmp_path)) if f.startswith("error")]
        pytest.fail("a worker failed:\n" + ("\n".join(errors) or str(err)))
    assert sorted(os.listdir(tmp_path)) == [f"ok{r}" for r in range(WORLD)]

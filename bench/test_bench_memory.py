"""One training step of a Llama-like decoder, HF PEFT LoRA beside fastpeft presets
(pytest-benchmark); the bytes saved for backward are recorded in ``extra_info``.

    pytest bench/test_bench_memory.py --benchmark-only
"""

import pytest
import torch

from fastpeft.benchmark.memory import adapt, build_model, measure_step
from fastpeft.benchmark.runner import Skip

PRESET, BATCH, SEQ = ("125m", 4, 512) if torch.cuda.is_available() else ("tiny", 2, 64)
METHODS = ["base", "peft-lora", "fastpeft-lora", "fastpeft-lora_fa", "fastpeft-lamda"]


@pytest.mark.parametrize("method", METHODS)
def test_training_step(method, device, timed, benchmark):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = adapt(build_model(PRESET, None, dtype, device), method, r=16, alpha=32, dropout=0.1)
    except Skip as reason:
        pytest.skip(f"{method}: {reason}")
    row = measure_step(model, BATCH, SEQ, device)
    benchmark.group = f"training step {PRESET} batch {BATCH} x {SEQ}"
    benchmark.extra_info.update({k: row[k] for k in ("trainable", "saved_bytes", "total_bytes", "peak_bytes")})
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (BATCH, SEQ), device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()

    timed(step, clear=trainable)

"""``fastpeft memory``: memory of one training step of a Llama-like decoder, HF PEFT vs fastpeft.

One step is forward (causal-LM loss), backward and an AdamW step, with all seven projections of
every block (q, k, v, o, gate, up, down) adapted at the same rank, alpha and dropout, by HF PEFT
LoRA (``get_peft_model`` with its defaults) and by fastpeft presets (``inject``); DoRA rows
(``peft-dora``: PEFT's ``use_dora=True``; ``fastpeft-dora``) compare with PEFT's DoRA. Per method,
batch size and sequence length it reports:

- **saved**: bytes autograd saves for backward (``saved_tensors_hooks``), each distinct storage
  counted once, parameters and buffers excluded;
- **added**: saved minus what the frozen base model itself saves for the same batch (the model
  without adapters, its embedding output requiring grad as in training, so the base layers save
  exactly what they save when adapted) — what the adapters add;
- **total**: on a GPU the peak of ``torch.cuda.max_memory_allocated`` over the step; on a CPU
  saved + parameter + gradient + optimiser-state bytes;
- tokens/s of the step (median over ``--steps`` timed steps after the measured one).

Models: presets built from a transformers ``LlamaConfig`` (``tiny`` to ``1b``; random weights,
the same seed for every method) or ``--model PATH`` (local weights, loaded offline). 4-bit rows
(bitsandbytes ``Linear4bit`` projections; ``peft-qlora`` and fastpeft's 4-bit layers) compare
with the 4-bit base and are skipped with the reason where a provider is missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Optional

import torch
import torch.nn as nn

from .runner import (SavedBytes, Skip, add_common_arguments, environment, fits_in_memory, format_table, num_threads,
                     optional_import, progress, resolve_device, validate_common, write_results)

__all__ = ["PRESETS", "METHODS", "TARGETS", "add_arguments", "validate", "build_model", "adapt",
           "measure_step", "profile", "run", "step_bytes"]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# LlamaConfig fields, and the default (batch sizes, sequence lengths), per preset
PRESETS = {
    "tiny": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512), [1, 2, 4], [64, 128]),
    "small": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=8192), [1, 2, 4], [128, 256]),
    "125m": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=32000), [1, 2, 4, 8], [256, 512]),
    "350m": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32000), [1, 2, 4, 8], [512]),
    "1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256), [1, 2, 4, 8], [512, 1024]),
}
# method -> (base it is compared with, adapter provider, fastpeft preset or None)
METHODS = {
    "peft-lora": ("base", "peft", None),
    "fastpeft-lora": ("base", "fastpeft", "lora"),
    "fastpeft-lora_fa": ("base", "fastpeft", "lora_fa"),
    "fastpeft-lamda": ("base", "fastpeft", "lamda"),
    "peft-dora": ("base", "peft", None),
    "fastpeft-dora": ("base", "fastpeft", "dora"),
    "peft-qlora": ("base-4bit", "peft", None),
    "fastpeft-lora-4bit": ("base-4bit", "fastpeft", "lora"),
    "fastpeft-lamda-4bit": ("base-4bit", "fastpeft", "lamda"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MiB = 2**20
COLUMNS = [("method", "method"), ("batch", "batch"), ("seq", "seq"), ("trainable", "trainable"),
           ("saved_mib", "saved MiB"), ("added_mib", "added MiB"), ("added_vs_peft", "added x peft"),
           ("total_mib", "total MiB"), ("tokens_per_s", "tokens/s")]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _methods(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in METHODS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; choose from {', '.join(METHODS)}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastpeft memory`` flags."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default tiny)")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a local Llama-like causal-LM folder instead of a preset")
    parser.add_argument("--methods", type=_methods, default=list(METHODS),
                        help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--batch-sizes", type=_int_list, default=None,
                        help="comma-separated batch sizes (default: the preset's, e.g. 1,2,4)")
    parser.add_argument("--seq-lens", type=_int_list, default=None,
                        help="comma-separated sequence lengths (default: the preset's, e.g. 64,128)")
    parser.add_argument("--r", type=int, default=16, help="adapter rank of every method (default 16)")
    parser.add_argument("--alpha", type=float, default=32.0, help="adapter alpha (default 32)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps for tokens/s (default 2)")
    add_common_arguments(parser, plot_help="also draw the memory-vs-batch-size PNG")


def validate(args) -> Optional[str]:
    """A message for flag values argparse cannot check, else ``None``."""
    if args.r < 1:
        return f"--r must be >= 1, got {args.r}"
    if args.steps < 1:
        return f"--steps must be >= 1, got {args.steps}"
    if args.model is not None and not os.path.isdir(args.model):
        return f"--model {args.model!r} is not a folder with a model (config.json and weights)"
    problem = validate_common(args)
    if problem or args.model is not None:
        return problem
    device = resolve_device(args.device, "fastpeft memory")
    fields, batches, seqs = PRESETS[args.preset]
    batch, seq = max(args.batch_sizes or batches), max(args.seq_lens or seqs)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return fits_in_memory(step_bytes(fields, batch, seq, dtype), device,
                          f"one training step of preset {args.preset!r} at batch {batch} x sequence {seq}",
                          "--batch-sizes or --seq-lens")


def step_bytes(fields: dict, batch: int, seq: int, dtype) -> int:
    """A lower estimate of one training step's memory for a preset: the parameters, and per token
    the activations of each block (about 16 hidden-size and 3 intermediate-size vectors), the
    attention scores (heads x sequence) and the logits with their gradient."""
    e = torch.finfo(dtype).bits // 8
    h, i, layers = fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"]
    params = layers * (4 * h * h + 3 * h * i) + 2 * fields["vocab_size"] * h
    per_token = layers * (16 * h + 3 * i + fields["num_attention_heads"] * seq) + 2 * fields["vocab_size"]
    return e * (params + batch * seq * per_token)


# -- models -------------------------------------------------------------------------------------

def build_model(preset: str, model_path: Optional[str], dtype, device, seed: int = 0) -> nn.Module:
    """A Llama-like causal LM: a preset from ``LlamaConfig`` with seeded random weights, or the
    local weights at ``model_path``."""
    transformers = optional_import("transformers", "hf")
    if model_path is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        return model.to(device)
    fields = PRESETS[preset][0]
    config = transformers.LlamaConfig(max_position_embeddings=4096, **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype)


def _quantize_targets(model: nn.Module) -> None:
    """Replace the seven projections by bitsandbytes NF4 ``Linear4bit`` layers (in place)."""
    bnb = optional_import("bitsandbytes", "quant")
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rpartition(".")[2] not in TARGETS:
            continue
        device, dtype = module.weight.device, module.weight.dtype
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=dtype, quant_type="nf4", device="cpu")
        layer.weight = bnb.nn.Params4bit(module.weight.detach().float().cpu(), requires_grad=False,
                                         quant_type="nf4", blocksize=64, compress_statistics=True)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().cpu(), requires_grad=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer.to(device))


def adapt(model: nn.Module, method: str, r: int, alpha: float, dropout: float) -> nn.Module:
    """Adapt ``model``'s seven projections with ``method`` (a key of :data:`METHODS` or a base);
    everything else frozen. Bases keep every weight frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    # the embedding output requires grad (as in training), so every layer saves for backward
    # what it saves when adapted, in the base runs and the adapted runs alike
    model.enable_input_require_grads()
    if method.startswith("base"):
        return model
    _, provider, preset = METHODS[method]
    if provider == "peft":
        peft = optional_import("peft", "hf")
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS,
                                 task_type="CAUSAL_LM", use_dora=method == "peft-dora")
        return peft.get_peft_model(model, config)
    import fastpeft

    if method.endswith("-4bit") and not hasattr(fastpeft, "LowRankLinear4bit"):
        raise Skip("fastpeft.LowRankLinear4bit is not in this build")
    config = fastpeft.AdapterConfig(method=preset, r=r, alpha=alpha, dropout=dropout, target_modules=TARGETS)
    model = fastpeft.inject(model, config)
    adapted = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    expected = sum(1 for n, _ in model.named_modules() if n.rpartition(".")[2] in TARGETS)
    if adapted != expected:
        raise Skip(f"fastpeft adapted {adapted} of {expected} projections ({method})")
    return model


# -- one step -----------------------------------------------------------------------------------

def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_step(model: nn.Module, batch: int, seq: int, device, steps: int = 1, seed: int = 0) -> dict:
    """Bytes and speed of one training step (forward, backward, AdamW step) at ``batch × seq``."""
    model.train()
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    frozen = list(model.parameters()) + list(model.buffers())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step(saved=None):
        if saved is not None:
            with saved:
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()

    saved = SavedBytes(exclude=frozen)
    step(saved)
    if cuda:
        torch.cuda.synchronize(device)
    row = {
        "trainable": sum(p.numel() for p in trainable),
        "saved_bytes": saved.nbytes,
        "param_bytes": _storage_bytes(frozen),
        "grad_bytes": _storage_bytes(p.grad for p in trainable if p.grad is not None),
        "optim_bytes": _storage_bytes(t for s in (opt.state.values() if opt else ()) for t in s.values()
                                      if torch.is_tensor(t) and t.numel() > 1),
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    row["total_bytes"] = row["peak_bytes"] if cuda else (
        row["saved_bytes"] + row["param_bytes"] + row["grad_bytes"] + row["optim_bytes"])
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    row["step_ms"] = statistics.median(times) * 1e3
    row["tokens_per_s"] = batch * seq / statistics.median(times)
    return row


def profile(args, device, dtype, bar=None) -> list[dict]:
    """Rows for every method, batch size and sequence length of ``args`` (bases included)."""
    _, batches, seqs = PRESETS[args.preset]
    batches, seqs = args.batch_sizes or batches, args.seq_lens or seqs
    bases = list(dict.fromkeys(METHODS[m][0] for m in args.methods))
    rows = []
    for method in bases + list(args.methods):
        common = {"method": method, "model": args.model or args.preset, "r": None if method.startswith("base") else args.r,
                  "dropout": None if method.startswith("base") else args.dropout,
                  "dtype": str(dtype).replace("torch.", "")}
        try:
            model = build_model(args.preset, args.model, dtype, device, args.seed)
            if method.endswith("-4bit") or method in ("peft-qlora", "base-4bit"):
                _quantize_targets(model)
            model = adapt(model, method, args.r, args.alpha, args.dropout)
        except Skip as reason:
            rows += [{**common, "batch": b, "seq": s, "tokens": b * s, "status": "skipped", "reason": str(reason)}
                     for s in seqs for b in batches]
            if bar is not None:
                bar.update(len(seqs) * len(batches))
            continue
        # what attention saves decides which projection inputs the base already keeps
        attention = getattr(model.config, "_attn_implementation", None)
        for s in seqs:
            for b in batches:
                if bar is not None:
                    bar.set_postfix_str(f"{method} batch={b} seq={s}")
                try:
                    row = {**common, "batch": b, "seq": s, "tokens": b * s, "status": "ok", "reason": None,
                           "attention": attention,
                           **measure_step(model, b, s, device, args.steps, args.seed)}
                except Exception as err:  # reported as a row, not fatal
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    row = {**common, "batch": b, "seq": s, "tokens": b * s, "status": "error",
                           "reason": f"{type(err).__name__}: {err}"[:300]}
                rows.append(row)
                if bar is not None:
                    bar.update(1)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _add_deltas(rows)
    return rows


def _add_deltas(rows: list[dict]) -> None:
    """added = saved − the base's saved (same batch and length); added × PEFT's added."""
    ok = {(r["method"], r["batch"], r["seq"]): r for r in rows if r["status"] == "ok"}
    for row in (r for r in rows if r["status"] == "ok"):
        base_name = METHODS[row["method"]][0] if row["method"] in METHODS else row["method"]
        base = ok.get((base_name, row["batch"], row["seq"]))
        row["base_saved_bytes"] = base["saved_bytes"] if base else None
        row["added_bytes"] = row["saved_bytes"] - base["saved_bytes"] if base else None
    for row in (r for r in rows if r["status"] == "ok"):
        four_bit = row["method"] == "base-4bit" or METHODS.get(row["method"], ("base",))[0] == "base-4bit"
        ref_name = "peft-qlora" if four_bit else "peft-dora" if "dora" in row["method"] else "peft-lora"
        ref = ok.get((ref_name, row["batch"], row["seq"]))
        added, ref_added = row["added_bytes"], ref["added_bytes"] if ref else None
        row["added_vs_peft"] = added / ref_added if added is not None and ref_added else None
        row["saved_mib"] = row["saved_bytes"] / MiB
        row["added_mib"] = added / MiB if added is not None else None
        row["total_mib"] = row["total_bytes"] / MiB


def run(args) -> int:
    """Run with parsed ``args`` (CPU threads as ``--threads`` says, restored afterwards)."""
    with num_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    """Run ``fastpeft memory`` with parsed ``args``; prints the table, writes the files."""
    device = resolve_device(args.device, "fastpeft memory")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    _, batches, seqs = PRESETS[args.preset]
    n_methods = len(set(METHODS[m][0] for m in args.methods)) + len(args.methods)
    total = n_methods * len(args.batch_sizes or batches) * len(args.seq_lens or seqs)
    bar = progress(total, "fastpeft memory", enabled=not args.no_progress)
    try:
        rows = profile(args, device, dtype, bar)
    finally:
        bar.close()
    meta = environment(device)
    kind = "peak of torch.cuda.max_memory_allocated" if device.type == "cuda" else \
        "CPU: saved for backward + parameters + gradients + AdamW state"
    print(f"fastpeft memory on {meta['device_name']}: {args.model or args.preset}, {str(dtype)[6:]}, "
          f"r={args.r}, alpha={args.alpha:g}, dropout={args.dropout:g}, targets {','.join(TARGETS)}")
    print(f"total = {kind}; added = saved for backward beyond the frozen base model")
    print(format_table([r for r in rows if r["status"] == "ok"], COLUMNS))
    for r in rows:
        if r["status"] != "ok" and (r["batch"], r["seq"]) == (rows[0]["batch"], rows[0]["seq"]):
            print(f"{r['status']}: {r['method']}: {r['reason']}")
    settings = {"preset": args.preset, "model": args.model, "r": args.r, "alpha": args.alpha,
                "dropout": args.dropout, "dtype": str(dtype)[6:], "targets": TARGETS, "total": kind}
    paths = write_results("memory", meta, rows, args.out, extra={"settings": settings})
    print(f"wrote {paths['json']} and {paths['csv']}")
    if args.plot:
        from .plots import plot_memory
        for path in plot_memory(rows, meta, paths["json"][:-5]):
            print(f"wrote {path}")
    return 0

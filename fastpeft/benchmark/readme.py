"""``fastpeft report``: regenerate the README's results section from the files in bench/results.

The section lies between the lines ``<!-- results:start -->`` and ``<!-- results:end -->`` of the
README; everything between them is replaced, nothing else is touched. It holds, for the newest
``fastpeft bench`` and ``fastpeft memory`` result of every GPU and of the newest CPU: the device,
the date, the versions and the tables, built only from numbers the harness measured and wrote.
CPU numbers are labelled as CPU numbers. The text depends on the files alone, so running the
command twice changes nothing, and ``--check`` can tell whether the README is current.

    fastpeft report                          # rewrite README.md's section in place
    fastpeft report --readme docs/x.md --results some/folder
    fastpeft report --check                  # exit 1 when the section is out of date
    fastpeft report --allow-noisy            # show noisy rows, flagged, instead of refusing

Without the markers the section is printed instead, with a hint on where to place them.

Noisy results are refused: when a shown bench file has a row whose numbers do not mean much (a
20-80 % range wider than ``NOISE_SPREAD`` of the median, fewer timed samples than a quick CPU run
takes, or an adapter layer faster than the floor, which no adapter layer is), the command names
those rows, leaves the README as it is and exits 1; ``--allow-noisy`` writes them anyway, under a
"Noisy run" note.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Optional

from .runner import CPU_MIN_SAMPLES, format_table, latest_results

__all__ = ["START", "END", "NOISE_SPREAD", "add_arguments", "validate", "render", "replace_section",
           "noisy_rows", "run"]

START = "<!-- results:start -->"
END = "<!-- results:end -->"
CPU_LABEL = "CPU timings, not kernel speed"
DETAILS_ABOVE = 12   # tables longer than this many rows are folded
NOISE_SPREAD = 0.5   # a row whose (q80 - q20) / median exceeds this is noisy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastpeft report`` flags."""
    parser.add_argument("--results", default="bench/results",
                        help="folder of bench-*.json and memory-*.json files (default bench/results)")
    parser.add_argument("--readme", default=None, metavar="PATH",
                        help="the README to update (default README.md, when it exists)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when the section is missing or out of date")
    parser.add_argument("--allow-noisy", action="store_true",
                        help="write noisy bench rows (wide 20-80 %% range, too few samples, faster than "
                             "the floor) under a 'Noisy run' note instead of refusing them")


def validate(args) -> Optional[str]:
    """A message for flag values argparse cannot check, else ``None``."""
    if not os.path.isdir(args.results):
        return f"--results {args.results!r} is not a folder"
    if args.readme is not None and not os.path.isfile(args.readme):
        return f"--readme {args.readme!r} is not a file"
    return None


# -- the section ----------------------------------------------------------------------------------

def _chosen(results: list[dict]) -> list[dict]:
    """Every GPU result, then the newest CPU result (one CPU in the README is enough)."""
    gpu = [r for r in results if r["meta"].get("device") == "cuda"]
    cpu = [r for r in results if r["meta"].get("device") != "cuda"]
    return gpu + cpu[-1:]


def _heading(what: str, meta: dict, cpu_note: str) -> list[str]:
    device = meta.get("device_name", "?")
    versions = ", ".join(f"{name} {meta[name]}" for name in
                         ("fastpeft", "torch", "triton", "peft", "transformers", "bitsandbytes")
                         if meta.get(name))
    if meta.get("cuda"):
        versions += f", CUDA {meta['cuda']}"
    commit = f", commit `{meta['git_commit']}`" if meta.get("git_commit") else ""
    lines = [f"#### {what}: {device}, {meta.get('timestamp', '?')[:10]}", "",
             f"{versions}; Python {meta.get('python', '?')}{commit}."]
    if meta.get("device") != "cuda":
        lines += ["", f"**CPU numbers.** {cpu_note}"]
    return lines


def _table(rows: list[dict], columns) -> list[str]:
    text = format_table(rows, columns, markdown=True).splitlines()
    if len(rows) <= DETAILS_ABOVE:
        return text
    return ["<details><summary>" + f"{len(rows)} rows</summary>", ""] + text + ["", "</details>"]


def _figures(path: str, suffixes, readme_dir: str) -> list[str]:
    stem = path[:-len(".json")]
    lines = []
    for suffix, alt in suffixes:
        png = stem + suffix
        if os.path.isfile(png):
            lines.append(f"![{alt}]({os.path.relpath(png, readme_dir).replace(os.sep, '/')})")
    return [""] + lines if lines else []


def _bench_section(data: dict, readme_dir: str, noisy: Optional[list] = None) -> list[str]:
    meta, rows, args = data["meta"], data["rows"], data.get("args", {})
    ok = [r for r in rows if r["status"] == "ok"]
    lines = _heading("Layer microbenchmark", meta, f"{CPU_LABEL}: they check that the harness runs and "
                     "say nothing about the GPU kernels.")
    mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in ok) else \
        (Counter(r["mode"] for r in ok).most_common(1)[0][0] if ok else "fwd+bwd")
    method = args.get("method", "lora")
    dropout = args.get("dropout")
    lines += ["", f"Training {mode.replace('fwd', 'forward').replace('bwd', 'backward').replace('+', ' + ')} "
                  f"of one `k -> d` layer on `M` tokens: median ms over repetitions "
                  + ("(the providers of a shape timed in interleaved blocks, so that they share the "
                     "machine's load) " if meta.get("device") == "cpu" else "")
                  + "and, in brackets, "
                  f"the ratio to the floor (the base `F.linear` alone). fastpeft runs the `{method}` "
                  f"preset, HF PEFT its LoRA layer" + (f", adapter dropout {dropout:g}" if dropout else "")
              + ("; quick set" if args.get("quick") else "") + "."]
    for op in ("dense", "4bit"):
        table = _bench_table([r for r in ok if r["mode"] == mode], op)
        if table:
            lines += ["", f"{'Dense' if op == 'dense' else '4-bit (NF4)'} base weight:", ""] + table
    flagged = noisy_rows(ok)
    if flagged:
        note = (f"{len(flagged)} of {len(ok)} measured rows are noisy (a ratio below the floor, a 20-80 % "
                f"range wider than {NOISE_SPREAD:g} of the median, or fewer than {CPU_MIN_SAMPLES[True]} timed "
                "samples), e.g. " + ", ".join(_row_name(r) for r, _ in flagged[:3]))
        lines += ["", f"**Noisy run.** {note}: read these ratios with care."]
    notes = Counter((r["provider"], r["status"], r["reason"]) for r in rows if r["status"] != "ok")
    if notes:
        lines += ["", "Not measured: " + "; ".join(
            f"`{name}` ({status}: {reason})" for (name, status, reason) in sorted(notes, key=str)) + "."]
    lines += _figures(data["_path"], [("-time_vs_M.png", "time vs M"), ("-time_vs_r.png", "time vs r"),
                                      ("-ratio.png", "ratio to the floor")], readme_dir)
    if noisy is not None:
        noisy += [f"{data['_path']}: {_row_name(r)}: {why}" for r, why in flagged]
    return lines


def _row_name(r: dict) -> str:
    return f"{r['provider']} M={r['M']} {r['shape']} r={r.get('r')} {r['mode']}"


def noisy_rows(rows: list[dict]) -> list[tuple[dict, str]]:
    """(row, why) for each measured row whose numbers do not mean much, from its stored
    quantiles: a 20-80 % range wider than ``NOISE_SPREAD`` of the median, fewer timed samples
    than a quick CPU run takes (GPU rows, timed by ``do_bench``, store 0), or a ratio below the
    floor for a provider that runs more than the floor's GEMM."""
    out = []
    for r in rows:
        ms, ratio, samples = r.get("ms"), r.get("ratio"), r.get("samples")
        spread = (r["ms_q80"] - r["ms_q20"]) / ms if ms else 0.0
        if spread > NOISE_SPREAD:
            out.append((r, f"20-80 % range {r['ms_q20']:.4g}-{r['ms_q80']:.4g} ms is {spread:.2f} of the "
                           f"median {ms:.4g} ms (limit {NOISE_SPREAD:g})"))
        elif samples and samples < CPU_MIN_SAMPLES[True]:
            out.append((r, f"{samples} timed samples (at least {CPU_MIN_SAMPLES[True]})"))
        elif ratio is not None and ratio < 1.0 and r["provider"] != "torch-linear":
            out.append((r, f"{ratio:.2f}x the floor: faster than the base F.linear alone"))
    return out


def _bench_table(rows: list[dict], op: str) -> list[str]:
    """One row per (shape, M, r, dtype); one column per provider, "ms (x floor)"."""
    floors = {(r["shape"], r["M"], r["dtype"]): r for r in rows if r["provider"] == "torch-linear"}
    mine = [r for r in rows if r["op"] == op and r["provider"] != "torch-linear"]
    if not mine:
        return []
    providers = list(dict.fromkeys(r["provider"] for r in mine))
    adapted = sorted({(r["shape"], r["M"], r["r"], r["dtype"]) for r in mine if r["r"] is not None},
                     key=lambda key: (int(key[0].split("x")[0]), int(key[0].split("x")[1]), key[1], key[2], key[3]))
    cells: dict[tuple, dict] = {key: {} for key in adapted}
    for r in mine:
        for key in adapted:
            if (r["shape"], r["M"], r["dtype"]) == (key[0], key[1], key[3]) and r["r"] in (None, key[2]):
                cells[key][r["provider"]] = f"{r['ms']:.4g} ({r['ratio']:.2f}x)" if r.get("ratio") \
                    else f"{r['ms']:.4g}"
    table = []
    for key in adapted:
        shape, m, rank, dtype = key
        floor = floors.get((shape, m, dtype))
        table.append({"shape": shape.replace("x", " -> "), "M": m, "r": rank, "dtype": dtype,
                      "floor": f"{floor['ms']:.4g}" if floor else None, **cells[key]})
    columns = [("shape", "k -> d"), ("M", "M"), ("r", "r"), ("dtype", "dtype"), ("floor", "F.linear ms")]
    columns += [(p, p) for p in providers]
    return _table(table, columns)


def _memory_section(data: dict, readme_dir: str) -> list[str]:
    meta, rows, settings = data["meta"], data["rows"], data.get("settings", {})
    ok = [r for r in rows if r["status"] == "ok"]
    lines = _heading("Memory of one training step", meta, "Bytes are counted with saved-tensor hooks and "
                     f"from the tensors' sizes; tokens/s are {CPU_LABEL}.")
    targets = settings.get("targets") or []
    lines += ["", f"Model `{settings.get('model') or settings.get('preset')}` ({settings.get('dtype')}), "
                  f"{len(targets)} projections adapted per block at r = {settings.get('r')}, "
                  f"alpha {settings.get('alpha', 0):g}, dropout {settings.get('dropout')}; one forward, backward "
                  f"and AdamW step. *total*: {settings.get('total')}. *added*: bytes saved for backward "
                  "beyond what the frozen base model saves for the same batch (each storage counted once); "
                  "*x PEFT*: added over HF PEFT LoRA's added (DoRA rows: over HF PEFT DoRA's)."]
    if ok:
        tokens = max(r["tokens"] for r in ok)
        top = [r for r in ok if r["tokens"] == tokens]
        batch, seq = top[0]["batch"], top[0]["seq"]
        top = [r for r in top if (r["batch"], r["seq"]) == (batch, seq)]
        lines += ["", f"Batch {batch} x sequence length {seq}:", ""]
        lines += _table([{**r, "trainable": f"{r['trainable']:,}"} for r in top],
                        [("method", "method"), ("trainable", "trainable params"), ("saved_mib", "saved MiB"),
                         ("added_mib", "added MiB"), ("added_vs_peft", "x PEFT"), ("total_mib", "total MiB"),
                         ("tokens_per_s", "tokens/s")])
        by_batch = [r for r in ok if r["seq"] == seq]
        batches = sorted({r["batch"] for r in by_batch})
        if len(batches) > 1:
            pivot = {}
            for r in by_batch:
                pivot.setdefault(r["method"], {"method": r["method"]})[f"b{r['batch']}"] = r["total_mib"]
            lines += ["", f"Total MiB by batch size (sequence length {seq}):", ""]
            lines += _table(list(pivot.values()), [("method", "method")] + [(f"b{b}", str(b)) for b in batches])
    notes = Counter((r["method"], r["status"], r["reason"]) for r in rows if r["status"] != "ok")
    if notes:
        lines += ["", "Not measured: " + "; ".join(
            f"`{name}` ({status}: {reason})" for (name, status, reason) in sorted(notes, key=str)) + "."]
    lines += _figures(data["_path"], [(".png", "memory vs batch size")], readme_dir)
    return lines


def _body(results_dir: str, readme_dir: str, problems: list, noisy: Optional[list] = None) -> list[str]:
    """The tables of every usable result file; a file that cannot be read, or lacks a field the
    tables need, is skipped and named in ``problems``; noisy bench rows are named in ``noisy``."""
    body = []
    for kind in ("bench", "memory"):
        for data in _chosen(latest_results(results_dir, kind, problems)):
            try:
                body += (_bench_section(data, readme_dir, noisy) if kind == "bench"
                         else _memory_section(data, readme_dir)) + [""]
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
                what = f"field {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
                problems.append(f"{data['_path']}: missing or malformed {what}")
    return body


def render(results_dir: str, readme_dir: str = ".", problems: Optional[list] = None) -> str:
    """The section's text (markers included) from the newest result files in ``results_dir``;
    files that cannot be used are skipped (and named in ``problems`` when it is a list)."""
    return _section(results_dir, readme_dir, _body(results_dir, readme_dir, [] if problems is None else problems))


def _section(results_dir: str, readme_dir: str, body: list[str]) -> str:
    rel = os.path.relpath(results_dir, readme_dir).replace(os.sep, "/")
    lines = [START, f"<!-- generated by `fastpeft report` from {rel}; edits here are overwritten -->", ""]
    if not body:
        body = ["No results yet: run `fastpeft bench` and `fastpeft memory`, then `fastpeft report`.", ""]
    files = f"Every row, with quantiles, TFLOP/s and GB/s, is in the JSON and CSV files under `{rel}/`."
    return "\n".join(lines + body + [files, END]) + "\n"


def replace_section(text: str, section: str) -> Optional[str]:
    """``text`` with the lines from START to END replaced by ``section``; ``None`` when the
    markers are missing or out of order."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    end += len(END)
    if text[end:end + 1] == "\n":
        end += 1
    return text[:start] + section + text[end:]


def run(args) -> int:
    """Run ``fastpeft report`` with parsed ``args``. A damaged result file is named and skipped
    (exit status 1); the README's section is never replaced when no result file is usable."""
    readme = args.readme or ("README.md" if os.path.isfile("README.md") else None)
    readme_dir = os.path.dirname(os.path.abspath(readme)) if readme else os.getcwd()
    problems: list[str] = []
    noisy: list[str] = []
    body = _body(args.results, readme_dir, problems, noisy)
    section = _section(args.results, readme_dir, body)
    for problem in problems:
        print(f"fastpeft report: skipped {problem}", file=sys.stderr)
    for row in noisy:
        print(f"fastpeft report: noisy: {row}", file=sys.stderr)
    if noisy and not getattr(args, "allow_noisy", False):
        print(f"fastpeft report: refused: {len(noisy)} noisy row(s) named above; "
              f"{readme or 'nothing'} left as it is. Rerun the benchmark on a quiet machine, or pass "
              "--allow-noisy to show them under a 'Noisy run' note", file=sys.stderr)
        return 1
    failed = 1 if problems else 0
    if readme is None:
        print(section, end="")
        print("fastpeft report: no README.md here; pass --readme PATH to update one", file=sys.stderr)
        return 1 if args.check else failed
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    updated = replace_section(text, section)
    if updated is None:
        print(section, end="")
        print(f"fastpeft report: {readme} has no results section; put the lines\n  {START}\n  {END}\n"
              f"where it belongs and run fastpeft report again", file=sys.stderr)
        return 1 if args.check else failed
    if not body:
        print(f"fastpeft report: no usable result files in {args.results}; {readme} left as it is",
              file=sys.stderr)
        return 1
    if args.check:
        current = updated == text
        print(f"{readme}: results section is {'current' if current else 'out of date (run fastpeft report)'}")
        return 0 if current and not failed else 1
    if updated != text:
        with open(readme, "w", encoding="utf-8") as f:
            f.write(updated)
    print(f"{'updated' if updated != text else 'unchanged'}: {readme} (results from {args.results})")
    return failed

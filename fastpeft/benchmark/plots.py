"""PNG charts of benchmark rows (matplotlib, imported lazily, drawn off-screen).

- :func:`plot_bench`: time vs M, time vs r, and the ratio to the floor vs M, one panel per
  projection shape, one line per provider (forward + backward unless only another mode ran);
- :func:`plot_memory`: memory of one training step vs batch size, one panel per sequence length,
  one line per method (as the LaMDA paper's figure), and the bytes the adapters add.
"""

from __future__ import annotations

import math
from collections import Counter

from .runner import Skip, optional_import

__all__ = ["style", "plot_bench", "plot_memory", "plot_mixed"]


def _pyplot():
    matplotlib = optional_import("matplotlib", "bench")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _grid(plt, n: int, title: str, width: float = 4.6, height: float = 3.4):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.0, width * cols), height * rows + 0.8), layout="constrained",
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig, list(axes.flat)


def _subtitle(meta: dict) -> str:
    cpu = "CPU timings, not kernel speed; " if meta.get("device") != "cuda" else ""
    return (f"{meta.get('device_name')}\n{cpu}{meta.get('timestamp', '')[:10]}, "
            f"torch {meta.get('torch')}, fastpeft {meta.get('fastpeft')}")


def _ticks(ax, values) -> None:
    values = sorted(set(values))
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values], fontsize=7)
    ax.xaxis.set_minor_locator(__import__("matplotlib").ticker.NullLocator())


# one colour, marker and line style per series name in every figure (names in a fixed order
# first, then others by a stable hash); curves that coincide stay visible through their markers
_KNOWN = ["torch-linear", "peft-lora", "fastpeft-torch", "fastpeft-triton", "fastpeft-cuda", "bnb-4bit",
          "bnb-4bit+peft-lora", "fastpeft-4bit-torch", "fastpeft-4bit-triton", "fastpeft-4bit-triton-buffered",
          "base", "base-4bit", "fastpeft-lora", "fastpeft-lora_fa", "fastpeft-lamda", "peft-qlora",
          "fastpeft-lora-4bit", "fastpeft-lamda-4bit", "peft-mixed", "fastpeft-mixed", "loop"]
_COLORS = ["#4d4d4d", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#ff7f0e", "#7f7f7f", "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5", "#c49c94",
           "#f7b6d2", "#9edae5", "#dbdb8d", "#ffbb78", "#393b79"]
_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h"]
_LINES = ["-", "--", "-.", ":"]


def style(name: str) -> dict:
    """matplotlib keywords of series ``name``: the same in every figure."""
    base = name.split(" (")[0]
    if base in _KNOWN:
        i = _KNOWN.index(base)
    else:
        i = len(_KNOWN) + sum(base.encode()) % 97
    return {"color": _COLORS[i % len(_COLORS)], "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINES[(i // 2) % len(_LINES)] if base != "torch-linear" else "-",
            "markersize": 5, "markerfacecolor": "none", "linewidth": 1.4, "label": name}


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, framealpha=0.85)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _measured(rows: list[dict]):
    """(the measured rows, pyplot), or None when nothing was measured or matplotlib is missing."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    try:
        return ok, _pyplot()
    except Skip as reason:
        print(f"skipped plots: {reason}")
        return None


def plot_bench(rows: list[dict], meta: dict, stem: str) -> list[str]:
    """Draw ``<stem>-time_vs_M.png``, ``<stem>-time_vs_r.png`` and ``<stem>-ratio.png``;
    returns the paths written (none when nothing was measured)."""
    measured = _measured(rows)
    if measured is None:
        return []
    ok, plt = measured
    modes = Counter(r["mode"] for r in ok)
    mode = "fwd+bwd" if "fwd+bwd" in modes else modes.most_common(1)[0][0]
    dtype = Counter(r["dtype"] for r in ok).most_common(1)[0][0]
    ok = [r for r in ok if r["mode"] == mode and r["dtype"] == dtype]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    adapters = [r for r in ok if r["r"] is not None]
    ranks = Counter(r["r"] for r in adapters)
    r0 = 16 if 16 in ranks else (ranks.most_common(1)[0][0] if ranks else None)
    m_counts = Counter(r["M"] for r in adapters if r["r"] != r0)
    m_r = m_counts.most_common(1)[0][0] if m_counts else None
    title = f"{mode}, {dtype}\n{_subtitle(meta)}"
    paths = []

    def draw(name, x_key, select, y_of, ylabel, logy=True, floor_line=False):
        fig, axes = _grid(plt, len(shapes), f"{name}: {title}")
        for ax, shape in zip(axes, shapes):
            series: dict[str, list] = {}
            for r in ok:
                if r["shape"] == shape and select(r):
                    series.setdefault(f"{r['provider']} ({r['op']})" if r["op"] == "4bit" else r["provider"],
                                      []).append((r[x_key], y_of(r)))
            xs = []
            for label, points in series.items():
                points = sorted(p for p in points if p[1] is not None)
                if points:
                    ax.plot(*zip(*points), **style(label))
                    xs += [p[0] for p in points]
            if floor_line:
                ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            _ticks(ax, xs)
            if logy:
                ax.set_yscale("log")
            ax.set_title(f"k->d = {shape.replace('x', ' -> ')}", fontsize=9)
            ax.set_xlabel(x_key)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            _legend(ax)
        return fig

    fig = draw("time vs M", "M", lambda r: r["r"] in (None, r0), lambda r: r["ms"], f"ms (r={r0})")
    paths.append(_save(fig, f"{stem}-time_vs_M.png"))
    if m_r is not None:
        fig = draw("time vs r", "r", lambda r: r["M"] == m_r and r["r"] is not None, lambda r: r["ms"],
                   f"ms (M={m_r})")
        paths.append(_save(fig, f"{stem}-time_vs_r.png"))
    fig = draw("ratio to the floor (F.linear)", "M", lambda r: r["r"] in (None, r0) and not
               r["provider"] == "torch-linear", lambda r: r.get("ratio"), f"x floor (r={r0})",
               logy=False, floor_line=True)
    paths.append(_save(fig, f"{stem}-ratio.png"))
    return paths


def plot_memory(rows: list[dict], meta: dict, stem: str) -> list[str]:
    """Draw ``<stem>.png``: total memory and adapter-added bytes vs batch size."""
    measured = _measured(rows)
    if measured is None:
        return []
    ok, plt = measured
    seqs = sorted({r["seq"] for r in ok})
    fig, axes = plt.subplots(2, len(seqs), figsize=(max(7.0, 5 * len(seqs)), 8), squeeze=False, layout="constrained")
    total = "peak allocated" if meta.get("device") == "cuda" else "saved + params + grads + AdamW state (CPU)"
    fig.suptitle(f"Memory of one training step vs batch size\n{meta.get('device_name')}, "
                 f"{meta.get('timestamp', '')[:10]}, torch {meta.get('torch')}", fontsize=10)
    methods = list(dict.fromkeys(r["method"] for r in ok))
    for col, seq in enumerate(seqs):
        for row_i, (key, label) in enumerate((("total_mib", f"MiB: {total}"),
                                              ("added_mib", "MiB the adapters add to saved activations"))):
            ax = axes[row_i][col]
            for method in methods:
                if row_i == 1 and method.startswith("base"):
                    continue
                points = sorted((r["batch"], r[key]) for r in ok
                                if r["method"] == method and r["seq"] == seq and r.get(key) is not None)
                if points:
                    ax.plot(*zip(*points), **style(method))
            ax.set_xscale("log", base=2)
            _ticks(ax, [r["batch"] for r in ok])
            ax.set_xlabel("batch size")
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(f"sequence length {seq}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            _legend(ax)
    return [_save(fig, f"{stem}.png")]


def plot_mixed(rows: list[dict], meta: dict, stem: str) -> list[str]:
    """Draw ``<stem>-time_vs_adapters.png``: time of one mixed-batch forward vs the number of
    adapters in the batch, one panel per shape (and M), one line per provider."""
    measured = _measured(rows)
    if measured is None:
        return []
    ok, plt = measured
    dtype = Counter(r["dtype"] for r in ok).most_common(1)[0][0]
    ok = [r for r in ok if r["dtype"] == dtype]
    panels = list(dict.fromkeys((r["shape"], r["M"], r["r"]) for r in ok))
    fig, axes = _grid(plt, len(panels), f"mixed-batch forward, {dtype}\n{_subtitle(meta)}")
    for ax, (shape, m, rank) in zip(axes, panels):
        series: dict[str, list] = {}
        for r in ok:
            if (r["shape"], r["M"], r["r"]) == (shape, m, rank):
                series.setdefault(r["provider"], []).append((r["adapters"], r["ms"]))
        xs = []
        for label, points in series.items():
            points = sorted(points)
            ax.plot(*zip(*points), **style(label))
            xs += [p[0] for p in points]
        ax.set_xscale("log", base=2)
        _ticks(ax, xs)
        ax.set_yscale("log")
        ax.set_title(f"k->d = {shape.replace('x', ' -> ')}, M = {m}, r = {rank}", fontsize=9)
        ax.set_xlabel("adapters in the batch", fontsize=8)
        ax.set_ylabel("ms per forward", fontsize=8)
        _legend(ax)
    return [_save(fig, f"{stem}-time_vs_adapters.png")]

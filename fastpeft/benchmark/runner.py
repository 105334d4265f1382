"""The shared benchmark runner: timing, environment metadata, result files and tables.

Every benchmark of the package (``fastpeft bench``, ``fastpeft memory``, the pytest-benchmark
suites and the scripts under ``bench/``) times and records through this module, so that all
results carry the same fields and are measured the same way:

- on a GPU, :func:`time_fn` is ``triton.testing.do_bench`` (which flushes L2 before every
  repetition) reporting the median and the 20/80 % quantiles in ms;
- on a CPU, blocks of calls timed with ``time.perf_counter`` (at least 10 blocks for ``--quick``,
  20 otherwise, and 0.05 / 0.3 s), the providers of one case in interleaved blocks
  (:func:`time_side_by_side`), the median and quantiles taken over the blocks, and the same
  for the process's CPU time (``time.process_time``: the time it computed, without the time
  other jobs held the cores; with one thread the steadier measure on a shared machine). CPU
  timings are CPU timings, never kernel speed.

Result files are ``<kind>-<device-slug>-<YYYYmmdd-HHMMSS>.json`` (``{"meta": ..., "rows": [...]}``)
and a ``.csv`` beside it (one row per record, the metadata repeated in each row).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

__all__ = [
    "Skip",
    "Timing",
    "time_fn",
    "time_side_by_side",
    "env_vars",
    "add_common_arguments",
    "validate_common",
    "environment",
    "resolve_device",
    "device_name",
    "slug",
    "write_results",
    "latest_results",
    "load_results",
    "format_table",
    "progress",
    "optional_import",
    "cache_bytes",
    "SavedBytes",
    "num_threads",
    "writable_folder",
    "available_bytes",
    "fits_in_memory",
]

META_KEYS = ("device", "device_name", "timestamp", "fastpeft", "torch", "triton", "peft",
             "transformers", "bitsandbytes", "python", "git_commit")


class Skip(Exception):
    """Raised by a provider that cannot run here; the message is the reason shown to users."""


def optional_import(name: str, extra: str = "bench"):
    """Import an optional dependency or raise :class:`Skip` with the install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise Skip(f"{name} is not installed ({err.__class__.__name__}); "
                   f"pip install 'fastpeft[{extra}]'") from None


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20 % / 80 % quantiles (over ``samples`` timed
    blocks on a CPU)."""
    ms: float
    q20: float
    q80: float
    samples: int = 0      # timed blocks on a CPU (0: do_bench on a GPU)
    cpu_ms: Optional[float] = None    # CPU: the process's CPU time per call, median and quantiles
    cpu_q20: Optional[float] = None
    cpu_q80: Optional[float] = None


# timed blocks per CPU case (quick, full): enough for the 20/80 % quantiles to mean something
CPU_MIN_SAMPLES = {True: 10, False: 20}


def cache_bytes(device: torch.device) -> int:
    """The last-level cache of ``device`` in bytes (L2 on a GPU, L3 or a guess on a CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    for index in (3, 2):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/size"
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        return int(text[:-1]) * units.get(text[-1], 1) if text[-1] in units else int(text)
    return 32 * 2**20


def time_fn(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Timing:
    """Time ``fn()`` on ``device``. On a GPU: ``triton.testing.do_bench`` (median, 20/80 %
    quantiles; ``grad_to_none`` cleared between calls outside the timed region). On a CPU:
    blocks of calls (:func:`time_side_by_side` with one callable); ``grad_to_none`` cleared
    inside the call."""
    if device.type == "cuda":
        import triton.testing
        warmup, rep = (10, 40) if quick else (25, 100)
        q50, q20, q80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep,
                                                grad_to_none=list(grad_to_none or []),
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(float(q50), float(q20), float(q80))
    return time_side_by_side([fn], device, quick=quick, grads_to_none=[grad_to_none])[0]


def time_side_by_side(fns: Sequence[Callable[[], object]], device: torch.device, *, quick: bool = False,
                      grads_to_none: Optional[Sequence[Optional[Sequence[torch.Tensor]]]] = None,
                      scopes: Optional[Sequence[Callable[[], contextlib.AbstractContextManager]]] = None,
                      ) -> list[Timing]:
    """Time several callables (the providers of one case) against each other.

    On a CPU their blocks of calls are interleaved: each round times one block of every callable,
    in reversed order every other round, so that a change of load on a shared machine falls on
    all of them alike instead of on whichever ran during it. At least CPU_MIN_SAMPLES rounds,
    and rounds until each callable has run about 0.05 s (quick) / 0.3 s. On a GPU, one
    :func:`time_fn` after another (``do_bench`` times on the device, where host load does not
    enter). ``grads_to_none[i]``: tensors whose ``.grad`` is cleared before each call of
    ``fns[i]``; ``scopes[i]``: a context entered around each block of ``fns[i]`` (outside the
    timed region; e.g. the backend a provider runs under)."""
    grads_to_none = list(grads_to_none or [None] * len(fns))
    scopes = list(scopes or [contextlib.nullcontext] * len(fns))
    if device.type == "cuda":
        timings = []
        for fn, clear, scope in zip(fns, grads_to_none, scopes):
            with scope():
                timings.append(time_fn(fn, device, quick=quick, grad_to_none=clear))
        return timings
    calls = [_clearing(fn, clear) for fn, clear in zip(fns, grads_to_none)]
    min_samples, min_time = CPU_MIN_SAMPLES[bool(quick)], 0.05 if quick else 0.3
    numbers = []
    for call, scope in zip(calls, scopes):
        with scope():
            numbers.append(_block_size(call, min_time / min_samples))
    times: list[list[float]] = [[] for _ in calls]
    cpu: list[list[float]] = [[] for _ in calls]
    start, rounds = time.perf_counter(), 0
    while rounds < min_samples or (time.perf_counter() - start < min_time * len(calls) and rounds < 1000):
        order = range(len(calls)) if rounds % 2 == 0 else range(len(calls) - 1, -1, -1)
        for i in order:
            with scopes[i]():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(numbers[i]):
                    calls[i]()
                cpu[i].append((time.process_time() - c0) / numbers[i])
                times[i].append((time.perf_counter() - t0) / numbers[i])
        rounds += 1
    return [_cpu_timing(t, c) for t, c in zip(times, cpu)]


def _clearing(fn: Callable[[], object], clear: Optional[Sequence[torch.Tensor]]) -> Callable[[], None]:
    """``fn`` preceded by clearing the ``.grad`` of ``clear``."""
    clear = list(clear or [])

    def call():
        for t in clear:
            t.grad = None
        fn()
    return call


def _block_size(call: Callable[[], None], block_time: float) -> int:
    """Calls per timed block: about ``block_time`` seconds of them, at least one (after a warm-up
    call)."""
    call()
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    return max(1, int(block_time / max(once, 1e-9)))


def _cpu_timing(times: list[float], cpu: list[float]) -> Timing:
    q, qc = (statistics.quantiles(v, n=5, method="inclusive") for v in (times, cpu))
    return Timing(statistics.median(times) * 1e3, q[0] * 1e3, q[3] * 1e3, len(times),
                  statistics.median(cpu) * 1e3, qc[0] * 1e3, qc[3] * 1e3)


class SavedBytes:
    """Bytes autograd saves for backward inside the block (``saved_tensors_hooks``), each
    distinct storage counted once (keyed by its data pointer), storages of ``exclude``
    (parameters, buffers) left out. Only sizes are recorded; no tensor is kept alive.

    >>> import torch
    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> with SavedBytes() as saved:
    ...     y = (x * x).sum()
    >>> saved.nbytes
    128
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
        self._sizes: dict[int, int] = {}

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._skip and storage.nbytes() > 0:
            self._sizes[ptr] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())


@contextlib.contextmanager
def num_threads(n: Optional[int]):
    """Run the block with ``n`` torch CPU threads (unchanged for ``None``), then restore."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# -- environment ------------------------------------------------------------------------------

@contextlib.contextmanager
def env_vars(values: dict):
    """``os.environ`` updated with ``values`` inside the block, restored after it."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def add_common_arguments(parser, plot_help: str) -> None:
    """The flags ``fastpeft bench`` and ``fastpeft memory`` share."""
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--dropout", type=float, default=0.1, help="adapter dropout (default 0.1)")
    parser.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    parser.add_argument("--plot", action="store_true", help=plot_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data and adapters (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice)")


def validate_common(args) -> Optional[str]:
    """A message for a shared flag's value that argparse cannot check, else ``None``."""
    if args.threads is not None and args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    if not 0.0 <= args.dropout < 1.0:
        return f"--dropout must be in [0, 1), got {args.dropout:g}"
    if args.device not in (None, "cpu", "cuda") and not str(args.device).startswith("cuda:"):
        return f"--device must be cpu or cuda, got {args.device!r}"
    return writable_folder(args.out, "--out")


def writable_folder(path: str, flag: str) -> Optional[str]:
    """A message when files cannot be written into folder ``path`` (created if missing), else
    ``None``: checked before a run, not after it."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fastpeft-write-test-"):
            pass
    except OSError as err:
        return f"{flag} {path!r} is not a writable folder ({err.strerror or err})"
    return None


def available_bytes(device: torch.device) -> int:
    """Memory a run may use on ``device``: free GPU memory, or the CPU's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63


def fits_in_memory(need: int, device: torch.device, what: str, flag: str) -> Optional[str]:
    """A refusal when ``need`` bytes exceed what ``device`` has available, else ``None``."""
    have = available_bytes(device)
    if need > have:
        where = "free GPU memory" if device.type == "cuda" else "available memory"
        return (f"{what} needs about {_size(need)}, more than the {_size(have)} of {where}: "
                f"choose a smaller {flag}")
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"


def resolve_device(requested: Optional[str], command: str) -> torch.device:
    """``--device`` as given, else the GPU when torch sees one, else the CPU."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{command}: --device cuda but no GPU is visible to torch")
    return device


def device_name(device: torch.device) -> str:
    """A human-readable name: the GPU's, or the CPU model with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "device"


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """The checkout's commit (``-dirty`` with local changes); ``FASTPEFT_GIT_COMMIT`` names it
    where the package runs from an installed copy without the repository."""
    if os.environ.get("FASTPEFT_GIT_COMMIT"):
        return os.environ["FASTPEFT_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Metadata that keys every result: device, timestamp (UTC) and versions."""
    import fastpeft

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "fastpeft": getattr(fastpeft, "__version__", None),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "arch": "sm_{}{}".format(*torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }


# -- result files -----------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def write_results(kind: str, meta: dict, rows: list[dict], out_dir: str,
                  extra: Optional[dict] = None) -> dict[str, str]:
    """Write ``rows`` as JSON and CSV into ``out_dir``; returns {"json": path, "csv": path}."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = meta["timestamp"].replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
    base = os.path.join(out_dir, f"{kind}-{slug(meta['device_name'])}-{stamp}")
    rows = [{k: _jsonable(v) for k, v in row.items()} for row in rows]
    payload = {"kind": kind, "meta": meta, **(extra or {}), "rows": rows}
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    fields = list(META_KEYS)
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: meta.get(k) for k in META_KEYS}, **row})
    return {"json": base + ".json", "csv": base + ".csv"}


def load_results(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def latest_results(results_dir: str, kind: str, problems: Optional[list] = None) -> list[dict]:
    """The newest ``kind`` result file per device name in ``results_dir`` (loaded, oldest
    first; each with its file path under ``"_path"``). Files that cannot be read or are not
    ``kind`` results are skipped; with ``problems`` (a list), ``"path: why"`` is appended for each."""
    newest: dict[str, tuple[str, dict]] = {}
    if not os.path.isdir(results_dir):
        return []
    for name in sorted(os.listdir(results_dir)):
        if not (name.startswith(kind + "-") and name.endswith(".json")):
            continue
        path = os.path.join(results_dir, name)
        try:
            data = load_results(path)
        except (OSError, ValueError) as err:
            if problems is not None:
                problems.append(f"{path}: cannot be read as JSON ({err})")
            continue
        if not isinstance(data, dict) or data.get("kind") != kind or not isinstance(data.get("meta"), dict):
            if problems is not None:
                problems.append(f"{path}: not a {kind} result (a JSON object with kind {kind!r} and meta)")
            continue
        data["_path"] = path
        key = data["meta"].get("device_name", "?")
        stamp = str(data["meta"].get("timestamp", ""))
        if key not in newest or stamp >= newest[key][0]:
            newest[key] = (stamp, data)
    return [data for _, data in sorted(newest.values(), key=lambda v: v[0])]


# -- presentation -----------------------------------------------------------------------------

def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def format_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]], markdown: bool = False) -> str:
    """A fixed-width (or Markdown) table of ``rows``; ``columns`` are (key, header) pairs."""
    body = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    heads = [h for _, h in columns]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(heads)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(heads), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


class _NoBar:
    def __init__(self, total, desc):
        self.total, self.desc = total, desc

    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm progress bar on stderr (a silent stand-in without tqdm or when disabled)."""
    if not enabled:
        return _NoBar(total, desc)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(f"{desc}: {total} steps (pip install tqdm for a progress bar)", file=sys.stderr)
        return _NoBar(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

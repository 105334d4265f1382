"""``fastpeft bench --update-dispatch``: rewrite ``auto``'s dispatch table from a GPU run.

For every dense problem of a ``bench`` results file (``{"meta": ..., "rows": [...]}``, the file a
GPU run of ``fastpeft bench`` writes) that was measured with both ``fastpeft-triton`` and
``fastpeft-torch``, one row of the table (:mod:`fastpeft._dispatch`): per mode (``fwd``, and
``fwd+bwd``, taken as ``fwd`` + ``bwd`` where only those were run) both times and the faster
backend. Problems whose M values share a bucket (M = 1 and 16) share a row: the fused kernels
win it only if they are faster at every measured M (``auto`` must not be slower than the
composed path anywhere it was measured). Rows of other problems (another GPU, shape or dtype)
are kept; the file is replaced whole, by a rename.

Results that were not measured on a GPU are refused and nothing changes, as is an existing table
that cannot be read (fix or delete it first).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

from .. import _dispatch
from .runner import load_results

__all__ = ["PROVIDERS", "DispatchError", "rows_from_results", "update_table"]

PROVIDERS = {"fastpeft-triton": "triton", "fastpeft-torch": "torch"}


class DispatchError(Exception):
    """The update is refused; the message says why. Nothing was written."""


def _times(rows: list[dict]) -> dict:
    """{(dtype, M, k, d, r, dropout): {mode: {backend: ms}}} of the measured dense rows."""
    out: dict = {}
    for row in rows:
        if (row.get("status") != "ok" or row.get("op") != "dense" or row.get("provider") not in PROVIDERS
                or row.get("mode") not in ("fwd", "bwd", "fwd+bwd") or not isinstance(row.get("ms"), (int, float))):
            continue
        key = (row["dtype"], row["M"], row["k"], row["d"], row["r"], bool(row.get("dropout") or 0.0))
        out.setdefault(key, {}).setdefault(row["mode"], {})[PROVIDERS[row["provider"]]] = float(row["ms"])
    for modes in out.values():   # training time from separate fwd and bwd timings
        if "fwd+bwd" not in modes and "fwd" in modes and "bwd" in modes:
            modes["fwd+bwd"] = {b: modes["fwd"][b] + modes["bwd"][b]
                                for b in ("triton", "torch") if b in modes["fwd"] and b in modes["bwd"]}
    return out


def rows_from_results(data: dict, source: str = "") -> list[dict]:
    """The table rows a ``bench`` results object measures (DispatchError if it cannot give any)."""
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or not isinstance(data.get("rows"), list):
        raise DispatchError(f"{source or 'the results'} is not a fastpeft bench results file (meta and rows)")
    if meta.get("device") != "cuda":
        raise DispatchError(f"nothing measured on a GPU: {source or 'the results'} come from "
                            f"{meta.get('device_name') or meta.get('device')!r}; the dispatch table "
                            "changes only from a GPU run of fastpeft bench")
    arch = meta.get("arch")
    if not isinstance(arch, str) or not arch.startswith("sm_"):
        raise DispatchError(f"{source or 'the results'} do not name the GPU architecture (meta.arch); "
                            "rerun fastpeft bench with this version")
    grouped: dict = {}
    for (dtype, M, k, d, r, dropout), modes in _times(data["rows"]).items():
        key = _dispatch.row_key("dense", arch, dtype, _dispatch.m_bucket(M), k, d, r, dropout)
        row = grouped.setdefault(key, {"M": []})
        for mode in _dispatch.MODES:
            both = modes.get(mode, {})
            if "triton" in both and "torch" in both:
                entry = row.setdefault(mode, {"triton_ms": [], "torch_ms": []})
                entry["triton_ms"].append(both["triton"])
                entry["torch_ms"].append(both["torch"])
                if M not in row["M"]:
                    row["M"].append(M)
    table_rows = []
    for key, measured in grouped.items():
        if not measured["M"]:
            continue
        row = dict(zip(_dispatch.KEY_FIELDS, key))
        row.update(M=measured["M"], method=(data.get("args") or {}).get("method"),
                   device_name=meta.get("device_name"), measured=meta.get("timestamp"),
                   git_commit=meta.get("git_commit"), source=os.path.basename(source) if source else None)
        for mode in _dispatch.MODES:
            if mode in measured:
                entry = measured[mode]
                wins = all(t < c for t, c in zip(entry["triton_ms"], entry["torch_ms"]))
                row[mode] = {**entry, "backend": "triton" if wins else "torch"}
        table_rows.append(row)
    if not table_rows:
        raise DispatchError(f"{source or 'the results'} measure no dense problem with both fastpeft-triton and "
                            "fastpeft-torch (run fastpeft bench with --op dense and both providers)")
    return table_rows


def _sort_key(row: dict) -> tuple:
    bucket = row["M_bucket"]
    return (row["op"], row["arch"], row["dtype"], row["k"], row["d"], row["r"], row["dropout"],
            float("inf") if bucket == _dispatch.OPEN_BUCKET else bucket)


def update_table(results_path: str, table_path: Optional[str] = None) -> tuple[str, list[dict]]:
    """Rewrite the table at ``table_path`` (default: the one ``auto`` reads) with the rows
    measured in ``results_path``; returns (the table's path, the new rows). DispatchError, with
    nothing written, when the results give no row or the existing table cannot be read."""
    table_path = table_path or _dispatch.table_path()
    try:
        data = load_results(results_path)
    except (OSError, ValueError) as err:
        raise DispatchError(f"{results_path} cannot be read as a results file ({err})") from None
    new_rows = rows_from_results(data, results_path)
    if os.path.exists(table_path):
        try:
            table, _ = _dispatch.read_table(table_path)
        except ValueError as err:
            raise DispatchError(f"{err}; fix or delete it, then run the update again") from None
    else:
        with open(_dispatch.DEFAULT_TABLE) as f:
            table = json.load(f)
        table["rows"] = []
    replaced = {_dispatch.row_key(*(r[f] for f in _dispatch.KEY_FIELDS)) for r in new_rows}
    kept = [r for r in table["rows"] if _dispatch.row_key(*(r[f] for f in _dispatch.KEY_FIELDS)) not in replaced]
    table["rows"] = sorted(kept + new_rows, key=_sort_key)
    table["about"] = [line for line in table.get("about", []) if not line.startswith("No row has been measured")]
    _dispatch.validate_table(table)
    folder = os.path.dirname(os.path.abspath(table_path))
    fd, tmp = tempfile.mkstemp(prefix=".dispatch-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        os.replace(tmp, table_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _dispatch.clear_cache()
    return table_path, new_rows

"""Writing a folder of files all at once: every file is written into a temporary folder beside
the target and then renamed into place, so a failure leaves the old files whole, and nothing is
ever written through a symlink that sits in the target folder."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from typing import Callable

__all__ = ["write_folder"]


def write_folder(path: str | os.PathLike, names: list[str], write: Callable[[str], None]) -> None:
    """Write the files ``names`` of the folder ``path`` (created when missing).

    ``write(tmp)`` writes every one of ``names`` into the empty folder ``tmp``; the files are then
    renamed into ``path``. A file of that name already in ``path`` is replaced by the rename
    itself (a symlink is replaced, its target never touched); if a rename fails, the files
    already moved are put back, so ``path`` holds either all old files or all new ones. Other
    files in ``path`` are left alone.
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a folder")
    for name in names:
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            raise IsADirectoryError(f"{target} is a folder; it would be replaced by a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(path):
        os.makedirs(parent, exist_ok=True)
        # os.mkdir, not mkdtemp: the folder gets the permissions os.makedirs would give it
        tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.{secrets.token_hex(8)}")
        os.mkdir(tmp)
        try:
            _write_all(tmp, names, write)
            os.rename(tmp, path)  # the folder appears whole or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    tmp = tempfile.mkdtemp(prefix=".fastpeft-tmp-", dir=path)
    try:
        _write_all(tmp, names, write)
        old = os.path.join(tmp, "old")
        os.mkdir(old)
        moved = []  # (name, had an old file)
        try:
            for name in names:
                target = os.path.join(path, name)
                had_old = os.path.lexists(target)
                if had_old:
                    os.rename(target, os.path.join(old, name))
                moved.append((name, had_old))
                os.rename(os.path.join(tmp, name), target)
        except BaseException:
            for name, had_old in reversed(moved):
                target = os.path.join(path, name)
                if not os.path.lexists(os.path.join(tmp, name)) and os.path.lexists(target):
                    os.remove(target)
                if had_old:
                    os.rename(os.path.join(old, name), target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_all(tmp: str, names: list[str], write: Callable[[str], None]) -> None:
    write(tmp)
    missing = [n for n in names if not os.path.isfile(os.path.join(tmp, n))]
    if missing:
        raise RuntimeError(f"internal error: {missing} were not written")

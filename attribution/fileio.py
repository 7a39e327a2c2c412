"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Everything is written to a temporary name in the same folder and then renamed over the target with
`os.replace`, which is atomic on POSIX filesystems. A kill mid-write leaves at most a stray `.tmp-*` file, which
is ignored and cleaned up on the next write.

Files and folders end with the permissions an ordinary `open` / `mkdir` would give them (0666 / 0777 less the
umask, typically 0644 / 0755), not the owner-only 0600 / 0700 of the temporary names they were written under.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; read once, at import (threads may be writing files later)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _normal_permissions(path: Path, folder: bool = False) -> None:
    os.chmod(path, (0o777 if folder else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it onto `target`, on error delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            _normal_permissions(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(target: str | os.PathLike, data: dict) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def save_npy(target: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def save_npz(target: str | os.PathLike, compress: bool = True, **arrays: np.ndarray) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` (an old one is removed).

    With `replace=False` a `target` that exists by then (another process or thread made it meanwhile) is kept and
    the temporary folder discarded: of several concurrent creators, the first to finish wins.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        _normal_permissions(tmp, folder=True)
        for child in tmp.iterdir():
            if child.is_file():
                _normal_permissions(child)
        if not replace:
            try:
                os.rename(tmp, target)  # fails when target is a non-empty folder (made by another creator)
            except OSError:
                if not target.is_dir():
                    raise
        elif target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Everything is written to a temporary name in the same folder and then renamed over the target with
`os.replace`, which is atomic on POSIX filesystems. A kill mid-write leaves at most a stray `.tmp-*` file, which
is ignored and cleaned up on the next write.

The readers (`read_json`, `read_npy`, `read_npz`) turn a file that is missing, empty, corrupt or of the wrong kind
into one `FileFormatError` line that names the file and says what to do; they never delete or rewrite it.

Files and folders end with the permissions an ordinary `open` / `mkdir` would give them (0666 / 0777 less the
umask, typically 0644 / 0755), not the owner-only 0600 / 0700 of the temporary names they were written under.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import FileFormatError


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


REWRITE = "rerun the command that wrote it"


def reason(exc: BaseException) -> str:
    """An exception's message as a short phrase for a one-line error: its first line, first sentence, no final
    period; the exception's class name when it has no message."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    text = text.split(". ")[0].rstrip(".").strip()
    return text[:160] or type(exc).__name__


def _name(path: Path, name: str | None) -> str:
    return name or str(path)


def read_json(path: str | os.PathLike, fix: str = REWRITE, name: str | None = None) -> dict:
    """The JSON object in `path`. A missing, unreadable, empty or non-JSON file, or JSON that is not an object, is
    one FileFormatError line: "<name> is not ...; <fix>" (`name` defaults to the path)."""
    path = Path(path)
    label = _name(path, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileFormatError(f"{label} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{label} cannot be read as text ({reason(exc)}); {fix}") from None
    if not text.strip():
        raise FileFormatError(f"{label} is empty; {fix}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FileFormatError(f"{label} is not valid JSON ({reason(exc)}); {fix}") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{label} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def _check_head(path: Path, label: str, fix: str, magic: bytes, kind: str) -> None:
    """Refuse an empty file (FileFormatError) or one that does not start as a `kind` file does (ValueError):
    numpy would call text a pickle, and read a .npy where an .npz is wanted."""
    with open(path, "rb") as f:
        head = f.read(len(magic))
    if not head:
        raise FileFormatError(f"{label} is empty; {fix}")
    if head != magic:
        raise ValueError(f"no {kind} header")


def read_npy(path: str | os.PathLike, fix: str = REWRITE, name: str | None = None) -> np.ndarray:
    """The array in the .npy file `path` (never unpickled). Missing, empty, text, cut short or an object array: one
    FileFormatError line."""
    path = Path(path)
    label = _name(path, name)
    try:
        _check_head(path, label, fix, b"\x93NUMPY", ".npy")
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileFormatError(f"{label} is missing; {fix}") from None
    except (ValueError, OSError, EOFError) as exc:  # text, a pickled object array, a file cut short
        raise FileFormatError(f"{label} is not a readable .npy array ({reason(exc)}); {fix}") from None


def read_npz(path: str | os.PathLike, keys: Sequence[str], fix: str = REWRITE, name: str | None = None,
             ) -> dict[str, np.ndarray]:
    """The arrays `keys` of the .npz file `path`, read into memory (never unpickled). Missing, empty, not a zip
    archive, cut short, an object array or one of `keys` absent: one FileFormatError line."""
    path = Path(path)
    label = _name(path, name)
    try:
        _check_head(path, label, fix, b"PK", "zip archive")
        with np.load(path, allow_pickle=False) as z:
            absent = [k for k in keys if k not in z.files]
            if absent:
                raise FileFormatError(f"{label} has no array {', '.join(absent)} (it holds "
                                      f"{', '.join(z.files) or 'none'}); {fix}")
            return {k: z[k] for k in keys}
    except FileNotFoundError:
        raise FileFormatError(f"{label} is missing; {fix}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FileFormatError(f"{label} is not a readable .npz archive ({reason(exc)}); {fix}") from None


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

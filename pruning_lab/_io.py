"""Atomic file writes: a reader never sees a half-written file, an interrupted writer loses nothing.

Everything written here gets the permissions an ordinary ``open()`` would give under the user's umask
(``tempfile`` creates its files 0600 and its folders 0700, which a shared classroom machine cannot read).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file made by ``tempfile`` (0600) or a folder (0700), and everything inside that folder, the
    permissions an ordinary ``open()`` / ``mkdir()`` would have given: 0666 / 0777 minus the umask."""
    mask = umask()
    path = Path(path)
    if path.is_dir():
        for sub in path.rglob("*"):
            os.chmod(sub, (0o777 if sub.is_dir() else 0o666) & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise PermissionError(
            f"Cannot write to {path.parent} ({e.strerror or e}): choose a writable folder "
            "(for results, set PRUNING_LAB_RESULTS) or fix its permissions. Nothing was written."
        ) from e
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        honour_umask(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def plain(obj: Any) -> Any:
    """Turn tensors, numpy scalars and tuples into plain JSON values; NaN/inf become None."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch / numpy scalars and arrays
        return plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented plain JSON, atomically (non-finite floats are written as null)."""
    text = json.dumps(plain(obj), indent=2, allow_nan=False) + "\n"
    return write_text(path, text)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_json_in(path: str | os.PathLike, name: str, *, what: str, how: str) -> Any:
    """The JSON file ``path``, or ``path/name`` when ``path`` is a folder (a sweep's ``summary.json``, read by
    ``sweep`` and ``lottery``); when it is absent, one line: no ``what`` there, ``how`` to make it."""
    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise FileNotFoundError(f"No {what} at {p}: {how}.")
    return read_json(p)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex (about 1 s per GB here)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

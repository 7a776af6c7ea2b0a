"""Atomic, durable writes: the one helper every writer in the project uses (mmpo, datamodules, augment).

A file or a directory appears whole or not at all, and once a write returns it survives a power cut:

- :func:`atomic_file` yields a temporary path beside the target (same suffix, so writers that pick the
  format from the name, such as PyAV, still work); on success the file is fsynced, renamed over the
  target, and the folder is fsynced so the rename itself is on disk.
- :func:`atomic_directory` does the same for a directory of files (a model, an adapter, a dataset): every
  file and folder under the temporary directory is fsynced, then the new directory takes the target's
  place. On Linux the two are swapped in one ``renameat2(RENAME_EXCHANGE)`` call, so a reader sees the
  old directory or the new one and never a gap. Where the file system refuses the exchange, the old
  directory is first renamed to ``.NAME.previous`` and :func:`recover_directory` (run at the start of the
  next write, and callable by readers) puts it back if a crash fell between the two renames.
- :func:`append_durably` appends lines to a journal and fsyncs them (resumable builds).

An exception inside a ``with`` block, or a kill at any point, leaves the previous target untouched; the
temporary file or directory is removed on an exception, and a killed writer's leftovers (hidden
``.NAME.PID.*`` siblings) are removed by the next write to the same target once that process is gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "append_durably",
    "atomic_directory",
    "atomic_file",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_directory",
    "fsync_tree",
    "recover_directory",
]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries (the names created, renamed or removed in it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open a directory: its renames are durable on return
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on a directory
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str | os.PathLike) -> None:
    """Fsync every file under ``root``, then every directory bottom-up (``root`` last)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink():
                _fsync_file(path)
        fsync_directory(folder)


def _prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _remove_stale(target: Path) -> None:
    """Remove the hidden temporaries a killed writer of ``target`` left (their process no longer runs)."""
    start = f".{target.name}."
    for sibling in target.parent.glob(f"{_glob_escape(start)}*"):
        pid = sibling.name[len(start) :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _running(int(pid)):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write instead of ``path``; on success it replaces ``path`` durably.

    Args:
        path: The file to write. Its folder is created if missing.

    Yields:
        An empty file's path in the same folder, ending in the target's suffix. The writer may
        overwrite or remove and recreate it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    fd, name = tempfile.mkstemp(prefix=_prefix(target), suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer of {target} produced no file")
        _fsync_file(tmp)
        os.replace(tmp, target)
        fsync_directory(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing (``"w"`` or ``"wb"``); on success it replaces ``path`` durably."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_file(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically and durably."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def append_durably(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Append ``lines`` to a text journal and fsync it before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call (Linux ``renameat2``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc without renameat2 (glibc < 2.28, musl < 1.2.5)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def recover_directory(path: str | os.PathLike) -> None:
    """Finish what a writer killed between its two renames left: restore or drop ``.NAME.previous``.

    Only the rename fallback of :func:`atomic_directory` creates it; a missing ``path`` with a
    ``.NAME.previous`` beside it means the new directory never arrived, so the old one returns.
    """
    target = Path(path)
    previous = _previous(target)
    if not previous.exists():
        return
    if target.exists():
        shutil.rmtree(previous)
    else:
        os.replace(previous, target)
    fsync_directory(target.parent)


@contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; on success it takes ``out_dir``'s place, fsynced.

    A crash or an exception inside the block (or anywhere in the swap) leaves any previous ``out_dir``
    whole, so readers never see a half-written model or adapter.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(out)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(out), dir=out.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if not out.exists():
            os.replace(tmp, out)
        elif _exchange(tmp, out):
            pass  # tmp now holds the old directory, removed below
        else:
            previous = _previous(out)
            os.replace(out, previous)
            fsync_directory(out.parent)
            os.replace(tmp, out)
            fsync_directory(out.parent)
            shutil.rmtree(previous)
        fsync_directory(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Crash-safe writes: temp file in the same folder, fsync, os.replace."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or over the disk quota


def disk_full(e: BaseException) -> bool:
    """Whether `e` is the file system saying there is no room for what was being written."""
    return isinstance(e, OSError) and e.errno in DISK_FULL


def check_free(folder, need: int) -> None:
    """Raise the file system's own error for a full disk (OSError ENOSPC) before a write of about `need`
    bytes into `folder` when fewer are free: the write would fail midway, after filling the disk that every
    user shares. An unknown free space lets the write go on (it reports a full disk itself)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:  # a run folder made by the write itself
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data: bytes) -> None:
    """Replace `path` with `data` atomically: readers see the old file or the new one, never half."""
    replace_file(path, lambda f: f.write(data))


def replace_file(path, write: Callable[[object], object]) -> None:
    """Replace `path` atomically with what `write(f)` writes to a binary file object (streamed, so a long
    file never has to be held in memory); the new file is a new inode (hard links to the old one keep it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def publish_dir(dst, build: Callable[[Path], object], replace: bool = False) -> Path:
    """Make folder `dst` appear whole or not at all: `build(tmp)` fills a hidden folder beside it, whose
    files and itself are fsynced before it is renamed into place. The one way this project publishes a
    folder (library entries, checkpoints, datasets, merged exports).

    A new `dst` must not exist (FileExistsError, also when one appears meanwhile). With replace=True an
    existing `dst` is exchanged with the new one in one step, so readers never find neither; only where
    the system has no atomic exchange is there a moment between two renames.
    """
    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    try:
        build(tmp)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                _fsync_file(f)
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        if replace and dst.is_dir() and not dst.is_symlink():
            _exchange(tmp, dst)  # tmp now holds the old folder, removed below
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, dst)  # fails on a non-empty folder that appeared meanwhile
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, f"{dst} already exists", str(dst)) from None
        raise
    fsync_dir(dst.parent)
    return dst


def publish_file(dst, write: Callable[[Path], object]) -> Path:
    """Make a new file `dst` appear whole or not at all: `write(tmp)` fills a hidden temp file beside it,
    which is fsynced and then linked into place. FileExistsError if `dst` exists (or appears meanwhile):
    an export never overwrites a file."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, f"{dst} already exists", str(dst))
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=str(dst.parent))
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync_file(Path(tmp))
        try:
            os.link(tmp, dst)  # unlike os.replace, refuses a file that appeared meanwhile
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: checked above, under a small race
            os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(dst.parent)
    return dst


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> None:
    """Swap folders `a` and `b` atomically (Linux renameat2); elsewhere move `b` aside, then `a` in."""
    libc = _libc()
    if libc is not None:
        AT_FDCWD = -100
        if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
    aside = b.with_name(f".{b.name}.old-{os.getpid()}")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _libc():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2  # glibc 2.28+
        return libc
    except (OSError, AttributeError):
        return None

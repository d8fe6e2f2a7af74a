"""Crash-safe writes: temp file in the same folder, fsync, os.replace."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or over the disk quota


def disk_full(e: BaseException) -> bool:
    """Whether `e` is the file system saying there is no room for what was being written."""
    return isinstance(e, OSError) and e.errno in DISK_FULL


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
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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

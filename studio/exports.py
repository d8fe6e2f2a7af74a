"""The studio's folder for downloads waiting to be fetched, in the system temp dir (Gradio serves files from
there without allowed_paths), and the sweep of the folders that servers killed before they could remove
theirs left behind (SIGKILL, or SIGTERM, neither of which runs atexit).
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

PREFIX = "lora-studio-exports-"
OURS = re.compile(re.escape(PREFIX) + r"(\d+)-\w+")  # lora-studio-exports-<server pid>-<random>
LEGACY = re.compile(re.escape(PREFIX) + r"\w+")  # made before the pid was in the name: no owner to ask
LEGACY_MAX_AGE = 86400  # seconds an empty folder of unknown owner is left alone (its server may still run)


def make_exports_dir() -> Path:
    """A new exports folder for this process, removed at a normal exit; first, the folders of servers
    that are gone are removed."""
    sweep_stale(Path(tempfile.gettempdir()))
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def sweep_stale(tmp: Path) -> list[Path]:
    """Remove this user's exports folders in `tmp` whose server process has ended, and empty ones of
    unknown owner older than LEGACY_MAX_AGE; returns what was removed. Links are never followed."""
    if os.name != "posix":  # os.kill(pid, 0) asks about a process only on POSIX
        return []
    removed, now = [], time.time()
    for p in tmp.glob(PREFIX + "*"):
        try:
            st = p.lstat()
            if not p.is_dir() or p.is_symlink() or st.st_uid != os.getuid():
                continue
            m = OURS.fullmatch(p.name)
            if m and not _alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)  # its downloads cannot be fetched any more
            elif not m and LEGACY.fullmatch(p.name) and now - st.st_mtime > LEGACY_MAX_AGE and not any(p.iterdir()):
                p.rmdir()
            else:
                continue
            removed.append(p)
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except PermissionError:
        return True  # another user's process
    return True

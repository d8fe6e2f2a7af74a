"""The studio's downloads folder in the system temp dir: a server that was killed (SIGTERM, SIGKILL: no atexit)
leaves its folder behind, and the next studio to start removes it; the folders of servers still running, of
other programs, and links are left alone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli_helpers import ROOT

PREFIX = "lora-studio-exports-"
SERVER = ("from studio.app import create_studio; import sys, time; "
          "s = create_studio(sys.argv[1] + '/lib', sys.argv[1] + '/datasets', 'cpu', 'tiny', precision='fp32'); "
          "print('EXPORTS', s.exports_dir, flush=True); time.sleep(300)")


def test_the_folder_of_a_server_killed_with_sigterm_is_removed_when_the_next_studio_starts(tmp_path, monkeypatch):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path / "killed")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = next(ln for ln in proc.stdout if ln.startswith("EXPORTS "))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    left = Path(line.split(" ", 1)[1].strip())
    assert left.parent == tmp_path and left.is_dir()  # SIGTERM ran no atexit: the folder stayed

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    from studio.app import create_studio
    s = create_studio(tmp_path / "lib", tmp_path / "datasets", "cpu", "tiny", precision="fp32")
    try:
        assert not left.exists()
        assert [p.name for p in tmp_path.glob(PREFIX + "*")] == [s.exports_dir.name]
    finally:
        s.runs.stop_all(60)


def test_the_sweep_keeps_live_servers_folders_other_files_and_links(tmp_path):
    from studio.exports import LEGACY_MAX_AGE, sweep_stale

    def folder(name: str, age: float = 0.0, content: bool = False) -> Path:
        p = tmp_path / name
        p.mkdir()
        if content:
            (p / "x-1").mkdir()
        os.utime(p, (time.time() - age, time.time() - age))
        return p
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = folder(f"{PREFIX}{int(dead.stdout)}-abc123", content=True)  # its server ended: downloads and all
    live = folder(f"{PREFIX}{os.getppid()}-def456", age=10 * LEGACY_MAX_AGE)  # a server still running
    old_empty = folder(f"{PREFIX}k3j4_9zq", age=2 * LEGACY_MAX_AGE)  # an earlier version's, long unused
    old_full = folder(f"{PREFIX}a8s7d6f5", age=2 * LEGACY_MAX_AGE, content=True)
    new_empty = folder(f"{PREFIX}q1w2e3r4")  # an earlier version's server may still be running
    other = folder("lora-studio-notes", age=2 * LEGACY_MAX_AGE)
    target = folder("precious", content=True)
    link = tmp_path / f"{PREFIX}{int(dead.stdout)}-link99"
    link.symlink_to(target)

    assert sorted(sweep_stale(tmp_path)) == sorted([gone, old_empty])
    assert all(p.is_dir() for p in (live, old_full, new_empty, other, target, target / "x-1"))
    assert link.is_symlink() and not gone.exists() and not old_empty.exists()

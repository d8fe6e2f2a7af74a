"""Helpers for the CLI tests: `python -m core` in a real process, and in-process runs of bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.__main__ import main

ROOT = Path(__file__).resolve().parent.parent  # the repository, put on PYTHONPATH for child processes
# a finetune that takes seconds on the tiny model, with every cadence (log, eval, checkpoint) hit
TINY_RUN = ["--model", "tiny", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--grad-accum", "2",
            "--lr", "1e-2", "--eval-interval", "3", "--checkpoint-interval", "3", "--log-interval", "2"]


def cli(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(capsys, argv) -> str:
    """Run the CLI in-process on bad input: exit status 2, one line on stderr, no traceback."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err

"""bench/classroom.py runs end to end on tiny (a smoke test: it finishes, and every co-batched job
equals its solo run, with no error; the figures themselves are the benchmark's business)."""
from __future__ import annotations

import json
import subprocess
import sys

from cli_helpers import ROOT


def test_the_classroom_bench_runs_and_every_job_equals_its_solo_run(tmp_path):
    out = tmp_path / "classroom.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "classroom.py"), "--students", "2", "--comparers", "1",
                        "--steps", "2", "--idle-seconds", "1", "--uniform", "--json", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "equal to solo: 2 of 2" in r.stdout
    assert "errors: 0 training, 0 compare" in r.stdout
    figures = json.loads(out.read_text())
    assert [j["steps"] for j in figures["jobs"]] == [2, 2]
    # the same shapes open and validate in the same chunks, so they take every micro-step together
    assert figures["phases"][1]["micro_steps"] == 2 and figures["phases"][1]["runs_per_step"] == 2

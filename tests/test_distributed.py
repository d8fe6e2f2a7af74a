"""Data-parallel training under torchrun (core.train.distributed), on CPU with gloo and 2 processes.

The specification: 2 processes with a global batch of 4 rows train the same adapter, with the same
per-step losses, as 1 process with a batch of 4; rank 0 alone writes and prints; a rank that dies makes
every rank exit non-zero with the last checkpoint intact, and 1 process resumes from it to the end.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from cli_helpers import ROOT, cli
from core.adapters import run_record
from core.train.distributed import FAULT_ENV, TIMEOUT_ENV
from core.train.trainer import find_checkpoint

STEPS = 8
# lr 1e-3: Adam's first steps move each weight by about lr whatever the gradient's size, so float
# rounding in the gradient shows up in the adapter at most about lr x its relative size
# fp32: TOL is fp32's rounding. On a CPU with native bf16, --precision auto gives a bf16 base, whose products
# round differently for a rank's half batch than for the whole one (0.0012 apart after 8 steps)
RUN = ["--model", "tiny", "--device", "cpu", "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32",
       "--grad-accum", "2", "--lr", "1e-3", "--eval-interval", "4", "--checkpoint-interval", "2",
       "--log-interval", "1", "--precision", "fp32"]
TOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A random-token dataset and the single-process reference run (batch 4) on it."""
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    (root / "ds").mkdir()
    np.save(root / "ds" / "train_00000.npy", rng.integers(0, 50257, 3000).astype(np.uint16))
    np.save(root / "ds" / "val_00000.npy", rng.integers(0, 50257, 400).astype(np.uint16))
    r = cli("finetune", "--data", "ds", "--library", "lib", "--output", "one", *RUN, cwd=root)
    assert r.returncode == 0, r.stderr
    return root


def adapter(run) -> dict:
    return load_file(str(run / "adapter_model.safetensors"))


def losses(run) -> list[float]:
    return [h["loss"] for h in run_record.history(run)]


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_adapter_of_one_process_with_the_same_global_batch(work):
    one = work / "lib" / "one"
    assert max(float(t.abs().max()) for k, t in adapter(one).items() if "lora_B" in k) > 1e-3  # it trained
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "core", "finetune", "--data", "ds", "--library", "lib",
                        "--output", "two", *RUN], cwd=work, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    two = work / "lib" / "two"
    assert max_diff(adapter(one), adapter(two)) < TOL
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == STEPS and max(abs(x - y) for x, y in zip(a, b)) < TOL
    assert r.stdout.count("finished after") == 1  # rank 0 alone prints
    ck = find_checkpoint(two)  # the checkpoint format of a single process
    assert ck.step == STEPS and ck.tcfg.batch_size == 4


def rank(i: int, port: int, work, fault: str, output: str) -> subprocess.Popen:
    """Rank i of 2, started as torchrun starts it (its environment), so each rank's exit status is seen."""
    e = env(RANK=str(i), LOCAL_RANK=str(i), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), OMP_NUM_THREADS="1", **{FAULT_ENV: fault, TIMEOUT_ENV: "30"})
    return subprocess.Popen([sys.executable, "-m", "core", "finetune", "--data", "ds", "--library", "lib",
                             "--output", output, *RUN], cwd=work, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_killed_rank_ends_every_rank_and_one_process_resumes_from_the_last_checkpoint(work):
    port = free_port()
    procs = [rank(i, port, work, "1:5", "killed") for i in (0, 1)]  # rank 1 dies before step 5's reduce
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    out0, err0 = outs[0]
    errors = [ln for ln in err0.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "lost the other processes at step 5" in errors[0], err0
    assert outs[1][0] == ""  # rank 1 printed nothing
    run = work / "lib" / "killed"
    ck = find_checkpoint(run)
    assert ck.step == 4 and "step_000004" in errors[0]
    assert not (run / "adapter_model.safetensors").exists()  # no final adapter from a failed run
    assert losses(ck.path) == pytest.approx(losses(work / "lib" / "one")[:4], abs=TOL)

    r = cli("finetune", "--resume", str(run), "--library", "lib", "--precision", "fp32", cwd=work)  # one process
    assert r.returncode == 0, r.stderr
    assert "resuming from step_000004" in r.stdout
    assert find_checkpoint(run).step == STEPS
    assert max_diff(adapter(run), adapter(work / "lib" / "one")) < TOL
    assert losses(run) == pytest.approx(losses(work / "lib" / "one"), abs=TOL)


def test_a_batch_the_processes_cannot_share_evenly_is_refused_on_every_rank(work):
    port = free_port()
    bad = [*RUN]
    bad[bad.index("--batch-size") + 1] = "3"
    procs = [subprocess.Popen([sys.executable, "-m", "core", "finetune", "--data", "ds", "--library", "lib",
                               "--output", "odd", *bad], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env(RANK=str(i), LOCAL_RANK=str(i), WORLD_SIZE="2",
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                                 **{TIMEOUT_ENV: "30"}))
             for i in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "must be a multiple of it; choose --batch-size 2" in outs[0][1]
    assert not (work / "lib" / "odd").exists()


def test_instruction_data_two_processes_weigh_each_rank_by_its_response_tokens(work):
    """With a loss mask each rank holds a different number of response tokens: one process averages over the
    whole micro-batch's, so 2 processes must too (not the mean of the two ranks' means)."""
    rng = np.random.default_rng(1)
    ds = work / "masked"
    ds.mkdir()
    for split, n in (("train", 3000), ("val", 400)):
        np.save(ds / f"{split}_00000.npy", rng.integers(0, 50257, n).astype(np.uint16))
        # long masked and unmasked runs, so the two ranks' rows hold very different response counts
        mask = np.repeat(rng.random(n // 50 + 1) < 0.4, 50)[:n].astype(np.uint8)
        np.save(ds / f"{split}_mask_00000.npy", mask)
    r = cli("finetune", "--data", "masked", "--library", "lib", "--output", "m1", *RUN, cwd=work)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "core", "finetune", "--data", "masked", "--library", "lib",
                        "--output", "m2", *RUN], cwd=work, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = work / "lib" / "m1", work / "lib" / "m2"
    assert max_diff(adapter(one), adapter(two)) < TOL
    assert losses(one) == pytest.approx(losses(two), abs=TOL)


def start_ranks(work, output: str, flags: list[list[str]]) -> list[tuple[int, str]]:
    """Ranks 0 and 1 started by hand with their own extra flags (as a careless launch does); each
    (exit status, stderr)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "core", "finetune", "--data", "ds", "--library", "lib",
                               "--output", output, *RUN, *extra], cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=env(RANK=str(i), LOCAL_RANK=str(i), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", **{TIMEOUT_ENV: "60"}))
             for i, extra in enumerate(flags)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def test_ranks_started_with_different_steps_and_lr_are_refused_at_once_naming_both_settings(work):
    outs = start_ranks(work, "mixed", [[], ["--steps", "9", "--lr", "2e-3"]])
    assert [rc for rc, _ in outs] == [2, 2], outs
    for _, err in outs:
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert errors == ["error: the processes were started with different settings: --lr (rank 0: 0.001, "
                          "rank 1: 0.002); --steps (rank 0: 8, rank 1: 9); start every process with the same "
                          "flags, data and base."], err
    assert not (work / "lib" / "mixed").exists()  # refused before anything was written


def test_ranks_with_different_seeds_or_lora_settings_get_one_sentence_without_rng_state(work):
    outs = start_ranks(work, "seeds", [["--seed", "1"],
                                       ["--seed", "2", "--rank-pattern", '{"h.0.attn.c_attn": 2}']])
    assert [rc for rc, _ in outs] == [2, 2], outs
    err = outs[0][1]
    assert "--seed (rank 0: 1, rank 1: 2)" in err
    assert '--rank-pattern (rank 0: {}, rank 1: {"h.0.attn.c_attn": 2})' in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("start every process with the same flags, data and base.")
    assert "bit_generator" not in err and "state" not in err


def test_a_batch_size_one_rank_alone_cannot_share_is_refused_on_every_rank_as_a_difference(work):
    outs = start_ranks(work, "batch", [[], ["--batch-size", "3"]])
    assert [rc for rc, _ in outs] == [2, 2], outs
    assert all("--batch-size (rank 0: 4, rank 1: 3)" in err for _, err in outs)


def test_ranks_on_different_data_are_refused(work):
    other = work / "ds2"
    other.mkdir()
    rng = np.random.default_rng(5)
    np.save(other / "train_00000.npy", rng.integers(0, 50257, 3000).astype(np.uint16))
    np.save(other / "val_00000.npy", rng.integers(0, 50257, 400).astype(np.uint16))
    outs = start_ranks(work, "data", [[], ["--data", "ds2"]])
    assert [rc for rc, _ in outs] == [2, 2], outs
    assert "the dataset's content (rank 0: " in outs[1][1] and "start every process with the same" in outs[1][1]

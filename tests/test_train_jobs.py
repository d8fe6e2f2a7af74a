"""The training job scheduler: jobs co-batched on the loaded base, a queue with a token budget, jobs on
another base waiting for the current one, a per-user limit, stop rules, and cleanup."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from core.lora.layers import adapter_names, adapter_state_dict
from core.lora.config import LoraConfig
from core.model.weights import load_base
from core.train.jobs import JobSpec, TrainScheduler
from core.train.trainer import Trainer
from train_helpers import quick, train_solo

A = (LoraConfig(r=4, alpha=8, targets=("attn.c_attn",)), quick(steps=3, batch_size=2, seq_len=16, grad_accum=1,
                                                                eval_interval=0, checkpoint_interval=0, seed=1))
B = (LoraConfig(r=2, alpha=4, targets=("mlp.c_fc",)), quick(steps=4, batch_size=1, seq_len=24, grad_accum=2,
                                                             eval_interval=2, checkpoint_interval=0, seed=2))


class Bases:
    """load_base for the scheduler: one model per base id, loaded on first use; counts pins."""

    def __init__(self):
        self.models, self.pins, self.loads = {}, {}, []
        self.gate = threading.Event()
        self.gate.set()

    def load(self, spec):
        self.gate.wait(30)
        if spec.base_id not in self.models:
            self.models[spec.base_id] = load_base("tiny", device="cpu")
        self.loads.append(spec.base_id)
        model = self.models[spec.base_id]
        self.pins[id(model)] = self.pins.get(id(model), 0) + 1
        return model

    def release(self, model):
        self.pins[id(model)] -= 1


@pytest.fixture
def bases():
    return Bases()


@pytest.fixture
def sched(bases):
    s = TrainScheduler(bases.load, bases.release, capacity_tokens=10_000)
    yield s
    s.close()


def _until(pred, timeout: float = 30.0) -> None:
    """Wait until pred() holds (a job reported something), at most `timeout` seconds."""
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.05)


def spec(ds, tmp_path, name, job=A, user=None, base="tiny", **kw):
    lcfg, tcfg = job
    return JobSpec(name, base, ds, lcfg, tcfg, tmp_path / name, user=user, **kw)


def alone(ds, tmp_path, name, job):
    model = load_base("tiny", device="cpu")
    events = train_solo(Trainer(model, ds, job[0], job[1], name, tmp_path / f"alone-{name}"))
    return [e["loss"] for e in events if e["type"] == "step"], adapter_state_dict(model, name)


def test_two_users_jobs_train_together_each_as_alone(sched, bases, sample_ds, tmp_path):
    bases.gate.clear()  # both are queued before either starts, so they share their steps
    jobs = [sched.submit(spec(sample_ds, tmp_path, "a", A, user="u1")),
            sched.submit(spec(sample_ds, tmp_path, "b", B, user="u2"))]
    bases.gate.set()
    for job in jobs:
        assert job.wait(120)
    model = bases.models["tiny"]
    for job, settings in zip(jobs, (A, B)):
        snap = job.snapshot()
        assert snap["state"] == "finished" and snap["message"] == f"saved to the library as '{job.name}'"
        losses, tensors = alone(sample_ds, tmp_path, job.name, settings)
        assert [p["loss"] for p in snap["points"]] == pytest.approx(losses, abs=1e-5)
        saved = (tmp_path / job.name / "adapter_model.safetensors")
        assert saved.exists()
        from safetensors.torch import load_file
        got = {k.removeprefix("base_model.model."): v for k, v in load_file(str(saved)).items()}
        for k, v in tensors.items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0)
    assert adapter_names(model) == []  # the live adapters are gone: the library has them
    assert bases.pins[id(model)] == 0  # every job released the base it pinned


def test_the_queue_runs_in_order_within_the_token_budget(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=40)  # room for one 2 x 16 job at a time
    try:
        bases.gate.clear()
        first = sched.submit(spec(sample_ds, tmp_path, "first"))
        second = sched.submit(spec(sample_ds, tmp_path, "second"))
        third = sched.submit(spec(sample_ds, tmp_path, "third"))
        assert [second.position, third.position] == [2, 3] or [second.position, third.position] == [1, 2]
        bases.gate.set()
        assert third.wait(120)
        snaps = [j.snapshot() for j in (first, second, third)]
        assert all(s["state"] == "finished" for s in snaps)
        assert snaps[0]["ended"] <= snaps[1]["started"] and snaps[1]["ended"] <= snaps[2]["started"]
    finally:
        sched.close()


def test_a_job_on_another_base_waits_until_the_current_base_has_no_jobs(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=10_000)
    try:
        long = (A[0], quick(steps=30, batch_size=2, seq_len=16, grad_accum=1, eval_interval=0,
                            checkpoint_interval=0, seed=1))
        first = sched.submit(spec(sample_ds, tmp_path, "first", long))
        other = sched.submit(spec(sample_ds, tmp_path, "other", base="tiny-other"))
        same = sched.submit(spec(sample_ds, tmp_path, "same"))  # behind it, on the loaded base: it goes past
        _until(lambda: other.snapshot()["waiting"])
        snap = other.snapshot()
        assert snap["state"] == "queued" and snap["position"] == 1
        assert "needs tiny-other" in snap["waiting"] and "train on tiny" in snap["waiting"]
        assert other.wait(120) and same.wait(1)
        assert bases.loads == ["tiny", "tiny", "tiny-other"]
        assert max(first.snapshot()["ended"], same.snapshot()["ended"]) <= other.snapshot()["started"]
    finally:
        sched.close()


def test_the_per_user_limit_and_the_queue_cap(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, max_jobs_per_user=1, max_queue=2)
    try:
        bases.gate.clear()
        sched.submit(spec(sample_ds, tmp_path, "mine", user="ann"))
        with pytest.raises(ValueError, match=r"you already have 1 training job queued or running \('mine'\); "
                                             r"the limit is 1 per user"):
            sched.submit(spec(sample_ds, tmp_path, "mine2", user="ann"))
        sched.submit(spec(sample_ds, tmp_path, "bob", user="bob"))
        with pytest.raises(ValueError, match="busy, try again later: 2 training jobs are waiting"):
            sched.submit(spec(sample_ds, tmp_path, "cy", user="cy"))
    finally:
        bases.gate.set()
        sched.close()


def test_stopping_a_queued_job_removes_it_and_a_running_one_is_saved(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=40)
    ended = []
    try:
        long = (A[0], quick(steps=500, batch_size=2, seq_len=16, grad_accum=1, eval_interval=0,
                            checkpoint_interval=0, seed=1))
        running = sched.submit(spec(sample_ds, tmp_path, "running", long, on_end=ended.append))
        queued = sched.submit(spec(sample_ds, tmp_path, "queued", on_end=ended.append))
        _until(lambda: running.snapshot()["points"])
        assert "left the queue" in sched.stop(queued)
        assert queued.snapshot()["state"] == "stopped" and "nothing was trained" in queued.snapshot()["message"]
        assert not (tmp_path / "queued").exists()
        assert "Stopping 'running'" in sched.stop(running)
        assert running.wait(60)
        snap = running.snapshot()
        assert snap["state"] == "stopped" and 0 < snap["progress"]["step"] < 500
        assert (tmp_path / "running" / "adapter_model.safetensors").exists()
        assert ended == [queued, running]  # each job's hold is released once
    finally:
        sched.close()


def test_a_stopped_queued_job_has_no_queue_position_and_the_one_behind_it_moves_up(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=40)
    try:
        long = (A[0], quick(steps=500, batch_size=2, seq_len=16, grad_accum=1, eval_interval=0,
                            checkpoint_interval=0, seed=1))
        running = sched.submit(spec(sample_ds, tmp_path, "running", long))
        first = sched.submit(spec(sample_ds, tmp_path, "first"))
        second = sched.submit(spec(sample_ds, tmp_path, "second"))
        _until(lambda: running.snapshot()["points"])
        assert (first.snapshot()["position"], second.snapshot()["position"]) == (1, 2)
        sched.stop(first)
        assert first.snapshot()["state"] == "stopped"
        assert first.snapshot()["position"] == 0 and first.snapshot()["waiting"] == ""  # the table shows no place
        assert second.snapshot()["position"] == 1
        sched.stop(running)
        sched.stop(second)
    finally:
        sched.close()


def test_a_job_failing_on_a_system_error_names_the_file_not_the_servers_folder(sample_ds, tmp_path):
    def load(spec):
        raise PermissionError(13, "Permission denied", "/srv/lora-studio/weights/model.safetensors")
    sched = TrainScheduler(load)
    try:
        job = sched.submit(spec(sample_ds, tmp_path, "denied"))
        assert job.wait(30)
        assert job.snapshot()["message"] == "training failed: PermissionError: model.safetensors: Permission denied"
    finally:
        sched.close()


def test_a_job_that_cannot_start_fails_alone_with_its_message(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=10_000)
    try:
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "adapter_model.safetensors").write_bytes(b"")
        bad = sched.submit(spec(sample_ds, tmp_path, "taken"))
        good = sched.submit(spec(sample_ds, tmp_path, "good"))
        assert bad.wait(60) and good.wait(120)
        assert bad.snapshot()["state"] == "failed" and "already holds a training run" in bad.snapshot()["message"]
        assert good.snapshot()["state"] == "finished"
        assert bases.pins[id(bases.models["tiny"])] == 0
    finally:
        sched.close()


def test_the_token_budget_counts_the_padded_rows_of_a_shared_step(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=100)
    try:
        long = (A[0], quick(steps=500, batch_size=2, seq_len=16, grad_accum=1, eval_interval=0,
                            checkpoint_interval=0, seed=1))
        first = sched.submit(spec(sample_ds, tmp_path, "first", long))
        _until(lambda: first.snapshot()["points"])
        wide = (B[0], quick(steps=2, batch_size=1, seq_len=48, grad_accum=1, eval_interval=0, checkpoint_interval=0,
                            seed=2))
        second = sched.submit(spec(sample_ds, tmp_path, "second", wide))
        # 32 + 48 real tokens would fit 100, but the step would be 3 rows x 48 = 144 positions
        assert sched.waits(second).startswith("waiting for room")
        sched.stop(first)
        assert second.wait(120) and second.snapshot()["state"] == "finished"
    finally:
        sched.close()


def test_a_queued_job_is_told_why_it_waits_only_when_it_must(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=100)
    try:
        bases.gate.clear()  # nothing trains yet: the first job is starting or queued
        first = sched.submit(spec(sample_ds, tmp_path, "first"))  # 2 x 16
        second = sched.submit(spec(sample_ds, tmp_path, "second", B))  # 1 x 24: 3 rows x 24 = 72 fit beside it
        wide = (B[0], quick(steps=2, batch_size=1, seq_len=48, grad_accum=1, eval_interval=0, checkpoint_interval=0,
                            seed=2))
        third = sched.submit(spec(sample_ds, tmp_path, "third", wide))  # 4 rows x 48 = 192 do not
        small = (A[0], quick(steps=2, batch_size=1, seq_len=16, grad_accum=1, eval_interval=0, checkpoint_interval=0,
                             seed=3))
        fourth = sched.submit(spec(sample_ds, tmp_path, "fourth", small))  # 4 rows x 24 = 96 fit: it goes past
        fifth = sched.submit(spec(sample_ds, tmp_path, "fifth"))  # 6 rows x 24 do not
        assert sched.waits(first) is None and sched.waits(second) is None  # both start at once
        assert sched.waits(third).startswith("waiting for room")
        assert sched.waits(fourth) is None
        assert sched.waits(fifth).startswith("waiting for room")
    finally:
        bases.gate.set()
        sched.close()


ENDLESS = (A[0], quick(steps=10_000, batch_size=2, seq_len=16, grad_accum=1, eval_interval=0, checkpoint_interval=0,
                       seed=1))  # 2 x 16, runs until stopped
SMALL = (A[0], quick(steps=2, batch_size=1, seq_len=16, grad_accum=1, eval_interval=0, checkpoint_interval=0, seed=3))


def test_a_big_job_at_the_head_no_longer_blocks_a_small_job_that_fits(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=48)  # 2 + 1 rows of 16 fit, 2 + 2 do not
    try:
        first = sched.submit(spec(sample_ds, tmp_path, "first", ENDLESS, user="u0"))
        _until(lambda: first.snapshot()["state"] == "running")
        big = sched.submit(spec(sample_ds, tmp_path, "big", ENDLESS, user="u1"))
        small = sched.submit(spec(sample_ds, tmp_path, "small", SMALL, user="u2"))
        assert small.wait(120) and small.snapshot()["state"] == "finished"
        assert first.snapshot()["state"] == "running" and big.snapshot()["state"] == "queued"
        assert big.snapshot()["waiting"].startswith("waiting for room")
    finally:
        sched.close()


def test_a_big_job_passed_by_small_ones_gets_the_step_kept_free_for_it(bases, sample_ds, tmp_path):
    from core.train.jobs import PASS_LIMIT
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=48)
    try:
        first = sched.submit(spec(sample_ds, tmp_path, "first", ENDLESS, user="u0"))
        _until(lambda: first.snapshot()["state"] == "running")
        big = sched.submit(spec(sample_ds, tmp_path, "big", ENDLESS, user="big"))
        smalls = [sched.submit(spec(sample_ds, tmp_path, f"s{i}", SMALL, user=f"s{i}")) for i in range(PASS_LIMIT + 1)]
        for job in smalls[:PASS_LIMIT]:  # they go past it, one at a time beside the first job
            assert job.wait(120) and job.snapshot()["state"] == "finished"
        last = smalls[-1]
        _until(lambda: "kept free" in (sched.waits(last) or ""))
        assert last.snapshot()["state"] == "queued" and "'big'" in sched.waits(last)
        sched.stop(first)  # room for the big job: it starts before the small one waiting past it
        _until(lambda: big.snapshot()["state"] == "running")
        assert last.wait(120)
        assert big.snapshot()["started"] <= last.snapshot()["started"]
    finally:
        sched.close()


def test_a_user_with_fewer_running_jobs_goes_first(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=64, max_jobs_per_user=3)  # two jobs at a time
    try:
        a1 = sched.submit(spec(sample_ds, tmp_path, "a1", ENDLESS, user="alice"))
        _until(lambda: a1.snapshot()["state"] == "running")
        bases.gate.clear()  # the next job to start holds, so the queue behind it can be read
        a2 = sched.submit(spec(sample_ds, tmp_path, "a2", user="alice"))
        _until(lambda: a2.snapshot()["state"] == "starting")  # the step is full now
        a3 = sched.submit(spec(sample_ds, tmp_path, "a3", user="alice"))
        b1 = sched.submit(spec(sample_ds, tmp_path, "b1", user="bob"))  # last in, but bob has nothing running
        assert [j.snapshot()["position"] for j in (b1, a3)] == [1, 2]
        bases.gate.set()
        assert b1.wait(120) and a3.wait(120)
        assert b1.snapshot()["started"] <= a3.snapshot()["started"]
    finally:
        bases.gate.set()
        sched.close()


def test_a_job_reaching_the_time_limit_is_stopped_and_saved_and_says_why(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=10_000, max_job_minutes=0.002)
    try:
        job = sched.submit(spec(sample_ds, tmp_path, "long", ENDLESS))
        assert job.wait(120)
        snap = job.snapshot()
        assert snap["state"] == "stopped" and snap["progress"]["step"] < 10_000
        assert snap["message"] == ("stopped: it reached the server's limit of 0.002 minutes per job; "
                                   "saved to the library as 'long'")
    finally:
        sched.close()


def test_a_job_the_teacher_stops_says_who_stopped_it(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=40)
    try:
        running = sched.submit(spec(sample_ds, tmp_path, "running", ENDLESS, user="alice"))
        queued = sched.submit(spec(sample_ds, tmp_path, "queued", user="bob"))
        _until(lambda: running.snapshot()["state"] == "running")
        sched.stop(queued, by="ms_t")
        sched.stop(running, by="ms_t")
        assert running.wait(120) and queued.wait(1)
        assert running.snapshot()["message"] == "stopped by the teacher (ms_t); saved to the library as 'running'"
        assert queued.snapshot()["message"].startswith("stopped by the teacher (ms_t): removed from the queue")
        assert running.snapshot()["stopped_by"] == "ms_t"
    finally:
        sched.close()


def test_moving_a_queued_job_changes_the_order_jobs_start_in(bases, sample_ds, tmp_path):
    sched = TrainScheduler(bases.load, bases.release, capacity_tokens=40)  # one job at a time
    try:
        bases.gate.clear()
        first = sched.submit(spec(sample_ds, tmp_path, "first", user="u0"))
        _until(lambda: first.snapshot()["state"] == "starting")
        jobs = [sched.submit(spec(sample_ds, tmp_path, n, user=n)) for n in ("x", "y", "z")]
        assert sched.move(jobs[2], -2) == "'z' is now number 1 in the queue."
        sched.move(jobs[0], 1)
        assert [j.name for j in sched.queued()] == ["z", "y", "x"]
        with pytest.raises(ValueError, match="only queued jobs can move"):
            sched.move(first, 1)
        bases.gate.set()
        assert all(j.wait(120) for j in jobs)
        started = [j.snapshot()["started"] for j in reversed(jobs)]
        assert started == sorted(started)
    finally:
        bases.gate.set()
        sched.close()

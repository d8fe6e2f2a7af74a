"""The per-user caps a teacher may change while the studio runs: training jobs per user, generation rows per user,
and a training job's budget (steps x tokens, and steps). They start as the flags give them (--max-jobs-per-user,
--max-rows-per-user, --max-job-tokens, --max-job-steps) and are read where each limit is checked, so a change
applies to the next submission; what already runs or waits keeps going."""
from __future__ import annotations

from dataclasses import dataclass

from .context import Studio, whole

LARGEST_CAP = 10**15  # far past any real budget; a bound so every cap is an exact whole number


@dataclass(frozen=True)
class Caps:
    jobs_per_user: int  # training jobs one user may have queued or running
    rows_per_user: int  # generation rows one user may have waiting or running (batched generation)
    job_tokens: int | None  # a training job's steps x tokens per step at most (None: no limit)
    job_steps: int | None  # a training job's optimizer steps at most (None: no limit)


def current(studio: Studio) -> Caps:
    """The caps in force now, read where they are checked."""
    runs = studio.runs
    return Caps(runs.scheduler.max_jobs_per_user, studio.engine.max_rows_per_user, runs.max_job_tokens,
                runs.max_job_steps)


def _cap(value, what: str, optional: bool) -> int | None:
    if optional and (value is None or (isinstance(value, str) and not value.strip()) or value == 0):
        return None
    n = whole(value, what)
    if not 1 <= n <= LARGEST_CAP:
        raise ValueError(f"{what} must be a whole number from 1 to {LARGEST_CAP:,} (got {n:,})"
                         + ("; 0 or empty means no limit." if optional else "."))
    return n


def parse(jobs, rows, job_tokens, job_steps) -> Caps:
    """The caps as a form or an API client sends them (ValueError in one sentence for a bad one); an empty or 0
    job budget means no limit."""
    return Caps(_cap(jobs, "jobs per user", False), _cap(rows, "rows per user", False),
                _cap(job_tokens, "tokens per job", True), _cap(job_steps, "steps per job", True))


def apply(studio: Studio, caps: Caps) -> None:
    """Put `caps` in force for the next submissions (each is one attribute write, read as a job or request
    is submitted)."""
    runs, engine = studio.runs, studio.engine
    runs.scheduler.max_jobs_per_user = studio.max_jobs_per_user = caps.jobs_per_user
    runs.max_job_tokens = studio.max_job_tokens = caps.job_tokens
    runs.max_job_steps = studio.max_job_steps = caps.job_steps
    engine.max_rows_per_user = caps.rows_per_user
    scheduler = engine._scheduler  # the decode scheduler of the loaded base, if one was made
    if scheduler is not None:
        scheduler.max_rows_per_user = caps.rows_per_user


def describe(caps: Caps) -> str:
    """One line for the panel and the Train tab."""
    def limit(n):
        return "no limit" if n is None else f"{n:,}"
    return (f"{caps.jobs_per_user:,} training job{'s' if caps.jobs_per_user != 1 else ''} per user · "
            f"{caps.rows_per_user:,} generation rows per user · tokens per job: {limit(caps.job_tokens)} · "
            f"steps per job: {limit(caps.job_steps)}")

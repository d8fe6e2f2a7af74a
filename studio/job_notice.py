"""A toast for what happens elsewhere: "your job finished" while the user is on another tab than Train.

The Train tab's own card says how a job ended; on any other tab a slow timer watches the user's live jobs and
shows one toast per job that ends, then stops. It runs only while the page is away from Train and the user has
a job queued or training: a page without one costs nothing.
"""
from __future__ import annotations

import gradio as gr

from .context import Studio, requester

WATCH_SECONDS = 5.0  # how soon a page on another tab hears that a job ended
ENDED = {"finished": "is saved to the library", "stopped": "stopped and is saved to the library",
         "failed": "failed"}


def live_jobs(studio: Studio, owner: str | None) -> list[int]:
    """Ids of `owner`'s jobs queued or training (none for an unknown owner)."""
    return [j.id for j in studio.runs.scheduler.live() if owner is not None and j.user == owner]


def ended(studio: Studio, watched) -> tuple[list[str], list[int]]:
    """(a sentence per watched job that has ended, the ids still live)."""
    notes, still = [], []
    for job_id in watched if isinstance(watched, list) else []:
        job = studio.runs.find(job_id)
        if job is None:
            continue
        if job.live:
            still.append(job.id)
        else:
            snap = job.snapshot()
            reason = {"stopped": snap.get("stop_reason"), "failed": snap.get("message")}.get(snap["state"]) or ""
            notes.append(f"Your training job '{job.name}' {ENDED.get(snap['state'], snap['state'])}"
                         + (f" ({reason})" if reason else "") + "; the Train tab shows it.")
    return notes, still


def wire(studio: Studio, train_tab, other_tabs, me) -> None:
    """Watch the user's jobs while any of `other_tabs` is shown (me: the page's browser id State)."""
    timer = gr.Timer(WATCH_SECONDS, active=False)
    watched = gr.State([])
    quiet = dict(show_progress="hidden", api_visibility="private", queue=False)

    def away(browser, request: gr.Request):
        ids = live_jobs(studio, requester(request, browser))
        return gr.Timer(active=bool(ids)), ids

    def tick(ids):
        notes, still = ended(studio, ids)
        for note in notes:
            gr.Info(note, duration=15, title="Training")
        return gr.Timer(active=bool(still)), still

    for tab in other_tabs:
        tab.select(away, inputs=me, outputs=[timer, watched], **quiet)
    train_tab.select(lambda: (gr.Timer(active=False), []), outputs=[timer, watched], **quiet)
    # queued: a toast reaches the page only through the queue's event stream (an unqueued call drops it)
    timer.tick(tick, inputs=watched, outputs=[timer, watched], concurrency_limit=None, show_progress="hidden",
               api_visibility="private")

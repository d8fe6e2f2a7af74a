"""Teacher tab: the class's training at a glance, for an admin only. Every job (who, state, step, loss, place
in the queue), and per job Stop, Cancel (a queued one), Move up / down in the queue; Stop all; the per-user caps,
changed while the studio runs (studio.caps); and each user's latest run in the library with its validation loss.
A job the teacher stops tells its owner so.

Who counts as the teacher: with --auth, a signed-in --admin; without it, whoever types --admin-token into the
panel. Everyone else gets one sentence from every action and an empty panel."""
from __future__ import annotations

import gradio as gr

from core.api import is_real, is_whole

from .. import caps as class_caps
from ..context import Studio, friendly, sentence, user_of
from ..inputs import Number

JOB_COLUMNS = ["id", "user", "run", "state", "step", "loss", "queue"]
CLASS_COLUMNS = ["user", "latest run", "base", "dataset", "steps", "val loss", "status"]


def teacher_of(studio: Studio, request: gr.Request | None, token=None) -> str:
    """The teacher's name, as a stopped job shows it ('' for the holder of --admin-token); ValueError for
    anyone else."""
    if studio.auth:
        user = user_of(request)
        if user is not None and user in studio.admins:
            return user
        raise ValueError("only the teacher (an admin) can use the Teacher panel.")
    if studio.is_admin_token(token):
        return ""
    if studio.admin_token is None:
        raise ValueError("the Teacher panel needs the server started with --admin-token (or --auth with --admin).")
    raise ValueError("enter the admin token (--admin-token) above to use the Teacher panel.")


def _who(job) -> str:
    """A job's owner as people know them: the signed-in name, else a short browser or session id."""
    user = job.spec.meta.get("user")
    if user:
        return user
    kind, _, key = (job.user or "").partition(":")
    return f"{kind} {key[:8]}" if key else "this server"


def job_rows(studio: Studio) -> list[list]:
    rows = []
    for job in studio.runs.jobs():
        snap = job.snapshot()
        points, p = snap["points"], snap["progress"]
        rows.append([job.id, _who(job), job.name, snap["state"], f"{p.get('step', 0):,} / {p.get('steps', 0):,}",
                     round(points[-1]["loss"], 4) if points else None, snap["position"] or ""])
    return rows


def class_rows(studio: Studio) -> list[list]:
    """Each user's newest library entry, by user name."""
    latest = {}
    for e in studio.library.list():
        if e.user and (e.user not in latest or e.created_ts > latest[e.user].created_ts):
            latest[e.user] = e
    return [[u, e.name, e.base_model, e.dataset, e.steps, round(e.val_loss, 4) if e.val_loss is not None else None,
             e.status] for u, e in sorted(latest.items())]


def job_choices(studio: Studio, keep=None):
    live = [j for j in studio.runs.jobs() if j.live]
    choices = [(f"#{j.id} {j.name} ({_who(j)}, {j.state})", str(j.id)) for j in live]
    ids = [c[1] for c in choices]
    return gr.update(choices=choices, value=keep if keep in ids else (ids[0] if ids else None))


def _job(studio: Studio, job_id):
    """The live job `job_id` (ValueError when there is none)."""
    text = str(job_id).strip().lstrip("#") if isinstance(job_id, str) or is_whole(job_id) else ""
    job = studio.runs.find(text) if text.isdigit() else None
    if job is None or not job.live:
        raise ValueError("pick a job that is queued or training from the list (press Refresh to update it).")
    return job


def stop_job(studio: Studio, job_id, request=None, token=None) -> str:
    teacher = teacher_of(studio, request, token)
    return studio.runs.scheduler.stop(_job(studio, job_id), by=teacher)


def cancel_job(studio: Studio, job_id, request=None, token=None) -> str:
    teacher = teacher_of(studio, request, token)
    job = _job(studio, job_id)
    if job.state != "queued":
        raise ValueError(f"'{job.name}' is not waiting in the queue (it is {job.state}); use Stop to end it.")
    return studio.runs.scheduler.stop(job, by=teacher)


def move_job(studio: Studio, job_id, delta, request=None, token=None) -> str:
    teacher_of(studio, request, token)
    if not (is_real(delta) and delta == int(delta) and delta):
        raise ValueError("move by a whole number of places: -1 is one place up, 1 one place down.")
    return studio.runs.scheduler.move(_job(studio, job_id), int(delta))


def stop_all(studio: Studio, request=None, token=None) -> str:
    teacher = teacher_of(studio, request, token)
    live = studio.runs.scheduler.live()
    for job in live:
        studio.runs.scheduler.stop(job, by=teacher)
    return f"Stopped {len(live)} job{'s' if len(live) != 1 else ''}: running ones are saved, queued ones left the " \
           f"queue." if live else "No job is queued or training."


def set_caps(studio: Studio, jobs, rows, job_tokens, job_steps, request=None, token=None) -> str:
    """Change the per-user caps for the next submissions (the teacher only); returns a sentence."""
    teacher_of(studio, request, token)
    caps = class_caps.parse(jobs, rows, job_tokens, job_steps)
    class_caps.apply(studio, caps)
    return f"Caps changed for the next submissions: {class_caps.describe(caps)}."


def create_teacher_tab(studio: Studio) -> dict:
    gr.Markdown("Every training job of the class, and each student's latest run. Only the teacher (an admin) can "
                "use this panel; a job stopped here tells its owner who stopped it.", elem_classes="help")
    token = gr.Textbox("", label="Admin token", type="password", elem_id="teacher-token",
                       visible=not studio.auth, placeholder="the server's --admin-token")
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="teacher-refresh")
        stop_everything = gr.Button("Stop all", variant="stop", elem_id="teacher-stop-all")
    jobs = gr.Dataframe(headers=JOB_COLUMNS, value=[], interactive=False, label="Jobs", elem_id="teacher-jobs",
                        wrap=True)
    with gr.Row():
        picked = gr.Dropdown([], label="Job", allow_custom_value=True, elem_id="teacher-job", scale=3)
        stop_btn = gr.Button("Stop", variant="stop", elem_id="teacher-stop")
        cancel = gr.Button("Cancel (queued)", elem_id="teacher-cancel")
        up = gr.Button("Move up", elem_id="teacher-up")
        down = gr.Button("Move down", elem_id="teacher-down")
    status = gr.Markdown("", elem_id="teacher-status")
    now = class_caps.current(studio)
    with gr.Accordion("Per-user caps (apply to the next submissions)", open=False, elem_id="teacher-caps"):
        with gr.Row():
            cap_jobs = Number(now.jobs_per_user, precision=0, label="Training jobs per user", elem_id="teacher-cap-jobs")
            cap_rows = Number(now.rows_per_user, precision=0, label="Generation rows per user",
                              elem_id="teacher-cap-rows")
            cap_tokens = Number(now.job_tokens or 0, precision=0, label="Tokens per job (steps × tokens; 0: no limit)",
                                elem_id="teacher-cap-tokens")
            cap_steps = Number(now.job_steps or 0, precision=0, label="Steps per job (0: no limit)",
                               elem_id="teacher-cap-steps")
            apply_caps = gr.Button("Apply caps", elem_id="teacher-apply-caps", scale=0, min_width=120)
    overview = gr.Dataframe(headers=CLASS_COLUMNS, value=[], interactive=False, label="Class overview: each user's "
                            "latest run", elem_id="teacher-class", wrap=True)
    outputs = [status, jobs, overview, picked]

    def panel(line: str, request, token_value, keep=None) -> tuple:
        """The status line and the panel, filled only for the teacher."""
        try:
            teacher_of(studio, request, token_value)
        except ValueError as e:
            return sentence(str(e)), [], [], gr.update(choices=[], value=None)
        return line, job_rows(studio), class_rows(studio), job_choices(studio, keep)

    def act(fn):
        def handler(token_value, job_id, request: gr.Request):
            try:
                line = fn(job_id, request, token_value)
            except ValueError as e:
                line = sentence(str(e))
            return panel(line, request, token_value, job_id)
        return handler

    def teacher_stop_all(token_value, request: gr.Request):
        return act(lambda j, r, t: stop_all(studio, r, t))(token_value, None, request)

    def teacher_jobs(token_value, request: gr.Request):
        return panel("", request, token_value)

    refresh.click(teacher_jobs, inputs=token, outputs=outputs, api_name="teacher_jobs", queue=False)
    stop_btn.click(act(lambda j, r, t: stop_job(studio, j, r, t)), inputs=[token, picked], outputs=outputs,
                   api_name="teacher_stop", queue=False)
    cancel.click(act(lambda j, r, t: cancel_job(studio, j, r, t)), inputs=[token, picked], outputs=outputs,
                 api_name="teacher_cancel", queue=False)
    up.click(act(lambda j, r, t: move_job(studio, j, -1, r, t)), inputs=[token, picked], outputs=outputs,
             api_visibility="private", queue=False)
    down.click(act(lambda j, r, t: move_job(studio, j, 1, r, t)), inputs=[token, picked], outputs=outputs,
               api_visibility="private", queue=False)
    stop_everything.click(teacher_stop_all, inputs=token, outputs=outputs,
                          api_name="teacher_stop_all", queue=False)

    def teacher_move(token: str, job_id: str, delta: int, request: gr.Request) -> str:
        """Move queued job `job_id` `delta` places in the queue (-1: one place up). Returns a sentence."""
        try:
            return move_job(studio, job_id, delta, request, token)
        except ValueError as e:
            return sentence(str(e))

    def teacher_caps(token_value, jobs_cap, rows_cap, tokens_cap, steps_cap, request: gr.Request):
        line = set_caps(studio, jobs_cap, rows_cap, tokens_cap, steps_cap, request, token_value)
        return panel(line, request, token_value)

    # a refusal replaces the status line and changes nothing; queued, so that API clients also read it as a warning
    apply_caps.click(friendly(teacher_caps, status=status), inputs=[token, cap_jobs, cap_rows, cap_tokens, cap_steps],
                     outputs=outputs, api_name="teacher_caps")
    gr.api(teacher_move, api_name="teacher_move")  # the buttons' one endpoint, with the places as an argument
    return {"token": token, "jobs": jobs, "overview": overview, "picked": picked, "status": status,
            "refresh": teacher_jobs, "outputs": outputs}

"""Train tab: base model, dataset, LoRA and training settings, an estimate, your jobs and everyone's.

Jobs belong to core's Runs (its TrainScheduler underneath: every job on the loaded base trains in
one shared step). This page queues, stops and resumes jobs and polls the followed job's snapshot
with a gr.Timer, so a reloaded page reattaches to its chart; the session remembers only which job it
follows and which versions it drew last. Who owns a job: the signed-in user, else the browser (a
random id in its local storage).
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field

import gradio as gr

from core.api import (ATTN_OUT, ATTN_QKV, INITS, MAX_PROMPT_CHARS, MLP_DOWN, MLP_UP, PRESETS, REPORT_TO, TARGET_MODULES,
                      LoraConfig, TrainConfig, check_name, check_text, estimate_training, find_checkpoint, human_bytes,
                      human_seconds, load_dataset, normalize_targets, parse_pattern, read_dataset_meta, scrub)

from .. import caps as class_caps
from ..context import (Studio, address_of, friendly, new_browser_id, number, requester, sentence, typed_name,
                       user_of, whole)
from ..inputs import CheckboxGroup, Number, Slider
from ..models import CHOICES
from ..plots import loss_figure

REFRESH_SECONDS = 1.0  # the live chart and the jobs table poll the jobs this often
DEFAULT_PROMPT = "The"
TARGET_HELP = {
    ATTN_QKV: "attention query/key/value projection (the classic LoRA target)",
    ATTN_OUT: "attention output projection",
    MLP_UP: "MLP up-projection (4x wider: many parameters)",
    MLP_DOWN: "MLP down-projection",
}


# ---- the form -> configs ---------------------------------------------------------------------

@dataclass
class TrainForm:
    """The Train tab's form, as the page (or an API client) sends it: unchecked values of any kind. The
    defaults are the page's; the field order is the start_training API's argument order."""
    model: str = "gpt2"  # base model preset
    dataset: str | None = None  # a dataset name in the datasets folder
    name: str | None = ""  # the new adapter's name; empty = automatic
    targets: list = field(default_factory=lambda: list(LoraConfig().targets))  # projections that get LoRA
    rank: float | None = 8
    alpha: float | None = 16
    dropout: float | None = 0.0
    lr: float | None = 1e-3
    steps: float | None = 200
    batch: float | None = 4
    accum: float | None = 1  # gradient accumulation
    seq_len: float | None = 128
    eval_interval: float | None = 20
    seed: float | None = 1337
    prompt: str | None = DEFAULT_PROMPT  # continued at each evaluation
    report_to: str | None = "none"  # a tracker that logs the run (core.train.trackers.REPORT_TO)
    dora: bool | None = False  # DoRA (use_dora): a trained magnitude per output feature on top of LoRA
    rslora: bool | None = False  # rsLoRA scaling alpha / sqrt(rank)
    init: str | None = "kaiming"  # how A and B start (core.lora.variants)
    loraplus_lr_ratio: float | None = 1.0  # LoRA+: B's learning rate over A's
    rank_pattern: str | None = ""  # JSON {module regex: rank}, PEFT's rank_pattern
    alpha_pattern: str | None = ""  # JSON {module regex: alpha}, PEFT's alpha_pattern


SETTINGS = ("model", "targets", "rank", "alpha", "dropout", "lr", "steps", "batch", "accum", "seq_len",
            "eval_interval", "seed", "dora", "init", "rank_pattern")  # the fields the estimate reads


def make_configs(form: TrainForm, with_prompt: bool = True) -> tuple[LoraConfig, TrainConfig]:
    """The form's values as validated core configs (ValueError with a message otherwise). Every value is
    checked here as an API client could send it: None, NaN, inf, 1e300 or text in any field."""
    f = form
    if f.lr is None:
        raise ValueError("learning rate is empty; enter a number such as 3e-4.")
    if f.targets is not None and not isinstance(f.targets, (list, tuple)):
        raise ValueError("target modules must be a list; choose them with the checkboxes.")
    targets = normalize_targets(f.targets or ())
    prompt = check_text(f.prompt if with_prompt else None, "the sample prompt", MAX_PROMPT_CHARS).strip()
    if f.dora not in (None, True, False):
        raise ValueError("DoRA must be true or false; tick or untick the DoRA box.")
    if f.rslora not in (None, True, False):
        raise ValueError("rsLoRA must be true or false; tick or untick the rsLoRA box.")
    lcfg = LoraConfig(r=whole(f.rank, "rank"), alpha=number(f.alpha if f.alpha is not None else 0, "alpha"),
                      dropout=number(f.dropout if f.dropout is not None else 0, "dropout"), use_dora=bool(f.dora),
                      targets=targets,
                      use_rslora=bool(f.rslora), init=f.init if f.init is not None else "kaiming",
                      loraplus_lr_ratio=number(f.loraplus_lr_ratio if f.loraplus_lr_ratio is not None else 1,
                                               "LoRA+ ratio"),
                      rank_pattern=parse_pattern(f.rank_pattern, "rank pattern"),
                      alpha_pattern=parse_pattern(f.alpha_pattern, "alpha pattern"))
    eval_every = whole(f.eval_interval, "eval interval")
    tcfg = TrainConfig(steps=whole(f.steps, "steps"), lr=number(f.lr, "learning rate"),
                       batch_size=whole(f.batch, "batch size"), grad_accum=whole(f.accum, "gradient accumulation"),
                       seq_len=whole(f.seq_len, "sequence length"), eval_interval=eval_every,
                       checkpoint_interval=max(eval_every, 50) if eval_every else 50, seed=whole(f.seed, "seed"),
                       sample_prompts=(prompt,) if prompt else ())
    return lcfg, tcfg


def training_estimate(model_name: str, lcfg: LoraConfig, tcfg: TrainConfig, device_type: str,
                      precision: str | None = None) -> dict:
    """Memory/time/size estimate (core.train.estimate): peak_bytes, step_seconds, total_seconds,
    trainable_params, adapter_bytes, share_percent. precision: the base's dtype name (default by device)."""
    est = estimate_training(PRESETS[model_name], lcfg, tcfg, device_type, weights=precision)
    return est.as_dict() if hasattr(est, "as_dict") else dict(est)


def size_md(studio: Studio, model_name, targets, r, dora=False, init="kaiming", rank_pattern="") -> str:
    """Live count of what LoRA adds: trainable parameters, adapter file size, share of the model (a rank
    pattern changes the count; PiSSA/OLoRA save a rank-2r file)."""
    try:
        lcfg = LoraConfig(r=whole(r, "rank"), targets=normalize_targets(targets or ()),
                          use_dora=dora is True, init=init if init is not None else "kaiming",
                          rank_pattern=parse_pattern(rank_pattern, "rank pattern"))
        lcfg.validate(PRESETS.get(model_name))
        est = training_estimate(model_name, lcfg, TrainConfig(steps=1), studio.engine.device.type)
    except (ValueError, TypeError, KeyError, ArithmeticError) as e:
        return f"<span class='warn'>{html.escape(scrub(str(e)))}</span>"
    return (f"**{est['trainable_params']:,}** trainable parameters · adapter file ≈ "
            f"**{human_bytes(est['adapter_bytes'])}** · **{est['share_percent']:.3f}%** of the model")


def estimate_md(studio: Studio, form: TrainForm) -> str:
    """Expected peak memory and time of the run, before it starts (the form's SETTINGS only)."""
    try:
        lcfg, tcfg = make_configs(form, with_prompt=False)
        cfg = PRESETS[form.model]
        lcfg.validate(cfg)
        tcfg.validate(cfg)
        dev = studio.engine.device.type
        est = training_estimate(form.model, lcfg, tcfg, dev, studio.precision)
    except (ValueError, TypeError, KeyError, ArithmeticError) as e:
        return f"<span class='warn'>⚠ {html.escape(scrub(str(e)))}</span>"
    per = tcfg.batch_size * tcfg.grad_accum
    return (f"**Estimate on {dev}** ({studio.precision} base, fp32 LoRA): peak memory ≈ "
            f"**{human_bytes(est['peak_bytes'])}** · "
            f"≈ {est['step_seconds']:.2f} s per step → **{human_seconds(est['total_seconds'])}** for "
            f"{tcfg.steps:,} steps ({per} sequences × {tcfg.seq_len} tokens per step). "
            f"<span class='muted'>A rough guide; the live ETA is measured.</span>")


def model_status_md(studio: Studio, model_name: str) -> str:
    return studio.model_status(model_name)


def dataset_choices(studio: Studio, user: str | None = None, rows: list[dict] | None = None) -> list[tuple[str, str]]:
    """(label, name) of the datasets `user` may see (or of `rows`, studio.datasets' entries)."""
    out = []
    for d in studio.datasets(user) if rows is None else rows:
        t = d["meta"].get("tokens")
        out.append((f"{d['name']} ({t:,} tokens)" if isinstance(t, int) else d["name"], d["name"]))
    return out


def refresh_datasets(studio: Studio, current: str | None = None, select: str | None = None,
                     user: str | None = None):
    """The dataset picker for `user`: `select`, else `current`, else the newest of the user's own (or unowned)
    datasets; never another user's unasked (an admin sees everyone's, but none is picked for them)."""
    rows = studio.datasets(user)
    names = [d["name"] for d in rows]
    own = [d["name"] for d in rows if d["meta"].get("user") in (None, user)]
    value = select if select in names else current if current in names else (own[0] if own else None)
    return gr.update(choices=dataset_choices(studio, rows=rows), value=value)


# ---- actions -----------------------------------------------------------------------------

def _progress_say(progress):
    def say(msg: str):
        if progress is not None:
            progress(None, desc=msg)
    return say


def auto_name(dataset: str, model_name: str) -> str:
    return f"{dataset}-{model_name}-{time.strftime('%m%d-%H%M%S')}"[:64]


def owner_of(user: str | None, owner: str | None) -> str | None:
    """Who a job belongs to: the given owner key, else the signed-in user's (None: the process itself)."""
    return owner if owner is not None else (f"user:{user}" if user else None)


def start(studio: Studio, form: TrainForm, user: str | None = None, progress=None,
          owner: str | None = None, address: str | None = None) -> tuple[str, str]:
    """Queue a training job; it starts at once when there is room. Returns (status line, the run's name).
    Raises ValueError/WeightsError. user: the signed-in user; owner: who may stop it (see owner_of);
    address: without sign-in, the client's address (context.address_of), a second key for the job limit."""
    dataset = typed_name(form.dataset, "the dataset name")
    if not dataset:
        raise ValueError("choose a dataset (prepare one on the Data tab first).")
    model_name = form.model
    if not isinstance(model_name, str) or model_name not in PRESETS:
        raise ValueError(f"unknown base model {model_name!r}; choose one of {', '.join(CHOICES)}.")
    lcfg, tcfg = make_configs(form)
    lcfg.validate(PRESETS[model_name])  # bad settings are explained before a base model is loaded
    tcfg.validate(PRESETS[model_name])
    ds = studio.dataset(dataset, user)
    name = check_name(typed_name(form.name, "the adapter name") or auto_name(dataset, model_name))
    studio.runs.scheduler.check_room(owner_of(user, owner))  # Start twice: the job limit, not the name taken
    studio.runs.check_budget(ds, tcfg)  # before a base is loaded for nothing
    studio.runs.check_memory(model_name, ds, lcfg, tcfg)
    _load_now(studio, model_name, progress)
    job = studio.runs.start(model_name, ds, name, lcfg, tcfg, owner=owner_of(user, owner), user=user,
                              report_to=form.report_to, address=address)
    return _queued_line(studio, job, f"Started **{name}** on {model_name}"), name


def _load_now(studio: Studio, model_name: str, progress) -> None:
    """Load the job's base here when it can start on it now: the page shows the load, and missing weights
    are explained before anything is queued (a queued job on another base loads it when it starts)."""
    if studio.runs.scheduler.running_base() in (None, model_name):
        if progress is not None:
            progress(0.1, desc=f"loading base model {model_name} (first use only)…")
        studio.base(model_name, _progress_say(progress))


def _queued_line(studio: Studio, job, started: str) -> str:
    """'Started ...' when the job can start now; else its place in the queue and why it waits."""
    why = studio.runs.scheduler.waits(job)
    if why is None:
        return f"{started}. The chart updates live; Stop saves what was learned."
    return f"Queued **{job.name}**: {why[0].lower() + why[1:].rstrip('.')}. The chart below follows it."


def stop(studio: Studio, user: str | None = None, job_id=None, owner: str | None = None,
         admin_token: str | None = None) -> str:
    """Stop a job (default: the user's newest live one); only its owner or an admin may: a signed-in --admin,
    or whoever gives --admin-token (for a studio without sign-in)."""
    if admin_token and not studio.is_admin_token(admin_token):
        raise ValueError("the admin token is wrong; nothing was stopped (leave it empty to stop a job of your own).")
    admin = (studio.auth and user is not None and user in studio.admins) or bool(admin_token)
    return studio.runs.stop(job_id, owner=owner_of(user, owner), admin=admin, by=user or "")


def resume(studio: Studio, name, steps, user: str | None = None, progress=None, owner: str | None = None,
           job_id=None, address: str | None = None) -> tuple[str, str]:
    """Continue run `name` (default: the followed job's run) from its newest checkpoint to `steps` in total."""
    steps = whole(steps, "steps") if steps is not None else None  # a bad value is explained before any lookup
    name = typed_name(name, "the run name")
    if not name:
        snap = studio.runs.snapshot(job_id, owner_of(user, owner))
        if snap is None:
            raise ValueError("type the name of a stopped run to resume (it is in the Library).")
        name = snap["name"]
    paused = studio.chunked.paused(name, job_id, owner_of(user, owner)) if studio.chunked is not None else None
    if paused is not None:  # ZeroGPU: a run no page drove goes on from where it was, in memory
        return studio.chunked.resume(paused), paused.name
    studio.check_entry_owner(name, user, "resume")  # first: another user's private run is not named as one
    ck = find_checkpoint(studio.runs.run_dir(name))
    base = ck.meta.get("base_model") or ""
    if not isinstance(base, str) or base not in PRESETS:
        raise ValueError(f"run '{name}' was trained on {base or 'an unknown base'}; the studio resumes runs of "
                         f"{', '.join(CHOICES)} only (use the CLI for other bases).")
    ds_meta = ck.meta.get("dataset") if isinstance(ck.meta.get("dataset"), dict) else {}
    folder = studio.dataset_store.find(ds_meta.get("path"), ds_meta.get("name"))
    if folder is None:
        raise ValueError(f"the dataset of run '{name}' ({ds_meta.get('name', '?')}) is no longer in the datasets "
                         f"folder; prepare it again with the same text to resume.")
    if not studio.can_see(read_dataset_meta(folder).get("user"), user):
        raise ValueError(f"the dataset of run '{name}' ({ds_meta.get('name', '?')}) belongs to another user; "
                         f"prepare the same text as a dataset of yours to resume.")
    ds = load_dataset(folder)
    total = steps if steps is not None and steps > ck.step else None
    if total is None and ck.tcfg.steps <= ck.step:
        raise ValueError(f"run '{name}' already reached its {ck.step} steps; raise Steps above {ck.step} to "
                         f"train it further.")
    _load_now(studio, base, progress)
    job = studio.runs.resume(base, ds, name, total, owner=owner_of(user, owner), user=user, address=address)
    return _queued_line(studio, job, f"Resumed **{name}** from step {ck.step} toward {job.progress['steps']} "
                                     f"steps"), name


def limit_note(studio: Studio) -> str:
    """The Train tab's line on the limits a Start meets: jobs per user, the per-job budget (--max-job-tokens,
    --max-job-steps, --max-job-minutes), as in force now (the teacher may change them: studio.caps)."""
    caps = class_caps.current(studio)
    cap, steps, minutes, jobs = caps.job_tokens, caps.job_steps, studio.max_job_minutes, caps.jobs_per_user
    return f" Each user may have {jobs:,} training job{'s' if jobs != 1 else ''} queued or running." + \
        ("" if cap is None else (f" A job may train at most {cap:,} tokens (steps × batch × accumulation × "
                                 f"sequence length).")) + \
        ("" if steps is None else f" A job may train at most {steps:,} steps.") + \
        ("" if minutes is None else f" A job trains at most {minutes:g} minutes, then it is stopped and saved.")


def limits_md(studio: Studio) -> str:
    return ("<span class='help'>Stop ends within one optimizer step and saves the adapter to the library; Resume "
            "continues the run named below from where it stopped." + limit_note(studio) + "</span>")


# ---- the live view -------------------------------------------------------------------------

def _clock(s) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def job_html(snap: dict | None) -> str:
    """The status banner, progress bar and numbers of the current (or last) job."""
    if snap is None:
        return ("<div class='job idle'><b>No training job yet.</b> Choose a model and a dataset, check the "
                "estimate, then press <b>Start training</b>.</div>")
    p = snap["progress"]
    step, steps = p.get("step", 0), max(1, p.get("steps") or 1)
    pct = 100.0 * step / steps
    name = html.escape(snap["name"])
    who = f" · started by <b>{html.escape(snap['user'])}</b>" if snap.get("user") else ""
    state = snap["state"]
    badge = {"queued": "Queued", "starting": "Training", "running": "Training", "stopping": "Stopping",
             "finished": "Finished", "stopped": "Stopped", "failed": "Failed", "paused": "Paused"}[state]
    wait = f" · starts in about <b>{_clock(snap['start_eta'])}</b>" if snap.get("start_eta") is not None else ""
    text = {
        "queued": f"<b>{name}</b> waits in the queue: position <b>{snap.get('position') or 1}</b>{wait}. "
                  f"{html.escape(snap.get('waiting') or 'It starts in a moment.')}",
        "starting": f"starting <b>{name}</b>…",
        "running": f"training <b>{name}</b> on {html.escape(snap['base_id'])}",
        "stopping": f"<b>{name}</b>: saving at the end of this step…",
        "finished": f"<b>{name}</b> is saved to the library.",
        "stopped": f"<b>{name}</b> stopped at step {step} and is saved to the library; <b>Resume</b> continues it.",
        "failed": f"<b>{name}</b>: {html.escape(snap['message'])}",
        "paused": f"<b>{name}</b> paused at step {step}: no page drove it; <b>Resume</b> continues it.",
    }[state]
    if state == "stopped" and snap.get("stop_reason"):  # the teacher, or the server's time limit
        text += f" <b>{html.escape(snap['stop_reason'][0].upper() + snap['stop_reason'][1:])}.</b>"
    head = f"<span class='badge {state}'>{badge}</span> {text}"
    metrics = [f"step <b>{step:,}</b> / {steps:,} ({pct:.0f}%)"]
    if snap["live"] and state != "queued":
        metrics.append(f"ETA <b>{_clock(p.get('eta'))}</b>")
    if p.get("tokens_per_sec"):
        metrics.append(f"<b>{p['tokens_per_sec']:,.0f}</b> tokens/s")
    if p.get("elapsed") is not None:
        metrics.append(f"elapsed {_clock(p.get('elapsed'))}")
    if snap["points"]:
        metrics.append(f"train loss <b>{snap['points'][-1]['loss']:.4f}</b>")
    if snap["evals"]:
        metrics.append(f"val loss <b>{snap['evals'][-1]['val_loss']:.4f}</b>")
    notes = "".join(f"<div class='job-note'>Note: {html.escape(n)}</div>" for n in snap.get("notes", []))
    together = snap.get("together", 0)
    busy = (f"<div class='job-note'>Trains in one shared step with {together} other job"
            f"{'s' if together != 1 else ''} on this base; each job learns exactly what it would alone.{who}</div>"
            if snap["live"] and state != "queued" and together else
            f"<div class='job-note'>{who[3:]}</div>" if who else "")
    bar_cls = "bar live" if snap["live"] else f"bar {state}"
    return (f"<div class='job {state}' data-state='{state}'><div class='job-head'>{head}</div>"
            f"<div class='{bar_cls}'><div class='fill' style='width:{pct:.1f}%'></div></div>"
            f"<div class='job-metrics'>{' · '.join(metrics)}</div>{notes}{busy}</div>")


def samples_html(snap: dict | None) -> str:
    if not snap or not snap["samples"]:
        return ("<div class='samples empty'>Sample generations from the fixed prompt appear here at each "
                "evaluation.</div>")
    rows = []
    for s in reversed(snap["samples"][-6:]):
        for item in s["samples"]:
            rows.append(f"<div class='sample'><div class='sample-step'>step {s['step']}</div>"
                        f"<div class='sample-text'><b>{html.escape(item['prompt'])}</b>"
                        f"{html.escape(item['text'])}</div></div>")
    return f"<div class='samples'>{''.join(rows)}</div>"


JOB_COLUMNS = ["job", "user", "adapter", "base", "state", "step", "loss", "queue"]
JOB_COLUMN_WIDTHS = ["8%", "14%", "24%", "8%", "12%", "12%", "11%", "11%"]  # every column in view at 1280 px


def jobs_table(studio: Studio, owner: str | None) -> list[list]:
    """Every running and queued job (then the recently ended), for the table all users see. Without
    sign-in, users are 'you' and 'another browser': browser ids are never shown."""
    rows = []
    for job in studio.runs.jobs()[:30]:
        snap = job.snapshot()
        who = snap["user"] or ("you" if owner is not None and snap["owner"] == owner else "another browser")
        p = snap["progress"]
        loss = f"{snap['points'][-1]['loss']:.4f}" if snap["points"] else ""
        rows.append([f"#{snap['id']}", who, snap["name"], snap["base_id"], snap["state"],
                     f"{p.get('step', 0)}/{p.get('steps', 0)}", loss, snap["position"] or ""])
    return [[scrub(str(c)) for c in row] for row in rows]


def job_choices(studio: Studio, owner: str | None) -> list[tuple[str, str]]:
    """(label, job id) of the jobs a page may follow: yours first, then everyone's."""
    jobs = sorted(studio.runs.jobs(), key=lambda j: (j.user != owner or owner is None, -j.id))
    return [(scrub(f"#{j.id} {j.name} ({j.state})"), str(j.id)) for j in jobs[:30]]


def live_view(studio: Studio, seen, job_id=None, owner: str | None = None):
    """Timer tick: the followed job (`job_id`, else the owner's newest, else the newest) and the jobs table,
    each redrawn only when it changed since this page last drew it (`seen`: what it drew, as a list)."""
    snap = studio.runs.snapshot(job_id, owner)
    if snap is not None:
        snap["together"] = max(0, sum(j.state in ("running", "stopping") for j in studio.runs.jobs()) - 1)
    table, choices = jobs_table(studio, owner), job_choices(studio, owner)
    job_key = None if snap is None else f"{snap['id']}:{snap['version']}:{snap['together']}:{snap.get('start_eta')}"
    keys = [job_key, repr(table), repr(choices)]
    drawn = list(seen) if isinstance(seen, (list, tuple)) and len(seen) == 3 else [None, None, None]
    outs = [gr.skip()] * 5
    if job_key != drawn[0] or job_key is None and seen is None:
        fig = loss_figure(snap["points"], snap["evals"], snap["progress"].get("steps")) if snap else \
            loss_figure([], [])
        # every page polls this: one unencodable character in it would break the Train tab for all users
        outs[:3] = [scrub(job_html(snap)), fig, scrub(samples_html(snap))]
    if keys[1] != drawn[1]:
        outs[3] = gr.update(value=table)
    if keys[2] != drawn[2]:  # only when jobs come, go or change state: an open list is not redrawn
        outs[4] = gr.update(choices=choices)
    return (*outs, keys)


# ---- the tab ---------------------------------------------------------------------------------

def _training_settings(d: TrainForm) -> dict:
    """The Training settings accordion: steps, rates and what the run shows while it learns."""
    with gr.Accordion("Training settings", open=True, elem_id="train-training-settings"):
        with gr.Row():
            lr = Number(d.lr, label="Learning rate", elem_id="train-lr", min_width=110,
                        info="Peak step size of AdamW (warmup, then cosine decay); LoRA likes 1e-4 to 2e-3.")
            steps = Number(d.steps, precision=0, label="Steps", elem_id="train-steps", min_width=110,
                           info="Optimizer steps to run (to continue a stopped run: its new total).")
            seed = Number(d.seed, precision=0, label="Seed", elem_id="train-seed", min_width=110,
                          info="Fixes the adapter's start and the batch order: same seed = same run.")
        with gr.Row():
            batch = Number(d.batch, precision=0, label="Batch size", elem_id="train-batch", min_width=110,
                           info="Sequences per micro-batch; lower it if memory runs out.")
            accum = Number(d.accum, precision=0, label="Gradient accumulation", elem_id="train-accum",
                           min_width=110,
                           info="Micro-batches summed per step: a bigger batch at no memory cost.")
            seq_len = Number(d.seq_len, precision=0, label="Sequence length", elem_id="train-seq",
                             min_width=110,
                             info="Tokens of context per training sequence (at most the model's 1024).")
        with gr.Row():
            eval_interval = Number(d.eval_interval, precision=0, label="Eval interval", elem_id="train-eval",
                                   min_width=110,
                                   info="Measure validation loss and draw samples every N steps.")
            prompt = gr.Textbox(d.prompt, label="Sample prompt", elem_id="train-prompt", min_width=110,
                                max_length=MAX_PROMPT_CHARS,
                                info="A fixed prompt continued at each evaluation, to see the style emerge.")
        report_to = gr.Dropdown(list(REPORT_TO), value=d.report_to, label="Log to", elem_id="train-report-to",
                                info="Also log the run's metrics to a tracker, offline: tensorboard and wandb "
                                     "write in the run's folder, trackio in <library>/.trackio.")
    return dict(lr=lr, steps=steps, seed=seed, batch=batch, accum=accum, seq_len=seq_len,
                eval_interval=eval_interval, prompt=prompt, report_to=report_to)


def _lora_settings(studio: Studio, d: TrainForm) -> dict:
    """The LoRA and Advanced LoRA accordions, folded: settings a first run leaves alone."""
    # rarely changed: folded away (Gradio still renders them, so the form sends their values)
    with gr.Accordion("LoRA settings", open=False, elem_id="train-lora-settings"):
        targets = CheckboxGroup(list(TARGET_MODULES), value=d.targets, label="Target modules",
                                elem_id="train-targets",
                                info="Which projections in every block get a LoRA update: "
                                     + "; ".join(f"{k}: {v}" for k, v in TARGET_HELP.items()) + ".")
        size = gr.Markdown(size_md(studio, d.model, d.targets, d.rank), elem_id="train-size")
        with gr.Row():
            r = Slider(1, 64, value=d.rank, step=1, label="Rank", elem_id="train-rank", min_width=110,
                       info="Size of the low-rank update: higher = more capacity and parameters.")
            alpha = Number(d.alpha, label="Alpha", elem_id="train-alpha", min_width=110,
                           info="Scales the update by alpha / rank; 2 × rank is a common choice.")
            dropout = Slider(0.0, 0.5, value=d.dropout, step=0.05, label="Dropout", elem_id="train-dropout",
                             min_width=110,
                             info="Randomly drops LoRA inputs while training to reduce overfitting.")
            dora = gr.Checkbox(d.dora, label="DoRA", elem_id="train-dora", min_width=110,
                               info="Also learns each output's magnitude: often better at low rank, close to "
                                    "full fine-tuning; steps are slower and use more memory. Cannot be blended.")
    with gr.Accordion("Advanced LoRA", open=False, elem_id="train-advanced-lora"):
        with gr.Row():
            rslora = gr.Checkbox(d.rslora, label="rsLoRA", elem_id="train-rslora", min_width=110,
                                 info="Scale by alpha / √rank instead of alpha / rank: choose it for high "
                                      "ranks (32+), which otherwise learn too slowly.")
            init = gr.Dropdown(list(INITS), value=d.init, label="Initialisation", elem_id="train-init",
                               min_width=110,
                               info="kaiming: the standard start, the adapter begins as the base. gaussian: "
                                    "the same with a normal A. pissa / olora: start from the base weights' "
                                    "main directions for faster early progress on small budgets; the saved "
                                    "adapter is a plain LoRA of twice the rank (larger file).")
            loraplus = Number(d.loraplus_lr_ratio, label="LoRA+ ratio", elem_id="train-loraplus",
                              min_width=110,
                              info="B learns this many times faster than A (LoRA+); 16 often "
                                   "converges faster, 1 is plain LoRA.")
        with gr.Row():
            rank_pattern = gr.Textbox(d.rank_pattern, label="Rank pattern (JSON)", elem_id="train-rank-pattern",
                                      placeholder='{"h.0.attn.c_attn": 4}',
                                      info="Per-layer ranks, as PEFT's rank_pattern: give layers that matter "
                                           "more a higher rank, others less (fewer parameters).")
            alpha_pattern = gr.Textbox(d.alpha_pattern, label="Alpha pattern (JSON)",
                                       elem_id="train-alpha-pattern", placeholder='{"mlp.c_fc": 8}',
                                       info="Per-layer alphas, as PEFT's alpha_pattern.")
    return dict(targets=targets, size=size, rank=r, alpha=alpha, dropout=dropout, dora=dora, rslora=rslora,
                init=init, loraplus=loraplus, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _live_column() -> dict:
    """The followed job's card, chart and samples, and every job of the studio."""
    follow = gr.Dropdown([], value="", label="Follow job", elem_id="train-follow",
                         allow_custom_value=True,  # choices change as jobs come and go
                         info="Your jobs first. The chart, samples, Stop and Resume act on this job.")
    job = gr.HTML(job_html(None), elem_id="train-job")
    chart = gr.Plot(loss_figure([], []), label="Loss and learning rate", elem_id="train-chart")
    gr.Markdown("### Samples at each evaluation")
    samples = gr.HTML(samples_html(None), elem_id="train-samples")
    gr.Markdown("### Training jobs on this studio\n<span class='help'>Jobs on the loaded base train "
                "together in one shared step; the rest wait in the queue, in order.</span>")
    table = gr.Dataframe(headers=JOB_COLUMNS, value=[], interactive=False, elem_id="train-jobs",
                         wrap=True, column_widths=JOB_COLUMN_WIDTHS)
    return dict(follow=follow, job=job, chart=chart, samples=samples, table=table)


def create_train_tab(studio: Studio) -> dict:
    gr.Markdown("## 2 · Train\nPick a base model and a dataset, choose where LoRA adds its small trainable "
                "matrices, and watch it learn. Only the adapter is trained; the base stays frozen.",
                elem_classes="tab-intro")
    seen = gr.State(None)
    # the browser's random id (who owns a job without sign-in), kept across reloads in its local storage
    # rendered outside the tabs (saved_state.wire): in a tab not shown yet, the page would not have read its value
    browser = gr.BrowserState("", storage_key="lora-studio-browser", render=False)
    me = gr.State("")  # the same id on the server side: handlers read it (a State is not an API argument)
    d = TrainForm(model=studio.default_model)  # the page's starting values
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, elem_classes="settings"):
            # the action bar comes first: Start, Stop and Resume stay in reach on a laptop screen (1280x720)
            with gr.Row(elem_classes="action-bar", elem_id="train-actions"):
                start_btn = gr.Button("▶ Start training", variant="primary", elem_id="train-start", min_width=100)
                stop_btn = gr.Button("■ Stop", variant="stop", elem_id="train-stop", min_width=80)
                resume_btn = gr.Button("⟳ Resume", elem_id="train-resume", min_width=80)
            action = gr.Markdown(elem_id="train-action")
            model = gr.Dropdown(CHOICES, value=d.model, label="Base model", elem_id="train-model",
                                info="The pretrained GPT-2 to adapt; bigger models learn better but need more "
                                     "memory and time. 'tiny' is random and offline.")
            model_status = gr.Markdown(model_status_md(studio, d.model), elem_id="train-model-status")
            with gr.Row(equal_height=False):
                # choices are a snapshot; API clients may name a dataset made since (checked on Start)
                dataset = gr.Dropdown(dataset_choices(studio), value=None, label="Dataset", scale=4,
                                      allow_custom_value=True,
                                      elem_id="train-dataset",
                                      info="A dataset saved on the Data tab: the text the adapter learns from.")
                refresh = gr.Button("↻", scale=0, min_width=44, size="sm", elem_id="train-refresh",
                                    elem_classes="refresh-btn")
            name = gr.Textbox(label="Adapter name", elem_id="train-name", placeholder="automatic",
                              info="Library name of the new adapter; empty = dataset-model-date. Resume uses it too.")
            estimate = gr.Markdown(estimate_md(studio, d), elem_id="train-estimate")
            limits = gr.Markdown(limits_md(studio), elem_id="train-limits")
            # --admin-token: the person running a studio without sign-in stops anyone's job (the one followed)
            admin_token = gr.Textbox("", label="Admin token", type="password", elem_id="train-admin-token",
                                     visible=studio.admin_token is not None,
                                     info="Given at start-up (--admin-token): Stop then stops the followed job, "
                                          "whoever started it.")
            # no minimum= on the numbers below: make_configs and the configs' checks explain every bound in one sentence
            # (Gradio's own check answers "Value 0 is less than minimum value 1." and logs a traceback)
            c = {**_training_settings(d), **_lora_settings(studio, d)}
        with gr.Column(scale=6, elem_classes="live"):
            c.update(_live_column())
    follow, job, chart, samples, table = (c[k] for k in ("follow", "job", "chart", "samples", "table"))
    def tick(drawn, followed, browser_id, known, request: gr.Request):
        kept = new_browser_id(browser_id if browser_id else known)
        if studio.chunked is not None:  # ZeroGPU: the next chunk of this page's run, in this request
            studio.chunked.tick(followed or None, requester(request, kept))
        valid = isinstance(drawn, (list, tuple)) and len(drawn) == 4  # live_view's keys, then the limits drawn
        *views, keys = live_view(studio, list(drawn[:3]) if valid else None, followed or None,
                                 requester(request, kept))
        note = limits_md(studio)  # the teacher may change the caps meanwhile
        return (*views, keys + [note], gr.skip() if kept == browser_id else kept, kept,
                gr.skip() if valid and note == drawn[3] else note)

    # the page's id as soon as it loads (stored in the browser by the page's restore, saved_state, or the first
    # tick). Gradio may run this before the browser's stored value has arrived: an id already known is kept then
    gr.on(None, lambda current, known: new_browser_id(current or known), inputs=[browser, me], outputs=me,
          show_progress="hidden", api_visibility="private")
    timer = gr.Timer(REFRESH_SECONDS, active=False)  # on only while this tab is shown: build_ui switches it
    # queue=False: a poll is a quick read, and the queue's join and event stream cost more than it (6 pages
    # polling took 0.155-0.170 cores of the server against 0.202-0.207 queued; 0.057 with none polling)
    timer.tick(tick, inputs=[seen, follow, browser, me],
               outputs=[job, chart, samples, table, follow, seen, browser, me, limits],
               concurrency_limit=None, show_progress="hidden", api_visibility="private", queue=False)
    # a newly chosen job is drawn at once, not at the next change
    follow.input(lambda: None, outputs=seen, show_progress="hidden", api_visibility="private")

    # the form as TrainForm's fields, in its order (the start_training API's argument order)
    form = dict(model=model, dataset=dataset, name=name, targets=c["targets"], rank=c["rank"], alpha=c["alpha"],
                dropout=c["dropout"], lr=c["lr"], steps=c["steps"], batch=c["batch"], accum=c["accum"],
                seq_len=c["seq_len"], eval_interval=c["eval_interval"], seed=c["seed"], prompt=c["prompt"],
                report_to=c["report_to"], dora=c["dora"], rslora=c["rslora"], init=c["init"],
                loraplus_lr_ratio=c["loraplus"], rank_pattern=c["rank_pattern"], alpha_pattern=c["alpha_pattern"])
    settings = {k: form[k] for k in SETTINGS}
    gr.on([x.change for x in settings.values()], lambda **values: estimate_md(studio, TrainForm(**values)),
          inputs_kwargs=settings, outputs=estimate, show_progress="hidden", trigger_mode="always_last",
          api_visibility="private")
    sized = [model, c["targets"], c["rank"], c["dora"], c["init"], c["rank_pattern"]]
    gr.on([x.change for x in sized], lambda *values: size_md(studio, *values),
          inputs=sized, outputs=c["size"], show_progress="hidden", trigger_mode="always_last",
          api_visibility="private")
    model.change(lambda m: model_status_md(studio, m), inputs=model, outputs=model_status, show_progress="hidden",
                 api_visibility="private")
    def refresh_mine(cur, request: gr.Request):
        return refresh_datasets(studio, cur, user=user_of(request))

    refresh.click(refresh_mine, inputs=dataset, outputs=dataset, api_visibility="private")

    def followed(run: str):
        job = studio.runs.training(run)
        return gr.update(value=str(job.id)) if job is not None else gr.skip()

    def do_start(request: gr.Request, browser_id="", progress=gr.Progress(), **values):
        msg, run = start(studio, TrainForm(**values), user_of(request), progress,
                         owner=requester(request, browser_id), address=address_of(request, studio))
        return msg, run, model_status_md(studio, values["model"]), followed(run)

    def do_stop(job_id, browser_id, admin_token, request: gr.Request):
        try:
            return stop(studio, user_of(request), job_id or None, owner=requester(request, browser_id),
                        admin_token=admin_token if isinstance(admin_token, str) else None)
        except ValueError as e:  # a refusal, shown where the page reports its actions (Stop is not queued)
            return f"⚠ {html.escape(sentence(scrub(str(e))))}"

    def do_resume(run_name, total_steps, job_id, browser_id, request: gr.Request, progress=gr.Progress()):
        msg, run = resume(studio, run_name, total_steps, user_of(request), progress,
                          owner=requester(request, browser_id), job_id=job_id or None,
                          address=address_of(request, studio))
        return msg, run, followed(run)

    # the action line under the buttons is where every Start, Stop and Resume reports, refusals too
    start_btn.click(friendly(do_start, status=action), inputs_kwargs={**form, "browser_id": me},
                    outputs=[action, name, model_status, follow], concurrency_id="train-control",
                    api_name="start_training")
    stop_btn.click(do_stop, inputs=[follow, me, admin_token], outputs=action, queue=False, api_name="stop_training")
    resume_btn.click(friendly(do_resume, status=action), inputs=[name, c["steps"], follow, me], outputs=[action, name, follow],
                     concurrency_id="train-control", api_name="resume_training")
    return {**c, "model": model, "model_status": model_status, "dataset": dataset, "name": name,
            "estimate": estimate, "start": start_btn, "stop": stop_btn, "resume": resume_btn, "action": action,
            "timer": timer, "browser": browser, "me": me, "form": form}

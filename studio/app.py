"""build_ui(): the five tabs around one shared Engine (base model + adapters) and the training Runs (core.train.runs).

Process-wide objects (engine, training jobs, folders) live in a Studio that the tabs close over; gr.State
holds only small per-session values (the session's uploaded text, which job version a page drew).
"""
from __future__ import annotations

import asyncio
import html
import importlib.util
import os
import sys
from contextlib import asynccontextmanager

import anyio
import gradio as gr

from core.api import Engine, GpuCalls, Quota, is_real, is_whole, parse_size, pick_device, precision_dtype, preset_of

from . import fair_queue, job_notice, saved_state
from .context import UPLOADS_KEPT_S, Studio, StudioBlocks, friendly, typed_name, user_of
from .style import CSS, theme
from .tabs.arena import create_arena_tab, round_choices
from .tabs.teacher import create_teacher_tab
from .tabs.compare import adapter_choices, create_compare_tab
from .tabs.data import create_data_tab
from .tabs.data_view import saved_datasets_md
from .tabs.evaluate import create_evaluate_tab, from_compare
from .tabs.library import create_library_tab, refresh as library_refresh
from .tabs.train import create_train_tab, refresh_datasets

LOGO = ("<svg class='logo' viewBox='0 0 24 24' width='26' height='26' aria-hidden='true'>"
        "<rect x='1' y='1' width='22' height='22' rx='6' fill='#4f46e5'/>"
        "<path d='M7 6v12M12 6v12M17 6v12' stroke='#c7d2fe' stroke-width='1.6' stroke-linecap='round'/>"
        "<circle cx='7' cy='14' r='2.2' fill='#fff'/><circle cx='12' cy='9' r='2.2' fill='#fff'/>"
        "<circle cx='17' cy='12' r='2.2' fill='#fff'/></svg>")
MAX_FILE_SIZE = "300mb"  # uploads: text up to core.train.data's 256 MiB, adapters up to 256 MiB
# Gradio keeps every upload and every download it hands out in its cache: without this, forever (anyone
# who can reach the page can POST files). Checked every 5 minutes; all of it goes when the server stops.
DELETE_CACHE = (300, UPLOADS_KEPT_S)
MAX_CACHE_BYTES = 4 * 2**30  # ... and within the hour, the oldest files go once the cache holds more than this
TRIM_EVERY_S = 30


QUEUE_SIZE = 64  # requests waiting in all past which only someone with none waiting gets in (studio.fair_queue)
MAX_JOB_TOKENS = 100_000_000  # --max-job-tokens' default: minutes on a GPU for gpt2, hours for gpt2-xl


def create_studio(library="adapters", datasets="datasets", device="auto", model="gpt2", weights=None,
                  auth=False, max_train_memory: str | int | None = None, admins=(),
                  max_rows_per_user: int = 8, max_new_tokens: int = 512,
                  torch_threads: int | None = None, max_jobs_per_user: int = 1,
                  train_capacity: int | None = None, precision: str = "auto",
                  max_queued_per_user: int = 8, users_per_address: int = 4,
                  max_job_tokens: int | None = MAX_JOB_TOKENS, admin_token: str | None = None, quota: Quota | None = None,
                  max_job_steps: int | None = None, max_job_minutes: float | None = None) -> Studio:
    """max_train_memory: --max-train-memory ('8GB', or bytes): cap on a training run's estimated peak.
    admins: with sign-in, users who may stop, resume, rename and delete anyone's runs.
    max_rows_per_user: --max-rows-per-user.
    max_new_tokens: --max-new-tokens, new tokens one Compare request may ask for (the Engine refuses more).
    torch_threads: --torch-threads, torch's CPU threads per operation for the whole process (None: torch's choice).
    The decode loop and a training run each use that many: on a 2-core machine 2 + 2 oversubscribe the cores.
    max_jobs_per_user: --max-jobs-per-user; train_capacity: --train-capacity (tokens per shared training step).
    precision: --precision auto|fp32|bf16, the frozen base's dtype (core.device.precision_dtype).
    max_queued_per_user: --max-queued-per-user, requests one user may have waiting or running (studio.fair_queue);
    users_per_address: --users-per-address, without sign-in how many users one client address counts as (0: off).
    max_job_tokens: --max-job-tokens, a training job's steps x tokens per step at most (None: no limit).
    max_job_steps, max_job_minutes: --max-job-steps, --max-job-minutes, a job's steps and training time at most
    (None: no limit); a job over the steps is refused at Start, one reaching the minutes is stopped and saved.
    admin_token: --admin-token, a secret whose holder may stop anyone's job (at least 16 characters).
    quota: per-user disk caps and the free-space floor (default: Quota.for_studio(), the flags' defaults)."""
    cap = parse_size(max_train_memory) if max_train_memory is not None else None
    if not is_whole(max_rows_per_user, 1):
        raise ValueError(f"--max-rows-per-user must be a whole number of at least 1 (got {max_rows_per_user!r}).")
    for flag, value in (("--max-jobs-per-user", max_jobs_per_user), ("--train-capacity", train_capacity),
                        ("--max-queued-per-user", max_queued_per_user), ("--max-job-tokens", max_job_tokens),
                        ("--max-job-steps", max_job_steps)):
        if value is not None and not is_whole(value, 1):
            raise ValueError(f"{flag} must be a whole number of at least 1 (got {value!r}).")
    if max_job_minutes is not None and not (is_real(max_job_minutes) and 0 < max_job_minutes < 1e9):
        raise ValueError(f"--max-job-minutes must be a number of minutes above 0 (got {max_job_minutes!r}).")
    if not is_whole(users_per_address, 0):
        raise ValueError(f"--users-per-address must be a whole number of at least 0 (got {users_per_address!r}).")
    if admin_token is not None and (not isinstance(admin_token, str) or len(admin_token) < 16
                                    or not admin_token.isascii() or not admin_token.isprintable()):
        raise ValueError("--admin-token must be at least 16 printable ASCII characters; make one with "
                         "python -c 'import secrets; print(secrets.token_urlsafe())'.")
    if not is_whole(max_new_tokens, 1):
        raise ValueError(f"--max-new-tokens must be a whole number of at least 1 (got {max_new_tokens!r}).")
    if torch_threads is not None:
        if not is_whole(torch_threads, 1):
            raise ValueError(f"--torch-threads must be a whole number of at least 1 (got {torch_threads!r}).")
        import torch
        torch.set_num_threads(torch_threads)  # threads started later (the decode loop, training runs) get it too
    gpu_calls = GpuCalls.here(precision, device)  # ZeroGPU: GPU work in GPU calls, CUDA never in this process
    dev = pick_device("cpu" if gpu_calls else device)
    engine = Engine(device=dev, library_dir=library, dtype=precision_dtype(precision, dev),
                    max_train_memory=cap,
                    max_rows_per_user=max_rows_per_user, max_new_tokens=max_new_tokens, gpu_calls=gpu_calls)
    studio = Studio(engine=engine, datasets_dir=datasets, default_model=model, weights=weights,
                    weights_for=model if weights else None, auth=auth, admins=frozenset(admins or ()),
                    max_jobs_per_user=max_jobs_per_user, train_capacity=train_capacity,
                    max_queued_per_user=max_queued_per_user, users_per_address=users_per_address,
                    max_job_tokens=max_job_tokens, admin_token=admin_token, max_job_steps=max_job_steps,
                    max_job_minutes=max_job_minutes,
                    quota=quota or Quota.for_studio())
    studio.probe.reachable()  # starts the hub check in the background; pages show its answer later
    return studio


def header_html(studio: Studio) -> str:
    dev = studio.engine.device
    return (f"<div class='studio-header'><h1>{LOGO}LoRA Studio</h1>"
            f"<span class='tagline'>Fine-tune GPT-2 on your own text with LoRA, watch it learn, compare "
            f"side by side.</span><span class='pill'>device: {html.escape(str(dev))}</span>"
            f"<span class='pill'>precision: {studio.precision} base, fp32 LoRA</span>"
            f"<span class='pill'>library: {html.escape(studio.library.root.name)}/</span></div>")


def identity_html(studio: Studio, request: gr.Request | None) -> str:
    """Who this page acts as: the signed-in user (an admin badge, a sign-out link), or that everyone shares one
    space without sign-in, or (a public demo) that the visitor works in a private sandbox. A student on a shared lab
    PC sees whose session is open."""
    if studio.demo is not None:
        return studio.demo.chip_html()
    user = user_of(request)
    if not studio.auth or user is None:
        return ("<div class='identity' id='identity'><span class='pill'>no sign-in: everyone on this server shares "
                "one space</span></div>")
    badge = " <span class='pill admin'>admin</span>" if user in studio.admins else ""
    return (f"<div class='identity' id='identity'><span class='pill'>signed in as <b>{html.escape(user)}</b></span>"
            f"{badge} <a href='/logout' class='signout'>sign out</a></div>")


def use_in_compare(studio: Studio, name: str | None, model: str, current, user: str | None = None):
    """Library -> Compare: switch to the adapter's base if it records a known one, add it, show the tab."""
    name = typed_name(name, "the selected adapter")
    if not name:
        gr.Warning("Select an adapter first.")
        return gr.skip()
    studio.check_adapter(name, user)
    base = preset_of(studio.library.details(name).get("base_model")) or model
    keep = current if base == model else []
    return base, adapter_choices(studio, base, keep, add=name, user=user), gr.Tabs(selected="compare")


def skip_matplotlib_lookups() -> None:
    """Gradio imports matplotlib twice per event (every streamed update), to switch its plot backend. The
    studio does not need matplotlib; where it is not installed, each of those imports searched sys.path
    again on the server's event loop, its stat calls waiting for the GIL behind decoding and training (a
    visible share of that thread under load). A None in sys.modules makes the import fail at once, as it
    would anyway."""
    if "matplotlib" not in sys.modules and importlib.util.find_spec("matplotlib") is None:
        sys.modules["matplotlib"] = None


def build_ui(studio: Studio) -> gr.Blocks:
    skip_matplotlib_lookups()
    with StudioBlocks(title="LoRA Studio", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.HTML(header_html(studio))
        identity = gr.HTML(identity_html(studio, None), elem_id="identity-box")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("1 · Data", id="data", elem_id="tab-data") as data_tab:
                data = create_data_tab(studio)
            with gr.Tab("2 · Train", id="train", elem_id="tab-train") as train_tab:
                train = create_train_tab(studio)
            with gr.Tab("3 · Library", id="library", elem_id="tab-library") as library_tab:
                library = create_library_tab(studio)
            with gr.Tab("4 · Compare", id="compare", elem_id="tab-compare") as compare_tab:
                compare = create_compare_tab(studio)
            with gr.Tab("5 · Evaluate", id="evaluate", elem_id="tab-evaluate") as evaluate_tab:
                evaluate = create_evaluate_tab(studio)
            with gr.Tab("6 · Arena", id="arena", elem_id="tab-arena") as arena_tab:
                arena = create_arena_tab(studio)
            with gr.Tab("7 · Teacher", id="teacher", elem_id="tab-teacher") as teacher_tab:
                teacher = create_teacher_tab(studio)

        # the Train tab's timer ticks only while that tab is shown. Each tick is a queued event whose skipped
        # outputs Gradio still rebuilds as components, so many open pages on any tab kept a small server's
        # cores busy while nothing ran. A page coming back is redrawn at its next tick.
        train_tab.select(lambda: gr.Timer(active=True), outputs=train["timer"], show_progress="hidden",
                         concurrency_limit=None, api_visibility="private")
        for other in (data_tab, library_tab, compare_tab, evaluate_tab, arena_tab, teacher_tab):
            other.select(lambda: gr.Timer(active=False), outputs=train["timer"], show_progress="hidden",
                         concurrency_limit=None, api_visibility="private")
        job_notice.wire(studio, train_tab, (data_tab, library_tab, compare_tab, evaluate_tab, arena_tab, teacher_tab),
                        train["me"])  # "your job finished", on the other tabs
        # a prepared dataset becomes selectable in Train at once (other pages refresh on tab select)
        # every list shows what the signed-in user may see (Studio.can_see), read as the page asks
        def prepared(n, cur, request: gr.Request):
            return refresh_datasets(studio, cur, select=(n or "").strip(), user=user_of(request))

        def train_shown(cur, m, request: gr.Request):
            return refresh_datasets(studio, cur, user=user_of(request)), studio.model_status(m)

        def library_shown(n, request: gr.Request):
            return library_refresh(studio, n, user_of(request))

        def compare_shown(m, cur, request: gr.Request):
            return adapter_choices(studio, m, cur, user=user_of(request)), studio.model_status(m)

        def evaluate_shown(m, cur, one, ds, request: gr.Request):
            return (*evaluate["refresh_all"](m, cur, one, ds, user_of(request)), studio.model_status(m))

        @friendly
        def arena_shown(r, b, m, request: gr.Request):
            return (round_choices(studio, r), arena["refresh_board"](r),
                    arena["model_choices"](b, m, user_of(request)))

        data["prepared"].success(prepared, inputs=[data["name"], train["dataset"]], outputs=train["dataset"],
                                 api_visibility="private")
        train_tab.select(train_shown, inputs=[train["dataset"], train["model"]],
                         outputs=[train["dataset"], train["model_status"]],
                         show_progress="hidden", api_visibility="private")
        library_tab.select(library_shown, inputs=library["picked"], outputs=library["lists"], show_progress="hidden",
                           api_visibility="private")
        compare_tab.select(compare_shown, inputs=[compare["model"], compare["adapters"]],
                           outputs=[compare["adapters"], compare["model_status"]], show_progress="hidden",
                           api_visibility="private")
        evaluate_tab.select(evaluate_shown,
                            inputs=[evaluate["model"], evaluate["adapters"], evaluate["diff_adapter"],
                                    evaluate["dataset"]], outputs=[*evaluate["lists"], evaluate["model_status"]],
                            show_progress="hidden", api_visibility="private")
        arena_tab.select(arena_shown, inputs=[arena["rounds"], arena["base"], arena["models"]],
                         outputs=[arena["rounds"], arena["board"], arena["models"]], show_progress="hidden",
                         api_visibility="private")
        teacher_tab.select(teacher["refresh"], inputs=teacher["token"], outputs=teacher["outputs"], show_progress="hidden",
                           api_visibility="private", queue=False)
        # "Use Compare's text": the first adapter column (prompt + continuation) and its adapter
        evaluate["from_compare"].click(from_compare, inputs=[compare["include_base"], compare["adapters"],
                                                             *compare["outputs"]],
                                       outputs=[evaluate["diff_text"], evaluate["diff_adapter"]],
                                       api_visibility="private")
        # a page opened later sees what exists now (choices built with the UI are a snapshot)
        def opened(request: gr.Request):
            user = user_of(request)
            return (refresh_datasets(studio, user=user), studio.model_status(studio.default_model),
                    adapter_choices(studio, studio.default_model, user=user),
                    studio.model_status(studio.default_model), *library_refresh(studio, None, user),
                    saved_datasets_md(studio, user))

        loaded = demo.load(opened, outputs=[train["dataset"], train["model_status"], compare["adapters"],
                                            compare["model_status"], *library["lists"], data["saved"]],
                           show_progress="hidden", api_visibility="private")
        saved_state.wire(studio, loaded, tabs, {"data": data_tab, "train": train_tab, "library": library_tab,
                                                "compare": compare_tab, "evaluate": evaluate_tab, "arena": arena_tab,
                                                "teacher": teacher_tab}, train)  # a reload keeps the page
        def who(request: gr.Request):
            return identity_html(studio, request)

        demo.load(who, outputs=identity, show_progress="hidden", api_visibility="private", queue=False)
        if studio.demo is not None:
            studio.demo.wire(demo)
        # "Use in Compare": add the selected adapter to the comparison and switch tabs
        @friendly
        def use(n, m, cur, request: gr.Request):
            return use_in_compare(studio, n, m, cur, user_of(request))

        library["use"].click(use,
                             inputs=[library["picked"], compare["model"], compare["adapters"]],
                             outputs=[compare["model"], compare["adapters"], tabs], api_visibility="private")
    demo.queue(default_concurrency_limit=1)
    fair_queue.install(demo, studio.max_queued_per_user, studio.users_per_address, QUEUE_SIZE)
    demo.studio = studio  # for tests and the entry point
    demo.parts = {"data": data, "train": train, "library": library, "compare": compare, "evaluate": evaluate,
                  "arena": arena, "teacher": teacher, "tabs": tabs}
    return demo


def trim_cache(demo: gr.Blocks, max_bytes: int | None = None) -> int:
    """Delete the oldest files Gradio keeps for this app (uploads, downloads) until the rest fit in `max_bytes`:
    anyone who can reach the page can POST files, and delete_cache alone lets an hour's worth pile up.
    Returns the bytes freed. A session whose upload went gets "upload it again" from the Data tab."""
    max_bytes = MAX_CACHE_BYTES if max_bytes is None else max_bytes
    files = []
    for kept in demo.temp_file_sets:
        for f in list(kept):  # a copy: the server adds files meanwhile
            try:
                st = os.lstat(f)
                files.append((st.st_ctime, st.st_size, f, kept))
            except OSError:
                kept.discard(f)
    excess = sum(size for _, size, _, _ in files) - max_bytes
    freed = 0
    for _, size, f, kept in sorted(files, key=lambda x: x[0]):
        if freed >= excess:
            break
        try:
            os.remove(f)
        except OSError:
            pass
        kept.discard(f)
        freed += size
    return freed


@asynccontextmanager
async def cache_trimmer(app):
    """Lifespan of the served app: trim Gradio's cache every TRIM_EVERY_S seconds while it runs."""
    async def loop():
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            await anyio.to_thread.run_sync(trim_cache, app.get_blocks())

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()


def launch_options(max_file_size: str = MAX_FILE_SIZE, demo=None) -> dict:
    """What every launch of the studio passes (theme/css go to launch() in Gradio 6); demo: studio.demo."""
    options = dict(theme=theme(), css=CSS, max_file_size=max_file_size, enable_monitoring=False,
                   footer_links=["gradio", "settings"], show_error=False, app_kwargs={"lifespan": cache_trimmer})
    return options if demo is None else demo.launch_options(options)

"""Compare tab: one prompt continued by the base and up to four adapters, side by side.

All columns are generated together in one batched pass with the same seed (core Engine.compare:
per-row adapter routing on the one shared base), so the only difference between columns is the
adapter. Each call streams its own generator: concurrent users never share outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from core.api import (DEFAULT_TEMPLATE, MAX_PROMPT_CHARS, AdapterError, SamplingConfig, check_text, preset_of,
                      read_dataset_meta, render_prompt)

from ..context import Studio, friendly, number, requester, typed_name, user_of, whole
from ..inputs import Number, Slider
from ..models import CHOICES

MAX_ADAPTERS = 4
COLUMNS = 1 + MAX_ADAPTERS
PRESET_PROMPTS = [
    "Once upon a time",
    "Ahoy! Today in the galley we cook",
    "ACT I. SCENE I. Enter",
    "no cap the bus this morning",
    "The best advice I ever got was",
]
STREAM_INTERVAL = 0.08  # seconds between one stream's UI updates, at least
# Each update is an event the server encodes and sends (Gradio's per-event CPU work): many streams each at
# STREAM_INTERVAL would swamp a small server. The streams share this budget instead: each one updates
# every max(STREAM_INTERVAL, streams / UPDATES_PER_S), so the total stays about this many per second.
UPDATES_PER_S = 50
QUEUE_NOTE = "waiting in the queue: position {}"  # shown under the prompt while a request waits for free rows
BATCHED_CONCURRENCY = 32  # compares served at once with batched generation (under anyio's 40 worker threads)


def compatible_adapters(studio: Studio, model_name: str, user: str | None = None) -> list[str]:
    """Library adapters that can run on base `model_name` (complete, valid, made for that base) and that the
    signed-in `user` may see (Studio.can_see)."""
    out = []
    for e in studio.adapters(user):
        if not e.has_final or e.problem or (e.status or "").startswith("training"):
            continue
        base = preset_of(e.base_model)
        if base is None or base == model_name:
            out.append(e.name)
    return out


ADAPTERS_INFO = "Library adapters made for this base; each gets its own column."
NO_ADAPTERS = "No adapters for this base yet: train one on the Train tab (the base model column works meanwhile)."


def adapter_choices(studio: Studio, model_name: str, current=None, add: str | None = None,
                    user: str | None = None):
    names = compatible_adapters(studio, model_name, user)
    value = [n for n in (current or []) if n in names]
    if add and add in names and add not in value:
        value = (value + [add])[-MAX_ADAPTERS:]
    return gr.update(choices=names, value=value, info=ADAPTERS_INFO if names else NO_ADAPTERS)


@dataclass
class CompareForm:
    """The Compare tab's form, as the page (or an API client) sends it: unchecked values of any kind. The
    defaults are the page's; the field order is the compare API's argument order."""
    model: str = "gpt2"  # the shared base
    include_base: bool = True  # a column without any adapter
    adapters: list = field(default_factory=list)  # library names, one column each
    prompt: str = PRESET_PROMPTS[0]
    temperature: float | None = 0.8
    top_k: float | None = 50
    top_p: float | None = 1.0
    max_tokens: float | None = 80
    seed: float | None = 1234  # shared by every column
    apply_template: bool = False  # wrap the prompt in the dataset's template ({prompt}, empty {response})


def dataset_template(studio: Studio, adapters: list[str]) -> str:
    """The template of the instruction dataset the first of `adapters` was trained on (studio.json records
    the dataset; its meta.json the template); the default template when none was (or it is gone)."""
    for a in adapters:
        try:
            ds = studio.library.details(a).get("meta", {}).get("dataset", {})
            folder = studio.dataset_store.find(ds.get("path"), ds.get("name")) if isinstance(ds, dict) else None
        except (ValueError, OSError, AdapterError):
            continue
        template = read_dataset_meta(folder).get("template") if folder else None
        if isinstance(template, str):
            return template
    return DEFAULT_TEMPLATE


def sampling(form: CompareForm) -> SamplingConfig:
    cfg = SamplingConfig(max_new_tokens=whole(form.max_tokens, "max new tokens"),
                         temperature=number(form.temperature, "temperature"), top_k=whole(form.top_k, "top-k"),
                         top_p=number(form.top_p, "top-p"), seed=whole(form.seed, "seed"))
    cfg.validate()
    return cfg


def update_interval(streams: int) -> float:
    """Seconds between one stream's updates while `streams` stream at once (see UPDATES_PER_S)."""
    return max(STREAM_INTERVAL, streams / UPDATES_PER_S)


def compare(studio: Studio, form: CompareForm, progress=None, user=None, signed_in: str | None = None):
    """Yield, for the five output columns and then the model status, gr.update()s: labels/visibility first,
    then the texts as they grow. user: who asks (signed-in user or session), for the rows-per-user cap of
    batched generation; signed_in: the signed-in user name, for which adapters they may use."""
    model_name, adapters = form.model, form.adapters
    if adapters is not None and not isinstance(adapters, (list, tuple)):
        raise ValueError("adapters must be a list of library names; pick them from the list.")
    if len(adapters or []) > MAX_ADAPTERS:
        raise ValueError(f"choose at most {MAX_ADAPTERS} adapters (got {len(adapters)}).")
    # library adapters only (the engine's one rule), refused before any base loads: never a live 'train:<run>'
    adapters = [studio.engine.check_adapter(typed_name(a, "an adapter name")) for a in adapters or []]
    if len(set(adapters)) != len(adapters):
        raise ValueError("each adapter can be chosen once.")
    for a in adapters:
        studio.check_adapter(a, signed_in)  # another user's private adapter: 'no adapter named ...'
    if not isinstance(model_name, str) or model_name not in CHOICES:
        raise ValueError(f"unknown base model {str(model_name)[:40]!r}; choose one of {', '.join(CHOICES)}.")
    columns = ([None] if form.include_base else []) + adapters
    if not columns:
        if not compatible_adapters(studio, model_name, signed_in):  # a first run: say where adapters come from
            raise ValueError("there are no adapters for this base yet: train one on the Train tab, or tick "
                             "\"Include the base model\" to see what the base writes alone.")
        raise ValueError("choose the base model and/or at least one adapter to compare.")
    prompt = check_text(form.prompt, "the prompt", MAX_PROMPT_CHARS)
    if not prompt.strip():
        raise ValueError("write a prompt (or pick a preset) to continue.")
    if form.apply_template:
        prompt = render_prompt(dataset_template(studio, adapters), prompt)
    cfg = sampling(form)
    if progress is not None and studio.loaded_base() != model_name:  # a progress message is an event too
        progress(0.05, desc=f"loading base model {model_name} (first use only)…")
    studio.base(model_name, (lambda m: progress(None, desc=m)) if progress is not None else None)
    labels = [f"Base model · {model_name}" if c is None else f"Adapter · {c}" for c in columns]
    texts = [prompt] * len(columns)
    # the status ("loaded") comes with the texts: a .then() for it was a second queued event per compare,
    # which cost a loaded server a large share of its answers per second (bench/load.py)
    status = studio.model_status(model_name)

    def updates(first: bool = False):
        # Only the first update changes labels and visibility: Gradio rebuilds a component (its config, the
        # signature of its __init__) for every gr.update() or gr.skip() it gets, on the server's event loop
        # (a large share of that thread under load). The streamed updates are plain values,
        # "" for the hidden columns (what they hold).
        out = []
        for i in range(COLUMNS):
            if i < len(columns):
                out.append(gr.update(value=texts[i], label=labels[i], visible=True) if first else texts[i])
            else:
                out.append(gr.update(value="", visible=False) if first else "")
        return out + [status]

    with studio.streams.one() as streams:
        # loads and validates the adapters, eagerly; the last texts always come, at once
        stream = studio.engine.compare(prompt, columns, cfg, user=user, every=lambda: update_interval(int(streams)))
        try:
            yield updates(first=True)
            for step in stream:
                if step.waiting:  # no free rows yet (batched generation): where this request stands
                    texts = [f"{prompt}\n\n{QUEUE_NOTE.format(step.waiting)}"] * len(columns)
                else:
                    texts = [prompt + t for t in step]
                yield updates()
        finally:
            stream.close()  # Stop or a closed page: the request is cancelled and its rows freed now


def create_compare_tab(studio: Studio) -> dict:
    d = CompareForm(model=studio.default_model)  # the page's starting values
    gr.Markdown("## 4 · Compare\nThe same prompt, the same seed, one batched pass: the base model and your "
                "adapters side by side, so the only difference is the adapter.", elem_classes="tab-intro")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            model = gr.Dropdown(CHOICES, value=d.model, label="Base model", elem_id="cmp-model",
                                info="The shared base every column runs on (loaded once, kept loaded).")
            model_status = gr.Markdown(studio.model_status(d.model), elem_id="cmp-model-status")
            with gr.Row(equal_height=False):
                adapters = gr.Dropdown(compatible_adapters(studio, d.model), value=d.adapters, multiselect=True,
                                       max_choices=MAX_ADAPTERS, label="Adapters (up to 4)", scale=4,
                                       allow_custom_value=True,  # adapters made after launch, checked on use
                                       elem_id="cmp-adapters",
                                       info=ADAPTERS_INFO if compatible_adapters(studio, d.model) else NO_ADAPTERS)
                refresh = gr.Button("↻", scale=0, min_width=44, size="sm", elem_id="cmp-refresh",
                                    elem_classes="refresh-btn")
            include_base = gr.Checkbox(d.include_base, label="Include the base model as a column", elem_id="cmp-base",
                                       info="Shows what the model writes without any adapter.")
        with gr.Column(scale=6):
            prompt = gr.Textbox(d.prompt, label="Prompt", lines=2, elem_id="cmp-prompt",
                                max_length=MAX_PROMPT_CHARS,  # the browser stops there; the server checks too
                                info="The text every column continues.")
            apply_template = gr.Checkbox(d.apply_template, label="Apply the dataset's template", elem_id="cmp-template",
                                         info="For adapters trained on instruction data: the prompt becomes the "
                                              "template's {prompt}, with an empty {response} for the model to write.")
            gr.Examples([[p] for p in PRESET_PROMPTS], inputs=prompt, label="Preset prompts")
            with gr.Row():
                temperature = Slider(0, 2, value=d.temperature, step=0.05, label="Temperature", elem_id="cmp-temp",
                                     min_width=110, info="0 = always the likeliest token; higher = wilder.")
                top_k = Slider(0, 200, value=d.top_k, step=1, label="Top-k", elem_id="cmp-topk", min_width=110,
                               info="Only the k likeliest tokens (0 = all).")
                top_p = Slider(0.05, 1, value=d.top_p, step=0.05, label="Top-p", elem_id="cmp-topp", min_width=110,
                               info="Only tokens holding this much probability (1 = off).")
                most = studio.engine.max_new_tokens  # --max-new-tokens (the engine refuses more)
                max_tokens = Slider(1, most, value=min(d.max_tokens, most), step=1, label="Max new tokens",
                                    elem_id="cmp-max", min_width=110, info="Tokens each column adds.")
                seed = Number(d.seed, precision=0, label="Seed", elem_id="cmp-seed", minimum=0, min_width=100,
                              info="Shared by every column: same seed = same text.")
            with gr.Row():
                go = gr.Button("Generate side by side", variant="primary", elem_id="cmp-generate")
                stop = gr.Button("Stop", elem_id="cmp-stop")
    with gr.Row(equal_height=True, elem_classes="outputs"):
        outputs = [gr.Textbox(label="Base model" if i == 0 else f"Adapter {i}", lines=10, max_lines=24,
                              interactive=False, visible=i == 0, buttons=["copy"], elem_id=f"cmp-out-{i}",
                              elem_classes="cmp-out") for i in range(COLUMNS)]

    model.change(lambda m: studio.model_status(m), inputs=model, outputs=model_status, show_progress="hidden",
                 api_visibility="private")
    def choices(m, cur, request: gr.Request):
        return adapter_choices(studio, m, cur, user=user_of(request))

    model.change(choices, inputs=[model, adapters], outputs=adapters, show_progress="hidden",
                 api_visibility="private")
    refresh.click(choices, inputs=[model, adapters], outputs=adapters, api_visibility="private")

    # the form as CompareForm's fields, in its order (the compare API's argument order)
    form = dict(model=model, include_base=include_base, adapters=adapters, prompt=prompt, temperature=temperature,
                top_k=top_k, top_p=top_p, max_tokens=max_tokens, seed=seed, apply_template=apply_template)

    def run(request: gr.Request, progress=gr.Progress(), **values):
        yield from compare(studio, CompareForm(**values), progress, user=requester(request), signed_in=user_of(request))
    run = friendly(run, status=model_status)  # a refusal replaces the tab's status line

    # every running compare is rows of the one decode loop, so many may run at once (each handler thread only
    # waits for its rows)
    limit = BATCHED_CONCURRENCY
    # postprocess=False: the handler yields strings, which a Textbox shows as they are; Gradio would otherwise
    # hop to a worker thread per column per streamed update to run Textbox.postprocess (str(value))
    event = go.click(run, inputs_kwargs=form, outputs=[*outputs, model_status], concurrency_limit=limit,
                     concurrency_id="generate", api_name="compare", postprocess=False)
    stop.click(None, cancels=[event], queue=False, api_visibility="private")
    return {"model": model, "model_status": model_status, "include_base": include_base, "adapters": adapters,
            "refresh": refresh, "prompt": prompt, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "max_tokens": max_tokens, "seed": seed, "apply_template": apply_template, "generate": go, "stop": stop, "outputs": outputs}

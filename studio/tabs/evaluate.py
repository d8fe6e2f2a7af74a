"""Evaluate tab: numbers for "did it learn?" and colours for "what did it learn?".

Evaluation scores the base and up to 8 adapters on the same text (a dataset split or pasted text), all
in one batched pass (core Engine.evaluate: each window once per model, per-row adapter routing), and
shows loss, perplexity, tokens and time as a table and bars. Token differences colour each token of a
text by how much likelier (green) or less likely (red) one adapter makes it than the base.

It is a tab of its own, not a part of Compare: Compare samples text (a prompt, sampling settings, at most
4 columns streaming), while evaluation reads text that exists (a split, up to 9 models, no sampling), and
its results (a table, a chart, a coloured text) need the width of the page.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field

import gradio as gr

from core.api import EVAL_MAX_MODELS as MAX_MODELS, EVAL_TOKENS, MAX_PROMPT_CHARS, check_text, scrub, text_ids

from ..context import Studio, friendly, typed_name, user_of, whole
from ..inputs import Slider
from ..models import CHOICES
from ..plots import eval_figure
from .compare import compatible_adapters
from .train import dataset_choices

MAX_ADAPTERS = MAX_MODELS - 1  # 8, beside the base
MAX_EVAL_TEXT_CHARS = 8 * EVAL_TOKENS  # pasted text to evaluate on (~4 characters a token, with room to spare)
SOURCES = ("Dataset split", "Pasted text")
COLUMNS = ["model", "loss", "perplexity", "tokens", "seconds"]
SPLITS = ("val", "train")


@dataclass
class EvalForm:
    """The evaluation form as the page (or an API client) sends it: unchecked values of any kind."""
    model: str = "gpt2"  # the shared base
    include_base: bool = True  # score the base alone too (a row without any adapter)
    adapters: list = field(default_factory=list)  # library names, one row each (up to 8)
    source: str = SOURCES[0]  # score a dataset split, or the pasted text
    dataset: str | None = None  # a dataset name (source = dataset)
    split: str = "val"  # 'val' or 'train'
    text: str = ""  # the pasted text (source = pasted text)
    seq_len: float | None = 128  # tokens of context per window
    max_tokens: float | None = 4096  # tokens scored per model at most (an even sample of a longer split)


@dataclass
class DiffForm:
    """The "what did it learn" form: one text, one adapter against the base."""
    model: str = "gpt2"  # the shared base
    adapter: str | None = None  # a library name
    text: str = ""  # the text to colour, e.g. a Compare prompt with its continuation


def _model(name) -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"unknown base model {str(name)[:40]!r}; choose one of {', '.join(CHOICES)}.")
    return name


def _adapter(studio: Studio, name, user: str | None = None) -> str:
    """A typed adapter name that is in the library and that `user` may see (checked before any model is
    loaded)."""
    name = typed_name(name, "an adapter name")
    if not name:
        raise ValueError("choose an adapter.")
    studio.engine.check_adapter(name)  # the engine's one rule: a library adapter (AdapterError otherwise)
    studio.check_adapter(name, user)  # another user's private one: the same answer
    return name


def _ids(studio: Studio, form: EvalForm, user: str | None = None):
    """The token ids to score, where they came from (for the summary) and their loss mask (instruction data:
    only response tokens are scored; None = every token)."""
    if form.source == SOURCES[1]:
        text = check_text(form.text, "the text to evaluate on", MAX_EVAL_TEXT_CHARS)
        if not text.strip():
            raise ValueError("paste some text to evaluate on (or choose a dataset split).")
        return text_ids(text), "the pasted text", None
    if form.source != SOURCES[0]:
        raise ValueError(f"the source must be one of: {', '.join(SOURCES)}.")
    name = typed_name(form.dataset, "the dataset name")
    if not name:
        raise ValueError("choose a dataset (prepare one on the Data tab), or paste text instead.")
    if form.split not in SPLITS:
        raise ValueError("the split must be val or train.")
    ds = studio.dataset(name, user)  # 'no dataset named ...', also for another user's private one
    ids = ds.val if form.split == "val" else ds.train
    if len(ids) < 2:
        raise ValueError(f"the {form.split} split of {name} holds {len(ids)} tokens, too few to evaluate; "
                         f"choose the other split or paste text.")
    mask = ds.val_mask if form.split == "val" else ds.train_mask
    return ids, f"the {form.split} split of {name}" + (" (response tokens only)" if mask is not None else ""), mask


def evaluate(studio: Studio, form: EvalForm, progress=None, user: str | None = None):
    """(table rows, figure, summary markdown) for the form; ValueError/AdapterError for bad input, raised
    before anything is loaded. user: the signed-in user (who may use which adapters and datasets)."""
    model_name = _model(form.model)
    adapters = form.adapters
    if adapters is not None and not isinstance(adapters, (list, tuple)):
        raise ValueError("adapters must be a list of library names; pick them from the list.")
    if len(adapters or []) > MAX_ADAPTERS:
        raise ValueError(f"choose at most {MAX_ADAPTERS} adapters (got {len(adapters)}).")
    adapters = [_adapter(studio, a, user) for a in adapters or []]
    if len(set(adapters)) != len(adapters):
        raise ValueError("each adapter can be chosen once.")
    models = ([None] if form.include_base else []) + adapters
    if not models:
        raise ValueError("choose the base model and/or at least one adapter to evaluate.")
    seq_len, max_tokens = whole(form.seq_len, "the sequence length"), whole(form.max_tokens, "tokens to evaluate")
    if not 1 <= max_tokens <= EVAL_TOKENS:
        raise ValueError(f"tokens to evaluate must be from 1 to {EVAL_TOKENS:,} (got {max_tokens:,}).")
    ids, where, mask = _ids(studio, form, user)
    if progress is not None:
        progress(0.05, desc=f"loading base model {model_name} (first use only)…")
    studio.base(model_name, (lambda m: progress(None, desc=m)) if progress is not None else None)
    if progress is not None:
        progress(0.3, desc=f"scoring {len(models)} model(s) in one batched pass…")
    ev = studio.engine.evaluate(ids, models, seq_len, max_tokens, mask=mask, user=user)
    rows = [{"model": "base" if m is None else m, "base": m is None, "loss": s.loss, "ppl": s.ppl,
             "tokens": s.tokens, "seconds": ev.seconds} for m, s in zip(models, ev.scores)]
    table = [[r["model"], round(r["loss"], 4), round(r["ppl"], 2), r["tokens"], round(r["seconds"], 2)] for r in rows]
    summary = (f"Scored **{ev.tokens:,} tokens** of {html.escape(where)} per model ({ev.windows:,} window(s) of up to "
               f"{ev.seq_len} tokens): **{len(models)} model(s) in one batched pass**, {ev.forwards} forward(s), "
               f"**{ev.seconds:.2f} s** in all (the time is shared by every row). Lower loss = the model finds the "
               f"text more predictable; perplexity is e<sup>loss</sup>.")
    return table, eval_figure(rows), scrub(summary)


def _colour(diff: float, scale: float) -> str:
    alpha = 0.08 + 0.6 * min(1.0, abs(diff) / scale)
    return f"rgba(16, 185, 129, {alpha:.2f})" if diff >= 0 else f"rgba(239, 68, 68, {alpha:.2f})"


def diff_html(diffs, adapter: str) -> str:
    """The tokens as spans coloured by logp_adapter - logp_base (green likelier, red less likely), the values
    in each span's title; every text escaped."""
    if not diffs:
        return "<div class='token-view empty'>Coloured tokens appear here.</div>"
    scale = max(1e-6, max(abs(d.diff) for d in diffs))
    spans = []
    for d in diffs:
        tip = html.escape(f"{d.text!r}: log-prob base {d.logp_base:.3f}, {adapter} {d.logp_adapter:.3f}, "
                          f"difference {d.diff:+.3f}", quote=True)
        text = html.escape(d.text).replace("\n", "↵\n")
        spans.append(f"<span class='dtok' style='background:{_colour(d.diff, scale)}' title='{tip}'>{text}</span>")
    mean = sum(d.diff for d in diffs) / len(diffs)
    likelier = sum(d.diff > 0 for d in diffs)
    top = sorted(diffs, key=lambda d: -d.diff)[:5]
    top_html = ", ".join(f"<code>{html.escape(repr(d.text))}</code> {d.diff:+.2f}" for d in top)
    caption = (f"{len(diffs):,} tokens: {html.escape(adapter)} makes {likelier:,} likelier (green) and "
               f"{len(diffs) - likelier:,} less likely (red) than the base; mean difference {mean:+.3f} nats. "
               f"Colour strength is relative to the largest difference ({scale:.3f}). Hover a token for its values. "
               f"Most boosted: {top_html}.")
    return scrub(f"<div class='token-caption'>{caption}</div><div class='token-view'>{''.join(spans)}</div>")


def differences(studio: Studio, form: DiffForm, user: str | None = None) -> str:
    """The coloured tokens of the form's text (html); ValueError/AdapterError before anything is loaded."""
    model_name = _model(form.model)
    adapter = _adapter(studio, form.adapter, user)
    text = check_text(form.text, "the text", MAX_PROMPT_CHARS)
    if not text.strip():
        raise ValueError("write or paste a text to colour (for example a Compare prompt and its continuation).")
    studio.base(model_name)
    return diff_html(studio.engine.token_differences(text, adapter, user=user), adapter)


def from_compare(include_base, adapters, *texts):
    """(text, adapter) for the differences form from Compare: its first adapter column (prompt + continuation)."""
    adapters = [a for a in adapters or [] if isinstance(a, str)]
    if not adapters:
        gr.Warning("Compare has no adapter column yet: choose an adapter there and generate first.")
        return gr.skip(), gr.skip()
    text = texts[1 if include_base else 0] if len(texts) > 1 else ""
    return (text or gr.skip()), adapters[0]


def adapter_update(studio: Studio, model_name: str, current=None, multiselect: bool = True,
                   user: str | None = None):
    names = compatible_adapters(studio, model_name, user)
    if multiselect:
        return gr.update(choices=names, value=[n for n in (current or []) if n in names][:MAX_ADAPTERS])
    return gr.update(choices=names, value=current if current in names else None)


def create_evaluate_tab(studio: Studio) -> dict:
    d = EvalForm(model=studio.default_model)
    gr.Markdown("## 5 · Evaluate\nHow well does each adapter predict a text, and which tokens did it learn? Its own "
                "tab, not part of Compare: Compare samples new text from a prompt, while this scores text that "
                "exists (a dataset split or yours) under up to 9 models in one batched pass.",
                elem_classes="tab-intro")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            model = gr.Dropdown(CHOICES, value=d.model, label="Base model", elem_id="ev-model",
                                info="The shared base every model runs on.")
            model_status = gr.Markdown(studio.model_status(d.model), elem_id="ev-model-status")
            with gr.Row(equal_height=False):
                adapters = gr.Dropdown(compatible_adapters(studio, d.model), value=[], multiselect=True,
                                       max_choices=MAX_ADAPTERS, label=f"Adapters (up to {MAX_ADAPTERS})", scale=4,
                                       allow_custom_value=True, elem_id="ev-adapters",
                                       info="Library adapters made for this base; one row each.")
                refresh = gr.Button("↻", scale=0, min_width=44, size="sm", elem_id="ev-refresh",
                                    elem_classes="refresh-btn")
            include_base = gr.Checkbox(d.include_base, label="Include the base model", elem_id="ev-base")
        with gr.Column(scale=6):
            source = gr.Radio(list(SOURCES), value=d.source, label="Evaluate on", elem_id="ev-source")
            with gr.Row():
                dataset = gr.Dropdown(dataset_choices(studio), value=None, label="Dataset", allow_custom_value=True,
                                      elem_id="ev-dataset", scale=3)
                split = gr.Radio(list(SPLITS), value=d.split, label="Split", elem_id="ev-split", scale=1,
                                 info="val: text the adapters did not train on.")
            text = gr.Textbox(label="Pasted text", lines=4, max_length=MAX_EVAL_TEXT_CHARS, elem_id="ev-text",
                              placeholder="Text to score (when 'Pasted text' is chosen)…")
            with gr.Row():
                seq_len = Slider(16, 1024, value=d.seq_len, step=16, label="Context per window", elem_id="ev-seq",
                                 info="Tokens each prediction may look back (training's default is 128).")
                max_tokens = Slider(256, EVAL_TOKENS, value=d.max_tokens, step=256, label="Tokens per model",
                                    elem_id="ev-max", info="At most; a longer split is sampled evenly.")
            go = gr.Button("Evaluate", variant="primary", elem_id="ev-run")
    summary = gr.Markdown(elem_id="ev-summary")
    with gr.Row(equal_height=False):
        table = gr.Dataframe(headers=COLUMNS, value=[], interactive=False, elem_id="ev-table", scale=4)
        plot = gr.Plot(eval_figure([]), elem_id="ev-plot", scale=6, show_label=False)

    gr.Markdown("### What did it learn?\nEach token coloured by how much likelier the adapter makes it than the base "
                "(green: likelier, red: less likely), the log-probabilities on hover.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            diff_adapter = gr.Dropdown(compatible_adapters(studio, d.model), value=None, label="Adapter",
                                       allow_custom_value=True, elem_id="ev-diff-adapter")
            take = gr.Button("Use Compare's text", size="sm", elem_id="ev-from-compare")
            diff_go = gr.Button("Colour tokens", variant="primary", elem_id="ev-diff-run")
        with gr.Column(scale=6):
            diff_text = gr.Textbox(label="Text", lines=4, max_length=MAX_PROMPT_CHARS, elem_id="ev-diff-text",
                                   placeholder="A prompt with a continuation, or any text…")
    diff_view = gr.HTML(diff_html([], ""), elem_id="ev-diff-view")

    def refresh_all(m, cur, one, ds, user=None):
        return (adapter_update(studio, m, cur, user=user), adapter_update(studio, m, one, multiselect=False, user=user),
                gr.update(choices=dataset_choices(studio, user), value=ds))

    def refresh_mine(m, cur, one, ds, request: gr.Request):
        return refresh_all(m, cur, one, ds, user_of(request))

    lists = [adapters, diff_adapter, dataset]
    model.change(lambda m: studio.model_status(m), inputs=model, outputs=model_status, show_progress="hidden",
                 api_visibility="private")
    for trigger in (model.change, refresh.click):
        trigger(refresh_mine, inputs=[model, adapters, diff_adapter, dataset], outputs=lists,
                show_progress="hidden", api_visibility="private")

    form = dict(model=model, include_base=include_base, adapters=adapters, source=source, dataset=dataset,
                split=split, text=text, seq_len=seq_len, max_tokens=max_tokens)

    def run(request: gr.Request, progress=gr.Progress(), **values):
        return evaluate(studio, EvalForm(**values), progress, user_of(request))
    run = friendly(run, status=summary)  # a refusal replaces the evaluation's summary line

    go.click(run, inputs_kwargs=form, outputs=[table, plot, summary], concurrency_id="evaluate",
             concurrency_limit=1, api_name="evaluate")
    def colour(request: gr.Request, **values):
        return differences(studio, DiffForm(**values), user_of(request))
    colour = friendly(colour, status=diff_view)  # a refusal replaces the view it would have drawn

    diff_go.click(colour, inputs_kwargs=dict(model=model, adapter=diff_adapter, text=diff_text), outputs=diff_view,
                  concurrency_id="evaluate", api_name="token_differences")
    return {"model": model, "model_status": model_status, "adapters": adapters, "refresh": refresh,
            "include_base": include_base, "source": source, "dataset": dataset, "split": split, "text": text,
            "seq_len": seq_len, "max_tokens": max_tokens, "run": go, "summary": summary, "table": table,
            "plot": plot, "diff_adapter": diff_adapter, "diff_text": diff_text, "from_compare": take,
            "diff_run": diff_go, "diff_view": diff_view, "lists": lists, "refresh_all": refresh_all}

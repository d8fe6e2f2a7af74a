"""Data tab: text in (files, paste, bundled sample) -> statistics and a token view -> a named dataset.

What a session uploaded or pasted stays in that session (gr.State / the text box) until it is
saved as a named dataset in the datasets folder, where the Train tab finds it.
"""
from __future__ import annotations

import errno
import html
import os
import shutil
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np

from core import tokenizer
from core.data import TEXT_SUFFIXES, build_dataset, list_samples, load_sample, read_text_file, save_dataset
from core.data import text_stats

from ..context import Studio, friendly

TOKEN_VIEW_LIMIT = 400  # tokens shown as coloured spans
EMPTY = {"files": [], "tokens": 0, "sample": None}  # per-session: uploads [(source, text)], token count,
# and (name, text) of the bundled sample last loaded into the text box


def _docs(state: dict | None, pasted: str | None) -> tuple[list[str], list[str]]:
    """The session's documents: uploaded files, then the text box."""
    texts, sources = [], []
    for src, text in (state or EMPTY).get("files", []):
        texts.append(text)
        sources.append(src)
    if pasted and pasted.strip():
        sample = (state or EMPTY).get("sample")  # (name, text) of the bundled sample loaded into the box
        texts.append(pasted)
        sources.append(f"{sample[0]}.txt (sample)" if sample and sample[1] == pasted else "pasted text")
    return texts, sources


def read_uploads(files, state: dict | None = None) -> tuple[dict, str]:
    """Decode uploaded files into the session state; content is checked, not just the extension."""
    loaded = []
    for f in files or []:
        path = Path(f if isinstance(f, str) else getattr(f, "name", f))
        display = path.name
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise ValueError(f"{display}: only .txt and .md files can be used as text.")
        loaded.append((display, read_text_file(path)))
    suggested = loaded[0][0].rsplit(".", 1)[0] if loaded else gr.skip()  # keep a typed name when cleared
    return {"files": loaded, "tokens": 0, "sample": (state or EMPTY).get("sample")}, suggested


def token_view_html(text: str, limit: int = TOKEN_VIEW_LIMIT) -> str:
    """The first `limit` GPT-2 tokens as coloured spans; hovering one shows its id."""
    if not text:
        return "<div class='token-view empty'>Tokens appear here once there is text.</div>"
    ids = tokenizer.encode(text[: limit * 40])[:limit]
    spans = []
    for i, (tid, s) in enumerate(zip(ids, tokenizer.token_strings(ids))):
        shown = html.escape(s).replace("\n", "↵\n")
        tip = html.escape(f"id {tid}: {s!r}", quote=True)
        spans.append(f"<span class='tok tok-c{i % 6}' title='{tip}' data-id='{tid}'>{shown}</span>")
    total = len(tokenizer.encode(text)) if len(text) < 2_000_000 else None
    more = f" of {total:,}" if total is not None else ""
    return (f"<div class='token-caption'>First {len(ids):,}{more} tokens; hover a token to see its id.</div>"
            f"<div class='token-view'>{''.join(spans)}</div>")


def stats_html(texts: list[str], sources: list[str], ratio: float) -> tuple[str, int]:
    """Statistics cards + a split preview + the most frequent tokens; returns (html, token count)."""
    if not texts:
        return ("<div class='stats empty'>Upload .txt/.md files, paste text, or pick a sample to see "
                "statistics.</div>", 0)
    text = "<|endoftext|>".join(texts)
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    st = text_stats(text, ids, top=12)
    n_train = int(st.tokens * ratio)
    n_val = st.tokens - n_train
    cards = [("Documents", f"{len(texts):,}"), ("Characters", f"{st.chars:,}"), ("Tokens", f"{st.tokens:,}"),
             ("Unique tokens", f"{st.unique_tokens:,}"), ("Tokens / char", f"{st.tokens_per_char:.3f}"),
             ("Train / val", f"{n_train:,} / {n_val:,}")]
    card_html = "".join(f"<div class='stat'><div class='stat-v'>{v}</div><div class='stat-k'>{k}</div></div>"
                        for k, v in cards)
    notes = []
    if n_train < 2 or n_val < 2:
        notes.append("Too short to split into training and validation parts: add more text.")
    elif n_train < 129:
        notes.append(f"The training part has {n_train} tokens, less than one block of 128; training will use "
                     f"shorter blocks. More text gives better results.")
    elif st.tokens < 5_000:
        notes.append("A small text: a LoRA will memorise it quickly. A few thousand tokens or more is better.")
    top = "".join(f"<span class='top-tok' title='id {tid}'><code>{html.escape(repr(s))}</code> ×{n:,}</span>"
                  for tid, s, n in st.top_tokens)
    src = ", ".join(html.escape(s) for s in sources)
    body = (f"<div class='stats'><div class='stat-row'>{card_html}</div>"
            f"<div class='stat-src'>Sources: {src}</div>"
            + "".join(f"<div class='stat-note'>{html.escape(n)}</div>" for n in notes)
            + f"<div class='stat-top'><b>Most frequent tokens</b> {top}</div></div>")
    return body, st.tokens


def analyze(state: dict | None, pasted: str | None, ratio: float) -> tuple[dict, str, str]:
    """(state with the token count, statistics html, token view html) for the current text."""
    texts, sources = _docs(state, pasted)
    stats, n = stats_html(texts, sources, ratio)
    state = dict(state or EMPTY, tokens=n)
    return state, stats, token_view_html("<|endoftext|>".join(texts))


def sample_text(name: str | None, state: dict | None = None) -> tuple[str, str, dict]:
    """A bundled sample's text, its name as the suggested dataset name, and the state remembering it."""
    if not name:
        return gr.skip(), gr.skip(), gr.skip()
    text = load_sample(name)
    return text, name, dict(state or EMPTY, sample=(name, text))


def prepare(studio: Studio, state: dict | None, pasted: str | None, ratio: float, name: str) -> str:
    """Tokenize, split and save the session's text as dataset `name`; returns a status line."""
    name = (name or "").strip()
    path = studio.dataset_path(name)
    if path.exists():
        raise ValueError(f"a dataset named '{name}' already exists; choose another name.")
    texts, sources = _docs(state, pasted)
    if not texts:
        raise ValueError("there is no text yet: upload .txt/.md files, paste text, or pick a sample.")
    ds = build_dataset(texts, sources, float(ratio))
    # built in a hidden folder and renamed into place: a failed write (a full disk) leaves nothing behind
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=studio.datasets_dir))
    try:
        save_dataset(ds, tmp / name)
        try:
            os.rename(tmp / name, path)  # fails if another session filled the name meanwhile
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise ValueError(f"a dataset named '{name}' already exists; choose another name.") from None
            raise
        ds.path = path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = ds.meta
    return (f"✓ Saved dataset **{name}**: {m['tokens']:,} tokens ({m['train_tokens']:,} train / "
            f"{m['val_tokens']:,} validation). It is now selectable on the **Train** tab.")


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def saved_datasets_md(studio: Studio) -> str:
    rows = studio.datasets()
    if not rows:
        return "_No datasets saved yet._"
    lines = ["| dataset | tokens | train / val | sources |", "|---|---:|---:|---|"]
    for r in rows[:20]:
        m = r["meta"]
        srcs = ", ".join(str(s) for s in m.get("sources", []))[:80].replace("|", "/")
        lines.append(f"| {r['name']} | {_n(m.get('tokens'))} | {_n(m.get('train_tokens'))} / "
                     f"{_n(m.get('val_tokens'))} | {html.escape(srcs)} |")
    return "\n".join(lines)


def create_data_tab(studio: Studio) -> dict:
    samples = list_samples()
    state = gr.State(dict(EMPTY))
    gr.Markdown("## 1 · Data\nBring the text you want the model to imitate. Everything stays in your browser "
                "session until you save it as a named dataset.", elem_classes="tab-intro")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            files = gr.File(label="Text files", file_count="multiple", file_types=list(TEXT_SUFFIXES),
                            type="filepath", height=120, elem_id="data-files")
            gr.Markdown("<span class='help'>Upload one or more UTF-8 `.txt`/`.md` files; each becomes a "
                        "document, separated by GPT-2's end-of-text token.</span>")
            sample = gr.Dropdown(choices=[(f"{s['title']} ({s['name']})", s["name"]) for s in samples],
                                 value=None, label="Bundled sample", elem_id="data-sample",
                                 info="Loads a small example text into the box below, to try the studio quickly.")
            pasted = gr.Textbox(label="Text", lines=10, max_lines=18, elem_id="data-text",
                                placeholder="Paste or type text here…",
                                info="Pasted text is added after any uploaded files; edit it freely.")
        with gr.Column(scale=5):
            stats = gr.HTML(stats_html([], [], 0.9)[0], elem_id="data-stats")
            ratio = gr.Slider(0.5, 0.98, value=0.9, step=0.01, label="Training share", elem_id="data-split",
                              info="Fraction of the tokens used for training; the rest is held out to measure "
                                   "validation loss (how well the model generalises).")
            name = gr.Textbox(label="Dataset name", elem_id="data-name",
                              info="1-64 letters, digits, '_', '.' or '-'; the Train tab lists it by this name.")
            prepare_btn = gr.Button("Prepare dataset", variant="primary", elem_id="data-prepare")
            status = gr.Markdown(elem_id="data-status")
    gr.Markdown("### Token view")
    tokens = gr.HTML(token_view_html(""), elem_id="data-tokens")
    with gr.Accordion("Saved datasets", open=False):
        saved = gr.Markdown(saved_datasets_md(studio))

    run_analyze = dict(fn=friendly(analyze), inputs=[state, pasted, ratio], outputs=[state, stats, tokens],
                       api_visibility="private",
                       show_progress="minimal")
    files.change(friendly(read_uploads), inputs=[files, state], outputs=[state, name],
                 api_visibility="private").then(**run_analyze)
    sample.input(friendly(sample_text), inputs=[sample, state], outputs=[pasted, name, state],
                 api_visibility="private")
    pasted.change(trigger_mode="always_last", **run_analyze)
    ratio.release(**run_analyze)

    def do_prepare(st, text, r, n):
        return prepare(studio, st, text, r, n), saved_datasets_md(studio)

    prepared = prepare_btn.click(friendly(do_prepare), inputs=[state, pasted, ratio, name],
                                 outputs=[status, saved], api_name="prepare_dataset")
    return {"files": files, "sample": sample, "text": pasted, "ratio": ratio, "name": name,
            "prepare": prepare_btn, "status": status, "stats": stats, "tokens": tokens, "state": state,
            "prepared": prepared}

"""Data tab: text in (files, paste, bundled sample) -> statistics and a token view -> a named dataset.

What a session uploaded or pasted stays in that session (gr.State / the text box) until it is
saved as a named dataset in the datasets folder, where the Train tab finds it.
"""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
import numpy as np

from core.api import (TEXT_SUFFIXES, build_dataset, check_text, human_bytes, join_documents, list_samples, load_sample,
                      normalize_text, read_text_file, text_stats, tokenizer)

from ..context import UPLOADS_KEPT_S, Studio, friendly, number, typed_name, user_of
from ..inputs import Slider
from .data_records import create_records_section
from .data_view import MAX_SESSION_BYTES, saved_datasets_md, token_view_html

MAX_PASTED_CHARS = 8 * 2**20  # the text box travels with every event: big texts belong in a file
PREVIEW_CHARS = 1_000_000  # live statistics read at most this much, to stay interactive; Prepare counts everything
NO_TEXT = "add some text first: upload .txt/.md files, paste text, or pick a sample."
EMPTY = {"files": [], "tokens": 0, "sample": None}  # per-session: uploads [(source, path, bytes)] (never their
# text: gr.State is copied per session), the (estimated) token count, the bundled sample loaded into the box


def _pasted(state: dict | None, pasted) -> tuple[str, str | None]:
    """The text box's text (checked) and its source name; (\"\", None) when it is blank."""
    pasted = check_text(pasted, "the pasted text", MAX_PASTED_CHARS)
    if not pasted.strip():
        return "", None
    sample = (state or EMPTY).get("sample")
    is_sample = sample and len(pasted) < 2**20 and load_sample(sample) == pasted
    return pasted, f"{sample}.txt (sample)" if is_sample else "pasted text"


def _check_total(files: list, pasted: str) -> None:
    total = sum(size for _, _, size in files) + len(pasted)
    if total > MAX_SESSION_BYTES:
        raise ValueError(f"this session's text (files and pasted text) is {human_bytes(total)}; the limit is "
                         f"{human_bytes(MAX_SESSION_BYTES)} per session. Remove a file or shorten the text.")


def _read(display: str, path: str, limit: int | None = None) -> str:
    """An uploaded file's text (checked when it was uploaded); its first `limit` bytes for a preview."""
    try:
        if limit is None:
            return read_text_file(path)
        with open(path, "rb") as f:
            return normalize_text(f.read(limit).decode("utf-8", errors="ignore"))  # a cut last character
    except FileNotFoundError:
        raise ValueError(f"{display} is no longer on the server (uploads are kept for "
                         f"{UPLOADS_KEPT_S // 3600} h); upload it again.") from None


def _docs(state: dict | None, pasted, preview: int | None = None) -> tuple[list[str], list[str], bool]:
    """The session's documents (uploaded files, then the text box), and whether they were cut to `preview`
    characters in all."""
    files = list((state or EMPTY).get("files", []))
    pasted, pasted_source = _pasted(state, pasted)
    _check_total(files, pasted)
    texts, sources, budget, cut = [], [], preview, False
    for display, path, size in files:
        texts.append(_read(display, path, None if budget is None else budget))
        sources.append(display)
        if budget is not None:
            cut = cut or size > budget
            budget = max(0, budget - size)
    if pasted_source:
        texts.append(pasted if budget is None else pasted[:budget])
        sources.append(pasted_source)
        cut = cut or (budget is not None and len(pasted) > budget)
    return texts, sources, cut


def read_uploads(files, state: dict | None = None) -> tuple[dict, str]:
    """Check uploaded files by content (size, UTF-8, not binary) and remember where they are; their text is
    read again when needed, so a session holds no copy of it."""
    if files is not None and not isinstance(files, (list, tuple)):
        files = [files]
    loaded, total = [], 0
    for f in files or []:
        path = Path(f if isinstance(f, str) else getattr(f, "name", f))
        display = check_text(path.name, "a file name", 255)
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise ValueError(f"{display} is not a text file: only .txt and .md files can be used; copy its text "
                             f"into the Text box instead.")
        size = path.stat().st_size if path.is_file() else 0
        total += size
        if total > MAX_SESSION_BYTES:  # before reading: the cap bounds the memory one session can use
            raise ValueError(f"these files hold {human_bytes(total)} of text or more; the limit is "
                             f"{human_bytes(MAX_SESSION_BYTES)} per session. Upload fewer or smaller files.")
        check_text(read_text_file(path), display)  # decoded, checked, dropped
        loaded.append((display, str(path), size))
    suggested = loaded[0][0].rsplit(".", 1)[0] if loaded else gr.skip()  # keep a typed name when cleared
    return {"files": loaded, "tokens": 0, "sample": (state or EMPTY).get("sample")}, suggested


def stats_html(texts: list[str], sources: list[str], ratio: float, cut_from: int | None = None,
               ids=None) -> tuple[str, int]:
    """Statistics cards + a split preview + the most frequent tokens; returns (html, token count).
    `cut_from`: the session's whole size in bytes when `texts` are only its first part (counts are then
    estimated from that part). `ids`: the joined texts' tokens, when the caller has them already."""
    if not texts:
        return ("<div class='stats empty'>Upload .txt/.md files, paste text, or pick a sample to see "
                "statistics.</div>", 0)
    ratio = number(ratio, "the training share")
    text = join_documents(texts)
    ids = np.asarray(tokenizer.encode(text) if ids is None else ids, dtype=np.int64)
    st = text_stats(text, ids, top=12)
    scale = cut_from / max(1, len(text)) if cut_from else 1.0
    tokens = int(st.tokens * scale)
    n_train = int(tokens * ratio)
    n_val = tokens - n_train
    about = "≈ " if cut_from else ""
    cards = [("Documents", f"{len(texts):,}"), ("Characters", f"{about}{int(st.chars * scale):,}"),
             ("Tokens", f"{about}{tokens:,}"), ("Unique tokens", f"{st.unique_tokens:,}"),
             ("Tokens / char", f"{st.tokens_per_char:.3f}"), ("Train / val", f"{about}{n_train:,} / {n_val:,}")]
    card_html = "".join(f"<div class='stat'><div class='stat-v'>{v}</div><div class='stat-k'>{k}</div></div>"
                        for k, v in cards)
    notes = []
    if cut_from:
        notes.append(f"A large text: these statistics read its first {len(text):,} characters and estimate "
                     f"the rest; Prepare counts every token.")
    if n_train < 2 or n_val < 2:
        notes.append("Too short to split into training and validation parts: add more text.")
    elif n_train < 129:
        notes.append(f"The training part has {n_train} tokens, less than one block of 128; training will use "
                     f"shorter blocks. More text gives better results.")
    elif tokens < 5_000:
        notes.append("A small text: a LoRA will memorise it quickly. A few thousand tokens or more is better.")
    top = "".join(f"<span class='top-tok' title='id {tid}'><code>{html.escape(repr(s))}</code> ×{n:,}</span>"
                  for tid, s, n in st.top_tokens)
    src = ", ".join(html.escape(s) for s in sources)
    body = (f"<div class='stats'><div class='stat-row'>{card_html}</div>"
            f"<div class='stat-src'>Sources: {src}</div>"
            + "".join(f"<div class='stat-note'>{html.escape(n)}</div>" for n in notes)
            + f"<div class='stat-top'><b>Most frequent tokens</b> {top}</div></div>")
    return body, tokens


def analyze(state: dict | None, pasted: str | None, ratio: float) -> tuple[dict, str, str]:
    """(state with the token count, statistics html, token view html) for the current text. It reads at most
    PREVIEW_CHARS, so a big text costs every user the same fraction of a second as a small one. The text is
    encoded once, for the statistics and the token view together."""
    texts, sources, cut = _docs(state, pasted, PREVIEW_CHARS)
    whole_size = sum(size for _, _, size in (state or EMPTY).get("files", [])) + len(pasted or "")
    text = join_documents(texts)
    ids = tokenizer.encode(text) if texts else None
    stats, n = stats_html(texts, sources, ratio, cut_from=whole_size if cut else None, ids=ids)
    state = dict(state or EMPTY, tokens=n)
    return state, stats, token_view_html(text, ids=ids)


def sample_text(name: str | None, state: dict | None = None) -> tuple[str, str, dict]:
    """A bundled sample's text, its name as the suggested dataset name, and the state remembering it."""
    name = typed_name(name, "the sample")
    if not name:
        return gr.skip(), gr.skip(), gr.skip()
    text = load_sample(name)
    return text, name, dict(state or EMPTY, sample=name)


def prepare(studio: Studio, state: dict | None, pasted: str | None, ratio: float, name: str,
            user: str | None = None) -> str:
    """Tokenize, split and save the session's text as dataset `name` of `user` (the signed-in one, whose
    quota it counts against); returns a status line."""
    if not (state or EMPTY).get("files") and not _pasted(state, pasted)[0]:  # first: a name alone makes nothing
        raise ValueError(NO_TEXT)
    name = typed_name(name, "the dataset name")
    studio.dataset_store.check_new(name)  # before the text is read and tokenized for nothing
    texts, sources, _ = _docs(state, pasted)
    if not texts:
        raise ValueError(NO_TEXT)
    ds = build_dataset(texts, sources, number(ratio, "the training share"))
    studio.dataset_store.create(name, ds, user)  # published whole: a failed write (a full disk) leaves nothing
    m = ds.meta
    return (f"✓ Saved dataset **{name}**: {m['tokens']:,} tokens ({m['train_tokens']:,} train / "
            f"{m['val_tokens']:,} validation). It is now selectable on the **Train** tab.")


def create_data_tab(studio: Studio) -> dict:
    samples = list_samples()
    state = gr.State(dict(EMPTY))
    gr.Markdown("## 1 · Data\nBring the text you want the model to imitate. Everything stays in your browser "
                "session until you save it as a named dataset.", elem_classes="tab-intro")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            # no file_types: Gradio would refuse a .pdf in the box itself with a red "Error"; read_uploads
            # explains it in one sentence instead
            files = gr.File(label="Text files", file_count="multiple", type="filepath", height=120,
                            elem_id="data-files")
            gr.Markdown("<span class='help'>Upload one or more UTF-8 `.txt`/`.md` files; each becomes a "
                        "document, separated by GPT-2's end-of-text token.</span>")
            sample = gr.Dropdown(choices=[(f"{s['title']} ({s['name']})", s["name"]) for s in samples],
                                 value=None, label="Bundled sample", elem_id="data-sample",
                                 info="Loads a small example text into the box below, to try the studio quickly.")
            pasted = gr.Textbox(label="Text", lines=10, max_lines=18, elem_id="data-text", max_length=MAX_PASTED_CHARS,
                                placeholder="Paste or type text here…",
                                info="Pasted text is added after any uploaded files; edit it freely.")
        with gr.Column(scale=5):
            stats = gr.HTML(stats_html([], [], 0.9)[0], elem_id="data-stats")
            ratio = Slider(0.5, 0.98, value=0.9, step=0.01, label="Training share", elem_id="data-split",
                           info="Fraction of the tokens used for training; the rest is held out to measure "
                                "validation loss (how well the model generalises).")
            name = gr.Textbox(label="Dataset name", elem_id="data-name",
                              info="1-64 letters, digits, '_', '.' or '-'; the Train tab lists it by this name.")
            prepare_btn = gr.Button("Prepare dataset", variant="primary", elem_id="data-prepare")
            status = gr.Markdown(elem_id="data-status")
    gr.Markdown("### Token view")
    tokens = gr.HTML(token_view_html(""), elem_id="data-tokens")
    with gr.Accordion("Saved datasets", open=False):
        saved = gr.Markdown(saved_datasets_md(studio), elem_id="data-saved")
    with gr.Accordion("Records: .jsonl / .json / .csv / .tsv (instruction data: prompt and response)", open=False,
                      elem_id="data-records"):
        records = create_records_section(studio, ratio, saved)

    # analysis reads a bounded preview, so it is cheap; four run at once, shared by all sessions, so one
    # user's analysis never waits behind another's (Prepare, which reads everything, stays one at a time)
    run_analyze = dict(fn=friendly(analyze), inputs=[state, pasted, ratio], outputs=[state, stats, tokens],
                       api_visibility="private", show_progress="minimal", concurrency_id="analyze",
                       concurrency_limit=4)
    files.change(friendly(read_uploads), inputs=[files, state], outputs=[state, name], api_visibility="private",
                 concurrency_id="analyze", concurrency_limit=4).then(**run_analyze)
    sample.input(friendly(sample_text), inputs=[sample, state], outputs=[pasted, name, state],
                 api_visibility="private")
    pasted.change(trigger_mode="always_last", **run_analyze)
    ratio.release(**run_analyze)

    def do_prepare(st, text, r, n, request: gr.Request):
        user = user_of(request)
        return prepare(studio, st, text, r, n, user), saved_datasets_md(studio, user)

    prepared = prepare_btn.click(friendly(do_prepare, status=status), inputs=[state, pasted, ratio, name],
                                 outputs=[status, saved], api_name="prepare_dataset")
    return {"files": files, "sample": sample, "text": pasted, "ratio": ratio, "name": name,
            "prepare": prepare_btn, "status": status, "stats": stats, "saved": saved, "tokens": tokens, "state": state,
            "prepared": prepared, **records}

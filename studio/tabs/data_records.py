"""The Data tab's records section: a .jsonl/.json/.csv/.tsv file -> pick fields -> preview -> a dataset.

With a prompt and a response field the dataset is instruction data (core.train.instruct): examples go
through the editable template and only the response tokens count in the loss; the token view shows the
prompt tokens (no loss) greyed out. With a text field each record is one plain-text document.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np

from core.api import (DEFAULT_TEMPLATE, RECORD_SUFFIXES, Fields, check_template, check_text, dataset_from_records,
                      encode_example, human_bytes, pick, preview_records, read_records)

from ..context import Studio, friendly, number, typed_name, user_of
from .data_view import MAX_SESSION_BYTES, TOKEN_VIEW_LIMIT, saved_datasets_md, token_view_html

PREVIEW_ROWS = 5
VIEW_EXAMPLES = 8  # examples rendered in the token view
NONE = ""  # the pickers' "not used" choice
GUESSES = {  # common field names, tried in order, to preselect the pickers
    "prompt": ("prompt", "instruction", "question", "input", "q", "query"),
    "response": ("response", "answer", "output", "completion", "a", "target"),
    "text": ("text", "content", "body"),
}


PARSED_KEPT = 8  # uploads whose records stay parsed, for the token view's picker changes (a few users at once)
PARSED_KEPT_BYTES = 2 * MAX_SESSION_BYTES  # ... and their files' size in all (parsed, they take several times it)
_parsed: OrderedDict = OrderedDict()  # (path, mtime, size) -> (records, name), newest last
_parsed_lock = threading.Lock()


def _records(path: str | None):
    """An upload's records, read from its path (a session keeps the path, not the content). Parsed once per
    upload: the token view asks again on every picker change, and parsing a large file takes seconds."""
    if not path:
        raise ValueError("upload a .jsonl, .json, .csv or .tsv file first.")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p.name} is no longer on the server; upload it again.")
    st = p.stat()
    if st.st_size > MAX_SESSION_BYTES:
        raise ValueError(f"{p.name} is {human_bytes(st.st_size)}; the limit is "
                         f"{human_bytes(MAX_SESSION_BYTES)} per upload. Use a smaller part of it.")
    key = (str(p), st.st_mtime_ns, st.st_size)
    with _parsed_lock:
        if key in _parsed:
            _parsed.move_to_end(key)
            return _parsed[key]
    name = check_text(p.name, "a file name", 255)
    parsed = read_records(p.read_bytes(), name), name
    with _parsed_lock:
        _parsed[key] = parsed
        while len(_parsed) > PARSED_KEPT or sum(k[2] for k in _parsed) > PARSED_KEPT_BYTES:
            _parsed.popitem(last=False)
    return parsed


def _guess(names: list[str], role: str) -> str:
    lower = {n.lower(): n for n in names}
    return next((lower[g] for g in GUESSES[role] if g in lower), NONE)


def inspect_upload(file) -> tuple:
    """(path state, preview table, prompt / response / text pickers, suggested name) for an upload."""
    path = file if isinstance(file, str) or file is None else getattr(file, "name", None)
    if not path:
        empty = gr.update(choices=[NONE], value=NONE)
        return None, gr.update(value=None), empty, empty, empty, gr.skip()
    records, name = _records(path)
    names, rows = preview_records(records, PREVIEW_ROWS)
    choices = [NONE] + names
    prompt, response = _guess(names, "prompt"), _guess(names, "response")
    text = NONE if prompt and response else _guess(names, "text")
    pickers = [gr.update(choices=choices, value=v) for v in (prompt, response, text)]
    table = gr.update(value={"headers": names, "data": rows})
    return path, table, *pickers, Path(name).stem[:64]


def _fields(prompt, response, text) -> Fields:
    f = Fields(text=text or None, prompt=prompt or None, response=response or None)
    f.check()
    return f


def masked_view(path, prompt, response, text, template) -> str:
    """The token view of the first examples: prompt tokens (no loss) in grey, response tokens coloured."""
    if not path:
        return token_view_html("")
    records, name = _records(path)
    fields = _fields(prompt, response, text)
    rows = pick(records[:VIEW_EXAMPLES], fields, name)
    if not fields.instruction:
        return token_view_html("<|endoftext|>".join(r["text"] for r in rows))
    template = check_template(template)
    ids, mask = [], []
    for r in rows:
        t, m = encode_example(template, r["prompt"], r["response"])
        ids += t
        mask += m
    return token_view_html("(examples)", ids=ids[:TOKEN_VIEW_LIMIT], mask=mask[:TOKEN_VIEW_LIMIT])


def prepare_records(studio: Studio, path, prompt, response, text, template, ratio, name,
                    user: str | None = None) -> str:
    """Save the upload as dataset `name`, owned by the signed-in `user` (every record checked first; nothing is
    written on an error)."""
    name = typed_name(name, "the dataset name")
    studio.dataset_store.check_new(name)
    records, source = _records(path)
    fields = _fields(prompt, response, text)
    ds = dataset_from_records(records, source, fields, template if fields.instruction else None,
                              number(ratio, "the training share"))
    studio.dataset_store.create(name, ds, user)
    m = ds.meta
    if fields.instruction:
        share = int(np.sum(ds.train_mask)) / max(1, len(ds.train))
        return (f"✓ Saved instruction dataset **{name}**: {m['records']:,} examples ({m['train_records']:,} train / "
                f"{m['val_records']:,} validation), {m['tokens']:,} tokens, {share:.0%} of them response tokens "
                f"(the loss is computed on those only). It is now selectable on the **Train** tab.")
    return (f"✓ Saved dataset **{name}**: {m['tokens']:,} tokens ({m['train_tokens']:,} train / "
            f"{m['val_tokens']:,} validation). It is now selectable on the **Train** tab.")


def create_records_section(studio: Studio, ratio, saved) -> dict:
    """Widgets and wiring of the records section (inside the Data tab; `ratio` and `saved` are the tab's)."""
    path = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            file = gr.File(label="Records file", file_count="single", file_types=list(RECORD_SUFFIXES),
                           type="filepath", height=100, elem_id="rec-file")
            with gr.Row():
                prompt = gr.Dropdown([NONE], value=NONE, label="Prompt field", elem_id="rec-prompt",
                                     info="The model reads it; no loss on its tokens.")
                response = gr.Dropdown([NONE], value=NONE, label="Response field", elem_id="rec-response",
                                       info="The model learns to write it.")
                text = gr.Dropdown([NONE], value=NONE, label="Text field", elem_id="rec-text",
                                   info="Or: plain text, one document per record.")
            template = gr.Textbox(DEFAULT_TEMPLATE, label="Template", lines=5, elem_id="rec-template",
                                  info="Must contain {prompt} and then {response}; each example ends with "
                                       "<|endoftext|>, which is trained too (the model learns to stop).")
        with gr.Column(scale=5):
            table = gr.Dataframe(label="First records", interactive=False, wrap=True, elem_id="rec-preview")
            name = gr.Textbox(label="Dataset name", elem_id="rec-name")
            go = gr.Button("Prepare dataset from records", variant="primary", elem_id="rec-prepare")
            status = gr.Markdown(elem_id="rec-status")
    view = gr.HTML(token_view_html(""), elem_id="rec-tokens")
    fields = [path, prompt, response, text, template]
    show = dict(fn=friendly(masked_view), inputs=fields, outputs=view, api_visibility="private",
                show_progress="minimal", concurrency_id="analyze", concurrency_limit=4)
    file.change(friendly(inspect_upload), inputs=file, outputs=[path, table, prompt, response, text, name],
                api_visibility="private", concurrency_id="analyze", concurrency_limit=4).then(**show)
    for w in (prompt, response, text):
        w.input(**show)
    template.change(trigger_mode="always_last", **show)

    def do_prepare(path, prompt, response, text, template, ratio, name, request: gr.Request):
        user = user_of(request)
        return (prepare_records(studio, path, prompt, response, text, template, ratio, name, user),
                saved_datasets_md(studio, user))

    go.click(friendly(do_prepare), inputs=[*fields, ratio, name], outputs=[status, saved],
             api_name="prepare_records")
    return {"file": file, "prompt": prompt, "response": response, "text_field": text, "template": template,
            "preview": table, "rec_name": name, "rec_prepare": go, "rec_status": status, "rec_tokens": view}

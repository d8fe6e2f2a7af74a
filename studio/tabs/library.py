"""Library tab: every adapter with its metadata; inspect, rename, delete, duplicate, upload, download,
blend, restore a checkpoint, merge-and-export. All file work goes through core's Library (names
checked, writes atomic, uploads validated before anything is written)."""
from __future__ import annotations

import functools
import html
import json
import os
import time
from pathlib import Path

import gradio as gr

from core.api import (GGUF_TYPES, AdapterError, check_name, check_text, human_bytes, preset_of, scrub, write_metrics,
                      zip_merged)

from ..context import Studio, friendly, number, typed_name, user_of
from ..plots import curve_figure, loss_figure, overlay_figure

COLUMNS = ["name", "base", "rank", "targets", "steps", "train loss", "val loss", "dataset", "status", "user",
           "created", "size"]
COLUMN_WIDTHS = ["16%", "6%", "5%", "14%", "6%", "8%", "7%", "10%", "7%", "5%", "9%", "7%"]  # fits 1280 px
UPLOAD_TYPES = [".safetensors", ".zip", ".json"]
NOTHING = "<div class='muted'>Select an adapter in the table or the picker to see its settings.</div>"


def _f(x, digits=4):
    return "" if x is None else f"{x:.{digits}f}"


def table_rows(studio: Studio, entries=None, user: str | None = None) -> list[list]:
    """The table's rows of `entries` (default: the adapters `user` may see)."""
    rows = []
    for e in studio.adapters(user) if entries is None else entries:
        targets = ", ".join(map(str, e.targets)) + (f" · {e.variant}" if e.variant != "LoRA" else "")
        row = [e.name, e.base_model or "?", e.rank or "", targets, e.steps or "",
               _f(e.train_loss), _f(e.val_loss), e.dataset or "", e.status,
               (e.user or "") + (" · shared" if e.user and e.shared else ""),
               str(e.created or "")[:16].replace("T", " "), human_bytes(e.size_bytes)]
        # metadata comes from files anyone could have uploaded: one unencodable string must not break the page
        rows.append([scrub(v) if isinstance(v, str) else v for v in row])
    return rows


def names(studio: Studio, final_only: bool = False, user: str | None = None) -> list[str]:
    return [e.name for e in studio.adapters(user) if e.has_final or not final_only]


def refresh(studio: Studio, selected: str | None = None, user: str | None = None):
    """(table rows, adapter picker, blend picker) after a change, of the adapters `user` may see."""
    entries = studio.adapters(user)  # reads every adapter's studio.json: once per refresh
    all_names = [e.name for e in entries]
    finals = [e.name for e in entries if e.has_final]
    value = selected if selected in all_names else None
    return (table_rows(studio, entries), gr.update(choices=all_names, value=value),
            gr.update(choices=finals, value=[]))


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _short(x, limit: int = 200) -> str:
    """A metadata value as text: files anyone could have uploaded may hold any JSON there."""
    text = x if isinstance(x, str) else json.dumps(x, default=str) if isinstance(x, (dict, list)) else str(x)
    return text if len(text) <= limit else text[:limit] + "…"


def _detail_rows(d: dict) -> list[tuple[str, object]]:
    """(label, value) rows of an adapter's settings, each value read defensively from its studio.json."""
    meta, cfg = _dict(d.get("meta")), _dict(d.get("config"))
    lora, training, ds = _dict(meta.get("lora")), _dict(meta.get("training")), _dict(meta.get("dataset"))
    rows = [("Base model", d.get("base_model") or "?"),  # the record's, else adapter_config.json's
            ("Status", d.get("status")), ("Variant", d.get("variant") or "LoRA"),
            ("Rank / alpha", f"{d.get('rank')} / {d.get('alpha')}"),
            ("Targets", ", ".join(map(str, d.get("targets") or []))),
            ("Dropout", lora.get("dropout", cfg.get("lora_dropout"))), ("Steps", d.get("steps")),
            ("Train / val loss", f"{_f(d.get('train_loss'))} / {_f(d.get('val_loss'))}"),
            ("Dataset", ds.get("name") or d.get("dataset")), ("Created", d.get("created")),
            ("User", d.get("user")), ("Size", human_bytes(d.get("size_bytes") or 0))]
    if training:
        rows.append(("Training", ", ".join(f"{k} {_short(training[k], 40)}" for k in
                                           ("lr", "batch_size", "grad_accum", "seq_len", "eval_interval", "seed")
                                           if k in training)))
    if d.get("rank_detail"):  # rank "mixed": rank_pattern's per-module ranks
        rows.append(("Per-module ranks", _short(d["rank_detail"], 400)))
    defaults = {"init": "kaiming", "use_rslora": False, "loraplus_lr_ratio": 1}  # plain LoRA shows no row
    variant = [f"{k} {_short(lora[k], 40)}" for k, plain in defaults.items()
               if k in lora and lora[k] != plain]
    if variant:
        rows.append(("LoRA variant", ", ".join(variant)))
    blend = meta.get("blend") if isinstance(meta.get("blend"), list) else []
    if blend:
        rows.append(("Blend of", ", ".join(f"{_short(b.get('name'), 64)} × {_short(b.get('weight'), 20)}"
                                           for b in map(_dict, blend[:16]))))
    for key, label in (("imported_from", "Imported from"), ("duplicated_from", "Duplicated from"),
                       ("restored_from", "Restored from")):
        if meta.get(key):
            rows.append((label, meta[key]))
    if d.get("problem"):
        rows.append(("Problem", d["problem"]))
    return rows


def details(studio: Studio, name: str | None, user: str | None = None):
    """(settings markdown, loss curve, checkpoint picker) of adapter `name`."""
    if not name:
        return NOTHING, loss_figure([], [], height=300), \
            gr.update(choices=[], value=None)
    name = typed_name(name, "the selected adapter")
    studio.check_adapter(name, user)
    d = studio.library.details(name)
    md = scrub("<dl class='kv'>" + "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(_short(v))}</dd>" for k, v in _detail_rows(d)
        if v not in (None, "", "None / None")) + "</dl>")
    ckpts = [c["name"] for c in d.get("checkpoints", [])]
    fig = curve_figure(studio.library.curve(d["name"]), _dict(d.get("meta")), height=300)
    return md, fig, gr.update(choices=ckpts, value=ckpts[-1] if ckpts else None)


MAX_OVERLAY = 8  # adapters on one chart (beyond that the colours repeat and the lines blur)


def overlay(studio: Studio, chosen, user: str | None = None) -> object:
    """The train and validation curves of up to MAX_OVERLAY library adapters on one chart."""
    if chosen is not None and not isinstance(chosen, (list, tuple)):
        raise ValueError("choose the adapters from the list.")
    names = [typed_name(n, "an adapter name") for n in chosen or []]
    if len(names) > MAX_OVERLAY:
        raise ValueError(f"choose at most {MAX_OVERLAY} adapters for one chart (got {len(names)}).")
    if len(set(names)) != len(names):
        raise ValueError("each adapter can be chosen once.")
    for n in names:
        studio.check_adapter(n, user)
    return overlay_figure([(n, studio.library.curve(n)) for n in names])


def _not_training(studio: Studio, name: str) -> None:
    if studio.runs.training(name) is not None:
        raise ValueError(f"'{name}' is being trained right now (or queued to be); stop the run first.")


def _need(name, studio: Studio | None = None, user: str | None = None) -> str:
    """The selected adapter's name; with `studio`, one that `user` may see."""
    name = typed_name(name, "the selected adapter")
    if not name:
        raise ValueError("select an adapter first.")
    if studio is not None:
        studio.check_adapter(name, user)
    return name


def rename(studio: Studio, name, new, user: str | None = None) -> tuple[str, str]:
    name = _need(name)
    _not_training(studio, name)
    new = check_name(typed_name(new, "the new name"))
    studio.check_entry_owner(name, user, "rename")
    studio.library.rename(name, new)
    return f"Renamed **{name}** to **{new}**.", new


def delete(studio: Studio, name, user: str | None = None) -> str:
    name = _need(name)
    _not_training(studio, name)
    studio.check_entry_owner(name, user, "delete")
    studio.library.delete(name)
    return f"Deleted **{name}**."


def duplicate(studio: Studio, name, new, user: str | None = None) -> tuple[str, str]:
    name = _need(name, studio, user)
    new = check_name(typed_name(new, "the new name"))
    studio.library.duplicate(name, new, user=user)
    return f"Duplicated **{name}** as **{new}**.", new


def restore_checkpoint(studio: Studio, name, checkpoint, new, user: str | None = None) -> tuple[str, str]:
    name = _need(name, studio, user)
    checkpoint = typed_name(checkpoint, "the checkpoint")
    if not checkpoint:
        raise ValueError("choose a checkpoint of this run.")
    new = check_name(typed_name(new, "the new name"))
    studio.library.restore_checkpoint(name, checkpoint, new, user=user)
    return f"Saved checkpoint **{checkpoint}** of **{name}** as adapter **{new}**.", new


def import_upload(studio: Studio, files, name, user: str | None = None) -> tuple[str, str]:
    """A PEFT .zip, or adapter_model.safetensors with its adapter_config.json: validated by the core
    Library (safetensors header, keys, shapes, rank, dtype, finiteness, size) before anything is written."""
    paths = [Path(f if isinstance(f, str) else getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        raise ValueError("choose a PEFT adapter .zip, or an adapter .safetensors file with its adapter_config.json.")
    for p in paths:
        if p.suffix.lower() not in UPLOAD_TYPES:
            raise AdapterError(f"{p.name}: upload .safetensors, .zip or adapter_config.json files only.")
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    tensors = [p for p in paths if p.suffix.lower() == ".safetensors"]
    configs = [p for p in paths if p.suffix.lower() == ".json"]
    name = typed_name(name, "the name in the library")
    if zips:
        if len(paths) > 1:
            raise AdapterError("upload one .zip on its own (it already holds the adapter's files).")
        src, config = zips[0], None
    else:
        if len(tensors) != 1:
            raise AdapterError("upload exactly one .safetensors file (with its adapter_config.json).")
        if len(configs) != 1:
            raise AdapterError(f"{tensors[0].name} needs its adapter_config.json (rank, alpha, target modules): "
                               f"select both files together, or upload the adapter folder as a .zip.")
        src, config = tensors[0], configs[0]
    if not name:
        stem = src.stem
        name = stem if stem != "adapter_model" else f"upload-{time.strftime('%Y%m%d-%H%M%S')}"
    check_name(name)
    studio.library.import_path(src, name, config_path=config, user=user)
    return f"Imported **{name}** (validated).", name


def share(studio: Studio, name, shared, user: str | None = None) -> tuple[str, str]:
    """Share adapter `name` with everyone signed in, or make it private again (its owner or an admin)."""
    if not studio.auth:
        raise ValueError("sharing needs sign-in (--auth); without it everyone already sees every adapter.")
    if studio.demo is not None:
        raise ValueError("sharing is off in this public demo: your work stays in your own sandbox.")
    if shared not in (True, False):
        raise ValueError("shared must be true or false; tick or untick the box.")
    name = _need(name)
    _not_training(studio, name)
    studio.check_entry_owner(name, user, "share")
    studio.library.set_shared(name, shared)
    if shared:
        return f"**{name}** is shared with the class: everyone signed in can see and use it.", name
    return f"**{name}** is private again: only its owner and the admins see it.", name


def export_zip(studio: Studio, name, user: str | None = None) -> str:
    name = _need(name, studio, user)
    return str(studio.library.export_zip(name, studio.export_folder()))


def export_metrics(studio: Studio, name, fmt: str, user: str | None = None) -> str:
    """The run's metrics (step, losses, lr, grad norm, tokens/s, time) from its history, as CSV or JSON."""
    name = _need(name, studio, user)
    meta = _dict(studio.library.details(name).get("meta"))
    return str(write_metrics(meta, studio.export_folder(), name, fmt, studio.library.history(name)))


def blend_weights(weights_text, n: int) -> list[float]:
    """One finite number per adapter from 'a, b, ...' (empty: equal weights)."""
    text = check_text(weights_text, "the blend weights", 1000)
    parts = [w for w in text.replace(";", ",").split(",") if w.strip()]
    if not parts:
        return [1.0 / n] * n
    try:
        weights = [float(w) for w in parts]
    except ValueError:
        raise ValueError(f"weights must be numbers separated by commas, e.g. 0.5, 0.5 "
                         f"(got {text[:80]!r}).") from None
    weights = [number(w, "each blend weight") for w in weights]  # 'nan' and 'inf' parse as floats
    if len(weights) != n:
        raise ValueError(f"give one weight per adapter: {n} adapters, {len(weights)} weights.")
    return weights


def blend(studio: Studio, picked, weights_text, new, user: str | None = None) -> tuple[str, str]:
    if picked is not None and not isinstance(picked, (list, tuple)):
        raise ValueError("pick the adapters to blend from the list.")
    picked = [typed_name(p, "an adapter to blend") for p in picked or []]
    if len(picked) < 2:
        raise ValueError("pick at least two adapters to blend.")
    for p in picked:
        studio.check_adapter(p, user)
    weights = blend_weights(weights_text, len(picked))
    new = check_name(typed_name(new, "the blend name"))
    studio.library.blend(picked, weights, new, user=user)
    mix = " + ".join(f"{w:g} × {n}" for n, w in zip(picked, weights))
    return f"Blended **{new}** = {mix}.", new


def _load_base_of(studio: Studio, name: str, progress=None) -> str:
    """Load the base adapter `name` records (else the loaded one) for an export; returns its preset name."""
    base = preset_of(studio.library.details(name).get("base_model")) or studio.loaded_base()
    if base is None:
        raise ValueError(f"'{name}' does not record a known base model; load its base on the Compare tab first.")
    if progress is not None:
        progress(0.1, desc=f"loading base model {base}…")
    studio.base(base)
    return base


def merge_export(studio: Studio, name, progress=None, user: str | None = None) -> tuple[str, str]:
    """Base + adapter merged into an HF GPT-2 folder (config.json + model.safetensors), zipped."""
    name = _need(name, studio, user)
    base = _load_base_of(studio, name, progress)
    folder = studio.export_folder()
    out = studio.engine.export_merged(name, folder / f"{name}-merged")
    if progress is not None:
        progress(0.7, desc="zipping the merged model…")
    zpath = zip_merged(out)
    size = human_bytes(os.path.getsize(zpath))
    return (f"Merged **{name}** into {base}: a transformers folder (`GPT2LMHeadModel.from_pretrained`), "
            f"{size} zipped."), str(zpath)


def gguf_export(studio: Studio, name, qtype, progress=None, user: str | None = None) -> tuple[str, str]:
    """Base + adapter merged into one GGUF file (llama.cpp's GPT-2 layout), f16 or q8_0."""
    name = _need(name, studio, user)
    if not isinstance(qtype, str) or qtype not in GGUF_TYPES:
        raise ValueError(f"choose the GGUF type: {' or '.join(GGUF_TYPES)}.")
    base = _load_base_of(studio, name, progress)
    if progress is not None:
        progress(0.4, desc=f"writing the GGUF file ({qtype})…")
    out = studio.engine.export_gguf(name, studio.export_folder() / f"{name}-{qtype}.gguf", qtype)
    return (f"Merged **{name}** into {base} as a GGUF file ({qtype}, {human_bytes(os.path.getsize(out))}) for "
            f"llama.cpp, LM Studio or ollama."), str(out)


def gguf_adapter_export(studio: Studio, name, progress=None, user: str | None = None) -> tuple[str, str]:
    """The adapter alone as a GGUF adapter file, for llama.cpp's --lora over a GGUF of its base."""
    name = _need(name, studio, user)
    base = _load_base_of(studio, name, progress)
    out = studio.engine.export_gguf_adapter(name, studio.export_folder() / f"{name}-lora.gguf")
    return (f"Wrote **{name}** alone as a GGUF adapter ({human_bytes(os.path.getsize(out))}) for llama.cpp's "
            f"`--lora`, over a GGUF of {base}."), str(out)


def _export_widgets() -> dict:
    """The Download and export column: the zip, the merged model, GGUF files and the metrics."""
    gr.Markdown("### Download and export")
    with gr.Row():
        zip_btn = gr.Button("Download adapter (.zip)", elem_id="lib-download")
        merge_btn = gr.Button("Merge into base & export", elem_id="lib-merge")
    with gr.Row():
        csv_btn = gr.Button("Metrics (.csv)", size="sm", elem_id="lib-metrics-csv")
        json_btn = gr.Button("Metrics (.json)", size="sm", elem_id="lib-metrics-json")
    with gr.Row():
        gguf_type = gr.Dropdown(list(GGUF_TYPES), value="f16", label="GGUF type", scale=1, min_width=110,
                                elem_id="lib-gguf-type", info="q8_0: 8-bit, about half the size.")
        gguf_btn = gr.Button("Merge & export GGUF", scale=2, elem_id="lib-gguf")
        gguf_lora_btn = gr.Button("GGUF adapter (--lora)", scale=2, elem_id="lib-gguf-adapter")
    gr.Markdown("<span class='help'>The .zip is a PEFT adapter folder (loads with "
                "`PeftModel.from_pretrained`). Merge writes base + adapter as one transformers model; "
                "GGUF as one file for llama.cpp; GGUF adapter: the adapter alone, for llama.cpp's "
                "`--lora` over a GGUF of the base. Metrics: every step's losses, lr, grad norm, tokens/s "
                "and time.</span>")
    out_file = gr.File(label="Your file", interactive=False, visible=False, elem_id="lib-file")
    return {"download": zip_btn, "merge": merge_btn, "metrics_csv": csv_btn, "metrics_json": json_btn,
            "gguf": gguf_btn, "gguf_type": gguf_type, "gguf_adapter": gguf_lora_btn, "file": out_file}


def _wire_exports(studio: Studio, x: dict, picked, status) -> None:
    """Each export writes a file for the selected adapter and hands it to the page."""
    reported = functools.partial(friendly, status=status)

    # Gradio copies a returned file into its own cache when it sends it: the studio's copy is removed right
    # after (the code after a generator's yield runs once that yield was sent, for pages and API clients alike)
    @friendly
    def do_zip(selected, request: gr.Request):
        path = export_zip(studio, selected, user_of(request))
        yield gr.update(value=path, visible=True)
        studio.drop_export(path)

    def handed(msg: str, path):
        """The message and the file for the page, then the studio's copy removed (after Gradio copied it)."""
        yield msg, gr.update(value=path, visible=True)
        studio.drop_export(path)

    @reported
    def do_merge(selected, request: gr.Request, progress=gr.Progress()):
        yield from handed(*merge_export(studio, selected, progress, user_of(request)))

    @reported
    def do_gguf(selected, qtype, request: gr.Request, progress=gr.Progress()):
        yield from handed(*gguf_export(studio, selected, qtype, progress, user_of(request)))

    @reported
    def do_gguf_adapter(selected, request: gr.Request, progress=gr.Progress()):
        yield from handed(*gguf_adapter_export(studio, selected, progress, user_of(request)))

    def metrics_of(fmt: str):
        @friendly
        def do_metrics(selected, request: gr.Request):
            path = export_metrics(studio, selected, fmt, user_of(request))
            yield gr.update(value=path, visible=True)
            studio.drop_export(path)
        return do_metrics

    x['download'].click(do_zip, inputs=picked, outputs=x['file'], api_name="export_adapter_zip")
    x['gguf'].click(do_gguf, inputs=[picked, x['gguf_type']], outputs=[status, x['file']], api_name="export_gguf")
    x['gguf_adapter'].click(do_gguf_adapter, inputs=picked, outputs=[status, x['file']], api_name="export_gguf_adapter")
    x['metrics_csv'].click(metrics_of("csv"), inputs=picked, outputs=x['file'], api_name="export_metrics_csv")
    x['metrics_json'].click(metrics_of("json"), inputs=picked, outputs=x['file'], api_name="export_metrics_json")
    x['merge'].click(do_merge, inputs=picked, outputs=[status, x['file']], api_name="merge_export")


def _overlay_section(studio: Studio) -> dict:
    """Several adapters' loss curves on one chart."""
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("### Curves side by side")
            chosen = gr.Dropdown(names(studio), value=[], multiselect=True, max_choices=MAX_OVERLAY,
                                 label="Adapters to overlay", elem_id="lib-overlay-pick", allow_custom_value=True,
                                 info="Their train loss (lines) and validation loss (dashed) on one chart.")
            overlay_plot = gr.Plot(overlay_figure([]), label="Loss curves", elem_id="lib-overlay")
    # the list is read when it opens (adapters come and go); the chart follows the choice
    def overlay_choices(cur, request: gr.Request):
        return gr.update(choices=names(studio, user=user_of(request)), value=cur or [])

    @friendly
    def draw_overlay(cur, request: gr.Request):
        return overlay(studio, cur, user_of(request))

    chosen.focus(overlay_choices, inputs=chosen, outputs=chosen, show_progress="hidden", api_visibility="private")
    chosen.change(draw_overlay, inputs=chosen, outputs=overlay_plot, show_progress="hidden",
                  api_name="overlay_curves")
    return {"overlay_pick": chosen, "overlay": overlay_plot}


def _blend_and_checkpoint_widgets(studio: Studio) -> dict:
    """Blend several adapters into one; keep a checkpoint of a run as an adapter of its own."""
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("### Blend")
            blend_pick = gr.Dropdown(names(studio, final_only=True), multiselect=True, label="Adapters to blend",
                                     allow_custom_value=True,
                                     elem_id="lib-blend-pick",
                                     info="The new adapter's update is the weighted sum of theirs (exact).")
            with gr.Row():
                blend_w = gr.Textbox(label="Weights", placeholder="e.g. 0.5, 0.5", elem_id="lib-blend-w",
                                     info="One number per adapter, in order; empty = equal weights.")
                blend_name = gr.Textbox(label="Blend name", elem_id="lib-blend-name",
                                        info="Library name of the new adapter.")
            blend_btn = gr.Button("Blend into a new adapter", elem_id="lib-blend")
        with gr.Column():
            gr.Markdown("### Checkpoints")
            ckpt = gr.Dropdown([], label="Checkpoint of the selected run", elem_id="lib-ckpt", allow_custom_value=True,
                               info="Training saves checkpoints; keep one as an adapter of its own (uses New name).")
            restore_btn = gr.Button("Save checkpoint as adapter", elem_id="lib-restore")
    return {"blend_pick": blend_pick, "blend_weights": blend_w, "blend_name": blend_name, "blend": blend_btn,
            "checkpoint": ckpt, "restore": restore_btn}


def create_library_tab(studio: Studio) -> dict:
    gr.Markdown("## 3 · Library\nEvery adapter you trained, blended or uploaded. Adapters are small PEFT-format "
                "files; they load onto the one shared base model without reloading it.", elem_classes="tab-intro")
    with gr.Row():
        refresh_btn = gr.Button("↻ Refresh", size="sm", scale=0, min_width=110, elem_id="lib-refresh")
    table = gr.Dataframe(table_rows(studio), headers=COLUMNS, interactive=False, wrap=True, max_height=320,
                         column_widths=COLUMN_WIDTHS,
                         elem_id="lib-table", label="Adapters (click a row to select it)")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            # choices are a snapshot of the library; API clients may name what exists now (checked on use)
            picked = gr.Dropdown(names(studio), value=None, label="Selected adapter", elem_id="lib-picked",
                                 allow_custom_value=True,
                                 info="The adapter the actions below work on.")
            info = gr.HTML(NOTHING, elem_id="lib-details")
        with gr.Column(scale=5):
            curve = gr.Plot(loss_figure([], [], height=300), label="Loss curve", elem_id="lib-curve")
    status = gr.Markdown(elem_id="lib-status")
    with gr.Row(equal_height=False, elem_classes="actions"):
        new_name = gr.Textbox(label="New name", scale=2, elem_id="lib-new-name",
                              info="For rename, duplicate and saving a checkpoint as an adapter.")
        with gr.Column(scale=3, elem_classes="button-column"):
            with gr.Row():
                rename_btn = gr.Button("Rename", elem_id="lib-rename")
                dup_btn = gr.Button("Duplicate", elem_id="lib-duplicate")
                del_btn = gr.Button("Delete…", variant="stop", elem_id="lib-delete")
                use_btn = gr.Button("Use in Compare →", variant="primary", elem_id="lib-use")
            # with sign-in an adapter is private to its owner (and the admins) until it is shared
            share_box = gr.Checkbox(False, label="Share with the class", elem_id="lib-share",
                                    visible=studio.auth and studio.demo is None,  # a demo's visitors never share
                                    info="Everyone signed in can then see and use it; admins always can.")
    with gr.Row(visible=False, elem_classes="confirm") as confirm_row:
        confirm_md = gr.Markdown()
        confirm_btn = gr.Button("Yes, delete it", variant="stop", elem_id="lib-confirm-delete")
        cancel_btn = gr.Button("Cancel", elem_id="lib-cancel-delete")
    with gr.Row(equal_height=False):
        with gr.Column():
            x = _export_widgets()
        with gr.Column():
            gr.Markdown("### Upload")
            upload = gr.File(label="Adapter files", file_count="multiple", file_types=UPLOAD_TYPES,
                             type="filepath", height=110, elem_id="lib-upload")
            up_name = gr.Textbox(label="Name in the library", elem_id="lib-upload-name",
                                 info="Empty = the file's name. Every upload is validated before it is saved.")
            up_btn = gr.Button("Import into the library", elem_id="lib-import")
    w = _blend_and_checkpoint_widgets(studio)
    blend_pick, blend_w, blend_name, blend_btn = w["blend_pick"], w["blend_weights"], w["blend_name"], w["blend"]
    ckpt, restore_btn = w["checkpoint"], w["restore"]
    overlay_parts = _overlay_section(studio)
    lists = [table, picked, blend_pick]
    @friendly
    def show(selected, request: gr.Request):
        shown = details(studio, selected, user_of(request))  # checks that this user may see it
        name = typed_name(selected, "the selected adapter")
        return (*shown, bool(name) and studio.library.details(name).get("shared") is True)

    picked.change(show, inputs=picked, outputs=[info, curve, ckpt, share_box], api_visibility="private")

    def on_select(evt: gr.SelectData):
        row = evt.row_value if evt.row_value else None
        return row[0] if row else gr.skip()

    table.select(on_select, outputs=picked, api_visibility="private")
    def mine(selected, request: gr.Request):
        return refresh(studio, selected, user_of(request))

    refresh_btn.click(mine, inputs=picked, outputs=lists, api_visibility="private")

    def after(result, user: str | None):
        """Run an action returning (message, name to select); then refresh the lists `user` sees."""
        msg, select = result
        return (msg, *refresh(studio, select, user))

    reported = functools.partial(friendly, status=status)  # the tab's one status line takes their refusals too

    # every handler acts as the signed-in user: owners (or admins) only for rename/delete, the acting user
    # recorded for what it creates
    @reported
    def do_rename(selected, new_name, request: gr.Request):
        return after(rename(studio, selected, new_name, user_of(request)), user_of(request))

    @reported
    def do_duplicate(selected, new_name, request: gr.Request):
        return after(duplicate(studio, selected, new_name, user_of(request)), user_of(request))

    @reported
    def do_restore(selected, checkpoint, new_name, request: gr.Request):
        return after(restore_checkpoint(studio, selected, checkpoint, new_name, user_of(request)), user_of(request))

    @friendly
    def ask_delete(selected):
        selected = _need(selected)
        return (gr.update(visible=True),
                f"Delete **{html.escape(selected)}** and its checkpoints? This cannot be undone.")

    @reported
    def do_delete(selected, request: gr.Request):
        return (gr.update(visible=False), delete(studio, selected, user_of(request)),
                *refresh(studio, None, user_of(request)))

    @reported
    def do_import(files, name, request: gr.Request):
        return (*after(import_upload(studio, files, name, user_of(request)), user_of(request)), None)

    @reported
    def do_blend(picked, weights, name, request: gr.Request):
        return after(blend(studio, picked, weights, name, user_of(request)), user_of(request))

    @reported
    def do_share(selected, shared, request: gr.Request):
        return after(share(studio, selected, shared, user_of(request)), user_of(request))

    rename_btn.click(do_rename, inputs=[picked, new_name], outputs=[status, *lists], api_name="rename_adapter")
    dup_btn.click(do_duplicate, inputs=[picked, new_name], outputs=[status, *lists], api_name="duplicate_adapter")
    restore_btn.click(do_restore, inputs=[picked, ckpt, new_name], outputs=[status, *lists],
                      api_name="restore_checkpoint")
    del_btn.click(ask_delete, inputs=picked, outputs=[confirm_row, confirm_md], api_visibility="private")
    cancel_btn.click(lambda: gr.update(visible=False), outputs=confirm_row, api_visibility="private")
    confirm_btn.click(do_delete, inputs=picked, outputs=[confirm_row, status, *lists], api_name="delete_adapter")
    up_btn.click(do_import, inputs=[upload, up_name], outputs=[status, *lists, upload], api_name="import_adapter")
    blend_btn.click(do_blend, inputs=[blend_pick, blend_w, blend_name], outputs=[status, *lists],
                    api_name="blend_adapters")
    share_box.input(do_share, inputs=[picked, share_box], outputs=[status, *lists], api_name="share_adapter")

    _wire_exports(studio, x, picked, status)
    return {**x, **w, **overlay_parts, "table": table, "picked": picked, "details": info, "curve": curve,
            "status": status, "new_name": new_name, "rename": rename_btn, "duplicate": dup_btn, "delete": del_btn,
            "confirm": confirm_btn, "cancel": cancel_btn, "confirm_row": confirm_row, "upload": upload,
            "upload_name": up_name, "import": up_btn, "use": use_btn, "refresh": refresh_btn, "share": share_box,
            "lists": lists}

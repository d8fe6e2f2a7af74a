"""Instruction data: prompt/response pairs rendered through a template, with a loss mask.

Each example is the template with its prompt and response filled in, followed by <|endoftext|>;
examples follow each other in the token stream. Everything up to `{response}` (the rendered prompt
part) is masked: the model reads it but is not trained to write it. The response, whatever the
template puts after it, and the <|endoftext|> are trained: the model learns the answer and to stop.
The two parts are tokenized separately, so the mask's boundary is exact (at most one BPE merge across
the boundary is lost, which the default template avoids by ending its prompt part with a newline).

The split is by examples (the first `train_ratio` of them train), never inside one. The mask is
uint8 per token, 1 = the token counts in the loss when it is predicted (core.train.data.get_batch).
Templates are filled by plain replacement, not str.format: braces elsewhere in a template are text.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from core.checks import check_text
from core.model import tokenizer
from core.model.config import EOT_TOKEN
from core.train.data import Dataset, MAX_TEXT_BYTES, build_dataset, save_dataset
from core.train.imports import Fields, pick, read_file, read_records

DEFAULT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n{response}"
MAX_TEMPLATE_CHARS = 4000  # a template is a few lines; meta.json records it


def check_template(template) -> str:
    """The template, if it holds {prompt} once and then {response} once; ValueError saying what to fix."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("the template is empty; it must contain {prompt} and {response}, e.g. "
                         + repr(DEFAULT_TEMPLATE) + ".")
    check_text(template, "the template", MAX_TEMPLATE_CHARS)
    for slot in ("{prompt}", "{response}"):
        if template.count(slot) != 1:
            raise ValueError(f"the template must contain {slot} exactly once (found {template.count(slot)}); "
                             f"e.g. {DEFAULT_TEMPLATE!r}.")
    if template.index("{prompt}") > template.index("{response}"):
        raise ValueError("in the template, {prompt} must come before {response} (the model reads the prompt, "
                         "then writes the response).")
    return template


def render_prompt(template: str, prompt: str) -> str:
    """The template up to {response}, with the prompt filled in: what the model reads before answering
    (the studio's Compare applies it to a prompt, as an example with an empty response)."""
    head = check_template(template).split("{response}")[0]
    return head.replace("{prompt}", prompt)


def encode_example(template: str, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of one example (prompt part, response part, <|endoftext|>) and its mask (0 prompt, 1 rest)."""
    head, tail = template.split("{response}")
    p = tokenizer.encode(head.replace("{prompt}", prompt))
    r = tokenizer.encode(response + tail) + [EOT_TOKEN]
    return p + r, [0] * len(p) + [1] * len(r)


def _encode_all(template: str, pairs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = [], []
    for ex in pairs:
        t, m = encode_example(template, ex["prompt"], ex["response"])
        ids += t
        mask += m
    return np.asarray(ids, dtype=np.uint16), np.asarray(mask, dtype=np.uint8)


def build_instruction_dataset(pairs: list[dict], sources: list[str], template: str = DEFAULT_TEMPLATE,
                              train_ratio: float = 0.9, fields: Fields | None = None) -> Dataset:
    """[{'prompt', 'response'}] -> a Dataset with loss masks; nothing is written."""
    check_template(template)
    if not 0 < train_ratio < 1:
        raise ValueError(f"train ratio must be between 0 and 1, e.g. 0.9 (got {train_ratio}).")
    if len(pairs) < 2:
        raise ValueError(f"{len(pairs)} example(s): at least 2 are needed (one to train on, one to validate).")
    total = 0
    for i, ex in enumerate(pairs, 1):
        for role in ("prompt", "response"):
            check_text(ex[role], f"example {i}'s {role}", MAX_TEXT_BYTES)
            total += len(ex[role])
    if total > MAX_TEXT_BYTES:
        raise ValueError(f"the examples together are over the limit of {MAX_TEXT_BYTES} bytes of text; use fewer.")
    n_train = min(len(pairs) - 1, max(1, round(len(pairs) * train_ratio)))
    train, train_mask = _encode_all(template, pairs[:n_train])
    val, val_mask = _encode_all(template, pairs[n_train:])
    digest = hashlib.sha256(template.encode("utf-8"))
    for ex in pairs:  # lengths first, so no two different lists of pairs give the same bytes
        for role in ("prompt", "response"):
            b = ex[role].encode("utf-8")
            digest.update(len(b).to_bytes(8, "little") + b)
    ids = np.concatenate([train, val])
    meta = {
        "format": "lora-studio-dataset", "version": 1, "tokenizer": "gpt2", "kind": "instruction",
        "sources": list(sources), "sha256": digest.hexdigest(), "template": template,
        "chars": total, "tokens": int(len(ids)), "unique_tokens": int(len(np.unique(ids))),
        "records": len(pairs), "train_records": n_train, "val_records": len(pairs) - n_train,
        "train_tokens": int(len(train)), "val_tokens": int(len(val)), "train_ratio": train_ratio,
        "response_tokens": int(train_mask.sum() + val_mask.sum()),
        "loss_mask": "train_mask_00000.npy, val_mask_00000.npy (uint8, 1 = response token: in the loss)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if fields is not None:
        meta.update(prompt_field=fields.prompt, response_field=fields.response)
    return Dataset(train=train, val=val, meta=meta, train_mask=train_mask, val_mask=val_mask)


def dataset_from_records(records, name: str, fields: Fields, template: str | None = None,
                         train_ratio: float = 0.9) -> Dataset:
    """Parsed records -> a Dataset: plain text (each record's text field one document) or instruction data."""
    rows = pick(records, fields, name)
    if fields.instruction:
        return build_instruction_dataset(rows, [name], template or DEFAULT_TEMPLATE, train_ratio, fields)
    if template:
        raise ValueError("a template applies to prompt and response fields; a text field is used as it is.")
    return build_dataset([r["text"] for r in rows], [f"{name}#{i}" for i in range(1, len(rows) + 1)]
                         if len(rows) > 1 else [name], train_ratio)


def dataset_from_bytes(data: bytes, name: str, fields: Fields, template: str | None = None,
                       train_ratio: float = 0.9) -> Dataset:
    """An uploaded file's bytes -> a Dataset (the studio's Data tab); nothing is written."""
    return dataset_from_records(read_records(data, name), name, fields, template, train_ratio)


def prepare_records(path, fields: Fields, output=None, template: str | None = None,
                    train_ratio: float = 0.9) -> Dataset:
    """A .jsonl/.json/.csv/.tsv file -> a Dataset, saved to `output` only when the whole file was good."""
    ds = dataset_from_records(read_file(path), Path(path).name, fields, template, train_ratio)
    if output is not None:
        save_dataset(ds, output)
    return ds


def read_template(path) -> str:
    """A template file (UTF-8 text) -> the checked template (an editor's final newline after {response} dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.name}: no such template file.")
    if path.stat().st_size > MAX_TEMPLATE_CHARS * 4:
        raise ValueError(f"{path.name} is too large for a template (at most {MAX_TEMPLATE_CHARS} characters).")
    try:
        text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not UTF-8 text; save the template as UTF-8.") from None
    # editors end files with a newline; after {response} it would be trained as part of every answer
    return check_template(text[:-1] if text.endswith("\n") and text.rstrip("\n").endswith("{response}") else text)

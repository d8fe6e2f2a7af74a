"""Text -> tokens -> a train/validation dataset folder, and batches drawn from it.

A dataset folder holds `train_00000.npy` and `val_00000.npy` (uint16 GPT-2 token ids, the
seed's layout; more shards `_00001`... load too) and `meta.json` (where the text came from,
its sha256, counts and the split ratio). Folders without meta.json load as well. Instruction data
(core.train.instruct) adds a loss mask per split beside the tokens (`train_mask_00000.npy`, uint8).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from core import atomic, safe_json
from core.checks import check_text, shown
from core.model import tokenizer
from core.model.config import EOT_TOKEN
from core.model.loss import IGNORE

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "samples"
TEXT_SUFFIXES = (".txt", ".md")
MAX_TEXT_BYTES = 256 * 1024 * 1024  # larger inputs are refused (uint16 shards, memory)
VOCAB_SIZE = EOT_TOKEN + 1
META = "meta.json"
MAX_META_BYTES = 1 << 20  # meta.json: counts and source names, a few KB
MAX_SOURCES = 1000  # source file names kept from a meta.json
DOC_SEPARATOR = "<|endoftext|>"
MASK_SUFFIX = "_mask_"  # train_mask_00000.npy: instruction data's loss mask beside train_00000.npy


# ---- reading text ---------------------------------------------------------------------

def normalize_text(text: str) -> str:
    """Unix newlines, no byte-order mark."""
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text from bytes, or a ValueError naming `name` (binary or another encoding)."""
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"{name} is {len(data) / 2**20:.0f} MiB; the limit is "
                         f"{MAX_TEXT_BYTES // 2**20} MiB of text. Use a smaller part of it.")
    if b"\x00" in data[:1 << 20]:
        raise ValueError(f"{name} looks like a binary file, not text (it contains NUL bytes); "
                         f"give a UTF-8 .txt or .md file.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (undecodable byte at offset {e.start}); "
                         f"save it as UTF-8 and try again.") from None
    return normalize_text(text)


def read_text_file(path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path.name}: no such file.")
    if path.is_dir():
        raise ValueError(f"{path.name} is a folder; give one or more .txt/.md files.")
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise ValueError(f"{path.name}: only {' and '.join(TEXT_SUFFIXES)} files can be used as text.")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise ValueError(f"{path.name} is larger than {MAX_TEXT_BYTES // 2**20} MiB; use a smaller part of it.")
    return decode_text(path.read_bytes(), path.name)


def join_documents(texts: Sequence[str]) -> str:
    """Documents joined with <|endoftext|> (the separator GPT-2 was trained with)."""
    return DOC_SEPARATOR.join(texts)


# ---- statistics -----------------------------------------------------------------------

@dataclass
class TextStats:
    chars: int  # characters of the (joined) text
    tokens: int  # GPT-2 tokens
    unique_tokens: int  # distinct token ids
    tokens_per_char: float  # tokens / characters (GPT-2 averages ~0.25 on English prose)
    top_tokens: list[tuple[int, str, int]] = field(default_factory=list)  # (id, text, count), most frequent first


def text_stats(text: str, tokens: Sequence[int] | np.ndarray | None = None, top: int = 20) -> TextStats:
    """Counts for the data view; pass `tokens` when the text is already encoded."""
    ids = np.asarray(tokenizer.encode(text) if tokens is None else tokens, dtype=np.int64)
    return TextStats(chars=len(text), tokens=int(ids.size), unique_tokens=int(np.unique(ids).size),
                     tokens_per_char=round(ids.size / len(text), 4) if text else 0.0,
                     top_tokens=top_tokens(ids, top))


def top_tokens(ids, top: int = 20) -> list[tuple[int, str, int]]:
    """The `top` most frequent tokens as (id, text, count), most frequent first (ties: lower id)."""
    uniq, cnt = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    order = np.argsort(-cnt, kind="stable")[:top]
    strings = tokenizer.token_strings(uniq[order].tolist())
    return [(int(uniq[i]), s, int(cnt[i])) for i, s in zip(order, strings)]


# ---- the dataset ----------------------------------------------------------------------

@dataclass
class Dataset:
    train: np.ndarray  # uint16 token ids of the training split
    val: np.ndarray  # uint16 token ids of the validation split
    meta: dict = field(default_factory=dict)  # meta.json (empty for folders prepared elsewhere)
    path: Path | None = None  # the folder it was loaded from / saved to
    # instruction data only (core.train.instruct): uint8 per token of the split, 1 = the token is a
    # response token and counts in the loss when predicted, 0 = a prompt token (no loss). None = all count.
    train_mask: np.ndarray | None = None
    val_mask: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.path else self.meta.get("name", "dataset")

    @property
    def sha256(self) -> str:
        """The text's sha256 from meta.json, else a digest of the tokens (folders made elsewhere)."""
        if self.meta.get("sha256"):
            return self.meta["sha256"]
        return hashlib.sha256(self.train.tobytes() + b"|" + self.val.tobytes()).hexdigest()

    def block_size(self, seq_len: int) -> tuple[int, str | None]:
        """The sequence length that fits the training split, and a note when it had to shrink."""
        fit = min(seq_len, len(self.train) - 1)
        if fit < seq_len:
            return fit, (f"the training split has only {len(self.train)} tokens, fewer than one block "
                         f"of {seq_len} + 1; the block size is reduced to {fit} tokens.")
        return seq_len, None


def split_tokens(ids: np.ndarray, train_ratio: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """The first `train_ratio` of the tokens for training, the rest for validation."""
    if not 0 < train_ratio < 1:
        raise ValueError(f"train ratio must be between 0 and 1, e.g. 0.9 (got {train_ratio}).")
    n_train = int(len(ids) * train_ratio)
    train, val = ids[:n_train], ids[n_train:]
    if len(train) < 2 or len(val) < 2:
        raise ValueError(f"the text has only {len(ids)} tokens: too short to split into training and "
                         f"validation parts of at least 2 tokens each with ratio {train_ratio}; add more text.")
    return train, val


def build_dataset(texts: Sequence[str], sources: Sequence[str], train_ratio: float = 0.9) -> Dataset:
    """Tokenize documents (joined with <|endoftext|>) and split them; nothing is written."""
    for t, src in zip(texts, sources):
        check_text(t, src, MAX_TEXT_BYTES)  # characters: a lower bound on the UTF-8 bytes, known without encoding
    if sum(len(t) for t in texts) > MAX_TEXT_BYTES:  # what was read or pasted, all together
        raise ValueError(f"the texts together are over the limit of {MAX_TEXT_BYTES} bytes; use fewer or "
                         f"smaller files.")
    docs = [normalize_text(t) for t in texts]
    for doc, src in zip(docs, sources):
        if not doc.strip():
            raise ValueError(f"{src} is empty; give some text to train on.")
    if not docs:
        raise ValueError("no text given; paste some text or choose .txt/.md files.")
    text = join_documents(docs)
    ids = np.asarray(tokenizer.encode(text), dtype=np.uint16)  # GPT-2 ids < 50257 fit uint16
    train, val = split_tokens(ids, train_ratio)
    stats = text_stats(text, ids, top=0)
    meta = {
        "format": "lora-studio-dataset", "version": 1, "tokenizer": "gpt2",
        "sources": list(sources), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "chars": stats.chars, "tokens": stats.tokens, "unique_tokens": stats.unique_tokens,
        "train_tokens": int(len(train)), "val_tokens": int(len(val)), "train_ratio": train_ratio,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Dataset(train=train, val=val, meta=meta)


def prepare(inputs: Iterable = (), output=None, train_ratio: float = 0.9, text: str | None = None,
            text_name: str = "pasted text") -> Dataset:
    """Files (.txt/.md) and/or a pasted `text` -> a Dataset, saved to `output` when given."""
    texts, sources = [], []
    for p in inputs:
        texts.append(read_text_file(p))
        sources.append(Path(p).name)
    if text is not None:
        texts.append(text)
        sources.append(text_name)
    ds = build_dataset(texts, sources, train_ratio)
    if output is not None:
        save_dataset(ds, output)
    return ds


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def save_dataset(ds: Dataset, folder, name: str | None = None) -> Path:
    """Write the dataset folder (each file atomically, meta.json last). `name` is recorded in meta.json
    (default: the folder's name; the dataset store builds in a hidden folder under another name)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("train_*.npy")) + list(folder.glob("val_*.npy")):
        old.unlink()  # a re-prepared folder must not keep stale shards (or masks)
    atomic.write_bytes(folder / "train_00000.npy", _npy_bytes(ds.train.astype(np.uint16)))
    atomic.write_bytes(folder / "val_00000.npy", _npy_bytes(ds.val.astype(np.uint16)))
    for split, mask in (("train", ds.train_mask), ("val", ds.val_mask)):
        if mask is not None:  # plain-text datasets keep the seed's layout: no mask files
            atomic.write_bytes(folder / f"{split}{MASK_SUFFIX}00000.npy", _npy_bytes(mask.astype(np.uint8)))
    meta = dict(ds.meta, name=name or folder.name)
    atomic.write_text(folder / META, json.dumps(meta, indent=2))
    ds.meta, ds.path = meta, folder
    return folder


def _load_split(folder: Path, split: str) -> np.ndarray:
    shards = sorted(folder.glob(f"{split}_[0-9]*.npy"))  # not the loss masks (train_mask_00000.npy)
    if not shards:
        raise ValueError(f"{folder.name} has no {split}_00000.npy; prepare the data first "
                         f"(python -m core prepare --input FILE --output DIR).")
    parts = []
    for shard in shards:
        try:
            arr = np.load(shard, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{folder.name}/{shard.name} is not a readable .npy token file "
                             f"({type(e).__name__}).") from None
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{folder.name}/{shard.name} holds {arr.dtype} values, not token ids.")
        arr = arr.reshape(-1)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= VOCAB_SIZE):
            raise ValueError(f"{folder.name}/{shard.name} has token ids outside GPT-2's vocabulary "
                             f"(0..{VOCAB_SIZE - 1}).")
        parts.append(arr.astype(np.uint16, copy=False))
    ids = np.concatenate(parts)
    if len(ids) < 2:
        raise ValueError(f"the {split} split in {folder.name} has {len(ids)} tokens; at least 2 are needed.")
    return ids


def load_dataset(folder) -> Dataset:
    """A dataset folder: this app's or one in the seed's layout (no meta.json)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder.name}: no such dataset folder.")
    # only checked fields are kept (they travel into the adapter's studio.json); the tokens are what
    # training needs, so a damaged meta.json costs its counts and sha256 (then a digest of the tokens)
    meta = read_dataset_meta(folder)
    meta.pop("problem", None)
    train, val = _load_split(folder, "train"), _load_split(folder, "val")
    return Dataset(train=train, val=val, meta=meta, path=folder,
                   train_mask=_load_mask(folder, "train", len(train)), val_mask=_load_mask(folder, "val", len(val)))


def _load_mask(folder: Path, split: str, n: int) -> np.ndarray | None:
    """The split's loss mask (instruction data), checked against its tokens; None when there is none."""
    shards = sorted(folder.glob(f"{split}{MASK_SUFFIX}[0-9]*.npy"))
    if not shards:
        return None
    try:
        mask = np.concatenate([np.load(s, allow_pickle=False).reshape(-1) for s in shards])
    except Exception as e:
        raise ValueError(f"{folder.name}: the {split} loss mask is not a readable .npy file "
                         f"({type(e).__name__}).") from None
    if mask.dtype.kind not in "iub" or len(mask) != n or (mask.size and int(mask.max()) > 1) or \
            (mask.size and int(mask.min()) < 0):
        raise ValueError(f"{folder.name}: the {split} loss mask does not match its tokens ({len(mask)} values of 0/1 "
                         f"expected {n}); prepare the data again.")
    return mask.astype(np.uint8, copy=False)


_META_FIELDS = {  # what build_dataset writes, and the check each value must pass
    **{k: lambda x: safe_json.text(x, 200) for k in ("format", "tokenizer", "name", "user")},  # user: its owner
    "sha256": lambda x: x if isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x) else None,
    **{k: safe_json.integer for k in ("version", "chars", "tokens", "unique_tokens", "train_tokens", "val_tokens")},
    "train_ratio": lambda x: safe_json.number(x, 0, 1),
    "created": safe_json.date,
    # instruction data (core.train.instruct): the template, the fields read, the record counts
    **{k: lambda x: safe_json.text(x, 200) for k in ("kind", "prompt_field", "response_field", "loss_mask")},
    "template": lambda x: safe_json.text(x, 4000),
    **{k: safe_json.integer for k in ("records", "train_records", "val_records", "response_tokens")},
}


def read_dataset_meta(folder) -> dict:
    """meta.json of a dataset folder, read defensively: only known fields with sane values; a
    'problem' key says what was wrong when something was dropped. Never raises ({} if absent)."""
    path = Path(folder) / META
    try:
        if not path.is_file():
            return {}
        raw = safe_json.load_file(path, MAX_META_BYTES)
    except (OSError, ValueError) as e:
        return {"problem": shown(str(e))}
    if not isinstance(raw, dict):
        return {"problem": f"{META} is not a JSON object"}
    out = {k: v for k, check in _META_FIELDS.items() if k in raw and (v := check(raw[k])) is not None}
    sources = raw.get("sources")
    if isinstance(sources, list):
        out["sources"] = [t for x in sources[:MAX_SOURCES] if (t := safe_json.text(x, 255)) is not None]  # file names
    dropped = [k for k in (*_META_FIELDS, "sources") if k in raw and k not in out]
    why = safe_json.problem(raw)
    if why or dropped or (isinstance(sources, list) and len(out["sources"]) < len(sources)):
        out["problem"] = f"{META} {why or 'has values of the wrong kind'}" + (
            f" (dropped: {', '.join(dropped)})" if dropped else "")
    return out


# ---- batches --------------------------------------------------------------------------

def get_batch(ids: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator,
              device="cpu", mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of seq_len + 1 tokens: inputs and next-token targets (int64).
    With a loss `mask` (instruction data), the targets of masked tokens in the same windows are IGNORE."""
    if len(ids) < seq_len + 1:
        raise ValueError(f"{len(ids)} tokens cannot fill a window of {seq_len} + 1 tokens.")
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
    at = starts[:, None] + np.arange(seq_len + 1)
    win = torch.from_numpy(ids[at].astype(np.int64))
    if mask is not None:  # the inputs stay whole; only the targets' copy is masked
        win = torch.cat([win, masked_targets(win[:, 1:], mask[at][:, 1:])], dim=1)
    if torch.device(device).type == "cuda":
        win = win.pin_memory().to(device, non_blocking=True)
    else:
        win = win.to(device)
    if mask is not None:
        return win[:, :seq_len], win[:, seq_len + 1:]
    return win[:, :-1], win[:, 1:]


def masked_targets(targets: torch.Tensor, mask) -> torch.Tensor:
    """`targets` with IGNORE where `mask` (same shape, 0/1) is 0: those tokens count in no loss."""
    keep = torch.as_tensor(np.asarray(mask), dtype=torch.bool, device=targets.device)
    return targets.masked_fill(~keep, IGNORE)


def eval_windows(ids: np.ndarray, seq_len: int, max_windows: int | None = None) -> list[np.ndarray]:
    """Consecutive windows covering the split (each token predicted once); when there are more than
    `max_windows`, an evenly spaced fixed sample of them. The last window may be shorter."""
    step = max(1, min(seq_len, len(ids) - 1))
    starts = list(range(0, len(ids) - 1, step))
    if max_windows is not None and len(starts) > max_windows:
        pick = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
        starts = [starts[i] for i in pick]
    return [ids[s:s + step + 1] for s in starts]


# ---- bundled sample texts -------------------------------------------------------------

def list_samples() -> list[dict]:
    """The bundled sample texts: name, title (the first line) and size."""
    out = []
    for p in sorted(SAMPLES_DIR.glob("*.txt")):
        first = p.read_text("utf-8").strip().splitlines()[0] if p.stat().st_size else p.stem
        out.append({"name": p.stem, "title": first.strip("# ").strip(), "path": str(p),
                    "bytes": p.stat().st_size})
    return out


def load_sample(name: str) -> str:
    names = [s["name"] for s in list_samples()]
    if name not in names:
        raise ValueError(f"no sample named {name!r}; choose from {', '.join(names)}.")
    return read_text_file(SAMPLES_DIR / f"{name}.txt")

"""Adapters as .zip files: a guarded extract for uploads, and a plain export.

An uploaded zip is hostile until proven otherwise: member paths are checked (no absolute paths,
no '..', no links), the member count and the uncompressed sizes are capped (declared sizes and
the bytes actually inflated), pickles are refused, and only the adapter's own files are taken.
"""
from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from .adapter_io import CONFIG, META, WEIGHTS
from .adapter_validate import MAX_FILE_BYTES, MAX_JSON_BYTES, PICKLE_HINT, PICKLE_SUFFIXES, AdapterError

README = "README.md"  # PEFT writes a model card beside the adapter
ALLOWED = (WEIGHTS, CONFIG, META, README)
MAX_MEMBERS = 64


def extract_adapter_zip(zip_path, dest: Path, max_bytes: int = MAX_FILE_BYTES) -> Path:
    """Extract the adapter files of `zip_path` into the (empty, private) folder `dest`."""
    name = Path(zip_path).name
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise AdapterError(f"{name} is not a readable .zip file ({e}).") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise AdapterError(f"{name} has {len(infos)} entries; an adapter zip holds a few files "
                               f"({', '.join(ALLOWED)}).")
        found: dict[tuple[str, ...], dict[str, zipfile.ZipInfo]] = {}
        for info in infos:
            parts = _safe_parts(info, name)
            if info.is_dir() or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
                continue
            if PurePosixPath(parts[-1]).suffix.lower() in PICKLE_SUFFIXES:
                raise AdapterError(f"{name} contains {info.filename}: {PICKLE_HINT}")
            if parts[-1] in ALLOWED:
                found.setdefault(parts[:-1], {})[parts[-1]] = info
        folders = sorted((d for d, files in found.items() if WEIGHTS in files), key=len)
        if not folders:
            raise AdapterError(f"{name} holds no {WEIGHTS}; zip a PEFT adapter folder "
                               f"({WEIGHTS} + {CONFIG}).")
        if len(folders) > 1 and len(folders[1]) == len(folders[0]):
            raise AdapterError(f"{name} holds several adapters ({'/'.join(folders[0]) or '.'} and "
                               f"{'/'.join(folders[1])}); zip one adapter folder at a time.")
        members = found[folders[0]]
        for fname, info in members.items():
            cap = max_bytes if fname == WEIGHTS else MAX_JSON_BYTES
            if info.file_size > cap:
                raise AdapterError(f"{name}: {info.filename} would unpack to {info.file_size} bytes, over the "
                                   f"limit of {cap} bytes.")
            _extract_capped(zf, info, dest / fname, cap, name)
    return dest


def _safe_parts(info: zipfile.ZipInfo, name: str) -> tuple[str, ...]:
    raw = info.filename
    p = PurePosixPath(raw)
    if raw.startswith(("/", "\\")) or "\\" in raw or (len(raw) > 1 and raw[1] == ":") or ".." in p.parts:
        raise AdapterError(f"{name}: member {raw!r} has an unsafe path (absolute or with '..'); refusing the zip.")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise AdapterError(f"{name}: member {raw!r} is a symbolic link; links are not allowed in adapter zips.")
    if info.flag_bits & 0x1:
        raise AdapterError(f"{name}: member {raw!r} is encrypted; upload an unencrypted zip.")
    parts = tuple(q for q in p.parts if q not in ("", "."))
    if not parts:
        raise AdapterError(f"{name}: member {raw!r} has an empty path.")
    return parts


def _extract_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path, cap: int, name: str) -> None:
    """Copy one member, counting the bytes really inflated (declared sizes can lie)."""
    n = 0
    try:
        with zf.open(info) as src, open(out, "xb") as dst:
            while chunk := src.read(1 << 20):
                n += len(chunk)
                if n > cap:
                    raise AdapterError(f"{name}: {info.filename} unpacks to more than {cap} bytes; "
                                       f"refusing (zip bomb?).")
                dst.write(chunk)
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError) as e:  # zlib errors, CRC mismatch
        raise AdapterError(f"{name}: {info.filename} could not be unpacked ({e}).") from None


def write_adapter_zip(folder: Path, out: Path) -> Path:
    """Zip the adapter files of `folder` (flat, as PEFT lays them out) into `out`, fsynced."""
    with zipfile.ZipFile(out, "w") as zf:
        for fname in ALLOWED:
            p = folder / fname
            if p.is_file() and not p.is_symlink():
                # float weights barely compress: store them, deflate the text files
                kind = zipfile.ZIP_STORED if fname == WEIGHTS else zipfile.ZIP_DEFLATED
                zf.write(p, fname, compress_type=kind)
    with open(out, "rb") as f:
        os.fsync(f.fileno())
    return out

"""Adapters as .zip files: a guarded extract for uploads, and a plain export.

An uploaded zip is hostile until proven otherwise: member paths are checked (no absolute paths,
no '..', no links), the member count and the uncompressed sizes are capped (declared sizes and
the bytes actually inflated), pickles are refused, and only the adapter's own files are taken.
"""
from __future__ import annotations

import os
import stat
import struct
import time
import zipfile
from pathlib import Path, PurePosixPath

from core.adapters import run_record
from core.adapters.format import CONFIG, WEIGHTS
from core.adapters.run_record import HISTORY, MAX_HISTORY_BYTES, META
from core.adapters.validate import MAX_FILE_BYTES, MAX_JSON_BYTES, PICKLE_HINT, PICKLE_SUFFIXES, AdapterError

README = "README.md"  # PEFT writes a model card beside the adapter
ALLOWED = (WEIGHTS, CONFIG, META, README, HISTORY)
CAPS = {WEIGHTS: None, HISTORY: MAX_HISTORY_BYTES}  # bytes a member may unpack to (None: the adapter cap)
MAX_MEMBERS = 64
# the central directory: one ~46-byte record + name + extras per member (a name is at most 64 KiB); zipfile
# parses a crafted one of millions of entries for tens of seconds into gigabytes, so its size is checked first
MAX_DIRECTORY_BYTES = 1 << 20
EOCD, EOCD64, LOCATOR64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"


def extract_adapter_zip(zip_path, dest: Path, max_bytes: int = MAX_FILE_BYTES) -> Path:
    """Extract the adapter files of `zip_path` into the (empty, private) folder `dest`."""
    name = Path(zip_path).name
    _check_directory(Path(zip_path), name)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise AdapterError(f"{name} is not a readable .zip file ({e}).") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise AdapterError(f"{name} has {len(infos)} entries; an adapter zip holds a few files "
                               f"({', '.join(ALLOWED)}).")
        # the history has its own cap (CAPS), and only one folder's files are ever unpacked
        total = sum(i.file_size for i in infos if PurePosixPath(i.filename).name != HISTORY)
        cap = max_bytes + 3 * MAX_JSON_BYTES
        if total > cap:
            raise AdapterError(f"{name} would unpack to {total} bytes in all, over the {cap} byte limit for an "
                               f"adapter zip; zip only the adapter folder.")
        found = _members(infos, name)
        folders = sorted((d for d, files in found.items() if WEIGHTS in files), key=len)
        if not folders:
            raise AdapterError(f"{name} holds no {WEIGHTS}; zip a PEFT adapter folder "
                               f"({WEIGHTS} + {CONFIG}).")
        if len(folders) > 1 and len(folders[1]) == len(folders[0]):
            raise AdapterError(f"{name} holds several adapters ({'/'.join(folders[0]) or '.'} and "
                               f"{'/'.join(folders[1])}); zip one adapter folder at a time.")
        members = found[folders[0]]
        for fname, info in members.items():
            cap = CAPS.get(fname, MAX_JSON_BYTES) or max_bytes
            if info.file_size > cap:
                raise AdapterError(f"{name}: {info.filename} would unpack to {info.file_size} bytes, over the "
                                   f"limit of {cap} bytes.")
            _extract_capped(zf, info, dest / fname, cap, name)
    return dest


def _check_directory(path: Path, name: str) -> None:
    """Entry count and central-directory size from the end-of-central-directory record (zip64 too),
    read in a few bytes before zipfile parses the directory itself."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - (1 << 16) - 22 - 20 - 56))
            tail = f.read()
    except OSError as e:
        raise AdapterError(f"{name} could not be read ({e.strerror}).") from None
    at = tail.rfind(EOCD)
    if at < 0 or len(tail) - at < 22:
        raise AdapterError(f"{name} is not a readable .zip file (no end-of-central-directory record).")
    entries, cd_size = struct.unpack("<xxxxxxxxxxHI", tail[at:at + 16])
    loc = at - 20
    if loc >= 0 and tail[loc:loc + 4] == LOCATOR64:  # zip64: the real counts are in the zip64 record
        z64 = at - 20 - 56
        if z64 >= 0 and tail[z64:z64 + 4] == EOCD64:
            entries, cd_size = struct.unpack("<QQ", tail[z64 + 32:z64 + 48])
        elif entries == 0xFFFF or cd_size == 0xFFFFFFFF:
            raise AdapterError(f"{name} is not a readable .zip file (its zip64 record is missing).")
    if entries > MAX_MEMBERS:
        raise AdapterError(f"{name} has {entries} entries; an adapter zip holds a few files ({', '.join(ALLOWED)}).")
    if cd_size > MAX_DIRECTORY_BYTES:
        raise AdapterError(f"{name} has a central directory of {cd_size} bytes, over the {MAX_DIRECTORY_BYTES} "
                           f"byte limit; an adapter zip lists a few files.")


def _members(infos: list[zipfile.ZipInfo], name: str) -> dict[tuple[str, ...], dict[str, zipfile.ZipInfo]]:
    """The adapter files by folder; unsafe paths, links, pickles and repeated names refused."""
    found: dict[tuple[str, ...], dict[str, zipfile.ZipInfo]] = {}
    seen = set()
    for info in infos:
        parts = _safe_parts(info, name)
        if parts in seen:  # zipfile would silently take the last of them
            raise AdapterError(f"{name} holds two files named {'/'.join(parts)}; zip each file once.")
        seen.add(parts)
        if info.is_dir() or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
            continue
        if PurePosixPath(parts[-1]).suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterError(f"{name} contains {info.filename}: {PICKLE_HINT}")
        if parts[-1] in ALLOWED:
            found.setdefault(parts[:-1], {})[parts[-1]] = info
    return found


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
    """Zip the adapter files of `folder` (flat, as PEFT lays them out) into `out`, which the caller publishes
    (core.atomic.publish_file). The history is the record's own (a checkpoint's file may run on past its
    step), line by line."""
    with zipfile.ZipFile(out, "w") as zf:
        for fname in ALLOWED:
            p = folder / fname
            if fname == HISTORY:
                _zip_history(zf, folder)
            elif p.is_file() and not p.is_symlink():
                # float weights barely compress: store them, deflate the text files
                kind = zipfile.ZIP_STORED if fname == WEIGHTS else zipfile.ZIP_DEFLATED
                zf.write(p, fname, compress_type=kind)
    return out


def _zip_history(zf: zipfile.ZipFile, folder: Path) -> None:
    meta = run_record.read(folder)[0]
    if not meta.get("history_bytes"):  # none, or an older record's inline one (inside its studio.json)
        return
    info = zipfile.ZipInfo(HISTORY, date_time=time.localtime()[:6])
    info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
    with zf.open(info, "w", force_zip64=True) as dst:
        for line in run_record.encode(run_record.history(folder, meta)):
            dst.write(line)

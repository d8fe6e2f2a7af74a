"""What one user may keep on the server's disk, and the free space every write leaves for everyone.

One rule for every write a user asks for: a library entry (a save, an upload, a blend, a duplicate, a
restored checkpoint, a new or resumed training run) and a dataset. The store lists the sizes of what the
user owns; the Quota refuses a new entry past the user's count or size cap, and any write that would leave
less than the floor free on the disk (a full disk fails every user's saves, so the floor holds for
everyone). Admins have no caps. Without sign-in nobody owns an entry, and only the floor applies.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

from core.checks import is_whole
from core.train.estimate import human_bytes, parse_size

GiB = 1 << 30


class QuotaError(ValueError):
    """A write refused by a quota or the free-space floor; the message says what to do."""


@dataclass(frozen=True)
class Limit:
    count: int = 0  # entries one user may own (0: no cap)
    bytes: int = 0  # their total size on disk (0: no cap)


@dataclass(frozen=True)
class Quota:
    """The caps (the default: none, as for the CLI; the studio's flags give classroom values, `for_studio`)."""
    min_free: float = 0  # bytes the disk keeps free, or below 1 a share of it (0.05 = 5%); 0: no floor
    adapters: Limit = Limit()  # library entries per user (runs with their checkpoints, uploads, copies)
    datasets: Limit = Limit()  # prepared datasets per user
    admins: frozenset[str] = field(default_factory=frozenset)  # users without caps

    @classmethod
    def for_studio(cls, min_free="1GB", adapters=100, library="5GB", datasets=50, datasets_size="2GB",
                   admins=()) -> "Quota":
        """From the studio's flags (--min-free-disk SIZE or PERCENT%, --max-adapters-per-user,
        --max-library-per-user, --max-datasets-per-user, --max-datasets-size-per-user; 0 turns one off)."""
        return cls(_floor(min_free), Limit(_count(adapters, "--max-adapters-per-user"), _size(library, "--max-library-per-user")),
                   Limit(_count(datasets, "--max-datasets-per-user"),
                         _size(datasets_size, "--max-datasets-size-per-user")), frozenset(admins))

    def check(self, kind: str, folder, user: str | None, owned: Callable[[], list[int]], adding: int = 0,
              new: bool = True, written: bool = False) -> None:
        """Refuse (QuotaError) `user`'s write of about `adding` bytes into `folder`, whose store holds their
        `kind` ('adapters' or 'datasets'; owned(): the sizes of theirs, asked only when a cap applies).
        new: it adds an entry. written: those bytes are on the disk already (a folder built, not yet published)."""
        self.check_floor(folder, 0 if written else adding)
        limit: Limit = getattr(self, kind)
        if not user or user in self.admins or not (limit.count or limit.bytes):
            return
        sizes = owned()
        if new and limit.count and len(sizes) >= limit.count:
            raise QuotaError(f"you already have {len(sizes)} {kind} here, the most one user may keep; delete "
                             f"some you no longer need first.")
        used = sum(sizes)
        if limit.bytes and used + max(adding, 1) > limit.bytes:
            more = f" and this needs {human_bytes(adding)} more" if adding else ""
            raise QuotaError(f"your {kind} take {human_bytes(used)} of the {human_bytes(limit.bytes)} one user may "
                             f"keep{more}; delete some you no longer need first.")

    def check_floor(self, folder, adding: int = 0) -> None:
        """Refuse a write of `adding` bytes that would leave the disk of `folder` below the floor."""
        if not self.min_free:
            return
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            return
        floor = self.min_free if self.min_free >= 1 else self.min_free * usage.total
        if usage.free - adding < floor:
            raise QuotaError(f"the server's disk is nearly full ({human_bytes(usage.free)} free, {human_bytes(floor)} "
                             f"is kept free for everyone), so nothing was saved; delete something you no longer "
                             f"need, or ask whoever runs the server to free space.")


def folder_bytes(folder) -> int:
    """The size of the files under `folder` (links are not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def _floor(spec) -> float:
    text = str(spec).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 <= share < 1:
            raise ValueError(f"--min-free-disk {spec!r}: write a share of the disk from 0% to 99%, or a size like 1GB.")
        return share
    return _size(spec, "--min-free-disk")


def _size(spec, flag: str) -> int:
    if is_whole(spec):
        return _count(spec, flag)
    if str(spec).strip() == "0":
        return 0
    try:
        return parse_size(spec)
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: write a size like 5GB or 512MB (0: no limit).") from None


def _count(value, flag: str) -> int:
    if not is_whole(value, 0):
        raise ValueError(f"{flag} must be a whole number of at least 0 (0: no limit), not {value!r}.")
    return value

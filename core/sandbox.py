"""Visitor sandboxes of a public demo, and the read-only gallery that its owner ships.

A visitor is known by a random secret that their browser keeps; what they make is owned, as a signed-in
user's work is, by a name derived from that secret (`visitor_name`), so the sign-in privacy rules and the
per-user quotas apply unchanged: a visitor sees their own datasets and adapters, and what is shared (the
gallery). A sandbox lasts `idle_s` after its visitor's last request; `Sandboxes.expired` says whose ended,
and `clean` deletes what they owned. The gallery's adapters are library entries owned by GALLERY, shared
with everyone, and nobody may rename, delete, share or resume them (`check_not_gallery`).
"""
from __future__ import annotations

import hashlib
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from core.adapters.format import name_from_path
from core.adapters.library import Library, valid_name
from core.adapters.validate import AdapterError
from core.train.datasets import DatasetStore

VISITOR = "visitor:"  # a colon: no --auth user name can hold one (app.py splits user:password at the first)
GALLERY = "gallery"  # the owner recorded on the gallery's entries


def visitor_name(secret: str) -> str:
    """The owner name of the visitor who holds `secret`: shown in their own lists, it must not reveal the
    secret (whoever holds the secret acts as the visitor)."""
    return VISITOR + hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()[:20]


def is_visitor(user) -> bool:
    return isinstance(user, str) and user.startswith(VISITOR)


class Sandboxes:
    """When each visitor was last seen, by `clock` (seconds; tests pass their own)."""

    def __init__(self, idle_s: float, clock: Callable[[], float] = time.time):
        self.idle_s, self.clock = idle_s, clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, name: str) -> None:
        with self._lock:
            self._seen[name] = self.clock()

    def adopt(self, names: Iterable[str]) -> None:
        """Visitors whose work is on disk but who have not come back since this process started: their idle
        time starts now (a restart never deletes anyone's work at once)."""
        now = self.clock()
        with self._lock:
            for name in names:
                self._seen.setdefault(name, now)

    def expired(self) -> dict[str, float]:
        """Visitor -> when last seen, of those idle for `idle_s` or more."""
        now = self.clock()
        with self._lock:
            return {n: t for n, t in self._seen.items() if now - t >= self.idle_s}

    def forget(self, name: str, last_seen: float) -> None:
        """Drop `name` once their sandbox is cleaned, unless they came back since `last_seen`."""
        with self._lock:
            if self._seen.get(name) == last_seen:
                del self._seen[name]

    def __contains__(self, name) -> bool:
        return name in self._seen


def owners_on_disk(library: Library, store: DatasetStore) -> set[str]:
    """The visitors who own a library entry or a dataset."""
    owners = {e.user for e in library.list()} | {d["meta"].get("user") for d in store.list()}
    return {o for o in owners if is_visitor(o)}


def clean(owners: set[str], library: Library, store: DatasetStore) -> set[str]:
    """Delete every library entry and dataset that `owners` own; the owners some of whose entries could not
    go yet (a run still training, a file in use) are returned, for the next sweep."""
    left = set()
    for e in library.list():
        if e.user in owners:
            try:
                library.delete(e.name)
            except (ValueError, OSError):
                left.add(e.user)
    for d in store.list():
        owner = d["meta"].get("user")
        if owner in owners:
            try:
                store.delete(d["name"])
            except (ValueError, OSError):
                left.add(owner)
    return left


def check_not_gallery(library: Library, name: str, action: str) -> None:
    """Refuse to `action` (rename, delete, share, resume) a gallery adapter, for every user."""
    try:
        owner = library.details(name).get("user")
    except (ValueError, OSError):  # nothing readable to protect: the action itself says what is wrong
        return
    if owner == GALLERY:
        raise AdapterError(f"'{name}' is in the read-only gallery, so you cannot {action} it; duplicate it for a "
                           f"copy of your own.")


def import_gallery(library: Library, folder) -> list[str]:
    """Import the adapters in `folder` (PEFT folders, or .zip files of one) into the library as gallery
    entries, validated as uploads are; an entry already there stays as it is. Returns the gallery's names;
    a problem with one adapter is printed (for the Space's log) and the others still come."""
    library.quota = replace(library.quota, admins=library.quota.admins | {GALLERY})  # the owner's, no caps
    names = []
    for item in sorted(Path(folder).iterdir()):
        if item.name.startswith(".") or not (item.is_dir() or item.suffix.lower() == ".zip"):
            continue
        name = name_from_path(item)
        try:
            if not valid_name(name):
                raise AdapterError(f"'{name}' is not a valid adapter name (letters, digits, '_', '.', '-').")
            if not (library.root / name).exists():
                library.import_path(item, name, user=GALLERY)
            elif library.details(name).get("user") != GALLERY:
                raise AdapterError(f"the library already has an adapter named '{name}'.")
            library.set_shared(name, True)  # at every start: an import cut short before this step is finished
            names.append(name)
        except (ValueError, OSError) as e:
            print(f"gallery: {item.name} skipped: {e}", file=sys.stderr)
    return names

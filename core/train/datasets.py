"""The datasets folder: named dataset folders, listed, name-checked and created atomically.

It mirrors the adapter Library: names follow the same rule, a path never leaves the folder, every
meta.json is read defensively, and a new dataset appears whole or not at all (core.atomic.publish_dir).
The studio's Data and Train tabs go through it; they never look for shard files themselves.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from core.adapters.library import shown_name, valid_name
from core.atomic import publish_dir
from core.quota import Quota, folder_bytes
from core.train.data import Dataset, load_dataset, read_dataset_meta, save_dataset

FIRST_SHARD = "train_00000.npy"  # a folder holding it is a prepared dataset (this app's or the seed's)


def is_dataset_folder(path) -> bool:
    """Whether `path` is a prepared dataset folder (it need not be in a store: a run records its path)."""
    p = Path(path)
    return p.is_dir() and (p / FIRST_SHARD).is_file()


def _taken(name: str) -> str:
    return f"a dataset named '{name}' already exists; choose another name."


class DatasetStore:
    """Dataset folders under `root`, by name."""

    def __init__(self, root, quota: Quota | None = None):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota = quota or Quota()  # per-user caps and the free-space floor (the studio sets its flags')

    def path(self, name) -> Path:
        """The folder of dataset `name` (it may not exist yet); ValueError for a name that breaks the rules
        or would lead outside the store."""
        if not valid_name(name):
            raise ValueError(f"invalid dataset name {shown_name(name)}: use 1-64 letters, digits, '_', '.' or '-', "
                             f"starting with a letter or digit (not a Windows device name such as 'con').")
        p = self.root / name
        if p.is_symlink() or not p.resolve().is_relative_to(self.root):
            raise ValueError(f"dataset {name!r} is not inside the datasets folder.")
        return p

    def check_new(self, name) -> Path:
        """The folder for a new dataset `name`; ValueError when the name breaks the rules or is taken."""
        path = self.path(name)
        if path.exists():
            raise ValueError(_taken(name))
        return path

    def list(self) -> list[dict]:
        """Prepared datasets, newest first: name, meta (read defensively, never raises), mtime."""
        out = []
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not valid_name(d.name) or d.is_symlink() or not is_dataset_folder(d):
                continue  # hidden build folders, stray files and links are not datasets
            out.append({"name": d.name, "meta": read_dataset_meta(d), "mtime": d.stat().st_mtime})
        return sorted(out, key=lambda x: -x["mtime"])

    def create(self, name, ds: Dataset, user: str | None = None) -> Path:
        """Save `ds` as the new dataset `name` of `user` (recorded in meta.json): built in a hidden folder,
        published whole. ValueError when the name is taken, also by another session meanwhile, or past the
        user's quota or the disk's floor (nothing is written then); a failed write leaves nothing behind."""
        path = self.check_new(name)
        size = sum(a.nbytes for a in (ds.train, ds.val, ds.train_mask, ds.val_mask) if a is not None)
        self.quota.check("datasets", self.root, user, lambda: self._owned(user), size)
        ds.meta = {k: v for k, v in ds.meta.items() if k != "user"} | ({"user": user} if user else {})
        try:
            publish_dir(path, lambda tmp: save_dataset(ds, tmp, name=name))  # meta.json records the final name
        except FileExistsError:  # another session took the name meanwhile
            raise ValueError(_taken(name)) from None
        ds.path = path
        return path

    def delete(self, name) -> None:
        """Remove dataset `name`: moved into a hidden folder first, so it leaves the listing in one step (as a
        library entry does); ValueError when there is none."""
        path = self.path(name)
        if not is_dataset_folder(path):
            raise ValueError(f"no dataset named '{name}'.")
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.root))
        os.rename(path, trash / "x")
        shutil.rmtree(trash, ignore_errors=True)

    def _owned(self, user: str) -> list[int]:
        """The sizes on disk of the datasets `user` prepared."""
        return [folder_bytes(self.root / d["name"]) for d in self.list() if d["meta"].get("user") == user]

    def load(self, name) -> Dataset:
        return load_dataset(self.path(name))

    def find(self, path=None, name=None) -> Path | None:
        """The first prepared dataset among a recorded folder `path` and the store's `name` (a run's
        metadata records both; the folder may have moved or been deleted since)."""
        candidates = [path] if isinstance(path, str) and path else []
        if valid_name(name):
            candidates.append(self.path(name))
        return next((Path(p) for p in candidates if is_dataset_folder(p)), None)

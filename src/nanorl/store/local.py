"""A local folder as a store (also what tests and `checkpoint.store=/mnt/backup` use)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nanorl.api import NanorlError


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in p.parents and p != self.root.resolve():
            raise NanorlError(f"store key {key!r} escapes the store folder {self.root}")
        return p

    def check(self) -> None:
        """The folder, or the nearest folder above it that exists (`put` makes the rest), is a writable folder;
        else a NanorlError saying so. Makes nothing."""
        p = self.root.absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        if not p.is_dir():
            raise NanorlError(f"store folder {self.root} cannot be made: {p} is not a folder", hint="check the path")
        if not os.access(p, os.W_OK | os.X_OK):
            raise NanorlError(f"store folder {self.root} is not writable ({p})", hint="check its permissions")

    def put(self, local: str | Path, key: str) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)  # atomic: a reader never sees half a file

    def get(self, key: str, local: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NanorlError(f"{key!r} is not in the store {self.root}")
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, local)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root
        if not base.is_dir():
            return []
        keys = [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
        return sorted(k for k in keys if k.startswith(prefix))

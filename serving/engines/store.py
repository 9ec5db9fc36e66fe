"""The model store: weights kept by content, so a version's bytes cannot change under its name.

``hash_tree`` hashes every file of a weights directory (a Hugging Face cache snapshot too: its
files are links into ``blobs/``, followed), ``import_tree`` puts each file in the store under its
sha256 (``<store>/sha256/<2 hex>/<digest>``, read-only) and lays out the version's directory as
hard links to those objects (a copy where the store is on another filesystem), and
``verify_tree`` checks a directory against a manifest's sha256 table, naming the first file
that is missing or differs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20
Progress = Callable[[int, int], None]  # bytes done, bytes in all


class StoreError(RuntimeError):
    """A weights directory that cannot be imported or does not verify."""


def files_of(src: Path) -> list[Path]:
    """Every regular file under ``src`` (links followed), hidden ones (``.git``, ``.cache``)
    left out, in a stable order."""
    if not src.is_dir():
        raise StoreError(f"{src} is not a directory")
    found = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            found.append(path)
    if not found:
        raise StoreError(f"{src} holds no file")
    return found


def sha256_of(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


def hash_tree(src: Path, progress: Progress | None = None) -> dict[str, str]:
    """Relative posix path -> sha256 of every file of ``src``."""
    files = files_of(src)
    total = sum(p.stat().st_size for p in files)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    return {p.relative_to(src).as_posix(): sha256_of(p, step) for p in files}


def object_path(store: Path, digest: str) -> Path:
    return store / "sha256" / digest[:2] / digest


def import_tree(src: Path, sums: dict[str, str], store: Path, dest: Path) -> None:
    """Each file of ``src`` into the store (once per content), and ``dest`` laid out as links
    to the store's objects. ``dest`` must not exist yet."""
    if dest.exists():
        raise StoreError(f"{dest} exists already")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for rel, digest in sums.items():
        obj = object_path(store, digest)
        if not obj.exists():
            obj.parent.mkdir(parents=True, exist_ok=True)
            tmp = obj.with_name(obj.name + ".tmp")
            shutil.copyfile(src / rel, tmp)
            if sha256_of(tmp) != digest:  # changed while being imported
                tmp.unlink()
                raise StoreError(f"{src / rel} changed while it was imported")
            tmp.chmod(0o444)
            os.replace(tmp, obj)
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(obj, target)
        except OSError:
            shutil.copyfile(obj, target)
    os.replace(staging, dest)


def verify_tree(directory: Path, sums: dict[str, str]) -> None:
    """Raise ``StoreError`` naming the first file that is missing or not what was pinned."""
    if not directory.is_dir():
        raise StoreError(f"model directory {directory} does not exist")
    for rel, expected in sorted(sums.items()):
        path = directory / rel
        if not path.is_file():
            raise StoreError(f"{path} is missing")
        actual = sha256_of(path)
        if actual != expected:
            raise StoreError(f"{path}: sha256 {actual} does not match the pinned {expected}")

"""The content-addressed model store (``engines.store``): hashing a weights directory (a Hugging
Face snapshot's links followed), importing it once per content, verifying against pins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.engines.store import StoreError, hash_tree, import_tree, object_path, verify_tree


def snapshot(root: Path) -> Path:
    """A Hugging Face cache layout: snapshots/<rev>/ files are links into blobs/."""
    blobs = root / "blobs"
    snap = root / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    (snap / "sub").mkdir(parents=True)
    for name, data in {"config.json": b'{"a": 1}', "model.safetensors": b"\x00" * 4096,
                       "sub/tokenizer.json": b"{}"}.items():
        blob = blobs / f"blob-{len(data)}-{name.replace('/', '_')}"
        blob.write_bytes(data)
        os.symlink(blob, snap / name)
    (snap / ".cache").mkdir()
    (snap / ".cache" / "lock").write_text("x")
    return snap


def test_import_hashes_links_once_and_verifies(tmp_path: Path) -> None:
    src = snapshot(tmp_path / "hf")
    seen: list[tuple[int, int]] = []
    sums = hash_tree(src, lambda done, total: seen.append((done, total)))
    assert set(sums) == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    assert seen[-1][0] == seen[-1][1] == 4096 + 8 + 2
    store, dest = tmp_path / "store", tmp_path / "models" / "demo" / "v2"
    import_tree(src, sums, store, dest)
    verify_tree(dest, sums)
    obj = object_path(store, sums["model.safetensors"])
    assert obj.is_file() and obj.stat().st_mode & 0o222 == 0  # read-only
    # The same bytes under another version: stored once.
    import_tree(src, sums, store, tmp_path / "models" / "demo" / "v3")
    assert len([p for p in (store / "sha256").rglob("*") if p.is_file()]) == 3
    with pytest.raises(StoreError, match="exists already"):
        import_tree(src, sums, store, dest)


def test_a_changed_or_missing_file_is_named(tmp_path: Path) -> None:
    src = snapshot(tmp_path / "hf")
    sums = hash_tree(src)
    dest = tmp_path / "v2"
    import_tree(src, sums, tmp_path / "store", dest)
    target = dest / "config.json"
    target.unlink()  # the link, not the store's object
    target.write_bytes(b'{"a": 2}')
    with pytest.raises(StoreError, match=r"config\.json: sha256 .* does not match"):
        verify_tree(dest, sums)
    target.unlink()
    with pytest.raises(StoreError, match=r"config\.json is missing"):
        verify_tree(dest, sums)
    with pytest.raises(StoreError, match="not a directory"):
        hash_tree(tmp_path / "nope")

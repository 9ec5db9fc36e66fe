"""`enclave models import` and `verify` through the real CLI: a weights directory hashed, kept
in the content-addressed store, added to the manifest (comments kept, traffic 0, ports of its
own); the same name with other bytes refused; a changed file named by `verify`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support import REPO, TEST_PEPPER, copy_manifests


def enclave(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(tmp / "data"),
           "ENCLAVE_CACHE_DIR": str(tmp / "cache"), "ENCLAVE_MODELS_DIR": str(tmp / "models"),
           "ENCLAVE_PEPPER": TEST_PEPPER}
    return subprocess.run([sys.executable, "-m", "serving.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def weights(root: Path, seed: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_bytes(b'{"layers": 2}')
    (root / "model.safetensors").write_bytes(seed * 50000)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
    return root


def test_import_adds_a_pinned_version_and_verify_names_a_changed_file(tmp_path: Path) -> None:
    models = copy_manifests(tmp_path / "models")
    manifest = models / "demo-chat.yaml"
    manifest.write_text("# demo-chat: kept by the import\n" + manifest.read_text())
    src = weights(tmp_path / "w2", b"\x01")
    out = enclave(tmp_path, "models", "import", "demo-chat", "--from", str(src),
                  "--version", "v2", "--revision", "seed-1")
    assert out.returncode == 0, out.stderr
    assert "imported demo-chat@v2: 3 files" in out.stdout
    text = manifest.read_text()
    assert text.startswith("# demo-chat: kept by the import")
    data = yaml.safe_load(text)
    v1, v2 = data["versions"]
    assert data["traffic"] == {"v1": 100, "v2": 0}
    assert v2["revision"] == "seed-1" and set(v2["sha256"]) == {
        "config.json", "model.safetensors", "tokenizer/tokenizer.json"}
    assert v2["engine"]["port"] not in (v1["engine"]["port"],)
    assert Path(v2["source"]["path"]).is_dir()
    assert enclave(tmp_path, "models", "list").returncode == 0  # still valid, ports distinct
    # The same bytes again: nothing to do; other bytes under the name: refused.
    again = enclave(tmp_path, "models", "import", "demo-chat", "--from", str(src),
                    "--version", "v2")
    assert again.returncode == 0 and "already imported" in again.stdout
    other = weights(tmp_path / "w3", b"\x02")
    refused = enclave(tmp_path, "models", "import", "demo-chat", "--from", str(other),
                      "--version", "v2")
    assert refused.returncode != 0 and "exists with other bytes" in refused.stderr
    ok = enclave(tmp_path, "models", "verify", "demo-chat@v2")
    assert ok.returncode == 0 and "demo-chat@v2: ok (3 files)" in ok.stdout
    # A file changed on disk after the import: verify fails and names it.
    target = Path(v2["source"]["path"]) / "config.json"
    target.unlink()
    target.write_bytes(b'{"layers": 3}')
    bad = enclave(tmp_path, "models", "verify", "demo-chat@v2")
    assert bad.returncode == 1 and "config.json" in bad.stdout and "FAILED" in bad.stdout

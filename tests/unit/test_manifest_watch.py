"""Live manifests (``storage.manifest_watch``): a valid change reaches its receiver, a bad
one is refused with its file and field (logged once) and the running set stays, an untouched
directory costs a ``stat`` per file and nothing more."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from serving.domain.manifest import Manifest
from serving.storage.manifest_watch import ManifestWatcher
from serving.storage.manifests import load_manifests
from tests.support import REPO

pytestmark = pytest.mark.anyio


def write(models: Path, data: dict[str, object]) -> None:
    path = models / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    # Some filesystems keep coarse times: a rewrite must still look like one.
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def demo() -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    return data


def watcher_of(models: Path) -> tuple[ManifestWatcher, list[list[Manifest]]]:
    applied: list[list[Manifest]] = []
    watcher = ManifestWatcher(models, applied.append, interval_s=0.01,
                              applied=load_manifests(models))
    return watcher, applied


async def test_a_valid_change_is_applied_and_an_unchanged_directory_is_not(
        tmp_path: Path) -> None:
    data = demo()
    write(tmp_path, data)
    watcher, applied = watcher_of(tmp_path)
    assert not await watcher.poll() and applied == []  # the set in force: nothing to do
    data["description"] = "changed"
    write(tmp_path, data)
    assert await watcher.poll()
    assert [m.description for m in applied[0]] == ["changed"]
    assert watcher.applied_at is not None and watcher.last_error is None
    assert not await watcher.poll() and len(applied) == 1  # nothing changed since
    write(tmp_path, data)  # touched, same content: read again, not applied again
    assert not await watcher.poll() and len(applied) == 1


async def test_a_bad_manifest_is_refused_once_with_its_file_and_field_then_a_fix_applies(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = demo()
    write(tmp_path, data)
    watcher, applied = watcher_of(tmp_path)
    data["versions"][0]["engine"]["max_model_len"] = 1  # type: ignore[index]
    write(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="enclave.manifests"):
        assert not await watcher.poll()
        write(tmp_path, data)  # the same error again: not logged again
        assert not await watcher.poll()
    assert applied == []
    assert watcher.last_error is not None
    assert "demo-chat.yaml" in watcher.last_error
    assert "versions.0.engine.max_model_len" in watcher.last_error
    refusals = [r for r in caplog.records if r.getMessage().startswith("manifests refused")]
    assert len(refusals) == 1 and "max_model_len" in refusals[0].problem  # type: ignore[attr-defined]
    data["versions"][0]["engine"]["max_model_len"] = 4096  # type: ignore[index]
    write(tmp_path, data)
    assert await watcher.poll()
    assert applied[0][0].versions[0].engine.max_model_len == 4096
    assert watcher.last_error is None


async def test_a_set_the_receiver_refuses_is_not_recorded_as_applied(tmp_path: Path) -> None:
    data = demo()
    write(tmp_path, data)
    calls: list[str] = []

    def refuse(manifests: list[Manifest]) -> None:
        calls.append(manifests[0].description)
        if manifests[0].description == "plain":
            raise ValueError("engine endpoint http://10.0.0.7:8000 is plain HTTP")

    watcher = ManifestWatcher(tmp_path, refuse, applied=load_manifests(tmp_path))
    before = data["description"]
    data["description"] = "plain"
    write(tmp_path, data)
    assert not await watcher.poll()
    assert watcher.last_error is not None and "plain HTTP" in watcher.last_error
    data["description"] = before  # back to the set in force: nothing to apply or refuse
    write(tmp_path, data)
    assert not await watcher.poll()
    assert watcher.last_error is None and calls == ["plain"]


async def test_without_a_set_in_force_the_first_valid_set_is_handed_on(tmp_path: Path) -> None:
    write(tmp_path, demo())
    applied: list[list[Manifest]] = []

    async def receive(manifests: list[Manifest]) -> None:
        applied.append(manifests)

    watcher = ManifestWatcher(tmp_path, receive)
    assert await watcher.poll()
    assert [m.name for m in applied[0]] == ["demo-chat"]
    assert not await watcher.poll()

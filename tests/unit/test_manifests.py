from pathlib import Path

import pytest
import yaml

from serving.domain.manifest import ManifestError
from serving.storage.manifests import load_manifest, load_manifests
from tests.support import REPO


def write(tmp_path: Path, data: dict[str, object], name: str | None = None) -> Path:
    path = tmp_path / f"{name or data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def demo() -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    return data


def test_the_repository_manifests_load() -> None:
    manifests = {m.name: m for m in load_manifests(REPO / "models")}
    assert set(manifests) == {"demo-chat", "minilm-embed"}
    assert manifests["minilm-embed"].task == "embed"
    assert "--runner" in manifests["minilm-embed"].versions[0].engine.args
    assert manifests["demo-chat"].versions[0].sha256["model.safetensors"]


def test_traffic_must_add_up_to_100(tmp_path: Path) -> None:
    data = demo()
    data["traffic"] = {"v1": 90}
    with pytest.raises(ManifestError, match="add up to 100"):
        load_manifest(write(tmp_path, data))


def test_traffic_to_an_unknown_version_is_refused(tmp_path: Path) -> None:
    data = demo()
    data["traffic"] = {"v1": 50, "v9": 50}
    with pytest.raises(ManifestError, match="unknown versions"):
        load_manifest(write(tmp_path, data))


@pytest.mark.parametrize("arg", ["--host", "--port=9", "--api-key", "--served-model-name"])
def test_a_manifest_cannot_set_what_the_supervisor_owns(tmp_path: Path, arg: str) -> None:
    data = demo()
    data["versions"][0]["engine"]["args"] = [arg, "x"]  # type: ignore[index]
    with pytest.raises(ManifestError, match="set by the supervisor"):
        load_manifest(write(tmp_path, data))


@pytest.mark.parametrize("arg", ["--trust-request-chat-template", "--enable-prompt-embeds",
                                 "--allowed-local-media-path=/", "--enable-log-requests",
                                 "--tool-server", "--grpc-port=9000"])
def test_a_manifest_cannot_open_the_engine_past_the_gateways_policy(tmp_path: Path,
                                                                    arg: str) -> None:
    data = demo()
    data["versions"][0]["engine"]["args"] = [arg]  # type: ignore[index]
    with pytest.raises(ManifestError, match="cannot be set"):
        load_manifest(write(tmp_path, data))


def test_a_manifest_cannot_turn_on_development_endpoints(tmp_path: Path) -> None:
    data = demo()
    data["versions"][0]["engine"]["env"] = {"VLLM_SERVER_DEV_MODE": "1"}  # type: ignore[index]
    with pytest.raises(ManifestError, match="VLLM_SERVER_DEV_MODE"):
        load_manifest(write(tmp_path, data))


def test_unknown_fields_are_refused_with_their_location(tmp_path: Path) -> None:
    data = demo()
    data["versions"][0]["engnie"] = {}  # type: ignore[index]
    with pytest.raises(ManifestError, match=r"versions\.0\.engnie"):
        load_manifest(write(tmp_path, data))


def test_the_file_name_must_match_the_model_name(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"must be named demo-chat\.yaml"):
        load_manifest(write(tmp_path, demo(), name="other"))


def test_two_engines_on_one_port_are_refused(tmp_path: Path) -> None:
    a = demo()
    b = demo()
    b["name"] = "demo-two"
    write(tmp_path, a)
    write(tmp_path, b)
    with pytest.raises(ManifestError, match="both use port"):
        load_manifests(tmp_path)


def test_source_paths_cannot_escape_the_cache(tmp_path: Path) -> None:
    data = demo()
    data["versions"][0]["source"]["path"] = "../../etc"  # type: ignore[index]
    with pytest.raises(ManifestError, match=r"without '\.\.'"):
        load_manifest(write(tmp_path, data))


def test_a_manifest_edit_keeps_strings_that_yaml_1_2_would_read_as_numbers(
        tmp_path: Path) -> None:
    """A revision or digest like 3311740e6583 is a string to the manifest loader (YAML 1.1);
    the round-trip editor (ruamel, YAML 1.2) must not turn it into infinity."""
    from serving.storage.manifest_edit import set_versions

    data = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    v2 = {**data["versions"][0], "name": "v2", "revision": "3311740e6583", "state": "staged",
          "engine": {**data["versions"][0]["engine"], "port": 8150, "startup_timeout_s": 600.5}}
    data["versions"].append(v2)
    data["traffic"]["v2"] = 0
    (tmp_path / "demo-chat.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    set_versions(tmp_path, "demo-chat", states={"v2": "serving", "v1": "retired"},
                 traffic={"v2": 100})
    manifest = load_manifests(tmp_path)[0]
    assert [(v.name, v.state, v.revision) for v in manifest.versions] == [
        ("v1", "retired", "seed-0"), ("v2", "serving", "3311740e6583")]
    assert manifest.versions[1].engine.startup_timeout_s == 600.5
    assert manifest.traffic == {"v2": 100}


def test_an_imported_version_copies_the_serving_versions_engine_not_its_endpoints(
        tmp_path: Path) -> None:
    """The last version listed is a retired one served elsewhere (endpoints, no local replica):
    a new version gets the engine of the one that serves the traffic, on ports of its own, and
    never the other's endpoints (those engines serve other weights)."""
    from serving.storage.manifest_edit import add_version

    data = yaml.safe_load((REPO / "models" / "demo-chat.yaml").read_text())
    v1 = data["versions"][0]
    v1["engine"]["replicas"] = 2
    data["versions"].append({**v1, "name": "v0", "state": "retired", "engine": {
        **v1["engine"], "port": 9100, "replicas": 0,
        "endpoints": [{"url": "http://127.0.0.1:9999"}]}})
    (tmp_path / "demo-chat.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    entry = add_version(tmp_path, "demo-chat", "v2", tmp_path / "w", "run-1",
                        {"model.safetensors": "ab" * 32})
    assert "endpoints" not in entry["engine"] and entry["engine"]["replicas"] == 2
    assert entry["engine"]["args"] == v1["engine"]["args"]
    manifest = load_manifests(tmp_path)[0]
    v2 = manifest.version("v2")
    assert v2 is not None and v2.state == "staged" and manifest.traffic["v2"] == 0
    assert {p for _, p, _ in v2.engine.local_replicas()}.isdisjoint({8101, 8102})

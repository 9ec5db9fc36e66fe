import socket
from pathlib import Path

import pytest
from pydantic import SecretStr

from serving.settings import Settings, is_allowed_engine_host


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path, **kw)  # type: ignore[arg-type]


def test_a_missing_pepper_is_refused_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="openssl rand -hex 32"):
        settings(tmp_path).load_pepper()


@pytest.mark.parametrize("value", ["changeme", "secret", "dev-pepper", "short-but-random-1"])
def test_default_or_short_peppers_are_refused_outside_dev_mode(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match="pepper"):
        settings(tmp_path, pepper=SecretStr(value)).load_pepper()
    dev = settings(tmp_path, pepper=SecretStr(value), dev_mode=True)
    assert dev.load_pepper() == value.encode()


def test_a_pepper_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pepper"
    path.write_text("a" * 64)
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        settings(tmp_path, pepper_file=path).load_pepper()
    path.chmod(0o600)
    assert settings(tmp_path, pepper_file=path).load_pepper() == b"a" * 64


def test_ensure_pepper_file_creates_a_private_random_pepper_once(tmp_path: Path) -> None:
    s = settings(tmp_path / "data")
    assert s.ensure_pepper_file() is True
    first = s.load_pepper()
    assert len(first) == 64
    assert (s.default_pepper_file.stat().st_mode & 0o777) == 0o600
    assert s.ensure_pepper_file() is False
    assert s.load_pepper() == first


def test_both_pepper_sources_at_once_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        settings(tmp_path, pepper=SecretStr("a" * 40), pepper_file=tmp_path / "p")


def test_the_pepper_never_shows_in_the_settings_repr(tmp_path: Path) -> None:
    s = settings(tmp_path, pepper=SecretStr("super-secret-pepper-value-0123456789"))
    assert "super-secret" not in repr(s)


@pytest.mark.parametrize(("host", "ok"), [("127.0.0.1", True), ("10.0.3.4", True),
                                          ("localhost", True), ("8.8.8.8", False),
                                          ("engine.example.com", False)])
def test_engines_must_be_on_loopback_or_private_addresses(host: str, ok: bool) -> None:
    assert is_allowed_engine_host(host, allow_remote=False) is ok
    assert is_allowed_engine_host(host, allow_remote=True) is True


def test_an_engine_name_is_allowed_only_when_all_its_addresses_are_private(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in resolver (this machine has no DNS): an internal load balancer's name resolves
    # to one private address per zone; a name with one public address among them is refused.
    answers = {"engines.internal": ["10.0.1.5", "10.0.2.7"],
               "mixed.internal": ["10.0.1.5", "52.1.2.3"]}

    def getaddrinfo(host: str, *_: object, **__: object) -> list[tuple[object, ...]]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert is_allowed_engine_host("engines.internal", allow_remote=False) is True
    assert is_allowed_engine_host("mixed.internal", allow_remote=False) is False
    assert is_allowed_engine_host("nowhere.internal", allow_remote=False) is False

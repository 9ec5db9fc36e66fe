"""Where a deployment's weights are on this host, building the demo model, and reading what
the engine environment's vLLM accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from serving.domain.manifest import Deployment
from serving.engines.environment import EngineEnvironment

BUILDER = Path(__file__).with_name("build_demo_model.py")
FIELDS = Path(__file__).with_name("vllm_fields.py")


def model_cache(cache_dir: Path) -> Path:
    return cache_dir / "models"


def resolve_model_dir(dep: Deployment, cache_dir: Path, env: EngineEnvironment) -> Path:
    source = dep.version.source
    if source.kind == "built":
        return model_cache(cache_dir) / source.path
    if source.kind == "python-package":
        assert source.package is not None
        return env.package_dir(source.package) / source.path
    return Path(source.path)


def build_demo(env: EngineEnvironment, out: Path,
               on_progress: Callable[[int, int, str], None], seed: int = 0) -> dict[str, str]:
    """Run the builder in the engine environment; return the checksums of what it wrote."""
    tmp = out.with_name(out.name + ".partial")
    with subprocess.Popen(
            [str(env.python), str(BUILDER), str(tmp), "--seed", str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                 "PATH": "/usr/bin:/bin"}) as proc:  # the pipes closed whatever happens
        assert proc.stdout is not None and proc.stderr is not None
        files: dict[str, str] = {}
        for line in proc.stdout:
            event = json.loads(line)
            if "step" in event:
                on_progress(event["step"], event["of"], event["what"])
            elif "done" in event:
                files = event["files"]
        err = proc.stderr.read()
        if proc.wait() != 0:
            raise RuntimeError(f"building the demo model failed:\n{err[-2000:]}")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return files


def vllm_fields(env: EngineEnvironment) -> dict[str, list[str]]:
    """Every request field the engine environment's vLLM accepts (``vllm_fields.py``)."""
    out = subprocess.run([str(env.python), str(FIELDS)], capture_output=True, text=True,
                         timeout=300, check=False,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise RuntimeError(f"reading vLLM's request fields failed:\n{out.stderr[-2000:]}")
    fields: dict[str, list[str]] = json.loads(out.stdout)
    return fields

"""Loading NVML, naming its errors, and calling it without letting one failure stop a scrape.

The exporter takes the NVML module as an argument: the real ``pynvml`` (nvidia-ml-py) or
``fake_nvml.FakeNVML`` in tests. Both raise ``nvml.NVMLError`` whose ``value`` is an
``NVML_ERROR_*`` code. ``Calls.read`` turns those into ``None`` plus a count by call and error,
except a lost GPU (``GpuLost``), which ends that GPU's reading for the scrape. A call a GPU does
not support is counted once and not tried again on that GPU.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Hashable
from typing import Any

NVML = Any  # a ctypes binding's module surface: typed as Any on purpose


class GpuLost(Exception):
    """NVML_ERROR_GPU_IS_LOST: the GPU fell off the bus or stopped answering."""


def load() -> tuple[NVML | None, str | None]:
    """The real NVML, initialised; or ``None`` and why (no package, no library, no driver)."""
    try:
        import pynvml
    except ImportError:
        return None, "the nvidia-ml-py package is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"NVML is not available ({error_name(pynvml, exc)}): no NVIDIA driver or GPU"
    except OSError as exc:  # a broken libnvidia-ml.so
        return None, f"NVML could not be loaded: {exc}"
    return pynvml, None


_names: dict[int, dict[int, str]] = {}


def error_name(nvml: NVML, exc: BaseException) -> str:
    """``not_supported``, ``gpu_is_lost``, ...: from the module's own ``NVML_ERROR_*`` names.

    Never ``str(exc)``: pynvml's asks the library for unknown codes, which may be gone.
    """
    module = sys.modules[nvml.NVMLError.__module__]  # where the codes are defined
    names = _names.get(id(module))
    if names is None:
        names = {getattr(module, n): n[len("NVML_ERROR_"):].lower()
                 for n in dir(module) if n.startswith("NVML_ERROR_")}
        _names[id(module)] = names
    return names.get(getattr(exc, "value", -1), "unknown")


def text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Calls:
    """NVML calls with their errors counted by (call, error); thread-safe."""

    def __init__(self, nvml: NVML) -> None:
        self.nvml = nvml
        self.errors: Counter[tuple[str, str]] = Counter()
        self._unsupported: set[Hashable] = set()
        self._lock = threading.Lock()
        self._skip = {nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_FUNCTION_NOT_FOUND}
        self._lost = nvml.NVML_ERROR_GPU_IS_LOST

    def read(self, key: Hashable, call: str, *args: Any) -> Any:
        """``nvml.<call>(*args)``, or ``None`` if it failed. ``key`` names the call on one GPU
        (with its variant) for remembering that it is not supported."""
        return self.call(key, call, *args)[1]

    def call(self, key: Hashable, call: str, *args: Any) -> tuple[bool, Any]:
        """(succeeded, result): for calls whose success returns ``None``."""
        if key in self._unsupported:
            return False, None
        try:
            return True, getattr(self.nvml, call)(*args)
        except self.nvml.NVMLError as exc:
            if exc.value == self._lost:
                self.count(call, exc)
                raise GpuLost(call) from None
            self._failed(key, call, error_name(self.nvml, exc), exc.value in self._skip)
        except AttributeError:  # an older nvidia-ml-py without this call
            self._failed(key, call, "function_not_found", True)
        except Exception as exc:  # never fatal to a scrape
            # NVMLLibraryMismatchError: the driver lacks the struct version this nvidia-ml-py
            # asks for (e.g. nvmlDeviceGetComputeRunningProcesses_v3 on R470); it will not change
            mismatch = getattr(self.nvml, "NVMLLibraryMismatchError", ())
            self._failed(key, call, type(exc).__name__, isinstance(exc, mismatch))
        return False, None

    def _failed(self, key: Hashable, call: str, error: str, permanent: bool) -> None:
        with self._lock:
            if key in self._unsupported:  # a concurrent scrape got there first
                return
            if permanent:
                self._unsupported.add(key)
            self.errors[(call, error)] += 1

    def count(self, call: str, exc: BaseException) -> None:
        with self._lock:
            self.errors[(call, error_name(self.nvml, exc))] += 1

    def error_counts(self) -> list[tuple[tuple[str, str], int]]:
        with self._lock:
            return list(self.errors.items())

"""The policies in force, reloaded when the file changes (or on demand). A bad file is refused
with its message logged and returned; the previous policies stay in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from serving.domain.policy import Policy, PolicyError, PolicyFile
from serving.storage.policies import load_policies

log = logging.getLogger("enclave.policy")


def key_scopes(policy_name: str, policy: Policy, requested: Iterable[str] | None) -> frozenset[str]:
    """The scopes a new key of a client on this policy gets: what was asked for (default:
    everything the policy allows), refused when it goes beyond the policy."""
    allowed = frozenset(policy.scopes)
    scopes = allowed if requested is None else frozenset(requested)
    if not scopes:
        raise ValueError("a key needs at least one scope")
    beyond = scopes - allowed
    if beyond:
        raise ValueError(f"scope(s) {', '.join(sorted(beyond))} are beyond the policy "
                         f"{policy_name!r} (it allows {', '.join(policy.scopes)})")
    return scopes


class PolicyStore:
    def __init__(self, path: Path, known_models: set[str]) -> None:
        self.path = path
        self.known_models = known_models
        self.current: PolicyFile = load_policies(path, known_models)  # raises PolicyError
        self._stamp = self._file_stamp()
        self.last_error: str | None = None

    @property
    def version(self) -> int:
        return self.current.version

    def get(self, name: str) -> Policy | None:
        return self.current.policies.get(name)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload(self) -> PolicyFile:
        """Load the file again; raises PolicyError (and keeps the old policies) when it is bad."""
        self._stamp = self._file_stamp()
        try:
            candidate = load_policies(self.path, self.known_models)
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy file refused; the previous policies stay in force",
                      extra={"problem": str(exc), "version_in_force": self.current.version})
            raise
        if candidate.version < self.current.version:
            self.last_error = (f"{self.path}: version {candidate.version} is older than the "
                               f"version in force ({self.current.version})")
            log.error("policy file refused; the previous policies stay in force",
                      extra={"problem": self.last_error, "version_in_force": self.version})
            raise PolicyError(self.last_error)
        if candidate != self.current:
            log.info("policies reloaded", extra={"version": candidate.version,
                                                 "previous_version": self.current.version})
        self.current, self.last_error = candidate, None
        return candidate

    async def watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self._file_stamp() != self._stamp:
                with contextlib.suppress(PolicyError):  # logged; the old policies stay
                    self.reload()

"""The policy file on disk: ``config/policies.yaml``, read and validated into
``domain.policy.PolicyFile``; errors name the file, the policy and the field at fault."""

from __future__ import annotations

import re
from pathlib import Path

from serving.contract import control_fields
from serving.domain.manifest import NAME_RE
from serving.domain.policy import ANY_MODEL, PolicyError, PolicyFile
from serving.storage.yamlfile import parse_model


def parse_policies(text: str, source: str, known_models: set[str] | None) -> PolicyFile:
    parsed = parse_model(text, source, PolicyFile, PolicyError)
    known_fields = control_fields()
    for name, policy in parsed.policies.items():
        unknown_fields = sorted(set(policy.engine_control) - known_fields)
        if unknown_fields:
            raise PolicyError(f"{source}: policies.{name}.engine_control: unknown field(s) "
                              f"{', '.join(unknown_fields)}; known: "
                              f"{', '.join(sorted(known_fields))}")
        if not re.fullmatch(NAME_RE, name):
            raise PolicyError(f"{source}: policies.{name}: a policy name must match {NAME_RE}")
        if known_models is not None:
            named = set(policy.models) | set(policy.fallbacks)
            named |= {f for fs in policy.fallbacks.values() for f in fs}
            unknown = sorted(named - known_models - {ANY_MODEL})
            if unknown:
                raise PolicyError(f"{source}: policies.{name}.models: unknown model(s) "
                                  f"{', '.join(unknown)}; known: {', '.join(sorted(known_models))}")
    return parsed


def load_policies(path: Path, known_models: set[str] | None) -> PolicyFile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_policies(text, str(path), known_models)

"""A YAML file holding one pydantic model (a manifest, the policy file), loaded with errors that
name the source, the field and the value at fault."""

from __future__ import annotations

from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def parse_model(text: str, source: str, model: type[M], error: type[ValueError]) -> M:
    """Parse ``text`` as YAML and validate it as ``model``; raise ``error`` with a message that
    says where and what. These are operators' files: quoting a bad value helps and leaks
    nothing."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            + (f" (got {err['input']!r})" if isinstance(err.get("input"), str | int | float)
               else "")
            for err in exc.errors())
        raise error(f"{source}: {problems}") from None

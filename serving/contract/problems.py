"""Turning a contract violation into the client's 400: the parameter at fault and the rule it
broke, never the value it was given.

Validation errors from pydantic carry the input and, for some types, quote it in their message;
only messages known to be value-free are reused, the rest are written here. A path component
is kept only when it is a list index or a name the contract declares: union branch labels, tags
and client-chosen object keys never appear.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

from pydantic import BaseModel, ValidationError

from serving.contract.common import Contract
from serving.contract.tagged import TAG_SEPARATOR, TAGGED
from serving.contract.unsupported import MESSAGE_UNSUPPORTED, PART_UNSUPPORTED, UNSUPPORTED
from serving.errors import InvalidRequest, UnsupportedParameter

# pydantic error types whose message states the rule without quoting the input.
_VALUE_FREE = frozenset({
    "string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type",
    "model_type", "greater_than", "greater_than_equal", "less_than", "less_than_equal",
    "too_long", "too_short", "string_too_long", "string_too_short", "literal_error",
    "string_pattern_mismatch", "int_from_float", "finite_number", "none_required",
    "multiple_of", "int_parsing_size",
})
_SHOWABLE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@cache
def declared_names() -> frozenset[str]:
    """Every field name (and alias) of every contract model."""
    names: set[str] = set()
    seen: set[type[BaseModel]] = set()
    stack: list[type[BaseModel]] = [Contract]
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            if info.alias:
                names.add(info.alias)
        stack.extend(model.__subclasses__())
    return frozenset(names)


def refusal(exc: ValidationError, endpoint: str) -> InvalidRequest:
    """The one error to answer with (the most telling first: an unsupported field)."""
    errors = sorted(exc.errors(include_url=False, include_context=True),
                    key=_priority)
    if not errors:
        return InvalidRequest("The request body is invalid.")
    err = errors[0]
    kind = err["type"]
    loc: Sequence[int | str] = err["loc"]
    names = declared_names()
    param, branched = _path(loc, names)
    if kind == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    if not loc and kind in ("model_type", "dict_type", "model_attributes_type"):
        return InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return _unsupported(loc, endpoint, names)
    if kind in TAGGED:
        return _bad_tag(err, param, *TAGGED[kind])
    if kind == "missing":
        return InvalidRequest(f"'{param}' is required.", param=param,
                              code="missing_parameter")
    if branched and kind != "value_error":
        return InvalidRequest(f"Invalid '{param}': none of its accepted types and forms.",
                              param=param, code="invalid_parameter")
    if kind == "value_error":
        message = str(err["msg"]).removeprefix("Value error, ")
        return InvalidRequest(f"Invalid '{param or 'body'}': {message}.", param=param,
                              code="invalid_parameter")
    rule = f": {err['msg']}" if kind in _VALUE_FREE else ""
    return InvalidRequest(f"Invalid '{param or 'body'}'{rule}.", param=param,
                          code="invalid_parameter")


def _priority(err: Any) -> int:
    return 0 if err["type"] == "extra_forbidden" else 1 if err["type"] in TAGGED else 9


def _path(loc: Iterable[int | str], names: frozenset[str]) -> tuple[str | None, bool]:
    """A readable path (``messages[2].content[0].text``), and whether a union branch label was
    dropped on the way (the value had none of the field's accepted forms)."""
    out: list[str] = []
    branched = False
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part in names:
            out.append(f".{part}" if out else part)
        elif TAG_SEPARATOR not in part:
            branched = True
    return ("".join(out) or None), branched


def _unsupported(loc: Sequence[int | str], endpoint: str,
                 names: frozenset[str]) -> UnsupportedParameter:
    name = str(loc[-1]) if loc else ""
    shown = name if _SHOWABLE_NAME.match(name) else "(an undeclared field)"
    parent, _ = _path(loc[:-1], names)
    where = f"{parent}.{shown}" if parent else shown
    reason = None
    if len(loc) == 1:
        reason = UNSUPPORTED.get(endpoint, {}).get(name)
    elif loc and loc[0] == "messages":
        reason = MESSAGE_UNSUPPORTED.get(name)
    detail = f": {reason}" if reason else ""
    return UnsupportedParameter(f"Unsupported parameter '{where}'{detail}.", param=where)


def _bad_tag(err: Any, param: str | None, field: str, expected: str) -> InvalidRequest:
    where = f"{param}.{field}" if param else field
    value = err["input"].get(field) if isinstance(err.get("input"), dict) else None
    if field == "type" and isinstance(value, str) and value in PART_UNSUPPORTED:
        return UnsupportedParameter(
            f"Content part type '{value}' at '{param}' is not supported: "
            f"{PART_UNSUPPORTED[value]}.", param=where)
    if value is None:
        return InvalidRequest(f"'{where}' is required.", param=where, code="missing_parameter")
    return InvalidRequest(f"'{where}' must be one of: {expected}.", param=where,
                          code="invalid_parameter")

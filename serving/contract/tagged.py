"""Unions chosen by one field (a message's ``role``, a content part's ``type``).

The branch is named ``<field>=<value>`` in validation errors, so an error path can drop it
(``messages.0.role=user.content`` reads ``messages[0].content``) and no client-chosen value
ever appears in an error message. A value outside the union is reported with the error type
``invalid_<field>``, which ``TAGGED`` maps back to the field and the values it accepts.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Tag

TAG_SEPARATOR = "="
# error type -> (field, accepted values)
TAGGED: dict[str, tuple[str, str]] = {}


def tagged(field: str, branches: dict[str, type[BaseModel]]) -> Any:
    """``Annotated[A | B | ..., Discriminator(...)]`` choosing by ``field``'s value."""

    def pick(value: Any) -> str | None:
        key = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
        if isinstance(key, str) and key in branches:
            return f"{field}{TAG_SEPARATOR}{key}"
        return None

    error_type = f"invalid_{field}"
    TAGGED[error_type] = (field, ", ".join(branches))
    members = tuple(Annotated[model, Tag(f"{field}{TAG_SEPARATOR}{value}")]
                    for value, model in branches.items())
    union: Any = Union[members]  # noqa: UP007 (a union built from a tuple)
    return Annotated[union, Discriminator(pick, custom_error_type=error_type,
                                          custom_error_message=f"invalid {field}")]

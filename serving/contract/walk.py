"""Every piece of text in a validated request, found from the fields' kinds, and written back.

A ``Slot`` is one string the engine will read: a field of a model, an item of a list, a value
or a member name of a JSON object (a schema, template arguments, a document). Which fields
hold text comes from their ``Kind`` (``TEXT``, and ``CONTROL`` once a policy let one through),
so a field added to the contract is scanned without anyone listing it here.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from pydantic import BaseModel

from serving.contract.kinds import CONTROL, REVEALS, TEXT, Kind

_WALKED = (TEXT, CONTROL)


class Slot:
    """One string in the request. ``role``: the role of the chat message it belongs to."""

    __slots__ = ("is_key", "key", "owner", "role")

    def __init__(self, owner: Any, key: Any, role: str | None, is_key: bool = False) -> None:
        self.owner = owner
        self.key = key
        self.role = role
        self.is_key = is_key

    def get(self) -> str:
        if self.is_key:
            return str(self.key)
        if isinstance(self.owner, BaseModel):
            value: str = getattr(self.owner, self.key)
            return value
        item: str = self.owner[self.key]
        return item


def kind_of(model: type[BaseModel], name: str) -> Kind:
    kinds = [m for m in model.model_fields[name].metadata if isinstance(m, Kind)]
    if len(kinds) != 1:
        raise TypeError(f"{model.__name__}.{name} needs exactly one Kind")
    return kinds[0]


def reveals(model: type[BaseModel], name: str) -> bool:
    return any(m is REVEALS for m in model.model_fields[name].metadata)


@cache
def _plan(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(name for name in model.model_fields if kind_of(model, name) in _WALKED)


def slots(request: BaseModel) -> list[Slot]:
    """The request's strings, in document order."""
    out: list[Slot] = []
    _model(request, None, out)
    return out


def _model(obj: BaseModel, role: str | None, out: list[Slot]) -> None:
    own_role = getattr(obj, "role", None)
    if isinstance(own_role, str):
        role = own_role
    for name in _plan(type(obj)):
        value = getattr(obj, name)
        if value is not None:
            _value(obj, name, value, role, out)


def _value(owner: Any, key: Any, value: Any, role: str | None, out: list[Slot]) -> None:
    if isinstance(value, str):
        out.append(Slot(owner, key, role))
    elif isinstance(value, BaseModel):
        _model(value, role, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _value(value, i, item, role, out)
    elif isinstance(value, dict):
        _json(value, role, out)


def _json(root: dict[str, Any], role: str | None, out: list[Slot]) -> None:
    """A JSON object: member names and string values, at any depth, without recursion."""
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for name, item in node.items():
                out.append(Slot(node, name, role, is_key=True))
                if isinstance(item, str):
                    out.append(Slot(node, name, role))
                elif isinstance(item, dict | list):
                    stack.append(item)
        else:
            for i, item in enumerate(node):
                if isinstance(item, str):
                    out.append(Slot(node, i, role))
                elif isinstance(item, dict | list):
                    stack.append(item)


def write_back(places: Sequence[Slot], values: Sequence[str]) -> None:
    """Put ``values[i]`` where ``places[i]`` was, for the slots whose text changed. Member
    names are renamed last, one rebuild per object, keeping the members' order."""
    renames: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}
    for place, value in zip(places, values, strict=True):
        if place.is_key:
            if value != place.key:
                renames.setdefault(id(place.owner), (place.owner, {}))[1][place.key] = value
        elif isinstance(place.owner, BaseModel):
            if getattr(place.owner, place.key) != value:
                setattr(place.owner, place.key, value)
        elif place.owner[place.key] != value:
            place.owner[place.key] = value
    for obj, names in renames.values():
        items = [(names.get(k, k), v) for k, v in obj.items()]
        obj.clear()
        obj.update(items)

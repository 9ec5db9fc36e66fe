"""An evaluation set on disk: ``<evals_dir>/NAME/*.jsonl``, one case (a request and the checks
its answer must pass) per non-blank line.

A set is identified by its name and a digest of its files, so a report says exactly which
cases it measured, and two reports are comparable only when their digests match. Loading
checks everything a run would trip over later (a bad regular expression, a schema that is not
one, a request the gateway's contract refuses, a check that cannot apply to the endpoint) and
fails with ``file:line: field: problem``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jsonschema import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from serving import contract
from serving.domain.manifest import NAME_RE
from serving.errors import InvalidRequest

SET_NAME_RE = re.compile(NAME_RE)  # a set's name is a directory name: never a path
CheckKind = Literal["exact", "regex", "json_schema", "similar", "max_latency"]
CHECK_KINDS: tuple[CheckKind, ...] = ("exact", "regex", "json_schema", "similar", "max_latency")
EvalEndpoint = Literal["chat", "completions", "embeddings"]
# An embedding has no text: only its similarity to a reference and its latency can be checked.
EMBEDDING_KINDS = frozenset({"similar", "max_latency"})


class EvalSetError(ValueError):
    """A set that cannot be loaded; the message names the file, the line and the field."""


class Similar(BaseModel):
    """The answer's embedding against the embedding of ``text``: cosine similarity ≥ ``min``.
    ``model`` names the embedding model (default: the deployment's first embedding model, or
    for an embeddings case, the model under evaluation)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)
    min: float = Field(ge=0, le=1)
    model: str | None = Field(None, pattern=NAME_RE)


class Checks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: str | None = None
    regex: str | None = None
    json_schema: dict[str, Any] | None = None
    similar: Similar | None = None
    max_latency_ms: float | None = Field(None, gt=0)
    _pattern: re.Pattern[str] | None = PrivateAttr(None)
    _validator: Validator | None = PrivateAttr(None)

    @field_validator("regex")
    @classmethod
    def _a_regex(cls, regex: str | None) -> str | None:
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return regex

    @field_validator("json_schema")
    @classmethod
    def _a_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            try:
                validator_for(schema).check_schema(schema)
            except SchemaError as exc:
                raise ValueError(f"not a valid JSON schema: {exc.message}") from None
        return schema

    @model_validator(mode="after")
    def _compile(self) -> Checks:
        if not self.kinds():
            raise ValueError("give at least one of exact, regex, json_schema, similar, "
                             "max_latency_ms")
        if self.regex is not None:
            self._pattern = re.compile(self.regex)
        if self.json_schema is not None:
            self._validator = validator_for(self.json_schema)(self.json_schema)
        return self

    @property
    def pattern(self) -> re.Pattern[str] | None:
        """The compiled ``regex`` (compiled once, at load)."""
        return self._pattern

    @property
    def validator(self) -> Validator | None:
        """A validator for ``json_schema`` (of the draft the schema names; checked at load)."""
        return self._validator

    def kinds(self) -> list[CheckKind]:
        """The kinds of check this case has, in ``CHECK_KINDS`` order."""
        given = {"exact": self.exact, "regex": self.regex, "json_schema": self.json_schema,
                 "similar": self.similar, "max_latency": self.max_latency_ms}
        return [k for k in CHECK_KINDS if given[k] is not None]


class Case(BaseModel):
    """One request (the OpenAI body without ``model``: the runner names the model under test)
    and the checks its answer must pass."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    endpoint: EvalEndpoint = "chat"
    request: dict[str, Any]
    checks: Checks


@dataclass(frozen=True, slots=True)
class EvalSet:
    name: str
    digest: str  # sha256 hex of the files: their names and bytes
    files: tuple[Path, ...]
    cases: tuple[Case, ...]


def set_names(evals_dir: Path) -> list[str]:
    """The sets in ``evals_dir``: its sub-directories with a valid name, sorted."""
    if not evals_dir.is_dir():
        return []
    return sorted(p.name for p in evals_dir.iterdir()
                  if p.is_dir() and SET_NAME_RE.match(p.name))


def load_set(evals_dir: Path, name: str) -> EvalSet:
    if not SET_NAME_RE.match(name):
        raise EvalSetError(f"{name!r} is not an eval set name: lowercase letters, digits, '.', "
                           "'_' and '-', starting with a letter or digit")
    directory = evals_dir / name
    if not directory.is_dir():
        raise EvalSetError(f"no eval set {name!r} in {evals_dir}")
    files = tuple(sorted((p for p in directory.glob("*.jsonl") if p.is_file()),
                         key=lambda p: p.name))
    if not files:
        raise EvalSetError(f"{evals_dir.name}/{name}: no *.jsonl files")
    digest = hashlib.sha256()
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for path in files:
        where = f"{evals_dir.name}/{name}/{path.name}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EvalSetError(f"{where}: cannot read: {exc.strerror}") from None
        digest.update(path.name.encode() + b"\0" + data + b"\0")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise EvalSetError(f"{where}: not UTF-8 text") from None
        # split("\n"), not splitlines(): a JSON string may hold U+2028 and other separators.
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            at = f"{where}:{number}"
            case = _parse_case(line, at)
            if case.id in seen:
                raise EvalSetError(f"{at}: id: {case.id!r} repeats (first at {seen[case.id]})")
            seen[case.id] = at
            cases.append(case)
    if not cases:
        raise EvalSetError(f"{evals_dir.name}/{name}: no cases")
    return EvalSet(name=name, digest=digest.hexdigest(), files=files, cases=tuple(cases))


def _parse_case(line: str, at: str) -> Case:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalSetError(f"{at}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise EvalSetError(f"{at}: expected a JSON object")
    try:
        case = Case.model_validate(raw)
    except ValidationError as exc:
        raise EvalSetError(f"{at}: " + "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(case)'}: "
            f"{str(err['msg']).removeprefix('Value error, ')}"
            for err in exc.errors(include_url=False))) from None
    _check_case(case, at)
    return case


def _check_case(case: Case, at: str) -> None:
    """What a case's fields cannot say alone: the request as the gateway would take it, and
    checks that fit the endpoint."""
    request = case.request
    if "model" in request:
        raise EvalSetError(f"{at}: request.model: leave it out; the runner names the model "
                           "under evaluation")
    if request.get("stream") is True:
        raise EvalSetError(f"{at}: request.stream: must not be true; checks read a whole "
                           "answer")
    try:
        contract.parse(case.endpoint, json.dumps({"model": "eval", **request}))
    except InvalidRequest as exc:
        field = f"request.{exc.param}" if exc.param else "request"
        raise EvalSetError(f"{at}: {field}: the gateway would refuse it: {exc.message}"
                           ) from None
    kinds = case.checks.kinds()
    if case.endpoint == "embeddings":
        other = [k for k in kinds if k not in EMBEDDING_KINDS]
        if other:
            raise EvalSetError(f"{at}: checks.{other[0]}: an embedding has no text; only "
                               "similar and max_latency_ms apply to embeddings")
    elif "json_schema" in kinds and not _asks_for_json(request):
        raise EvalSetError(
            f"{at}: checks.json_schema: the request must ask for JSON: add \"response_format\": "
            "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": ...}} or "
            "{\"type\": \"json_object\"}")


def _asks_for_json(request: dict[str, Any]) -> bool:
    """Whether the engine is told to answer JSON: without it, a schema check measures luck."""
    fmt = request.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return True
    structured = request.get("structured_outputs")
    return isinstance(structured, dict) and (
        structured.get("json") is not None or bool(structured.get("json_object")))

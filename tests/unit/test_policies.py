"""The policy file: validated with precise messages; a bad reload keeps the old policies."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from serving.admission.policy_store import PolicyStore
from serving.domain.policy import PolicyError
from serving.storage.policies import load_policies
from tests.support import REPO

MODELS = {"demo-chat", "minilm-embed"}
GOOD = """
version: 3
policies:
  search:
    models: [demo-chat]
    scopes: [chat, models]
    caps: {max_tokens: 256, n: 1}
    limits: {requests_per_minute: 60, concurrent: 4}
    budgets: {tokens_per_day: 100000}
  ops:
    scopes: [admin]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_shipped_policy_file_is_valid() -> None:
    parsed = load_policies(REPO / "config" / "policies.yaml", MODELS)
    assert {"default", "admin"} <= set(parsed.policies)


def test_a_good_file_loads(tmp_path: Path) -> None:
    parsed = load_policies(write(tmp_path, GOOD), MODELS)
    search = parsed.policies["search"]
    assert parsed.version == 3
    assert search.allows_model("demo-chat") and not search.allows_model("minilm-embed")
    assert search.limits.requests_per_minute == 60 and search.budgets.tokens_per_month is None


@pytest.mark.parametrize(("text", "message"), [
    ("policies: {a: {scopes: [chat]}}", "version: Field required"),
    ("version: 1\npolicies: {a: {scopes: [chat], models: [gpt-4]}}",
     "policies.a.models: unknown model(s) gpt-4"),
    ("version: 1\npolicies: {a: {scopes: [chat, teleport]}}", "policies.a.scopes.1"),
    ("version: 1\npolicies: {a: {scopes: [chat, admin]}}",
     "admin scope cannot be combined"),
    ("version: 1\npolicies: {a: {scopes: [chat], limits: {requests_per_minute: 0}}}",
     "policies.a.limits.requests_per_minute"),
    ("version: 1\npolicies: {a: {scopes: [chat], caps: {max_tokenz: 5}}}",
     "policies.a.caps.max_tokenz: Extra inputs are not permitted"),
    ("version: 1\npolicies: {'Bad Name': {scopes: [chat]}}", "a policy name must match"),
    ("version: [1\n", "not valid YAML"),
])
def test_a_bad_file_is_refused_with_a_precise_message(tmp_path: Path, text: str,
                                                      message: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policies(write(tmp_path, text), MODELS)
    assert message in str(err.value)
    assert str(tmp_path / "policies.yaml") in str(err.value)


def test_a_bad_reload_keeps_the_policies_in_force(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    store = PolicyStore(path, MODELS)
    path.write_text(GOOD.replace("version: 3", "version: 4").replace("chat, models",
                                                                      "chat, modelz"))
    with pytest.raises(PolicyError):
        store.reload()
    assert store.version == 3 and store.get("search") is not None
    assert store.last_error is not None and "modelz" in store.last_error
    path.write_text(GOOD.replace("version: 3", "version: 2"))
    with pytest.raises(PolicyError, match="older than the version in force"):
        store.reload()
    path.write_text(GOOD.replace("version: 3", "version: 4").replace("60", "120"))
    store.reload()
    assert store.version == 4 and store.last_error is None
    assert store.get("search").limits.requests_per_minute == 120  # type: ignore[union-attr]

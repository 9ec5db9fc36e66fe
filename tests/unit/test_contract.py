"""The request contract: what a client may send, what reaches the engine, how refusals read.

Every field of every contract model has a kind; undeclared fields are refused by name; the body
the engine gets is re-serialised from the validated model; control fields need the policy;
fields that reveal unredactable output are refused under an output-redacting policy; errors
name the parameter and never echo the value."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from serving import contract
from serving.admission import cost
from serving.contract.common import Contract
from serving.contract.kinds import Kind
from serving.contract.walk import kind_of, slots, write_back
from serving.domain.policy import Policy
from serving.errors import InvalidRequest, ModelNotFound, UnsupportedParameter
from serving.pipeline import intake
from serving.storage.manifests import load_manifests
from serving.upstream.pool import EnginePool
from tests.support import REPO

CHAT: dict[str, Any] = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
SECRET = "jane.doe@example.com"


@pytest.fixture(scope="module")
def pool() -> EnginePool:
    return EnginePool(load_manifests(REPO / "models"))


def _policy(**data: Any) -> Policy:
    return Policy.model_validate({"scopes": ["chat", "completions", "embeddings"],
                                  "models": ["*"], **data})


def prepare(body: object, endpoint: str, pool: EnginePool,
            policy: Policy | None = None) -> intake.ParsedRequest:
    """The request path up to the body sent upstream (no guards, no admission)."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    policy = policy or _policy()
    request = contract.parse(endpoint, raw)
    route, pinned = intake.resolve_model(request.model, pool)
    intake.check_endpoint(endpoint, route)
    intake.check_fields(request, policy)
    cost.apply_caps(policy, request, route.max_model_len)
    return intake.finish(request, endpoint, route, pinned)


def _all_models() -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    stack: list[type[BaseModel]] = [Contract]
    while stack:
        model = stack.pop()
        if model not in seen:
            seen.append(model)
            stack.extend(model.__subclasses__())
    return [m for m in seen if m is not Contract]


def test_every_field_of_every_contract_model_has_exactly_one_kind() -> None:
    for model in _all_models():
        for name in model.model_fields:
            assert isinstance(kind_of(model, name), Kind), f"{model.__name__}.{name}"


def test_a_request_reaches_the_engine_re_serialised_with_nothing_added(pool: EnginePool) -> None:
    body = {**CHAT, "temperature": 0.3, "top_p": 0.9, "seed": 7, "stop": ["\n\n"]}
    sent = orjson.loads(prepare(body, "chat", pool).body)
    assert sent == body


@pytest.mark.parametrize(("field", "endpoint"), [
    ("vendor_field", "chat"), ("kv_transfer_params", "chat"), ("vllm_xargs", "completions"),
    ("use_beam_search", "chat"), ("best_of", "completions"), ("messages", "embeddings"),
    ("chat_template", "embeddings"), ("stream", "embeddings"), ("functions", "chat"),
    ("max_completion_tokens", "completions"), ("mm_payload", "chat"),
])
def test_an_undeclared_field_is_refused_by_name(pool: EnginePool, field: str,
                                                 endpoint: str) -> None:
    base = {"chat": CHAT, "completions": {"model": "demo-chat", "prompt": "x"},
            "embeddings": {"model": "minilm-embed", "input": "x"}}[endpoint]
    with pytest.raises(UnsupportedParameter) as err:
        prepare({**base, field: 1}, endpoint, pool)
    assert err.value.status == 400 and err.value.code == "unsupported_parameter"
    assert err.value.param == field and f"'{field}'" in err.value.message


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": "hi", "tools": []}, "messages[0].tools"),
    ({"role": "user", "content": "hi", "audio": {}}, "messages[0].audio"),
    ({"role": "user", "content": [{"type": "text", "text": "a", "uuid": "x"}]},
     "messages[0].content[0].uuid"),
    ({"role": "system", "content": "s", "tool_call_id": "x"}, "messages[0].tool_call_id"),
])
def test_a_message_carries_only_its_roles_fields(pool: EnginePool, message: dict[str, Any],
                                                 param: str) -> None:
    with pytest.raises(UnsupportedParameter) as err:
        prepare({**CHAT, "messages": [message]}, "chat", pool)
    assert err.value.param == param


@pytest.mark.parametrize("role", ["User", "user ", "USER", "human", "tool_result", ""])
def test_roles_are_a_closed_set(pool: EnginePool, role: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        prepare({**CHAT, "messages": [{"role": role, "content": "hi"}]}, "chat", pool)
    assert err.value.param == "messages[0].role"
    assert "system, developer, user, assistant, tool, function" in err.value.message


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "video_url", "file",
                                  "image_embeds", "prompt_embeds", "tool_reference"])
def test_media_content_parts_are_refused(pool: EnginePool, kind: str) -> None:
    part = {"type": kind, kind: {"url": "http://169.254.169.254/"}}
    with pytest.raises(UnsupportedParameter) as err:
        prepare({**CHAT, "messages": [{"role": "user", "content": [part]}]}, "chat", pool)
    assert f"'{kind}'" in err.value.message and err.value.param == "messages[0].content[0].type"


def test_an_unknown_content_part_type_is_refused_without_echoing_it(pool: EnginePool) -> None:
    part = {"type": SECRET, "text": "x"}
    with pytest.raises(InvalidRequest) as err:
        prepare({**CHAT, "messages": [{"role": "user", "content": [part]}]}, "chat", pool)
    assert SECRET not in err.value.message and err.value.param == "messages[0].content[0].type"


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": CHAT["messages"]}, "model"),
    ({"model": 5, "messages": CHAT["messages"]}, "model"),
    ({"model": "demo-chat"}, "messages"),
    ({"model": "demo-chat", "messages": []}, "messages"),
    ({"model": "demo-chat", "messages": ["hi"]}, "messages[0].role"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": "10"}, "max_tokens"),
    ({**CHAT, "max_tokens": True}, "max_tokens"),
    ({**CHAT, "max_tokens": 10**6}, "max_tokens"),
    ({**CHAT, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "stream": True, "stream_options": "x"}, "stream_options"),
    ({**CHAT, "stream_options": {"include_usage": True}}, None),
    ({**CHAT, "temperature": 9}, "temperature"),
    ({**CHAT, "logit_bias": {SECRET: 1}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"12": 500}}, "logit_bias"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "top_logprobs": -1}, "top_logprobs"),
    ({**CHAT, "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({**CHAT, "tools": [{"type": "retrieval"}]}, "tools[0].type"),
])
def test_bad_requests_name_the_parameter_never_the_value(pool: EnginePool, body: object,
                                                         param: str | None) -> None:
    with pytest.raises(InvalidRequest) as err:
        prepare(body, "chat", pool)
    assert err.value.status == 400
    assert err.value.param == param
    assert SECRET not in err.value.message and "yes" not in err.value.message.split("'")


def test_a_field_name_that_is_not_a_plain_name_is_not_echoed(pool: EnginePool) -> None:
    with pytest.raises(UnsupportedParameter) as err:
        prepare({**CHAT, SECRET: 1}, "chat", pool)
    assert SECRET not in err.value.message and SECRET not in str(err.value.param)


def test_a_stream_always_asks_the_engine_for_usage(pool: EnginePool) -> None:
    parsed = prepare({**CHAT, "stream": True}, "chat", pool)
    assert orjson.loads(parsed.body)["stream_options"] == {"include_usage": True,
                                                          "continuous_usage_stats": True}
    assert parsed.client_wants_usage is False and parsed.chunk_usage == "drop"
    parsed = prepare({**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                     "chat", pool)
    assert parsed.client_wants_usage is True and parsed.chunk_usage == "null"
    both = {"include_usage": True, "continuous_usage_stats": True}
    parsed = prepare({**CHAT, "stream": True, "stream_options": both}, "chat", pool)
    assert parsed.chunk_usage == "keep"


def test_a_pinned_version_goes_to_its_engine_under_the_alias(pool: EnginePool) -> None:
    parsed = prepare({**CHAT, "model": "demo-chat@v1"}, "chat", pool)
    assert parsed.pinned is not None and parsed.pinned.deployment.version.name == "v1"
    assert orjson.loads(parsed.body)["model"] == "demo-chat"


@pytest.mark.parametrize("model", ["demo-chat@v9", "Demo-Chat", " demo-chat", "demo-chat ",
                                   "demo-chat-v1", "demo-chat@", "@v1", "demo-chat@v1@v1"])
def test_spelling_variants_and_unknown_versions_are_not_found(pool: EnginePool,
                                                              model: str) -> None:
    with pytest.raises(ModelNotFound):
        prepare({**CHAT, "model": model}, "chat", pool)


def test_a_model_is_only_reachable_through_its_task(pool: EnginePool) -> None:
    with pytest.raises(InvalidRequest, match="does not support"):
        prepare({"model": "minilm-embed", "messages": CHAT["messages"]}, "chat", pool)
    with pytest.raises(InvalidRequest, match="does not support"):
        prepare({"model": "demo-chat", "input": "x"}, "embeddings", pool)


def test_completion_and_embedding_inputs_are_required(pool: EnginePool) -> None:
    with pytest.raises(InvalidRequest):
        prepare({"model": "demo-chat"}, "completions", pool)
    with pytest.raises(InvalidRequest):
        prepare({"model": "minilm-embed", "input": []}, "embeddings", pool)
    assert prepare({"model": "minilm-embed", "input": ["a", "b"]}, "embeddings", pool)


@pytest.mark.parametrize(("field", "value"), [
    ("chat_template", "{{ messages }}"), ("chat_template_kwargs", {"x": 1}),
    ("mm_processor_kwargs", {}), ("media_io_kwargs", {}), ("priority", -5),
    ("request_id", "abc"), ("session_id", "s1"),
])
def test_engine_control_needs_the_policy(pool: EnginePool, field: str, value: object) -> None:
    with pytest.raises(UnsupportedParameter, match="engine control") as err:
        prepare({**CHAT, field: value}, "chat", pool)
    assert err.value.param == field
    allowed = _policy(engine_control=[field])
    assert orjson.loads(prepare({**CHAT, field: value}, "chat", pool, allowed).body)[field] \
        == value


def test_token_id_prompts_need_the_policy_and_an_uninspected_client(pool: EnginePool) -> None:
    body = {"model": "demo-chat", "prompt": [[1, 2, 3]]}
    with pytest.raises(UnsupportedParameter, match="token ids"):
        prepare(body, "completions", pool)
    allowed = _policy(engine_control=["token_id_prompts"])
    assert orjson.loads(prepare(body, "completions", pool, allowed).body)["prompt"] == [[1, 2, 3]]
    inspected = _policy(engine_control=["token_id_prompts"], pii={"input": "redact"})
    with pytest.raises(InvalidRequest) as err:
        prepare(body, "completions", pool, inspected)
    assert err.value.code == "unsupported_prompt"


@pytest.mark.parametrize(("endpoint", "extra"), [
    ("chat", {"logprobs": True}), ("chat", {"logprobs": True, "top_logprobs": 3}),
    ("chat", {"prompt_logprobs": 1}), ("chat", {"return_token_ids": True}),
    ("chat", {"return_prompt_text": True}), ("completions", {"logprobs": 2}),
    ("completions", {"return_token_ids": True}),
])
def test_unredactable_output_is_refused_when_answers_are_redacted(
        pool: EnginePool, endpoint: str, extra: dict[str, Any]) -> None:
    base = CHAT if endpoint == "chat" else {"model": "demo-chat", "prompt": "x"}
    redacting = _policy(pii={"output": "redact"})
    with pytest.raises(UnsupportedParameter, match="cannot be redacted"):
        prepare({**base, **extra}, endpoint, pool, redacting)
    assert prepare({**base, **extra}, endpoint, pool)  # allowed when answers are not redacted
    assert prepare({**base, "logprobs": False} if endpoint == "chat" else base, endpoint, pool,
                   redacting)


def test_text_slots_cover_every_text_field_and_write_back_in_place() -> None:
    body = {
        **CHAT, "user": SECRET, "stop": [SECRET], "bad_words": [SECRET],
        "messages": [
            {"role": "system", "content": SECRET, "name": SECRET},
            {"role": "user", "content": [{"type": "text", "text": SECRET},
                                         {"type": "refusal", "refusal": SECRET},
                                         {"type": "thinking", "thinking": SECRET}]},
            {"role": "assistant", "reasoning": SECRET, "refusal": SECRET,
             "tool_calls": [{"id": SECRET, "type": "function",
                             "function": {"name": SECRET, "arguments": SECRET}}]},
            {"role": "tool", "tool_call_id": SECRET, "content": SECRET},
        ],
        "tools": [{"type": "function", "function": {
            "name": SECRET, "description": SECRET,
            "parameters": {"type": "object", "properties": {SECRET: {"enum": [SECRET]}}}}}],
        "tool_choice": {"type": "function", "function": {"name": SECRET}},
        "documents": [{"title": SECRET, SECRET: "x"}],
        "response_format": {"type": "json_schema", "json_schema": {
            "name": SECRET, "description": SECRET, "schema": {"enum": [SECRET]}}},
    }
    request = contract.parse("chat", orjson.dumps(body))
    places = slots(request)
    found = [p for p in places if p.get() == SECRET]
    raw_count = orjson.dumps(body).count(SECRET.encode())
    assert len(found) == raw_count  # every occurrence in the body is a slot
    write_back(places, ["<X>" if p.get() == SECRET else p.get() for p in places])
    sent = contract.body(request)
    assert SECRET.encode() not in sent and sent.count(b"<X>") == raw_count


def test_structured_output_text_is_a_slot() -> None:
    body = {**CHAT, "structured_outputs": {"choice": [SECRET, "b"]}}
    request = contract.parse("chat", orjson.dumps(body))
    assert SECRET in [p.get() for p in slots(request)]


def test_the_cost_bound_covers_every_prompt_and_choice(pool: EnginePool) -> None:
    policy = _policy(caps={"n": 4, "prompts": 16, "max_tokens": 64})
    request = contract.parse("completions", orjson.dumps(
        {"model": "demo-chat", "prompt": ["a" * 10] * 12, "n": 4, "max_tokens": 50}))
    cost.apply_caps(policy, request, 2048)
    bounds = cost.prompt_bounds(request, 0, 2048)
    price = cost.bound(request, bounds, 2048)
    assert price.choices == 48
    assert price.tokens == 12 * 4 * (10 + cost.SPECIAL_TOKENS + 50)
    too_many = contract.parse("completions", orjson.dumps(
        {"model": "demo-chat", "prompt": ["a"] * 17}))
    with pytest.raises(InvalidRequest) as err:
        cost.apply_caps(policy, too_many, 2048)
    assert err.value.code == "too_many_prompts"


def test_a_missing_max_tokens_is_filled_in_so_the_engine_stays_within_the_reservation(
        pool: EnginePool) -> None:
    sent = orjson.loads(prepare({"model": "demo-chat", "prompt": "x"}, "completions", pool).body)
    assert sent["max_tokens"] == cost.DEFAULT_COMPLETIONS_MAX_TOKENS
    capped = _policy(caps={"max_tokens": 32})
    assert orjson.loads(prepare(CHAT, "chat", pool, capped).body)["max_tokens"] == 32


def test_a_request_beyond_the_per_request_token_cap_is_refused() -> None:
    policy = _policy(caps={"request_tokens": 1000, "n": 8})
    request = contract.parse("chat", orjson.dumps({**CHAT, "n": 8, "max_tokens": 200}))
    price = cost.bound(request, [100], 2048)
    with pytest.raises(InvalidRequest) as err:
        cost.check_request_tokens(policy, price)
    assert err.value.code == "request_too_costly" and "2400" in err.value.message


def test_embedding_inputs_are_bounded_each() -> None:
    request = contract.parse("embeddings", orjson.dumps(
        {"model": "minilm-embed", "input": ["x" * 1000, "y"]}))
    assert cost.prompt_bounds(request, 0, 256) == [256, 1 + cost.SPECIAL_TOKENS]

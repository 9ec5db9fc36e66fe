import orjson
import pytest

from serving.errors import InvalidRequest, ModelNotFound
from serving.services import requests
from serving.services.engines import EnginePool
from serving.storage.manifests import load_manifests
from tests.support import REPO


@pytest.fixture(scope="module")
def pool() -> EnginePool:
    return EnginePool(load_manifests(REPO / "models"))


def parse(body: object, endpoint: str, pool: EnginePool) -> requests.ParsedRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    payload = requests.decode(raw)
    route, pinned = requests.resolve_model(payload, pool)
    return requests.validate(payload, raw, endpoint, route, pinned)


CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


def test_a_plain_request_is_forwarded_byte_for_byte(pool: EnginePool) -> None:
    raw = orjson.dumps({**CHAT, "temperature": 0.3, "vendor_field": [1, 2]})
    parsed = parse(raw, "chat", pool)
    assert parsed.body is raw
    assert parsed.stream is False


def test_a_stream_always_asks_the_engine_for_usage(pool: EnginePool) -> None:
    parsed = parse({**CHAT, "stream": True}, "chat", pool)
    # Usage on every event: an abandoned stream is still charged what was generated.
    assert orjson.loads(parsed.body)["stream_options"] == {"include_usage": True,
                                                          "continuous_usage_stats": True}
    assert parsed.client_wants_usage is False and parsed.chunk_usage == "drop"
    parsed = parse({**CHAT, "stream": True, "stream_options": {"include_usage": True}}, "chat",
                   pool)
    assert parsed.client_wants_usage is True and parsed.chunk_usage == "null"
    both = {"include_usage": True, "continuous_usage_stats": True}
    parsed = parse({**CHAT, "stream": True, "stream_options": both}, "chat", pool)
    assert parsed.chunk_usage == "keep"


def test_a_pinned_version_goes_to_its_engine_under_the_alias(pool: EnginePool) -> None:
    parsed = parse({**CHAT, "model": "demo-chat@v1"}, "chat", pool)
    assert parsed.engine is not None and parsed.engine.deployment.version.name == "v1"
    assert orjson.loads(parsed.body)["model"] == "demo-chat"


@pytest.mark.parametrize("model", ["demo-chat@v9", "Demo-Chat", " demo-chat", "demo-chat ",
                                   "demo-chat-v1", "demo-chat@", "@v1", "demo-chat@v1@v1"])
def test_spelling_variants_and_unknown_versions_are_not_found(pool: EnginePool,
                                                              model: str) -> None:
    with pytest.raises(ModelNotFound):
        parse({**CHAT, "model": model}, "chat", pool)


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": CHAT["messages"]}, "model"),
    ({"model": 5, "messages": CHAT["messages"]}, "model"),
    ({"model": "demo-chat"}, "messages"),
    ({"model": "demo-chat", "messages": []}, "messages"),
    ({"model": "demo-chat", "messages": ["hi"]}, "messages[0]"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": "10"}, "max_tokens"),
    ({**CHAT, "max_tokens": True}, "max_tokens"),
    ({**CHAT, "max_tokens": 10**6}, "max_tokens"),
    ({**CHAT, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "stream": True, "stream_options": "x"}, "stream_options"),
])
def test_bad_chat_requests_name_the_parameter(pool: EnginePool, body: object,
                                               param: str | None) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse(body, "chat", pool)
    assert err.value.status == 400
    assert err.value.param == param


def test_an_unknown_model_is_404_model_not_found(pool: EnginePool) -> None:
    with pytest.raises(ModelNotFound) as err:
        parse({**CHAT, "model": "gpt-4"}, "chat", pool)
    assert err.value.status == 404 and err.value.code == "model_not_found"


def test_a_model_is_only_reachable_through_its_task(pool: EnginePool) -> None:
    with pytest.raises(InvalidRequest, match="does not support"):
        parse({"model": "minilm-embed", "messages": CHAT["messages"]}, "chat", pool)
    with pytest.raises(InvalidRequest, match="does not support"):
        parse({"model": "demo-chat", "input": "x"}, "embeddings", pool)
    with pytest.raises(InvalidRequest, match="cannot be streamed"):
        parse({"model": "minilm-embed", "input": "x", "stream": True}, "embeddings", pool)


def test_completion_and_embedding_inputs_are_required(pool: EnginePool) -> None:
    with pytest.raises(InvalidRequest):
        parse({"model": "demo-chat"}, "completions", pool)
    with pytest.raises(InvalidRequest):
        parse({"model": "minilm-embed", "input": []}, "embeddings", pool)
    assert parse({"model": "minilm-embed", "input": ["a", "b"]}, "embeddings", pool)

import orjson
import pytest

from serving.upstream.sse import StreamAccountant, usage_from_body


def event(payload: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


CHUNKS = [
    event({"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
    event({"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}}]}),
    event({"id": "c1", "choices": [],
           "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}),
    b"data: [DONE]\n\n",
]
STREAM = b"".join(CHUNKS)


def relay(acct: StreamAccountant, pieces: list[bytes]) -> bytes:
    return b"".join(acct.feed(p) for p in pieces) + acct.flush()


@pytest.mark.parametrize("size", [1, 3, 7, 64, len(STREAM)])
def test_usage_is_read_whatever_the_chunk_boundaries(size: int) -> None:
    acct = StreamAccountant(strip_usage_event=False)
    out = relay(acct, [STREAM[i:i + size] for i in range(0, len(STREAM), size)])
    assert out == STREAM
    assert (acct.prompt_tokens, acct.completion_tokens) == (7, 2)


@pytest.mark.parametrize("size", [1, 5, len(STREAM)])
def test_usage_event_is_stripped_when_the_client_did_not_ask(size: int) -> None:
    acct = StreamAccountant(strip_usage_event=True)
    out = relay(acct, [STREAM[i:i + size] for i in range(0, len(STREAM), size)])
    assert out == CHUNKS[0] + CHUNKS[1] + CHUNKS[3]
    assert (acct.prompt_tokens, acct.completion_tokens) == (7, 2)


def test_complete_events_are_forwarded_at_once_not_held() -> None:
    acct = StreamAccountant(strip_usage_event=True)
    assert acct.feed(CHUNKS[0]) == CHUNKS[0]
    half = len(CHUNKS[1]) // 2
    assert acct.feed(CHUNKS[1][:half]) == b""
    assert acct.feed(CHUNKS[1][half:]) == CHUNKS[1]


CONTENT = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "x"}}],
           "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


def test_continuous_usage_on_content_chunks_is_kept_when_asked() -> None:
    chunk = event(CONTENT)
    acct = StreamAccountant(strip_usage_event=False, chunk_usage="keep")
    assert acct.feed(chunk) == chunk
    assert acct.completion_tokens == 1


def test_per_chunk_usage_is_counted_then_removed_when_not_asked() -> None:
    acct = StreamAccountant(strip_usage_event=True, chunk_usage="drop")
    out = acct.feed(event(CONTENT) + event({**CONTENT, "usage": {"prompt_tokens": 3,
                                                                 "completion_tokens": 2}}))
    events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e]
    assert [("usage" in e, e["choices"][0]["delta"]["content"]) for e in events] == [
        (False, "x"), (False, "x")]
    # An abandoned stream is charged what the engine reported so far.
    assert (acct.prompt_tokens, acct.completion_tokens) == (3, 2)


def test_per_chunk_usage_becomes_null_with_include_usage_only() -> None:
    acct = StreamAccountant(strip_usage_event=False, chunk_usage="null")
    out = acct.feed(event(CONTENT))
    assert orjson.loads(out[6:])["usage"] is None


def test_garbage_is_relayed_untouched() -> None:
    acct = StreamAccountant(strip_usage_event=True)
    junk = b'data: {"usage":{not json\n\n'
    assert relay(acct, [junk]) == junk
    assert acct.prompt_tokens is None


def test_usage_from_a_complete_body() -> None:
    body = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5}})
    assert usage_from_body(body) == (4, 5)
    assert usage_from_body(b'{"usage": {"prompt_tokens": 4}}') == (4, None)
    assert usage_from_body(b"not json") == (None, None)
    assert usage_from_body(b'{"data": []}') == (None, None)

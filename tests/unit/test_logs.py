import logging

import orjson

from serving.logs import JsonFormatter, request_id_var


def render(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = orjson.loads(JsonFormatter().format(record))
    return out


def make(msg: str, args: tuple[object, ...] = (), **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("enclave.test", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_one_json_object_with_the_request_id() -> None:
    token = request_id_var.set("req-123")
    try:
        line = render(make("request", status=200))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "request" and line["request_id"] == "req-123"
    assert line["status"] == 200


def test_arguments_of_a_log_call_are_never_written() -> None:
    line = render(make("user said %s", ("my card is 4111 1111 1111 1111",)))
    assert "4111" not in orjson.dumps(line).decode()


def test_fields_named_like_secrets_or_content_are_redacted() -> None:
    line = render(make("x", authorization="Bearer sk-enc-abc", prompt="hello", api_key="k"))
    assert line["authorization"] == line["prompt"] == line["api_key"] == "[redacted]"


def test_exception_messages_are_not_written_only_the_type() -> None:
    try:
        raise ValueError("secret prompt text")
    except ValueError:
        import sys

        record = logging.LogRecord("enclave.test", logging.ERROR, __file__, 1, "boom", (),
                                   sys.exc_info())
    text = JsonFormatter().format(record)
    assert "secret prompt text" not in text
    assert '"exc_type":"ValueError"' in text

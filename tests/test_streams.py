"""Stream followers against streams cut at every possible byte boundary."""

from __future__ import annotations

import orjson
import pytest

from tokenbooth.record import TokenUsage
from tokenbooth.streams import AnthropicStream, OpenAIStream


def _chunk(choices: list[dict[str, object]], usage: object = None, with_usage_key: bool = True) -> bytes:
    event: dict[str, object] = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18",
                                "choices": choices}
    if with_usage_key:
        event["usage"] = usage
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _stream(with_usage_key: bool) -> bytes:
    parts = [_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}], with_usage_key=with_usage_key)]
    parts += [_chunk([{"index": 0, "delta": {"content": w}}], with_usage_key=with_usage_key)
              for w in ("Hello", " there", "!")]
    parts.append(_chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}], with_usage_key=with_usage_key))
    if with_usage_key:
        parts.append(_chunk([], {"prompt_tokens": 9, "completion_tokens": 3}))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


@pytest.mark.parametrize("cut", [1, 2, 7, 50, 10_000])
def test_stripping_gives_the_client_exactly_the_stream_without_usage(cut: int) -> None:
    upstream = _stream(with_usage_key=True)
    follower = OpenAIStream(strip_usage=True)
    out = b"".join(follower.feed(upstream[i:i + cut]) for i in range(0, len(upstream), cut))
    assert out == _stream(with_usage_key=False)
    assert follower.usage == TokenUsage(input=9, output=3)
    assert follower.content_chunks == 3 and "".join(follower.text) == "Hello there!"
    assert follower.finished and follower.served_model == "gpt-4o-mini-2024-07-18"


@pytest.mark.parametrize("cut", [1, 3, 10_000])
def test_pass_through_mode_returns_every_byte_unchanged(cut: int) -> None:
    upstream = _stream(with_usage_key=True)
    follower = OpenAIStream()
    pieces = [upstream[i:i + cut] for i in range(0, len(upstream), cut)]
    assert [follower.feed(p) for p in pieces] == pieces
    assert follower.usage == TokenUsage(input=9, output=3) and follower.finished


def test_crlf_events_are_split_too() -> None:
    upstream = _stream(with_usage_key=True).replace(b"\n", b"\r\n")
    follower = OpenAIStream(strip_usage=True)
    out = follower.feed(upstream)
    assert b'"usage"' not in out and out.endswith(b"data: [DONE]\r\n\r\n")
    assert follower.usage == TokenUsage(input=9, output=3)


def test_anthropic_usage_merges_message_start_and_delta() -> None:
    def ev(kind: str, data: dict[str, object]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"

    stream = b"".join([
        ev("message_start", {"message": {"model": "claude-haiku-4-5", "usage": {
            "input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5,
            "output_tokens": 1}}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "!"}}),
        ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
        ev("message_stop", {}),
    ])
    follower = AnthropicStream()
    for i in range(0, len(stream), 5):
        assert follower.feed(stream[i:i + 5]) == stream[i:i + 5]
    assert follower.usage == TokenUsage(input=115, output=2, cached_input=100, cache_write=5)
    assert follower.content_chunks == 2 and follower.finished and follower.served_model == "claude-haiku-4-5"

"""Entries as bytes, and the in-process LRU: bounded in bytes, with TTLs on an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from tokenbooth.cache.entry import Entry, split_events
from tokenbooth.cache.memory import MemoryBackend
from tokenbooth.record import TokenUsage

USAGE = TokenUsage(input=10, output=20, cached_input=4, reasoning=5)


def _entry(body: bytes = b'{"ok":true}', events: tuple[int, ...] | None = None) -> Entry:
    return Entry(body, "application/json", USAGE, "gpt-4o-2024", 1000.5, events)


def test_an_entry_survives_its_bytes_and_a_stream_keeps_its_events() -> None:
    stream = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    entry = _entry(stream, split_events(stream))
    back = Entry.loads(entry.dumps())
    assert back == entry
    assert back.chunks() == [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
    assert split_events(b"event: x\r\ndata: 1\r\n\r\nevent: y\r\ndata: 2\r\n\r\n") == (21, 21)
    with pytest.raises(ValueError):
        Entry.loads(b"\x00\x00\x00\x02{}")


def test_the_memory_cache_evicts_the_least_recently_used_past_its_bytes_and_expires_by_ttl() -> None:
    now = [0.0]
    seen: list[tuple[int, int]] = []
    one = _entry(b"x" * 1000)
    backend = MemoryBackend(max_bytes=3 * one.size, clock=lambda: now[0], gauges=lambda n, b: seen.append((n, b)))
    for key in "abc":
        backend.put(key, one, ttl=10)
    assert backend.lookup("a") is one  # a is now the most recently used
    backend.put("d", one, ttl=10)
    assert backend.lookup("b") is None and len(backend) == 3 and backend.bytes == 3 * one.size
    assert seen == [(1, one.size)]  # the gauges are told at most once a second
    backend.put("huge", _entry(b"x" * 10 * one.size), ttl=10)  # larger than the whole cache: not kept
    assert backend.lookup("huge") is None and backend.lookup("c") is one
    now[0] = 10.0
    assert asyncio.run(backend.get("a")) is None and len(backend) == 2

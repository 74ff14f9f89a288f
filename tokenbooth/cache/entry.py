"""What the cache keeps of one answer, and its bytes in a shared backend."""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from tokenbooth.record import TokenUsage

__all__ = ["Entry", "split_events"]

_FORMAT = 1
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_OVERHEAD = 256  # bytes an entry holds besides its body, roughly: what the LRU counts it as


def split_events(data: bytes) -> tuple[int, ...]:
    """The lengths of the server-sent events in ``data`` (each with its blank line); a tail
    without one is an event too."""
    lengths = []
    start = 0
    if b"\r" in data:
        for m in _EVENT_END.finditer(data):
            lengths.append(m.end() - start)
            start = m.end()
    else:
        while (end := data.find(b"\n\n", start)) >= 0:
            lengths.append(end + 2 - start)
            start = end + 2
    if start < len(data):
        lengths.append(len(data) - start)
    return tuple(lengths)


@dataclass(frozen=True, slots=True)
class Entry:
    """A complete 200 answer: its body (a stream's events, joined, when ``events`` is set), its
    content type, the usage and model the upstream reported, and when it was stored (unix time)."""

    body: bytes
    content_type: str
    usage: TokenUsage
    served_model: str | None
    stored_at: float
    events: tuple[int, ...] | None = None  # a stream: the length of each event in ``body``

    @property
    def size(self) -> int:
        return len(self.body) + 8 * len(self.events or ()) + _OVERHEAD

    def chunks(self) -> list[bytes]:
        """A stream's events, one by one, as they were sent."""
        out = []
        start = 0
        for n in self.events or ():
            out.append(self.body[start:start + n])
            start += n
        return out

    def dumps(self) -> bytes:
        """The entry as bytes: a length-prefixed JSON head, then the body as it is."""
        u = self.usage
        head = orjson.dumps([_FORMAT, self.stored_at, self.content_type, self.served_model,
                             [u.input, u.output, u.cached_input, u.cache_write, u.reasoning, u.estimated],
                             self.events])
        return len(head).to_bytes(4, "big") + head + self.body

    @classmethod
    def loads(cls, data: bytes) -> Entry:
        """The entry :meth:`dumps` wrote; raises ``ValueError`` for anything else."""
        try:
            size = int.from_bytes(data[:4], "big")
            fmt, stored_at, content_type, served_model, usage, events = orjson.loads(data[4:4 + size])
            if fmt != _FORMAT:
                raise ValueError(f"cache entry format {fmt}")
            body = data[4 + size:]
            if events is not None and sum(events) != len(body):
                raise ValueError("cache entry events do not add up to its body")
            tokens = TokenUsage(int(usage[0]), int(usage[1]), int(usage[2]), int(usage[3]), int(usage[4]),
                                bool(usage[5]))
            return cls(body, content_type, tokens, served_model,
                       float(stored_at), tuple(events) if events is not None else None)
        except (orjson.JSONDecodeError, TypeError, IndexError) as exc:
            raise ValueError(f"not a cache entry: {exc}") from None

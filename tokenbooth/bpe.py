"""Exact token counts for OpenAI's byte-pair encodings, in a few megabytes per vocabulary.

OpenAI counts (and bills) tokens of its BPE encodings: ``o200k_base`` for GPT-4o and later,
``cl100k_base`` for GPT-4, GPT-3.5 and the embedding models. A count takes two steps, the
same two tiktoken takes:

1. split the text with the encoding's pattern into pieces (a word with its leading space, up
   to three digits, a run of punctuation, whitespace);
2. for each piece, repeatedly merge the adjacent pair of parts whose joined bytes have the
   lowest rank in the vocabulary, until no joined pair is in it. The parts left are tokens.

The vocabularies are the ``.tiktoken.gz`` files that bpe-openai's wheel bundles, read from
disk (nothing is downloaded). A vocabulary is held as three flat buffers: every token's bytes
in one ``bytes``, their offsets in an ``array``, and an open-addressing hash table from token
to rank in another ``array``. That is ~4 MB for o200k_base's 199,998 tokens, where a Python
dict takes ~22 MB and bpe-openai's Rust automata ~70-90 MB.

Counting is fast where it is common: pieces repeat (words, system prompts), so each piece's
count is cached (bounded), and ASCII text is split by a stdlib ``re`` pattern that is
equivalent on ASCII and about three times faster than the ``regex`` module's Unicode one.

>>> counter("o200k_base").count("Say hello to the benchmark.")
6
"""

from __future__ import annotations

import base64
import gzip
import heapq
import importlib.util
import re
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import regex

from tokenbooth.memo import remember

_SUFFIX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"


@dataclass(frozen=True)
class Encoding:
    """An encoding's split patterns: ``pattern`` for any text (``regex`` module syntax) and
    ``ascii_pattern``, which splits ASCII-only text the same way with stdlib ``re``."""

    name: str
    pattern: str
    ascii_pattern: str


ENCODINGS = {
    "o200k_base": Encoding(
        "o200k_base",
        "|".join((
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _SUFFIX,
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _SUFFIX,
            r"\p{N}{1,3}",
            r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
            r"\s*[\r\n]+",
            r"\s+(?!\S)",
            r"\s+",
        )),
        "|".join((
            r"[^\r\nA-Za-z0-9]?[A-Z]*[a-z]+" + _SUFFIX,
            r"[^\r\nA-Za-z0-9]?[A-Z]+[a-z]*" + _SUFFIX,
            r"[0-9]{1,3}",
            r" ?[^\sA-Za-z0-9]+[\r\n/]*",
            r"\s*[\r\n]+",
            r"\s+(?!\S)",
            r"\s+",
        )),
    ),
    "cl100k_base": Encoding(
        "cl100k_base",
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]+|[0-9]{1,3}| ?[^\sA-Za-z0-9]++[\r\n]*"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
}


class Vocabulary:
    """Token bytes → rank, for tokens given in rank order (rank 0 first).

    >>> v = Vocabulary([b"a", b"b", b"ab"])
    >>> v.rank(b"ab"), v.rank(b"ba"), len(v)
    (2, None, 3)
    """

    __slots__ = ("_blob", "_mask", "_starts", "_table")

    def __init__(self, tokens: Iterable[bytes]) -> None:
        blob = bytearray()
        starts = array("I", [0])
        for token in tokens:
            blob += token
            starts.append(len(blob))
        self._blob = bytes(blob)
        self._starts = starts
        count = len(starts) - 1
        size = 1 << max(2 * count, 8).bit_length()  # load factor <= 1/2: ~1.5 probes per lookup
        self._mask = mask = size - 1
        self._table = table = array("I", bytes(4 * size))  # rank + 1; 0 is an empty slot
        for rank in range(count):
            slot = hash(self._blob[starts[rank]:starts[rank + 1]]) & mask
            while table[slot]:
                slot = (slot + 1) & mask
            table[slot] = rank + 1

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """Read a tiktoken-format file (``base64-token rank`` per line, ranks 0, 1, 2, ...)."""
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as lines:
            return cls(_tokens_in_rank_order(lines, path))

    def __len__(self) -> int:
        return len(self._starts) - 1

    def rank(self, token: bytes) -> int | None:
        table, mask, starts, blob = self._table, self._mask, self._starts, self._blob
        size = len(token)
        slot = hash(token) & mask
        while entry := table[slot]:
            start = starts[entry - 1]
            if starts[entry] - start == size and blob[start:start + size] == token:
                return entry - 1
            slot = (slot + 1) & mask
        return None


def _tokens_in_rank_order(lines: Iterable[bytes], path: Path) -> Iterator[bytes]:
    expected = 0
    for line in lines:
        if not line.strip():
            continue
        token, rank = line.split()
        if int(rank) != expected:
            raise ValueError(f"{path}: rank {int(rank)} where {expected} was expected")
        expected += 1
        yield base64.b64decode(token)


_CACHED_PIECE = 64  # longer pieces (long words, runs of CJK) are counted, not kept: they rarely repeat


class _PieceCounts(dict[str, int]):
    """Token counts by piece; a missing piece is counted and remembered, up to ``limit`` pieces
    (:func:`~tokenbooth.memo.remember`)."""

    def __init__(self, count: Callable[[bytes], int], limit: int) -> None:
        super().__init__()
        self._count = count
        self._limit = limit

    def __missing__(self, piece: str) -> int:
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate counts as U+FFFD, as tiktoken counts it
            data = piece.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
        n = self._count(data)
        if len(piece) <= _CACHED_PIECE:
            remember(self, piece, n, self._limit)
        return n


class BpeCounter:
    """Counts the tokens of text in one encoding, as ``len(encoding.encode_ordinary(text))``
    would: special-token strings such as ``<|endoftext|>`` count as ordinary text."""

    def __init__(self, encoding: Encoding, vocabulary: Vocabulary, cache_size: int = 16384) -> None:
        self.encoding = encoding
        self.vocabulary = vocabulary
        self._split = regex.compile(encoding.pattern).findall
        self._split_ascii = re.compile(encoding.ascii_pattern, re.ASCII).findall
        self._counts = _PieceCounts(self._parts, cache_size)

    def count(self, text: str) -> int:
        pieces = self._split_ascii(text) if text.isascii() else self._split(text)
        return sum(map(self._counts.__getitem__, pieces))

    def _parts(self, piece: bytes) -> int:
        """Tokens in one piece: merge the lowest-ranked adjacent pair (leftmost on a tie)
        until none is in the vocabulary. A heap keeps long pieces at O(n log n)."""
        rank = self.vocabulary.rank
        if rank(piece) is not None:
            return 1
        n = len(piece)
        if n <= 2:
            return n
        # parts are byte spans [start, after[start]); before[start] is the previous part's start
        after = list(range(1, n + 1))
        before = list(range(-1, n - 1))
        merged = [False] * n
        heap = [(r, i) for i in range(n - 1) if (r := rank(piece[i:i + 2])) is not None]
        heapq.heapify(heap)
        parts = n
        while heap:
            r, i = heapq.heappop(heap)
            if merged[i]:
                continue
            j = after[i]
            if j >= n:
                continue
            k = after[j]
            if rank(piece[i:k]) != r:  # stale: a neighbour changed since this pair was ranked
                continue
            merged[j] = True
            after[i] = k
            if k < n:
                before[k] = i
            parts -= 1
            if (p := before[i]) >= 0 and (pr := rank(piece[p:k])) is not None:
                heapq.heappush(heap, (pr, p))
            if k < n and (kr := rank(piece[i:after[k]])) is not None:
                heapq.heappush(heap, (kr, i))
        return parts


def vocabulary_file(name: str) -> Path:
    """Where bpe-openai's wheel keeps ``NAME.tiktoken.gz``, found without importing the
    package (its ``__init__`` builds every vocabulary as dicts: ~65 MB)."""
    spec = importlib.util.find_spec("bpe_openai")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / f"{name}.tiktoken.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the {name} vocabulary (bpe-openai's data/{name}.tiktoken.gz) is not installed: "
        "reinstall with 'pip install --force-reinstall bpe-openai', or set tokens.tokenizer: heuristic")


_loading = threading.Lock()
_counters: dict[str, BpeCounter] = {}


def counter(name: str) -> BpeCounter:
    """The counter for ``o200k_base`` or ``cl100k_base``, loaded once per process (~0.2 s, ~4 MB),
    even when several threads ask for it at the same time."""
    found = _counters.get(name)
    if found is None:
        with _loading:
            found = _counters.get(name)
            if found is None:
                found = _counters[name] = BpeCounter(ENCODINGS[name], Vocabulary.load(vocabulary_file(name)))
    return found

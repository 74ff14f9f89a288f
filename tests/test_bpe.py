"""The lean BPE counter against bpe-openai's own encoder, on fixed and generated text."""

from __future__ import annotations

import random
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from tokenbooth.bpe import ENCODINGS, BpeCounter, Vocabulary, counter, vocabulary_file

# Characters that each exercise a part of the split patterns or of the merge loop.
ALPHABET = [
    *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    *" \t\n\r\x0b\x0c", *"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "\x00", "\x1c", "\x1f", "\x7f", "\x85", "\xa0", "\u2028", "\u3000", "\u200b", "\ufeff",
    "\ud800", "\udfff",  # lone surrogates: tiktoken and bpe-openai count U+FFFD
    "'s", "'S", "'t", "'re", "'RE", "'ve", "'m", "'ll", "'Ll", "'d", "'\u017f",  # suffixes, long s
    "é", "ß", "Ω", "ж", "Ж", "ǅ", "ʰ", "\u0301", "\u0903", "\u20dd",  # Ll, Lu, Lt, Lm, Mn, Mc, Me
    "你", "好", "世", "界", "。", "，", "日", "本", "語", "の", "한", "국", "א", "ب", "ก", "ำ",
    "٣", "๓", "½", "²", "①", "Ⅻ", "€", "™", "—", "…", "“", "”",
    "🚀", "👩", "\u200d", "👧", "\U0001f3fd", "\ud7ff", "\U00010330",
]

SAMPLES = [
    "",
    "Say hello to the benchmark.",
    "你好，世界！请用中文回答。日本語のテキストも少し。한국어 문장.",
    "def f(x):\n    return x ** 2  # squares\n\n\n\tindented\r\n",
    "emoji 🚀🔥👩‍👩‍👧‍👦 and numbers 1234567890 3.14159 -42",
    "   leading and trailing spaces   ",
    "<|endoftext|> is ordinary text here",
    "HTTPServer's JSONDecoder isn't LOUD'S but 'Quoted' //path/to///file.py\r\n\r\n",
    "a" * 3000,
    "字节对编码" * 400,
    "".join(chr(c) for c in range(32, 0x250)),
    "a\udc00b \ud83d alone",
]


@pytest.fixture(scope="module")
def reference() -> Callable[[str, str], int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # bpe-openai 0.1.x's importlib.resources call
        import bpe_openai

    encodings = {name: bpe_openai.get_encoding(name) for name in ENCODINGS}
    return lambda name, text: len(encodings[name].encode_ordinary(text))


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_counts_equal_bpe_openai_on_fixed_samples(name: str, reference: Callable[[str, str], int]) -> None:
    count = counter(name).count
    for text in SAMPLES:
        assert count(text) == reference(name, text), text[:80]


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_counts_equal_bpe_openai_on_generated_text(name: str, reference: Callable[[str, str], int]) -> None:
    rng = random.Random(20261124)
    count = counter(name).count
    for _ in range(3000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40)))
        assert count(text) == reference(name, text), repr(text)
        ascii_text = "".join(rng.choice(ALPHABET[:100]) for _ in range(rng.randint(1, 40)))
        assert count(ascii_text) == reference(name, ascii_text), repr(ascii_text)


def test_a_full_piece_cache_starts_over_and_counts_stay_exact(reference: Callable[[str, str], int]) -> None:
    shared = counter("o200k_base")
    tiny = BpeCounter(ENCODINGS["o200k_base"], shared.vocabulary, cache_size=2)
    text = "The quick brown fox's 42 jumps\n\n" * 3
    for _ in range(2):
        assert tiny.count(text) == shared.count(text) == reference("o200k_base", text)
    assert len(tiny._counts) <= 2


def test_vocabulary_finds_every_token_at_its_rank() -> None:
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b"\x00\x00", b"xyz" * 20]
    vocabulary = Vocabulary(tokens)
    assert len(vocabulary) == len(tokens)
    assert [vocabulary.rank(t) for t in tokens] == list(range(len(tokens)))
    assert vocabulary.rank(b"abcd") is None and vocabulary.rank(b"") is None


def test_vocabulary_file_out_of_rank_order_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(b"YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="rank 2 where 1 was expected"):
        Vocabulary.load(path)


def test_o200k_vocabulary_is_complete_and_small() -> None:
    assert len(counter("o200k_base").vocabulary) == 199_998
    assert len(counter("cl100k_base").vocabulary) == 100_256
    assert vocabulary_file("o200k_base").name == "o200k_base.tiktoken.gz"


def test_loading_a_vocabulary_takes_a_few_megabytes_and_not_the_bpe_openai_package() -> None:
    code = (
        "import sys\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024\n"
        "from tokenbooth import bpe\n"
        "before = rss(); c = bpe.counter('o200k_base'); c.count('hello world'); after = rss()\n"
        "print(after - before, 'bpe_openai' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) < 15, f"o200k_base took {out[0]} MB"
    assert out[1] == "False"

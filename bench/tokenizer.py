"""Token counting: tokenbooth's lean counter against bpe-openai's Rust encoder.

    python bench/tokenizer.py [--repeat 200]

For each text: microseconds per count (median of --repeat timed counts after a warm-up count,
so the piece cache is warm, as it is for repeated prompts), one cold count with an empty cache,
the same for bpe-openai's Rust extension, and whether the counts agree. Then the resident memory
each takes for o200k_base, each measured in a fresh process.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenbooth import bpe  # noqa: E402

_ENGLISH = (ROOT / "README.md").read_text(encoding="utf-8")[:3000]
_CHINESE = ("在计算机科学中，字节对编码是一种简单的数据压缩形式，其中最常见的一对连续字节数据被替换为该数据中"
            "不存在的字节。后来的变体被用于自然语言处理，以将文本分割成子词单元。") * 12
TEXTS = {
    "English, 3,000 chars, ASCII": _ENGLISH.encode("ascii", "ignore").decode(),
    "English, 3,000 chars, curly quotes": _ENGLISH.replace("'", "\u2019"),
    "Python source, 3,000 chars": (ROOT / "tokenbooth" / "bpe.py").read_text(encoding="utf-8")[:3000],
    f"Chinese, {len(_CHINESE):,} chars": _CHINESE,
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def rust_counter(name: str) -> Callable[[str], int]:
    """bpe-openai's Rust extension alone, without its package's import (which builds every
    vocabulary as Python dicts): how tokenbooth counted before its lean counter."""
    spec = importlib.util.find_spec("bpe_openai")
    assert spec is not None and spec.submodule_search_locations
    path = next(Path(spec.submodule_search_locations[0]).glob("_bindings.*.so"))
    loader = importlib.machinery.ExtensionFileLoader("bpe_openai._bindings", str(path))
    module_spec = importlib.util.spec_from_file_location("bpe_openai._bindings", path, loader=loader)
    assert module_spec is not None
    module = importlib.util.module_from_spec(module_spec)
    loader.exec_module(module)
    count: Callable[[str], int] = module.tokenizer_for_encoding(name).count
    return count


def _memory(which: str) -> None:
    before = _rss_mb()
    count = bpe.counter("o200k_base").count if which == "lean" else rust_counter("o200k_base")
    count("hello world")
    print(round(_rss_mb() - before, 1))


def _rss(which: str) -> str:
    out = subprocess.run([sys.executable, __file__, "--memory", which], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _median_us(fn: Callable[[str], int], text: str, repeat: int) -> float:
    fn(text)
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(text)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def _once_us(fn: Callable[[str], int], text: str) -> float:
    t = time.perf_counter()
    fn(text)
    return (time.perf_counter() - t) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description="Token counting: lean counter against bpe-openai's Rust encoder.")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--memory", choices=("lean", "rust"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        _memory(args.memory)
        return
    lean = bpe.counter("o200k_base")
    rust = rust_counter("o200k_base")
    print(f"# o200k_base token counts: µs per count, median of {args.repeat}\n")
    print("| text | tokens | lean, warm | lean, cold | bpe-openai (Rust) | lean ÷ Rust, warm | same count |")
    print("|---|---|---|---|---|---|---|")
    for label, text in TEXTS.items():
        cold = _once_us(bpe.BpeCounter(lean.encoding, lean.vocabulary).count, text)
        warm = _median_us(lean.count, text, args.repeat)
        reference = _median_us(rust, text, args.repeat)
        print(f"| {label} | {rust(text)} | {warm:.0f} | {cold:.0f} | {reference:.0f} | {warm / reference:.1f}× "
              f"| {lean.count(text) == rust(text)} |")
    print(f"\nresident memory for o200k_base, each in a fresh process: lean {_rss('lean')} MB, "
          f"bpe-openai's Rust extension {_rss('rust')} MB")


if __name__ == "__main__":
    main()

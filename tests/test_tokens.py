from __future__ import annotations

from typing import Any

import pytest

from tokenbooth.record import TokenUsage
from tokenbooth.tokens import TokenEstimator, differs, heuristic_tokens, usage_from_anthropic, usage_from_openai


def test_openai_usage_with_cache_and_reasoning() -> None:
    u = usage_from_openai({"prompt_tokens": 3000, "completion_tokens": 700,
                           "prompt_tokens_details": {"cached_tokens": 1024},
                           "completion_tokens_details": {"reasoning_tokens": 300}})
    assert u == TokenUsage(input=3000, output=700, cached_input=1024, reasoning=300)


def test_deepseek_cache_hits_and_embeddings_usage() -> None:
    assert usage_from_openai({"prompt_tokens": 100, "completion_tokens": 1, "prompt_cache_hit_tokens": 64}
                             ) == TokenUsage(input=100, output=1, cached_input=64)
    assert usage_from_openai({"prompt_tokens": 8, "total_tokens": 8}) == TokenUsage(input=8)


@pytest.mark.parametrize("bad", [None, {}, {"prompt_tokens": "10"}, {"prompt_tokens": -1}, [], "usage"])
def test_no_usage_is_none(bad: object) -> None:
    assert usage_from_openai(bad) is None


def test_anthropic_input_is_the_total_of_its_parts() -> None:
    u = usage_from_anthropic({"input_tokens": 100, "cache_read_input_tokens": 2000,
                              "cache_creation_input_tokens": 500, "output_tokens": 300})
    assert u == TokenUsage(input=2600, output=300, cached_input=2000, cache_write=500)
    assert usage_from_anthropic({"input_tokens": 0, "output_tokens": 0}) is None


def test_bpe_counts_for_openai_families_offline() -> None:
    est = TokenEstimator()
    assert est.count("gpt-4o-mini", "The quick brown fox jumps over the lazy dog.") == 10
    assert est.count("gpt-4", "hello world") == 2
    assert est.count("o3-mini", "") == 0


def test_heuristic_is_cjk_aware() -> None:
    assert heuristic_tokens("你好世界" * 10) == 40
    assert heuristic_tokens("a" * 40) == 10
    est = TokenEstimator()
    assert est.count("deepseek-chat", "你好，世界") == heuristic_tokens("你好，世界")


def test_prompt_estimate_for_chat_messages_and_anthropic_system() -> None:
    est = TokenEstimator()
    chat = {"messages": [{"role": "user", "content": "hello world"},
                         {"role": "user", "content": [{"type": "text", "text": "hello world"}]}]}
    assert est.prompt("gpt-4o", chat) == 3 + 2 * (3 + 2)
    anthropic = {"system": "be brief", **chat}
    assert est.prompt("claude-haiku-4-5", anthropic) > est.prompt("claude-haiku-4-5", chat)
    assert est.prompt("gpt-4o", {"input": ["hello world", "hello"]}) == 3
    assert est.prompt("gpt-4o", {"input": [1, 2, 3]}) == 3


@pytest.mark.parametrize(("reported", "estimated", "expected"),
                         [(100, 100, False), (100, 119, False), (100, 121, True), (100, 79, True), (0, 1, True)])
def test_differs_by_relative_threshold(reported: int, estimated: int, expected: bool) -> None:
    assert differs(reported, estimated, 0.2) is expected


def test_heuristic_only_mode_loads_no_vocabulary() -> None:
    est = TokenEstimator(use_bpe=False)
    assert est.count("gpt-4o", "a" * 40) == 10


def test_counting_does_not_import_the_bpe_openai_package() -> None:
    import subprocess
    import sys

    code = ("import sys; from tokenbooth.tokens import TokenEstimator; e = TokenEstimator(); e.warm(); "
            "assert e.count('gpt-4o', 'hello world') == 2; assert e.count('gpt-4', 'hello world') == 2; "
            "print('bpe_openai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_message_nested_a_thousand_levels_deep_is_counted_not_a_recursion_error() -> None:
    content: Any = "innermost"
    for _ in range(1000):
        content = [content, {"type": "text", "text": "word"}]
    payload = {"messages": [{"role": "user", "content": content}]}
    assert TokenEstimator().prompt("gpt-4o", payload) > 30  # the parts within reach are counted


def test_the_tokenizer_chosen_per_model_name_is_remembered_within_a_bound() -> None:
    from tokenbooth.memo import MEMO_LIMIT

    estimator = TokenEstimator(use_bpe=False)
    for n in range(2 * MEMO_LIMIT + 10):
        assert estimator.count(f"client-model-{n}", "hello there") == heuristic_tokens("hello there")
    assert 0 < len(estimator._by_model) <= MEMO_LIMIT

from __future__ import annotations

from tokenbooth.memo import remember


def test_a_memo_never_holds_more_than_its_limit_and_keeps_answering() -> None:
    memo: dict[str, int] = {}
    for n in range(1000):
        assert remember(memo, f"name-{n}", n, limit=64) == n
        assert len(memo) <= 64
        assert memo[f"name-{n}"] == n  # the newest answer is always kept

"""The two-minute profile of bench/soak.py: faults and hang-ups under steady load lose nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SOAK = Path(__file__).parents[2] / "bench" / "soak.py"


def test_two_minute_soak_with_faults_keeps_every_number_equal(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("tokenbooth_bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = soak  # dataclasses look their module up there
    spec.loader.exec_module(soak)
    result = soak.run_soak(duration=120, rate=40, seed=7, workdir=tmp_path)
    print(result.summary())
    assert result.calls >= 4500
    assert result.client.get("client_failure", 0) == 0
    # calls answered = ledger rows = tokenbooth_requests_total, per outcome
    assert result.client == result.metrics == result.ledger
    assert result.client["error"] > 0 and result.client["cancelled"] > 0  # the faults did happen
    assert result.rss_growth < 0.10, result.rss_mb
    assert not result.unexpected_log, result.unexpected_log[:10]

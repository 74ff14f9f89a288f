"""Pushing to a real Pushgateway (Debian package prometheus-pushgateway)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

import tokenbooth
from tests.conftest import SimHandle, free_port, need, serving, track
from tokenbooth.catalog import total


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with serving([need("pushgateway"), f"--web.listen-address=127.0.0.1:{port}",
                  f"--persistence.file={tmp_path / 'pushgateway.data'}"],
                 f"http://127.0.0.1:{port}", timeout=15) as url:
        yield url


def _pushed(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_batch_job_that_exits_loses_nothing(pushgateway: str, sim: SimHandle, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import openai, tokenbooth
        client = tokenbooth.instrument(openai.OpenAI(base_url={sim.url!r}, api_key="k", max_retries=0))
        tokenbooth.push_to({pushgateway!r}, job="nightly", every_calls=10_000, every_seconds=600,
                           grouping_key={{"instance": "worker-1"}})
        for i in range(25):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "x"}}])
        # no explicit push: the one at interpreter exit must carry all 25
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"})
    assert result.returncode == 0, result.stderr
    assert _pushed(pushgateway, "tokenbooth_requests_total", job="nightly", outcome="success") == 25
    assert _pushed(pushgateway, "push_time_seconds", job="nightly", instance="worker-1") > 0


def test_pushes_happen_every_n_calls(pushgateway: str, sim: SimHandle) -> None:
    registry = CollectorRegistry()
    client = tokenbooth.instrument(track(openai.OpenAI(base_url=sim.url, api_key="k", max_retries=0)),
                                   registry=registry)
    pusher = tokenbooth.push_to(pushgateway, "every-5", every_calls=5, every_seconds=600, registry=registry)
    try:
        for _ in range(5):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        deadline = time.monotonic() + 5
        while pusher.pushes == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pusher.pushes >= 1
        assert _pushed(pushgateway, "tokenbooth_requests_total", job="every-5") == 5
    finally:
        pusher.close()


def test_a_broken_pushgateway_never_breaks_the_application(sim: SimHandle) -> None:
    registry = CollectorRegistry()
    client = tokenbooth.instrument(track(openai.OpenAI(base_url=sim.url, api_key="k", max_retries=0)),
                                   registry=registry)
    pusher = tokenbooth.push_to(f"http://127.0.0.1:{free_port()}", "broken", every_calls=1, every_seconds=0.1,
                                registry=registry)
    try:
        for _ in range(3):
            assert client.chat.completions.create(model="gpt-4o-mini",
                                                  messages=[{"role": "user", "content": "x"}]).choices
        deadline = time.monotonic() + 5
        while pusher.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pusher.close()
    assert pusher.failures >= 2 and pusher.pushes == 0
    assert total(registry, "tokenbooth_pushgateway_failures_total") == pusher.failures
    assert total(registry, "tokenbooth_requests_total", outcome="success") == 3

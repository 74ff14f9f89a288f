"""Serving /metrics from an application: thread server, ASGI and WSGI apps, multiprocess mode."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import httpx
import openai
from prometheus_client import CollectorRegistry

import tokenbooth
from tests.conftest import SimHandle, track


def _one_call(sim: SimHandle, registry: CollectorRegistry) -> None:
    client = tokenbooth.instrument(track(openai.OpenAI(base_url=sim.url, api_key="k", max_retries=0)),
                                   registry=registry)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])


def test_start_metrics_server(sim: SimHandle) -> None:
    registry = CollectorRegistry()
    _one_call(sim, registry)
    server = tokenbooth.start_metrics_server(0, registry=registry)
    try:
        assert server.server_address[0] == "127.0.0.1"  # loopback unless asked otherwise
        text = httpx.get(f"http://127.0.0.1:{server.server_address[1]}/metrics").text
    finally:
        server.shutdown()
        server.server_close()
    assert 'tokenbooth_requests_total{error_type="",model="gpt-4o-mini"' in text


def test_asgi_and_wsgi_apps(sim: SimHandle) -> None:
    registry = CollectorRegistry()
    _one_call(sim, registry)
    sent: list[dict[str, Any]] = []

    async def asgi() -> None:
        app = tokenbooth.metrics_asgi_app(registry)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
        await app(scope, receive, send)

    asyncio.run(asgi())
    assert sent[0]["status"] == 200 and b"tokenbooth_requests_total" in sent[1]["body"]

    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(tokenbooth.metrics_wsgi_app(registry)(environ, lambda s, h: status.append(s)))
    assert status[0].startswith("200") and b"tokenbooth_requests_total" in body


WORKER = """
import os, sys, time, openai, tokenbooth
client = tokenbooth.instrument(openai.OpenAI(base_url=sys.argv[1], api_key="k", max_retries=0))
for _ in range(5):
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
if sys.argv[2] == "hold":
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                            stream=True, max_tokens=400)
    chunks = iter(stream)
    next(chunks)
    open(sys.argv[3], "w").close()          # in flight now
    while not os.path.exists(sys.argv[3] + ".go"):
        time.sleep(0.02)
    for _ in chunks:
        pass
"""


def test_two_worker_processes_are_summed_in_multiprocess_mode(make_sim: Any, tmp_path: Path) -> None:
    sim = make_sim(token_ms=5)
    mp_dir = tmp_path / "mp"
    mp_dir.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, str(script), sim.url, "hold", str(ready)], env=env,
                              stderr=subprocess.PIPE, text=True)
    other = subprocess.run([sys.executable, str(script), sim.url, "done", ""], env=env, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert holder.poll() is None and time.monotonic() < deadline, holder.stderr.read() if holder.stderr else ""
        time.sleep(0.02)

    def scrape() -> str:
        result = subprocess.run(
            [sys.executable, "-c",
             "import tokenbooth; from prometheus_client import generate_latest; "
             "print(generate_latest(tokenbooth.sdk.metrics_registry()).decode())"],
            env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def sample(text: str, name: str, **labels: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))

    try:
        during = scrape()
        assert sample(during, "tokenbooth_requests_total", outcome="success") == 10
        assert sample(during, "tokenbooth_in_flight_requests") == 1
    finally:
        Path(str(ready) + ".go").touch()
    _, err = holder.communicate(timeout=60)
    assert holder.returncode == 0, err
    after = scrape()
    assert sample(after, "tokenbooth_requests_total", outcome="success") == 11
    assert sample(after, "tokenbooth_in_flight_requests") == 0

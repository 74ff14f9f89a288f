"""Memory a client cannot grow: every cache keyed by a name a client or an upstream chooses is bounded.

A model name is the client's to choose (up to ``limits.max_model_length``), and so is the model an
upstream says it served. The gateway runs as its own process here, so its resident memory is its
own, read from ``/proc/PID/status``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import free_port
from tokenbooth.config import TimeoutConfig
from tokenbooth.errors import UpstreamError
from tokenbooth.gateway.client import Pool
from tokenbooth.simulate import SimConfig, Simulator

_NAME = "x" * 200  # a long name, as a client may send: 211 characters with its number


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1))


async def _calls(pool: Pool, names: range, concurrency: int = 32) -> int:
    """One chat call per distinct model name, ``concurrency`` at a time; how many were answered 200."""
    todo = iter(names)
    answered = 0

    async def worker() -> None:
        nonlocal answered
        for i in todo:
            body = orjson.dumps({"model": f"m{i:07d}-{_NAME}", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 4})
            resp = await pool.request(b"/chat/completions", body, [(b"content-type", b"application/json")])
            await resp.read()
            resp.release()
            answered += resp.status == 200

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered


def test_twenty_thousand_distinct_model_names_leave_resident_memory_flat(tmp_path: Path) -> None:
    async def run() -> tuple[int, int, int]:
        sim = Simulator(SimConfig(seed=1))
        sim_port = await sim.start()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBOOTH_")}
        with (tmp_path / "gateway.log").open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tokenbooth.cli", "serve", "--upstream", f"http://127.0.0.1:{sim_port}/v1",
                 "--port", str(port), "--db", f"sqlite:///{tmp_path / 'ledger.db'}"],
                stdout=log, stderr=log, env=env)
        pool = Pool(f"http://127.0.0.1:{port}/v1", TimeoutConfig(), upstream="gateway")
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    resp = await pool.request(b"/models", b"", [], method=b"GET")
                    await resp.read()
                    resp.release()
                    break
                except UpstreamError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"the gateway did not start: {(tmp_path / 'gateway.log').read_text()}")
                    await asyncio.sleep(0.05)
            # warm-up: past every cache's bound, so each has been as full as it gets
            warm = await _calls(pool, range(5_000))
            before = _rss_kib(proc.pid)
            answered = await _calls(pool, range(5_000, 25_000))
            after = _rss_kib(proc.pid)
            return warm + answered, before, after
        finally:
            pool.close()
            proc.terminate()
            proc.wait(30)
            await sim.stop()

    answered, before, after = asyncio.run(run())
    assert answered == 25_000
    # before the caches were bounded: +30 MB (88 MB -> 118 MB), ~1.5 KB per name
    assert after - before < 4 * 1024, f"RSS grew from {before} KiB to {after} KiB over 20,000 distinct model names"

"""Soak with faults: does every call survive load, faults and hang-ups into the numbers?

    python bench/soak.py --duration 1800 --rate 40
    python bench/soak.py --duration 600 --rate 40 --hostile

A simulated upstream injects 5 % 429s, 2 % 5xx and 1 % timeouts; the gateway (metering,
SQLite ledger, retries on) serves a steady open-loop rate of chat calls, 30 % streamed, and
2 % of all calls are clients that hang up mid-stream. Afterwards, per outcome:
calls answered (as the clients saw them) = ledger rows = ``tokenbooth_requests_total``;
the gateway's RSS growth over the last two thirds of the run; and every warning or error
the gateway logged must be one of the injected faults. ``tests/integration/test_soak.py``
runs a two-minute profile of this in the test suite.

``--hostile`` mixes hostile clients into the same traffic: 1 % of calls send a 9 MiB body (past
``limits.max_request_bytes``: each must get a 413), 1 % are slowloris connections sending their
head a byte a second (each must be closed within ``limits.header_timeout``, 5 s here, plus 2 s),
1 % ask for a random model name, and the upstream answers 1 % of calls with usage of 10^18
tokens (each must be recorded with an estimate and counted in ``tokenbooth_usage_rejected_total``;
no metric or row may show such a count). The normal calls' numbers must still agree exactly,
``/healthz`` must answer throughout, and RSS must stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

TB = [sys.executable, "-m", "tokenbooth.cli"]
# What the gateway may log about injected faults; anything else at WARNING or above is a finding.
EXPECTED_LOG = re.compile(r"did not answer in time|broke off|ended the stream before|circuit of upstream|"
                          r"reported usage out of range")
HEADER_TIMEOUT = 5.0  # limits.header_timeout in the hostile soak
OVERSIZED = 9 * 2**20  # bytes of an oversized body, past the default limits.max_request_bytes (8 MiB)


@dataclass
class SoakResult:
    """What one soak run saw, from the clients, the metrics, the ledger and the logs."""

    duration: float
    calls: int
    client: dict[str, int]
    metrics: dict[str, int]
    ledger: dict[str, int]
    rss_mb: list[tuple[float, float]]
    unexpected_log: list[str] = field(default_factory=list)
    hostile: dict[str, float] = field(default_factory=dict)  # what the hostile clients and the gateway saw

    @property
    def rss_growth(self) -> float:
        """Relative RSS growth over the last two thirds of the run."""
        samples = [mb for t, mb in self.rss_mb if t >= self.duration / 3]
        if len(samples) < 2:
            return 0.0
        return (samples[-1] - samples[0]) / samples[0]

    def summary(self) -> str:
        rss = f"{self.rss_mb[0][1]:.0f} -> {self.rss_mb[-1][1]:.0f} MB" if self.rss_mb else "n/a"
        return (f"{self.calls} calls in {self.duration:.0f} s\n"
                f"  clients {dict(sorted(self.client.items()))}\n"
                f"  metrics {dict(sorted(self.metrics.items()))}\n"
                f"  ledger  {dict(sorted(self.ledger.items()))}\n"
                f"  RSS {rss}, growth over the last two thirds {self.rss_growth * 100:+.1f} %\n"
                f"  unexpected log lines: {len(self.unexpected_log)}"
                + (f"\n  hostile {dict(sorted(self.hostile.items()))}" if self.hostile else ""))

    def hostile_ok(self) -> bool:
        """Every hostile client got what it should, and nothing absurd reached the numbers."""
        h = self.hostile
        if not h:
            return True
        return (h["oversized_413"] == h["oversized"] == h["metric_too_large"]
                and h["slowloris_closed_in_time"] == h["slowloris"]
                and h["healthz_failures"] == 0
                and h["absurd_rows"] == h["metric_usage_rejected"] > 0
                and h["max_row_tokens"] < 1e9 and h["max_metric_tokens"] < 1e12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _slowloris(port: int, hostile: collections.Counter[str]) -> None:
    """A client that sends its request head a byte a second; the gateway must close it in time."""
    hostile["slowloris"] += 1
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n" * 4
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        hostile["slowloris_refused"] += 1
        return
    try:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                    break  # closed by the gateway
            except TimeoutError:
                continue
            break  # an answer (408): the connection is being closed
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    if time.monotonic() - started <= HEADER_TIMEOUT + 2:
        hostile["slowloris_closed_in_time"] += 1


async def _oversized(session: aiohttp.ClientSession, url: str, hostile: collections.Counter[str]) -> None:
    hostile["oversized"] += 1
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + b"x" * OVERSIZED + b'"}]}'
    try:
        async with session.post(f"{url}/chat/completions", data=body,
                                headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            hostile["oversized_413"] += resp.status == 413
    except (aiohttp.ClientError, TimeoutError):
        hostile["oversized_client_failure"] += 1


async def _one_call(session: aiohttp.ClientSession, url: str, rng: random.Random, tally: collections.Counter[str],
                    hostile: collections.Counter[str] | None = None, port: int = 0) -> None:
    roll = rng.random()
    if hostile is not None:
        pick = rng.random()
        if pick < 0.01:
            await _oversized(session, url, hostile)
            return
        if pick < 0.02:
            await _slowloris(port, hostile)
            return
    hang_up = roll < 0.02  # after two chunks of a stream of 16 or more at 10 ms each: mid-stream
    stream = hang_up or roll < 0.30
    model = "gpt-4o-mini"
    if hostile is not None and rng.random() < 0.01:
        model = f"random-{rng.getrandbits(64):016x}"
        hostile["random_models"] += 1
    body = {"model": model, "messages": [{"role": "user", "content": "soak " * rng.randint(5, 60)}],
            "max_tokens": 200 if hang_up else rng.randint(8, 48), "stream": stream}
    try:
        async with session.post(f"{url}/chat/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                tally["error"] += 1
                return
            if not stream:
                await resp.read()
                tally["success"] += 1
                return
            chunks = 0
            last = b""
            async for line in resp.content:
                if line.startswith(b"data: "):
                    last = line
                    if b'"content"' in line:
                        chunks += 1
                    if hang_up and chunks >= 2:
                        resp.close()  # the client goes away mid-stream
                        tally["cancelled"] += 1
                        return
            tally["error" if b'"error"' in last else "success"] += 1
    except (aiohttp.ClientError, TimeoutError):
        tally["client_failure"] += 1


async def _probe(base: str, hostile: collections.Counter[str], stop: asyncio.Event) -> None:
    """``/healthz`` twice a second, on fresh connections, for as long as the load runs."""
    timeout = aiohttp.ClientTimeout(total=2)
    while not stop.is_set():
        try:
            async with aiohttp.ClientSession(timeout=timeout) as s, s.get(f"{base}/healthz") as r:
                hostile["healthz_failures"] += r.status != 200
        except (aiohttp.ClientError, TimeoutError):
            hostile["healthz_failures"] += 1
        hostile["healthz"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def _load(url: str, duration: float, rate: float, gateway_pid: int, seed: int,
                hostile: collections.Counter[str] | None = None, port: int = 0
                ) -> tuple[collections.Counter[str], int, list[tuple[float, float]]]:
    tally: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(url.removesuffix("/v1"), hostile, stop)) if hostile is not None else None
    rng = random.Random(seed)
    rss: list[tuple[float, float]] = []
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    next_rss = 0.0
    n = 0
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=timeout) as session:
        while (elapsed := time.monotonic() - started) < duration:
            if elapsed >= next_rss:
                rss.append((elapsed, _rss_mb(gateway_pid)))
                next_rss += max(duration / 60, 1.0)
            task = asyncio.create_task(_one_call(session, url, rng, tally, hostile, port))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(started + n / rate - time.monotonic(), 0))
        await asyncio.gather(*tasks)
    stop.set()
    if probe is not None:
        await probe
    rss.append((time.monotonic() - started, _rss_mb(gateway_pid)))
    return tally, n, rss


def _metric_counts(text: str) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        if line.startswith("tokenbooth_requests_total{"):
            outcome = re.search(r'outcome="(\w+)"', line)
            assert outcome
            counts[outcome.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return dict(counts)


def run_soak(duration: float = 120, rate: float = 40, seed: int = 1, workdir: Path | None = None,
             hostile: bool = False) -> SoakResult:
    """Run one soak and collect its numbers (see the module docstring)."""
    tmp = Path(workdir or tempfile.mkdtemp(prefix="tokenbooth-soak-"))
    faults = "429=0.05,500=0.02,timeout=0.01" + (",absurd=0.01" if hostile else "")
    sim_log = (tmp / "simulate.log").open("w")  # a pipe nobody reads would block the simulator once full
    sim = subprocess.Popen([*TB, "simulate", "--port", "0", "--seed", str(seed), "--ttft-ms", "20", "--token-ms", "10",
                            "--faults", faults, "--retry-after", "0.2",
                            "--timeout-s", "3"], stdout=subprocess.PIPE, stderr=sim_log, text=True)
    assert sim.stdout is not None
    sim_url = re.search(r"http://\S+/v1", sim.stdout.readline()).group(0)  # type: ignore[union-attr]
    config = tmp / "soak.yaml"
    db = tmp / "soak.db"
    port = _free_port()
    settings: dict[str, object] = {
        "port": port, "ledger": {"url": f"sqlite:///{db}"},
        "upstreams": [{"name": "sim", "base_url": sim_url, "timeout": {"read": 1.0},
                       "retry": {"backoff_base": 0.05}, "models": ["*"]}],
    }
    if hostile:
        settings["limits"] = {"header_timeout": HEADER_TIMEOUT}
    config.write_text(json.dumps(settings))
    log_path = tmp / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBOOTH_")}
    with log_path.open("w") as log:
        gateway = subprocess.Popen([*TB, "serve", "--config", str(config), "--log-level", "warning"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise RuntimeError(f"gateway did not start: {log_path.read_text()}") from None
                time.sleep(0.1)
        seen: collections.Counter[str] | None = collections.Counter() if hostile else None
        tally, n, rss = asyncio.run(_load(f"{base}/v1", duration, rate, gateway.pid, seed, seen, port))

        async def scrape() -> str:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics") as r:
                return await r.text()

        time.sleep(0.5)  # let the last cancelled streams be recorded
        text = asyncio.run(scrape())
        metrics = _metric_counts(text)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
        sim.send_signal(signal.SIGINT)
        sim.communicate(timeout=10)
        sim_log.close()
    with sqlite3.connect(db) as conn:
        ledger = dict(conn.execute("SELECT outcome, count(*) FROM tokenbooth_calls GROUP BY outcome").fetchall())
        largest = conn.execute("SELECT max(max(input_tokens, output_tokens)) FROM tokenbooth_calls").fetchone()[0]
        # the upstream's absurd answers: whole answers, recorded with an estimate
        absurd = conn.execute("SELECT count(*) FROM tokenbooth_calls WHERE outcome = 'success' AND "
                              "tokens_estimated").fetchone()[0]
    unexpected = [line for line in log_path.read_text().splitlines()
                  if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", line) and not EXPECTED_LOG.search(line)]
    unexpected += [f"simulator: {line}" for line in (tmp / "simulate.log").read_text().splitlines()
                   if "Traceback" in line or "Error" in line]
    found: dict[str, float] = {}
    if seen is not None:
        found = {**seen, "absurd_rows": absurd, "max_row_tokens": largest or 0,
                 "metric_too_large": _sample(text, "tokenbooth_rejected_requests_total", 'reason="too_large"'),
                 "metric_usage_rejected": _sample(text, "tokenbooth_usage_rejected_total"),
                 "max_metric_tokens": max((float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                           if line.startswith("tokenbooth_tokens_total{")), default=0.0)}
        for key in ("oversized", "oversized_413", "slowloris", "slowloris_closed_in_time", "healthz_failures"):
            found.setdefault(key, 0)
    return SoakResult(duration, n, dict(tally), metrics, ledger, rss, unexpected, found)


def _sample(text: str, name: str, labels: str = "") -> float:
    """The sum of a metric's samples in an exposition, over those whose labels hold ``labels``."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if (line.startswith(name + "{") and labels in line) or line.startswith(name + " "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=1800)
    parser.add_argument("--rate", type=float, default=40, help="calls per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hostile", action="store_true", help="mix in hostile clients and absurd usage")
    args = parser.parse_args()
    result = run_soak(args.duration, args.rate, args.seed, hostile=args.hostile)
    print(result.summary())
    for line in result.unexpected_log[:20]:
        print("  !", line)
    ok = (result.client == result.metrics == result.ledger and result.rss_growth < 0.10
          and not result.unexpected_log and result.hostile_ok())
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""``tokenbooth demo``: a simulated upstream, the gateway in front of it, and traffic through it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import shutil
import signal
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from tokenbooth.catalog import total
from tokenbooth.config import load_settings
from tokenbooth.errors import ConfigError
from tokenbooth.gateway.app import build_gateway
from tokenbooth.gateway.server import GatewayServer, bind_socket, uvicorn_config
from tokenbooth.simulate import SimConfig, Simulator

__all__ = ["run_demo"]

# (model, weight, endpoint); deepseek-chat goes through the "relay" upstream priced in CNY.
_MIX = (
    ("gpt-4o-mini", 5, "chat"),
    ("gpt-4o", 2, "chat"),
    ("o3-mini", 1, "chat"),
    ("deepseek-chat", 2, "chat"),
    ("gpt-4o-mini", 1, "completions"),
    ("text-embedding-3-small", 1, "embeddings"),
)


async def _client(base: str, session: aiohttp.ClientSession, stop: asyncio.Event, rng: random.Random) -> None:
    weights = [w for _, w, _ in _MIX]
    while not stop.is_set():
        model, _, kind = rng.choices(_MIX, weights)[0]
        prompt = " ".join(rng.choice(("hello", "cost", "token", "gateway", "metrics", "ledger"))
                          for _ in range(rng.randint(5, 2000 if rng.random() < 0.15 else 80)))
        stream = kind != "embeddings" and rng.random() < 0.35
        if kind == "chat":
            body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                                    "max_tokens": rng.randint(16, 96), "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
        elif kind == "completions":
            body = {"model": model, "prompt": prompt, "max_tokens": 32, "stream": stream}
        else:
            body = {"model": model, "input": prompt}
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.post(f"{base}/{kind}" if kind != "chat" else f"{base}/chat/completions",
                                    json=body) as resp:
                async for _ in resp.content.iter_any():
                    pass
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0.05, 0.4))


_FAULTS = {"429": 0.03, "500": 0.02, "timeout": 0.01, "malformed": 0.005}
_FAULT_NAMES = {"429": "get 429 with Retry-After", "500": "get 500", "timeout": "stall past the read timeout",
                "malformed": "get a malformed answer"}


def _faults_line(faults: dict[str, float]) -> str:
    parts = [f"{rate * 100:g} % {_FAULT_NAMES[kind]}" for kind, rate in faults.items()]
    return "  faults    " + ", ".join(parts) + " (before retries): the errors you see are on purpose"


def self_command() -> str:
    """How to run ``tokenbooth`` again from this shell, as typed: the bare name when it is on the
    PATH, else the path of the script that is running (``.venv/bin/tokenbooth`` after ``make demo``)."""
    script = Path(sys.argv[0])
    on_path = shutil.which("tokenbooth")
    if on_path and (script.name != "tokenbooth" or Path(on_path).resolve() == script.resolve()):
        return "tokenbooth"
    if script.name == "tokenbooth" and script.is_file():
        relative = os.path.relpath(script.resolve())
        return shlex.quote(relative if not relative.startswith("..") else str(script.resolve()))
    return f"{shlex.quote(sys.executable)} -m tokenbooth.cli"


async def run_demo(duration: float = 60.0, port: int = 8080, db: str = "sqlite:///tokenbooth-demo.db",
                   concurrency: int = 4) -> None:
    """Run simulator, gateway and traffic for ``duration`` seconds or until Ctrl-C, then report."""
    sim = Simulator(SimConfig(ttft_ms=120, token_ms=6, jitter=0.5, output_tokens=(16, 96),
                              faults=_FAULTS,
                              timeout_s=4.0, seed=7))
    sim_port = await sim.start()
    upstream = f"http://127.0.0.1:{sim_port}/v1"
    with resources.as_file(resources.files("tokenbooth") / "data" / "demo-prices.yaml") as price_file:
        settings = load_settings(overrides={
            "port": port,
            "upstreams": [
                {"name": "relay", "base_url": upstream, "provider": "deepseek", "models": ["deepseek-chat"],
                 "timeout": {"read": 2.0}},
                {"name": "openai-sim", "base_url": upstream, "provider": "openai", "models": ["*"],
                 "timeout": {"read": 2.0}},
            ],
            "ledger": {"url": db},
            "pricing": {"price_file": str(price_file)},
            "graceful_shutdown": 5.0,
        }, environ={})
        registry = CollectorRegistry()
        gateway = build_gateway(settings, registry)
    try:
        sock = bind_socket(settings.host, port)
    except OSError as exc:
        await sim.stop()
        raise ConfigError(f"Cannot listen on port {port}: {exc.strerror}; pass --port") from None
    server = GatewayServer(uvicorn_config(gateway, settings), handle_signals=False)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            await serving
            return
        await asyncio.sleep(0.02)

    base = f"http://127.0.0.1:{sock.getsockname()[1]}"  # the port chosen, for --port 0
    print(f"tokenbooth demo: gateway {base}/v1 -> simulated upstream {upstream}")
    print(f"  metrics   {base}/metrics")
    tb = self_command()
    print(f"  ledger    {db}   ({tb} report --db {shlex.quote(db)})")
    print(_faults_line(_FAULTS))
    print(f"  running for {duration:.0f} s with {concurrency} clients; Ctrl-C to stop sooner\n", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(duration, stop.set)
    async with aiohttp.ClientSession(base_url=None, timeout=aiohttp.ClientTimeout(total=15)) as session:
        clients = [asyncio.create_task(_client(base + "/v1", session, stop, random.Random(i)))
                   for i in range(concurrency)]
        started = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
            calls = total(registry, "tokenbooth_requests_total")
            errors = total(registry, "tokenbooth_requests_total", outcome="error")
            cost = total(registry, "tokenbooth_cost_usd_total")
            print(f"  {time.monotonic() - started:5.0f} s  {calls:6.0f} calls  {errors:4.0f} errors  "
                  f"${cost:.6f}", flush=True)
        await asyncio.gather(*clients, return_exceptions=True)
    server.should_exit = True
    await serving
    await sim.stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)

    from tokenbooth.ledger.report import render, report
    from tokenbooth.ledger.schema import connect

    engine = connect(db, create=False)
    try:
        print()
        print(render(report(engine, "model"), "table", "model"), end="")
    finally:
        engine.dispose()
    print(f"\nThe ledger stays in {db}; try: {tb} report --db {shlex.quote(db)} --by provider --format csv")

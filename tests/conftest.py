"""Shared fixtures: a real simulated upstream and a real gateway, each on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from tokenbooth.catalog import total
from tokenbooth.config import Settings, load_settings
from tokenbooth.gateway.app import Gateway, build_gateway
from tokenbooth.gateway.server import GatewayServer, bind_socket, uvicorn_config
from tokenbooth.simulate import SimConfig, Simulator
from tokenbooth.stack.tools import MissingTool, find_tool

PG_URL = os.environ.get("TOKENBOOTH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(tool: str) -> str:
    """The path of a Prometheus tool; a test that needs one fails (never skips) without it."""
    try:
        return find_tool(tool)
    except MissingTool as exc:
        pytest.fail(exc.message)


# The flag that moves each server's data out of the Debian packages' shared /var/lib/prometheus
# (a Pushgateway stopped there would leave its groups to every later run on the machine).
_DATA_FLAGS = {"prometheus": "--storage.tsdb.path=", "prometheus-alertmanager": "--storage.path=",
               "alertmanager": "--storage.path=", "prometheus-pushgateway": "--persistence.file=",
               "pushgateway": "--persistence.file="}


@contextlib.contextmanager
def serving(command: list[str], url: str, timeout: float = 20) -> Iterator[str]:
    """Run a real server (Prometheus, Alertmanager, Pushgateway) until its ``/-/ready`` answers;
    yield its URL; stop it afterwards. Its data must go to the test's temporary directory."""
    flag = _DATA_FLAGS.get(Path(command[0]).name)
    assert flag is None or any(arg.startswith(flag) for arg in command), f"{command[0]} needs {flag}TMPDIR"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{Path(command[0]).name} did not start")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


_OPEN_CLIENTS: list[Any] = []


def track(client: Any) -> Any:
    """Register an API client (openai, anthropic) to be closed after the test."""
    _OPEN_CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


class LoopThread:
    """An asyncio loop on a background thread, for servers the (sync) tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def serve(self, app: web.Application) -> tuple[web.AppRunner, int]:
        """Serve an aiohttp app on a free loopback port from this loop: its runner (``cleanup()``
        stops it, run on this loop) and its port."""
        runner = web.AppRunner(app, access_log=None)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))

        async def start() -> None:
            await runner.setup()
            await web.SockSite(runner, sock).start()

        self.run(start())
        return runner, sock.getsockname()[1]


class SimHandle:
    """A running simulated upstream: its URL and its control endpoints."""

    def __init__(self, sim: Simulator, port: int) -> None:
        self.sim = sim
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"
        self.base = f"http://127.0.0.1:{port}"

    def script(self, actions: list[dict[str, Any]]) -> None:
        httpx.post(f"{self.base}/_sim/script", json={"script": actions}).raise_for_status()

    def spy_headers(self) -> list[dict[str, str]]:
        """Record the (lower-cased) request headers of every generation call from now on."""
        seen: list[dict[str, str]] = []
        original = self.sim._generate

        async def spy(request: Any, api: str) -> Any:
            seen.append({k.lower(): v for k, v in request.headers.items()})
            return await original(request, api)

        self.sim._generate = spy  # type: ignore[method-assign]
        return seen

    def faults(self, spec: str) -> None:
        httpx.post(f"{self.base}/_sim/faults", json={"faults": spec}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.base}/_sim/stats").json()
        return result


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture
def make_sim(loop_thread: LoopThread) -> Iterator[Callable[..., SimHandle]]:
    made: list[Simulator] = []

    def make(**config: Any) -> SimHandle:
        sim = Simulator(SimConfig(seed=1, **config))
        port = loop_thread.run(sim.start())
        made.append(sim)
        return SimHandle(sim, port)

    yield make
    for sim in made:
        loop_thread.run(sim.stop())


@pytest.fixture
def sim(make_sim: Callable[..., SimHandle]) -> SimHandle:
    return make_sim()


class GatewayHandle:
    """A gateway served by uvicorn on a background thread."""

    def __init__(self, gateway: Gateway, settings: Settings, registry: CollectorRegistry) -> None:
        self.gateway = gateway
        self.settings = settings
        self.registry = registry
        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = GatewayServer(uvicorn_config(gateway, settings), handle_signals=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("gateway failed to start")
            threading.Event().wait(0.01)

    def flush(self) -> None:
        """Wait for the calls in progress to be recorded (a client can see the end of its answer a
        moment before the gateway's thread records the call), then for the ledger to write them."""
        assert self.gateway.ledger is not None
        deadline = time.monotonic() + 10
        while self.sample("tokenbooth_in_flight_requests") > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.gateway.ledger.flush(10)

    def sample(self, name: str, **labels: str) -> float:
        return total(self.registry, name, **labels)

    def sample_when(self, name: str, expected: float, timeout: float = 3, **labels: str) -> float:
        """The sample once it equals ``expected`` (to 1e-9), or its value after ``timeout`` seconds:
        for gauges the gateway updates at most once a second."""
        return self._poll(name, labels, lambda v: abs(v - expected) <= 1e-9, timeout)

    def sample_seen(self, name: str, timeout: float = 3, **labels: str) -> float:
        """The sample once it is above 0 (a call recorded after its client hung up, say), or its
        value after ``timeout`` seconds."""
        return self._poll(name, labels, lambda v: v > 0, timeout)

    def _poll(self, name: str, labels: dict[str, str], done: Callable[[float], bool], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not done(value := self.sample(name, **labels)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return value

    def rows(self) -> list[Any]:
        """Every ledger row written so far, oldest first (flushes the writer first)."""
        import sqlalchemy as sa

        from tokenbooth.ledger.schema import calls

        self.flush()
        engine = sa.create_engine(self.settings.ledger.url)
        with engine.connect() as conn:
            rows = list(conn.execute(sa.select(calls).order_by(calls.c.id)).all())
        engine.dispose()
        return rows

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayHandle]]:
    made: list[GatewayHandle] = []

    def make(upstreams: list[dict[str, Any]], **overrides: Any) -> GatewayHandle:
        overrides.setdefault("ledger", {"url": f"sqlite:///{tmp_path / f'ledger-{uuid.uuid4().hex[:6]}.db'}",
                                        "flush_interval": 0.05})
        settings = load_settings(overrides={"upstreams": upstreams, "port": 0, **overrides}, environ={})
        registry = CollectorRegistry()
        handle = GatewayHandle(build_gateway(settings, registry), settings, registry)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        handle.stop()


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> GatewayHandle:
    """The one-line form: every model to the simulator."""
    return make_gateway([{"name": "default", "base_url": sim.url, "provider": "openai", "models": ["*"]}])


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema for one test; fails (never skips) when the server is absent."""
    import sqlalchemy as sa

    schema = f"tb_test_{uuid.uuid4().hex[:10]}"
    try:
        engine = sa.create_engine(PG_URL)
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is needed at {PG_URL} (set TOKENBOOTH_TEST_PG_URL, or start it: "
                    f"pg_ctlcluster <version> main start): {exc.orig}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


class RedisServer:
    """A real redis-server of the test's own on a free loopback port (no persistence), which the
    test may stop, restart and flush without touching anyone else's Redis."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is needed (Debian: apt-get install redis-server; "
                        "'make test' installs it as root)")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.directory)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers, as in a hang."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cli(self, *args: str) -> str:
        """One command through redis-cli; its reply as text ("" when the server is down)."""
        try:
            out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                                 timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 and "Could not connect" not in out.stderr else ""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()

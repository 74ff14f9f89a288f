"""Running the gateway on uvicorn (httptools parser under the connection limits, uvloop event loop)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from tokenbooth.config import Settings
from tokenbooth.gateway.app import Gateway
from tokenbooth.gateway.connections import GatewayProtocol
from tokenbooth.ledger.journal import recover

__all__ = ["GatewayServer", "report_lost_rows", "run_workers", "uvicorn_config", "worker_app"]


def _event_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # Windows
        return "asyncio"
    return "uvloop"


def uvicorn_config(gateway: Gateway | str, settings: Settings, **extra: Any) -> uvicorn.Config:
    """The uvicorn configuration tokenbooth runs with: httptools under the connection limits
    (``limits.*``, gateway/connections.py), no access log, no per-response headers we do not need,
    a graceful-shutdown window for in-flight calls."""
    return uvicorn.Config(
        gateway,
        host=settings.host,
        port=settings.port,
        loop=_event_loop(),
        http=GatewayProtocol,
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # client addresses are not used; skip the middleware
        log_level="warning",
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=int(settings.graceful_shutdown + 0.999),
        timeout_keep_alive=settings.limits.keep_alive_timeout,
        **extra,
    )


class GatewayServer(uvicorn.Server):
    """uvicorn's server, optionally leaving signal handling to the caller (demo, tests)."""

    def __init__(self, config: uvicorn.Config, *, handle_signals: bool = True,
                 on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.handle_signals = handle_signals
        self.on_started = on_started  # called once the app has started and the sockets listen

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.on_started is not None and not self.should_exit:
            self.on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises SIGTERM after shutting down, so the process dies of the signal;
        # a gateway that drained its calls and flushed its ledger has ended well: exit 0.
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; port 0 picks a free one."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


_SETTINGS_ENV = "TOKENBOOTH_WORKER_SETTINGS"


def worker_app() -> Gateway:
    """The app factory each worker process calls (``--workers N``): settings come validated
    from the parent, as JSON in the environment."""
    from tokenbooth.gateway.app import build_gateway

    settings = Settings.model_validate_json(os.environ[_SETTINGS_ENV])
    return build_gateway(settings)


def report_lost_rows(settings: Settings) -> int:
    """Say how many calls an earlier run that was killed may have left out of the ledger."""
    if not settings.ledger.enabled:
        return 0
    missing = recover(settings.ledger.journal_path())
    if missing:
        message = (f"the previous gateway run ended without a clean shutdown: up to {missing} "
                   f"calls may be missing from the ledger")
        logging.getLogger("tokenbooth.ledger").warning(message)
        print(f"tokenbooth: warning: {message}", file=sys.stderr, flush=True)
    return missing


def run_workers(settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve on ``settings.workers`` processes sharing one socket (``sock``, else one bound here).

    Metrics use client_python's multiprocess mode (a temporary directory shared by the
    workers, removed at exit); each worker has its own ledger writer and circuit breakers.
    """
    from uvicorn.supervisors import Multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="tokenbooth-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[_SETTINGS_ENV] = settings.model_dump_json()
    try:
        config = uvicorn_config("tokenbooth.gateway.server:worker_app", settings, factory=True,
                                workers=settings.workers)
        sock = sock if sock is not None else config.bind_socket()
        Multiprocess(config, sockets=[sock]).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)

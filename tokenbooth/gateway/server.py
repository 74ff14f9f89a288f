"""Running the gateway on uvicorn (httptools parser, uvloop event loop)."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Generator

import uvicorn

from tokenbooth.config import Settings
from tokenbooth.gateway.app import Gateway

__all__ = ["GatewayServer", "uvicorn_config"]


def _fastest(loop_or_http: str) -> str:
    try:
        __import__("uvloop" if loop_or_http == "loop" else "httptools")
    except ImportError:
        return "asyncio" if loop_or_http == "loop" else "h11"
    return "uvloop" if loop_or_http == "loop" else "httptools"


def uvicorn_config(gateway: Gateway, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration tokenbooth runs with: no access log, no per-response headers we
    do not need, a graceful-shutdown window for in-flight calls."""
    return uvicorn.Config(
        gateway,
        host=settings.host,
        port=settings.port,
        loop=_fastest("loop"),
        http=_fastest("http"),
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # client addresses are not used; skip the middleware
        log_level="warning",
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=int(settings.graceful_shutdown + 0.999),
        timeout_keep_alive=30,
    )


class GatewayServer(uvicorn.Server):
    """uvicorn's server, optionally leaving signal handling to the caller (demo, tests)."""

    def __init__(self, config: uvicorn.Config, *, handle_signals: bool = True) -> None:
        super().__init__(config)
        self.handle_signals = handle_signals

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

"""Serving ``/metrics`` from an application that uses the SDK.

Under gunicorn or uvicorn with several worker processes each worker has its own metrics;
set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the workers start and the
apps below serve the sum over all workers (client_python's multiprocess mode). In-flight
and active-session gauges are summed over live workers (``livesum``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app, make_wsgi_app, start_http_server

__all__ = ["metrics_asgi_app", "metrics_registry", "metrics_wsgi_app", "start_metrics_server"]


def metrics_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """The registry to serve: across workers in multiprocess mode, else ``registry`` (or the default)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
        return combined
    return registry if registry is not None else REGISTRY


def start_metrics_server(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> Any:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server (``shutdown()`` stops it).

    Loopback by default, as the gateway: pass ``addr="0.0.0.0"`` for a Prometheus on another host."""
    server, _thread = start_http_server(port, addr, registry=metrics_registry(registry))
    return server


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """An ASGI app serving the metrics: ``app.mount("/metrics", metrics_asgi_app())`` in FastAPI/Starlette."""
    return make_asgi_app(metrics_registry(registry))


def metrics_wsgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """A WSGI app serving the metrics, for Flask or Django (e.g. with werkzeug's DispatcherMiddleware)."""
    return make_wsgi_app(metrics_registry(registry))

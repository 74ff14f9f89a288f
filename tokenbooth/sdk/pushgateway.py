"""Pushing metrics to a Prometheus Pushgateway, for batch jobs that end before a scrape.

    tokenbooth.push_to("http://pushgateway:9091", job="nightly-summaries")

A background thread pushes every ``every_calls`` recorded calls or ``every_seconds``,
whichever comes first, and once more when the interpreter exits, so a short job loses
nothing. Pushes replace the group's metrics (HTTP PUT): the registry holds running
totals. A failed push is logged and counted in ``tokenbooth_pushgateway_failures_total``,
never raised; after failures the pusher backs off (doubling, up to five minutes).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, push_to_gateway

from tokenbooth.catalog import Metrics
from tokenbooth.sdk.runtime import get_runtime

__all__ = ["Pusher", "push_to"]

log = logging.getLogger("tokenbooth.sdk")

_MAX_BACKOFF = 300.0


class Pusher:
    """Pushes one registry to one Pushgateway group in the background. Create with :func:`push_to`."""

    def __init__(self, url: str, job: str, registry: CollectorRegistry, metrics: Metrics, *,
                 every_calls: int = 100, every_seconds: float = 10.0,
                 grouping_key: Mapping[str, str] | None = None, timeout: float = 5.0) -> None:
        self.url = url
        self.job = job
        self.registry = registry
        self.metrics = metrics
        self.every_calls = max(1, every_calls)
        self.every_seconds = every_seconds
        self.grouping_key = dict(grouping_key or {})
        self.timeout = timeout
        self.pushes = 0
        self.failures = 0
        self._pushed_at_count = metrics.calls_recorded
        self._last_push = time.monotonic()
        self._backoff = 0.0
        self._next_try = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tokenbooth-push", daemon=True)

    def start(self) -> Pusher:
        self._thread.start()
        atexit.register(self.close)
        return self

    def push(self) -> bool:
        """Push now; True on success. Never raises."""
        with self._lock:
            count = self.metrics.calls_recorded
            try:
                push_to_gateway(self.url, job=self.job, registry=self.registry, grouping_key=self.grouping_key,
                                timeout=self.timeout)
            except Exception as exc:
                self.failures += 1
                self.metrics.push_failures.inc()
                self._backoff = min(max(self._backoff * 2, 1.0), _MAX_BACKOFF)
                self._next_try = time.monotonic() + self._backoff
                log.warning("push to %s failed (%s); next try in %.0f s", self.url, type(exc).__name__,
                            self._backoff)
                return False
            self.pushes += 1
            self._backoff = 0.0
            self._pushed_at_count = count
            self._last_push = time.monotonic()
            return True

    def _run(self) -> None:
        tick = min(self.every_seconds, 0.2)
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now < self._next_try:
                continue
            due_calls = self.metrics.calls_recorded - self._pushed_at_count >= self.every_calls
            if due_calls or now - self._last_push >= self.every_seconds:
                self.push()

    def close(self) -> None:
        """Stop the thread and push the final totals. Idempotent; registered to run at exit."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout + 1)
        self.push()


def push_to(url: str, job: str, *, every_calls: int = 100, every_seconds: float = 10.0,
            grouping_key: Mapping[str, str] | None = None, registry: CollectorRegistry | None = None) -> Pusher:
    """Start pushing the SDK's metrics to a Pushgateway; returns the running :class:`Pusher`."""
    runtime = get_runtime(registry)
    return Pusher(url, job, runtime.metrics.registry, runtime.metrics, every_calls=every_calls,
                  every_seconds=every_seconds, grouping_key=grouping_key).start()

"""Agent monitoring: sessions, steps and tool calls, next to the LLM calls they make.

    with tokenbooth.agent_session("support-bot") as session:
        with session.step("plan"):
            client.chat.completions.create(...)      # an instrumented client: attributed to the session
        lookup_order(order_id)                       # a @tokenbooth.track_tool("lookup_order") function

Sessions, steps and tools work the same with ``async with`` and ``async def``. An LLM call
made inside a session by an instrumented client is attributed to it through a context
variable (so across ``await`` and into tasks started inside it); calls through the gateway
are attributed by sending ``session.headers`` (``X-Tokenbooth-Session``) with them. When the
session ends its roll-up (steps, tool calls, tokens, cost, outcome) goes to the ledger.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry

from tokenbooth.ledger.writer import LedgerWriter
from tokenbooth.record import CallRecord, SessionRecord
from tokenbooth.sdk.runtime import Runtime, get_runtime

__all__ = ["AgentSession", "Step", "agent_session", "current_session", "track_tool"]

P = ParamSpec("P")
R = TypeVar("R")

_current: contextvars.ContextVar[AgentSession | None] = contextvars.ContextVar("tokenbooth_session", default=None)
_ZERO = Decimal(0)


def current_session() -> AgentSession | None:
    """The agent session the calling code runs in, if any."""
    return _current.get()


class Step:
    """One step of a session (``plan``, ``act``, ``reflect``...): timed, counted. Sync or async."""

    def __init__(self, session: AgentSession, step_type: str) -> None:
        self.session = session
        self.step_type = step_type
        self._t0 = 0.0

    def __enter__(self) -> Step:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.session._end_step(self.step_type, time.perf_counter() - self._t0)

    async def __aenter__(self) -> Step:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)


class AgentSession:
    """A running agent session. Create with :func:`agent_session`."""

    def __init__(self, agent: str, session_id: str | None, runtime: Runtime) -> None:
        self.agent = agent
        self.session_id = session_id or uuid.uuid4().hex
        self.runtime = runtime
        self.outcome = "success"
        self.steps = 0
        self.tool_calls = 0
        self.tool_errors = 0
        self.llm_calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_usd = _ZERO
        self.unpriced_calls = 0
        self._lock = threading.Lock()
        self._token: contextvars.Token[AgentSession | None] | None = None
        self._started_at = 0.0
        self._t0 = 0.0

    @property
    def headers(self) -> dict[str, str]:
        """Headers that attribute gateway calls to this session: pass as ``extra_headers``."""
        return {"X-Tokenbooth-Session": self.session_id}

    def step(self, step_type: str) -> Step:
        """A context manager (sync or async) timing one step of this session."""
        return Step(self, step_type)

    def fail(self) -> None:
        """Mark the session failed even though no exception ends it."""
        self.outcome = "error"

    def add_call(self, record: CallRecord) -> None:
        """Count an LLM call made inside this session (done by instrumented clients)."""
        with self._lock:
            self.llm_calls += 1
            self.input_tokens += record.usage.input
            self.output_tokens += record.usage.output
            if record.cost is not None:
                self.cost_usd += record.cost.usd
            elif record.usage.input or record.usage.output:
                self.unpriced_calls += 1

    def _end_step(self, step_type: str, seconds: float) -> None:
        with self._lock:
            self.steps += 1
        self.runtime.metrics.agent_step_duration.labels(self.agent, step_type).observe(seconds)

    def _tool(self, failed: bool) -> None:
        with self._lock:
            self.tool_calls += 1
            self.tool_errors += failed

    def __enter__(self) -> AgentSession:
        self._started_at = time.time()
        self._t0 = time.perf_counter()
        self._token = _current.set(self)
        self.runtime.metrics.agent_sessions_active.labels(self.agent).inc()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.outcome = "error"
        if self._token is not None:
            _current.reset(self._token)
        m = self.runtime.metrics
        duration = time.perf_counter() - self._t0
        try:
            m.agent_sessions_active.labels(self.agent).dec()
            m.agent_session_duration.labels(self.agent, self.outcome).observe(duration)
            m.agent_session_steps.labels(self.agent).observe(self.steps)
            if self.runtime.ledger is not None:
                self.runtime.ledger.submit(self.record(duration))
        except Exception:  # instrumentation never breaks the agent
            import logging

            logging.getLogger("tokenbooth.sdk").exception("recording session %s failed", self.session_id)

    async def __aenter__(self) -> AgentSession:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.__exit__(exc_type, exc, tb)

    def record(self, duration: float) -> SessionRecord:
        """The session's roll-up."""
        with self._lock:
            return SessionRecord(
                session_id=self.session_id, agent=self.agent, started_at=self._started_at, duration_s=duration,
                outcome=self.outcome, steps=self.steps, tool_calls=self.tool_calls, tool_errors=self.tool_errors,
                llm_calls=self.llm_calls, input_tokens=self.input_tokens, output_tokens=self.output_tokens,
                cost_usd=self.cost_usd, unpriced_calls=self.unpriced_calls,
            )


def agent_session(agent: str, session_id: str | None = None, *, registry: CollectorRegistry | None = None,
                  ledger: str | LedgerWriter | None = None) -> AgentSession:
    """Start an agent session; use it as ``with`` or ``async with``.

    ``agent`` is a bounded name (it is a metric label); ``session_id`` (unbounded) only goes
    to the ledger. An exception leaving the block marks the session ``error``.
    """
    return AgentSession(agent, session_id, get_runtime(registry, ledger))


def track_tool(name: str, timeout: float | None = None, *,
               registry: CollectorRegistry | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Count and time calls of a tool function (sync or async) by status: success, error, timeout.

    With ``timeout``, an async tool is cancelled after that many seconds and a sync tool's
    caller stops waiting (the sync function itself runs on in a worker thread: Python cannot
    stop it); both raise ``TimeoutError``. Exceptions always propagate unchanged.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @contextlib.contextmanager
        def observed() -> Iterator[None]:
            """Time the block and count it: timeout on TimeoutError, error on any other exception."""
            t0 = time.perf_counter()
            try:
                yield
            except TimeoutError:
                observe("timeout", time.perf_counter() - t0)
                raise
            except BaseException:
                observe("error", time.perf_counter() - t0)
                raise
            observe("success", time.perf_counter() - t0)

        def observe(status: str, seconds: float) -> None:
            try:
                m = get_runtime(registry).metrics
                m.tool_calls.labels(name, status).inc()
                m.tool_duration.labels(name).observe(seconds)
                session = _current.get()
                if session is not None:
                    session._tool(status != "success")
            except Exception:  # instrumentation never breaks the tool
                import logging

                logging.getLogger("tokenbooth.sdk").exception("recording tool %s failed", name)

        if inspect.iscoroutinefunction(fn):
            async_fn: Callable[P, Awaitable[Any]] = fn

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with observed():
                    if timeout is None:
                        return await async_fn(*args, **kwargs)
                    return await asyncio.wait_for(async_fn(*args, **kwargs), timeout)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with observed():
                if timeout is None:
                    return fn(*args, **kwargs)
                context = contextvars.copy_context()
                pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"tool-{name}")
                try:
                    return pool.submit(functools.partial(context.run, fn, *args, **kwargs)).result(timeout)
                except concurrent.futures.TimeoutError:
                    raise TimeoutError(f"tool {name!r} did not finish within {timeout} s") from None
                finally:
                    pool.shutdown(wait=False)

        return run

    return decorate

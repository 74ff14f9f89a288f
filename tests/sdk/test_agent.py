"""Agent sessions, steps and tool calls, with the LLM calls made inside them."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import tokenbooth
from tests.conftest import SimHandle, track
from tokenbooth.catalog import total
from tokenbooth.ledger.schema import calls, sessions
from tokenbooth.sdk.runtime import get_runtime


def _ledger_rows(db: str, registry: CollectorRegistry) -> tuple[list[Any], list[Any]]:
    writer = get_runtime(registry, db).ledger
    assert writer is not None and writer.flush(10)
    engine = sa.create_engine(db)
    with engine.connect() as conn:
        call_rows = list(conn.execute(sa.select(calls)).all())
        session_rows = list(conn.execute(sa.select(sessions)).all())
    engine.dispose()
    return call_rows, session_rows


def test_sync_session_with_steps_a_failing_tool_and_a_timing_out_tool(sim: SimHandle, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    db = f"sqlite:///{tmp_path / 'l.db'}"
    client = tokenbooth.instrument(track(openai.OpenAI(base_url=sim.url, api_key="k", max_retries=0)),
                                   registry=registry, ledger=db)

    @tokenbooth.track_tool("search", registry=registry)
    def search(q: str) -> str:
        return q.upper()

    @tokenbooth.track_tool("flaky", registry=registry)
    def flaky() -> None:
        raise ValueError("backend down")

    @tokenbooth.track_tool("slow", timeout=0.1, registry=registry)
    def slow() -> None:
        time.sleep(0.5)

    with tokenbooth.agent_session("support", registry=registry, ledger=db) as session:
        assert total(registry, "tokenbooth_agent_sessions_active", agent="support") == 1
        with session.step("plan"):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "plan"}])
        with session.step("act"):
            assert search("order 7") == "ORDER 7"
            with pytest.raises(ValueError):
                flaky()
            with pytest.raises(TimeoutError):
                slow()
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "act"}])
        with session.step("act"):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "answer"}])

    assert total(registry, "tokenbooth_agent_sessions_active", agent="support") == 0
    assert total(registry, "tokenbooth_tool_calls_total", tool="search", status="success") == 1
    assert total(registry, "tokenbooth_tool_calls_total", tool="flaky", status="error") == 1
    assert total(registry, "tokenbooth_tool_calls_total", tool="slow", status="timeout") == 1
    assert total(registry, "tokenbooth_tool_duration_seconds_count") == 3
    assert total(registry, "tokenbooth_agent_session_steps_sum", agent="support") == 3
    assert total(registry, "tokenbooth_agent_session_steps_count", agent="support") == 1
    assert total(registry, "tokenbooth_agent_step_duration_seconds_count", step_type="act") == 2
    assert total(registry, "tokenbooth_agent_session_duration_seconds_count", outcome="success") == 1

    call_rows, session_rows = _ledger_rows(db, registry)
    (rollup,) = session_rows
    assert all(r.session_id == session.session_id for r in call_rows) and len(call_rows) == 3
    assert (rollup.agent, rollup.outcome, rollup.steps, rollup.tool_calls, rollup.tool_errors, rollup.llm_calls) \
        == ("support", "success", 3, 3, 2, 3)
    assert rollup.input_tokens == sum(r.input_tokens for r in call_rows)
    assert rollup.output_tokens == sum(r.output_tokens for r in call_rows)
    assert rollup.cost_usd == sum((r.cost_usd for r in call_rows), Decimal(0)) and rollup.cost_usd > 0


def test_async_session_tools_and_an_exception_marks_the_session_failed(sim: SimHandle) -> None:
    registry = CollectorRegistry()

    @tokenbooth.track_tool("fetch", timeout=0.1, registry=registry)
    async def fetch(slow: bool) -> str:
        await asyncio.sleep(1 if slow else 0)
        return "ok"

    async def main() -> None:
        client = tokenbooth.instrument(openai.AsyncOpenAI(base_url=sim.url, api_key="k", max_retries=0),
                                       registry=registry)
        try:
            async with tokenbooth.agent_session("researcher", registry=registry) as session:
                async with session.step("search"):
                    assert await fetch(False) == "ok"
                    with pytest.raises(TimeoutError):
                        await fetch(True)
                    # a task started inside the session is attributed to it
                    await asyncio.create_task(client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]))
                assert session.llm_calls == 1 and session.tool_calls == 2 and session.tool_errors == 1
                raise RuntimeError("agent gave up")
        finally:
            await client.close()

    with pytest.raises(RuntimeError):
        asyncio.run(main())
    assert total(registry, "tokenbooth_tool_calls_total", tool="fetch", status="timeout") == 1
    assert total(registry, "tokenbooth_agent_session_duration_seconds_count", agent="researcher",
                 outcome="error") == 1
    assert total(registry, "tokenbooth_agent_sessions_active", agent="researcher") == 0


def test_calls_outside_a_session_are_not_attributed(sim: SimHandle) -> None:
    registry = CollectorRegistry()
    client = tokenbooth.instrument(track(openai.OpenAI(base_url=sim.url, api_key="k", max_retries=0)),
                                   registry=registry)
    with tokenbooth.agent_session("a", registry=registry) as session:
        pass
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert session.llm_calls == 0 and tokenbooth.current_session() is None
    assert session.headers == {"X-Tokenbooth-Session": session.session_id}

"""The OpenAI Agents SDK through the gateway, on its default model path (the Responses API over
HTTP): every model call an agent's turn makes is metered, one ledger row each."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from agents import Agent, ModelSettings, OpenAIProvider, RunConfig, Runner, RunResult, RunResultStreaming, function_tool

from tests.conftest import GatewayHandle, SimHandle

ANSWER = "the quick brown fox jumps"  # the simulator's first five words
Result = RunResult | RunResultStreaming


def weather_agent(calls: list[str]) -> Agent[None]:
    """An agent with one tool, which records the city it is asked about."""

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: The city's name.
        """
        calls.append(city)
        return f"Sunny in {city}"

    return Agent(name="forecaster", instructions="Answer with the weather.", model="gpt-4o", tools=[get_weather],
                 model_settings=ModelSettings(max_tokens=len(ANSWER.split())))


def run_turn(gateway: GatewayHandle, agent: Agent[None], prompt: str, stream: bool) -> tuple[Result, str]:
    """Run one turn of ``agent`` through the gateway; its result, and the text streamed (if any).

    Tracing is off for the run, so nothing is exported; the provider uses the SDK's default model,
    the Responses API over HTTP."""

    async def main() -> tuple[Result, str]:
        async with openai.AsyncOpenAI(base_url=gateway.url, api_key="sk-test", max_retries=0) as client:
            config = RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)
            if not stream:
                return await Runner.run(agent, prompt, run_config=config), ""
            streamed = Runner.run_streamed(agent, prompt, run_config=config)
            deltas = [event.data.delta async for event in streamed.stream_events()
                      if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"]
            return streamed, "".join(deltas)

    return asyncio.run(main())


def assert_metered(gateway: GatewayHandle, result: Result, stream: bool) -> None:
    """One ledger row per model call the SDK made, each matching the call's usage, and the counter too."""
    rows = gateway.rows()
    assert [row.request_id for row in rows] == [raw.request_id for raw in result.raw_responses]
    for row, raw in zip(rows, result.raw_responses, strict=True):
        assert (row.operation, row.outcome, row.streamed, row.model) == ("chat", "success", stream, "gpt-4o")
        assert (row.input_tokens, row.output_tokens) == (raw.usage.input_tokens, raw.usage.output_tokens)
        assert row.input_tokens > 0 and row.output_tokens > 0 and row.cost_usd > 0
    calls = len(result.raw_responses)
    assert gateway.sample("tokenbooth_requests_total") == calls
    assert gateway.sample("tokenbooth_requests_total", operation="chat", outcome="success") == calls


@pytest.mark.parametrize("stream", [False, True])
def test_an_agent_turn_is_metered_call_by_call(gateway: GatewayHandle, sim: SimHandle, stream: bool) -> None:
    bodies: list[dict[str, Any]] = []
    original = sim.sim._generate

    async def spy(request: Any, api: str) -> Any:
        bodies.append(await request.json())
        return await original(request, api)

    sim.sim._generate = spy  # type: ignore[method-assign]
    calls: list[str] = []
    result, streamed_text = run_turn(gateway, weather_agent(calls), "What is the weather in Paris?", stream)
    assert result.final_output == ANSWER
    assert streamed_text == (ANSWER if stream else "")
    # the simulator answers in text, never with a function call, so the tool is offered and not called
    assert calls == [] and len(result.raw_responses) == 1
    assert [tool["name"] for tool in bodies[0]["tools"]] == ["get_weather"]
    assert_metered(gateway, result, stream)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_using_turn_is_metered_call_by_call(gateway: GatewayHandle, sim: SimHandle, stream: bool) -> None:
    sim.script([{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}, {}])
    calls: list[str] = []
    result, streamed_text = run_turn(gateway, weather_agent(calls), "What is the weather in Paris?", stream)
    assert calls == ["Paris"]
    assert result.final_output == ANSWER
    assert streamed_text == (ANSWER if stream else "")
    assert len(result.raw_responses) == 2
    assert_metered(gateway, result, stream)

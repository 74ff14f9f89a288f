"""The simulated upstream over real HTTP on loopback, driven by the official clients where they fit."""

from __future__ import annotations

import base64
import resource
import struct
import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.conftest import SimHandle, track
from tokenbooth.simulate import MAX_OUTPUT_WORDS

LONG_PROMPT = "every call is metered and priced " * 400  # > 1024 tokens: the simulator reports cache reads


def _openai(sim: SimHandle) -> openai.OpenAI:
    return track(openai.OpenAI(base_url=sim.url, api_key="sk-test", max_retries=0))


def _sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "data" in lines:
            events.append((lines.get("event", ""), orjson.loads(lines["data"])))
    return events


def test_base64_embeddings_are_little_endian_float32s_of_the_requested_dimensions(sim: SimHandle) -> None:
    client = _openai(sim)
    packed = client.embeddings.create(model="text-embedding-3-small", input=["a", "bc"], dimensions=256,
                                      encoding_format="base64")
    assert len(packed.data) == 2
    for item in packed.data:
        raw = base64.b64decode(item.embedding)  # type: ignore[arg-type]  # a str when base64 was asked for
        assert len(raw) == 256 * 4
        assert all(-1 <= v <= 1 for v in struct.unpack("<256f", raw))
    decoded = client.embeddings.create(model="text-embedding-3-small", input="a", dimensions=8)  # base64 too
    assert len(decoded.data[0].embedding) == 8 and all(isinstance(v, float) for v in decoded.data[0].embedding)
    floats = httpx.post(f"{sim.url}/embeddings", json={"model": "text-embedding-3-small", "input": "a"}).json()
    assert len(floats["data"][0]["embedding"]) == 64 and floats["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/embeddings", {"input": "a", "dimensions": 10**9}, "dimensions"),
    ("/embeddings", {"input": "a", "dimensions": 0}, "dimensions"),
    ("/embeddings", {"input": "a", "dimensions": "64"}, "dimensions"),
    ("/embeddings", {"input": "a", "dimensions": True}, "dimensions"),
    ("/embeddings", {"input": ["a"] * 2049}, "input"),
    ("/embeddings", {"input": "a", "encoding_format": "hex"}, "encoding_format"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 129}, "n"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ("/completions", {"prompt": "hi", "n": "2"}, "n"),
    ("/moderations", {"input": [""] * 2049}, "input"),
    ("/audio/speech", {"input": "a" * 4097, "voice": "alloy"}, "input"),
])
def test_out_of_range_sizes_are_refused_at_once_with_openai_errors(
        sim: SimHandle, path: str, body: dict[str, Any], param: str) -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the process's peak so far
    t0 = time.monotonic()
    r = httpx.post(f"{sim.url}{path}", json={"model": "gpt-4o-mini", **body})
    assert time.monotonic() - t0 < 1
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value")
    assert error["message"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50 * 1024
    assert sim.stats()["requests"][f"/v1{path}"] == 1  # seen, though refused


def test_the_largest_sizes_allowed_are_answered(sim: SimHandle) -> None:
    chat = httpx.post(f"{sim.url}/chat/completions", json={"model": "gpt-4o-mini", "n": 128, "max_tokens": 10**12,
                                                           "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    embeddings = _openai(sim).embeddings.create(model="text-embedding-3-small", input=["a"] * 2048, dimensions=4096)
    assert len(embeddings.data) == 2048 and len(embeddings.data[-1].embedding) == 4096


def test_generation_never_exceeds_the_word_cap_whatever_the_script_reports(sim: SimHandle) -> None:
    sim.script([{"usage": {"prompt_tokens": 5, "completion_tokens": 10**9, "total_tokens": 10**9 + 5}}])
    t0 = time.monotonic()
    chat = _openai(sim).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 2
    assert len((chat.choices[0].message.content or "").split()) == MAX_OUTPUT_WORDS
    assert chat.usage is not None and chat.usage.completion_tokens == 10**9  # reported as scripted


def test_anthropic_message_start_carries_the_input_tokens_of_the_final_usage(sim: SimHandle) -> None:
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": LONG_PROMPT}]}
    with httpx.stream("POST", f"{sim.url}/messages", json={**body, "stream": True}) as resp:
        events = _sse(resp.read())
    kinds = [kind for kind, _ in events]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]["usage"]
    assert start["output_tokens"] == 1 and start["input_tokens"] > 0 and start["cache_read_input_tokens"] > 0
    assert set(start) == {"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"}
    delta = events[-2][1]["usage"]
    text = "".join(data["delta"]["text"] for kind, data in events if kind == "content_block_delta")
    assert delta == {"output_tokens": sim.sim.estimator.count("claude-haiku-4-5", text)}

    plain = httpx.post(f"{sim.url}/messages", json=body).json()["usage"]  # the same prompt, not streamed
    assert {k: v for k, v in plain.items() if k != "output_tokens"} == \
        {k: v for k, v in start.items() if k != "output_tokens"}
    client = track(anthropic.Anthropic(base_url=sim.base, api_key="sk-ant", max_retries=0))
    with client.messages.stream(**body) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == \
        (start["input_tokens"], start["cache_read_input_tokens"])


def test_a_background_response_is_queued_then_completed_with_its_usage(
        make_sim: Callable[..., SimHandle]) -> None:
    sim = make_sim(ttft_ms=300, token_ms=2)
    client = _openai(sim)
    created = client.responses.create(model="gpt-4o-mini", input="tell me a story", background=True)
    assert (created.status, created.usage, created.background, created.output) == ("queued", None, True, [])
    assert client.responses.retrieve(created.id).status == "queued"
    statuses = []
    deadline = time.monotonic() + 5
    while (polled := client.responses.retrieve(created.id)).status != "completed" and time.monotonic() < deadline:
        statuses.append(polled.status)
        time.sleep(0.02)
    assert polled.status == "completed" and "in_progress" in statuses
    assert polled.usage is not None and polled.usage.input_tokens > 0 and polled.usage.output_tokens > 0
    assert polled.usage.total_tokens == polled.usage.input_tokens + polled.usage.output_tokens
    assert polled.output_text
    stats = sim.stats()
    assert stats["requests"]["/v1/responses"] == 1
    assert stats["requests"]["GET /v1/responses/{response_id}"] == len(statuses) + 2
    assert stats["kept"]["responses"] == 1


def test_a_stored_stream_replays_after_starting_after_and_ends_completed(sim: SimHandle) -> None:
    client = _openai(sim)
    original = list(client.responses.create(model="gpt-4o-mini", input="hi", store=True, stream=True))
    assert [e.sequence_number for e in original] == list(range(len(original)))
    rid = original[0].response.id  # type: ignore[union-attr]  # the first event is response.created
    replay = list(client.responses.retrieve(rid, stream=True, starting_after=3))
    assert [e.model_dump() for e in replay] == [e.model_dump() for e in original[4:]]
    assert replay[-1].type == "response.completed"
    whole = list(client.responses.retrieve(rid, stream=True))
    assert [e.model_dump() for e in whole] == [e.model_dump() for e in original]
    r = httpx.get(f"{sim.url}/responses/{rid}", params={"stream": "true", "starting_after": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after"


def test_kept_responses_are_cancelled_deleted_and_list_their_input_items(
        make_sim: Callable[..., SimHandle]) -> None:
    sim = make_sim(ttft_ms=2000)
    client = _openai(sim)
    stored = client.responses.create(model="gpt-4o-mini", store=True, max_output_tokens=5, input=[
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "second"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "third"}]}])
    with pytest.raises(openai.BadRequestError, match="Only responses created with background=true can be cancelled"):
        client.responses.cancel(stored.id)

    items = client.responses.input_items.list(stored.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["first", "second", "third"]  # type: ignore[union-attr]
    assert [i.content[0].type for i in items.data] == ["input_text", "output_text", "input_text"]  # type: ignore[union-attr]
    assert items.first_id == items.data[0].id and items.last_id == items.data[-1].id and not items.has_more
    page = client.responses.input_items.list(stored.id, limit=1)  # newest first by default
    assert page.has_more and page.data[0].content[0].text == "third"  # type: ignore[union-attr]
    assert len(list(page)) == 3  # the client follows the cursor

    running = client.responses.create(model="gpt-4o-mini", input="slow", background=True)
    cancelled = client.responses.cancel(running.id)
    assert (cancelled.status, cancelled.usage) == ("cancelled", None)
    assert client.responses.cancel(running.id).status == "cancelled"  # again: the same answer
    assert client.responses.retrieve(running.id).status == "cancelled"

    deleted = httpx.delete(f"{sim.url}/responses/{stored.id}").json()
    assert deleted == {"id": stored.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve(stored.id)
    assert missing.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert sim.stats()["requests"]["DELETE /v1/responses/{response_id}"] == 1


def test_kept_responses_are_bounded_oldest_dropped(sim: SimHandle) -> None:
    sim.sim.stored_responses.max_items = 3
    client = _openai(sim)
    ids = [client.responses.create(model="gpt-4o-mini", input=f"call {i}", store=True).id for i in range(5)]
    assert sim.stats()["kept"]["responses"] == 3
    for rid in ids[:2]:
        assert httpx.get(f"{sim.url}/responses/{rid}").status_code == 404
    assert [client.responses.retrieve(rid).id for rid in ids[2:]] == ids[2:]
    assert httpx.post(f"{sim.url}/responses", json={"model": "gpt-4o-mini", "input": "hi"}).json()["store"] is False
    assert sim.stats()["kept"]["responses"] == 3  # not stored without store or background


def test_input_tokens_and_compact_answer_with_usage(sim: SimHandle) -> None:
    client = _openai(sim)
    items = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, how can I help"},
             {"role": "user", "content": "summarise our chat"}]
    counted = client.responses.input_tokens.count(model="gpt-4o", input=items)  # type: ignore[arg-type]
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == sim.sim.estimator.prompt("gpt-4o", {"input": items}) > 0

    compacted = client.responses.compact(model="gpt-4o", input=items)  # type: ignore[arg-type]
    assert compacted.object == "response.compaction" and compacted.created_at > 0
    assert [o.type for o in compacted.output] == ["message", "message", "compaction"]
    assert compacted.output[-1].encrypted_content  # type: ignore[union-attr]
    assert compacted.usage.input_tokens == counted.input_tokens and compacted.usage.output_tokens > 0
    assert compacted.usage.total_tokens == compacted.usage.input_tokens + compacted.usage.output_tokens
    assert {"/v1/responses/input_tokens", "/v1/responses/compact"} <= set(sim.stats()["requests"])


def test_moderations_answer_one_unflagged_result_per_input(sim: SimHandle) -> None:
    client = _openai(sim)
    moderation = client.moderations.create(input=["hello", "world"])
    assert moderation.id.startswith("modr-") and moderation.model == "omni-moderation-latest"
    assert len(moderation.results) == 2
    result = moderation.results[0]
    assert not result.flagged and not result.categories.violence and not result.categories.self_harm_intent
    assert 0 < result.category_scores.harassment < 0.01
    assert result.category_applied_input_types.violence == ["text"]
    assert client.moderations.create(input="hi", model="text-moderation-latest").model == "text-moderation-latest"
    assert sim.stats()["requests"]["/v1/moderations"] == 2


def test_files_upload_list_content_and_batches_roundtrip(sim: SimHandle) -> None:
    client = _openai(sim)
    lines = b"".join(orjson.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "gpt-4o-mini"}}) + b"\n" for i in range(100))
    uploaded = client.files.create(file=("requests.jsonl", lines, "application/jsonl"), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(lines), "requests.jsonl", "batch")
    assert client.files.content(uploaded.id).read() == lines
    assert client.files.retrieve(uploaded.id) == uploaded

    big = bytes(range(256)) * (5 * 2**12)  # 5 MiB: more than is kept, fetched back at full size
    large = client.files.create(file=("big.bin", big), purpose="user_data")
    content = client.files.content(large.id).read()
    assert len(content) == len(big) == large.bytes and content[:2**20] == big[:2**20]
    assert [f.id for f in client.files.list()] == [large.id, uploaded.id]  # newest first
    assert [f.id for f in client.files.list(purpose="batch")] == [uploaded.id]

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.id.startswith("batch_") and batch.object == "batch" and batch.status == "validating"
    assert (batch.endpoint, batch.input_file_id, batch.completion_window) == \
        ("/v1/chat/completions", uploaded.id, "24h")
    assert client.batches.retrieve(batch.id) == batch
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=large.id, endpoint="/v1/chat/completions", completion_window="24h")

    requests = sim.stats()["requests"]
    assert requests["/v1/files"] == 2 and requests["GET /v1/files/{file_id}/content"] == 2
    assert requests["/v1/batches"] == 2 and requests["GET /v1/batches/{batch_id}"] == 1


def test_an_upload_over_the_limit_is_refused_with_a_413(make_sim: Callable[..., SimHandle]) -> None:
    sim = make_sim(max_upload_bytes=10_000)
    r = httpx.post(f"{sim.url}/files", data={"purpose": "batch"}, files={"file": ("x.jsonl", b"x" * 50_000)})
    assert r.status_code == 413 and r.json()["error"]["param"] == "file"
    r = httpx.post(f"{sim.url}/files", data={"purpose": "nonsense"}, files={"file": ("x.jsonl", b"x")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    assert sim.stats()["kept"]["files"] == 0


def test_speech_streams_mpeg_bytes_in_chunks(sim: SimHandle) -> None:
    client = _openai(sim)
    text = "Tokens flow through the gateway. " * 10
    with client.audio.speech.with_streaming_response.create(model="gpt-4o-mini-tts", voice="alloy",
                                                            input=text) as speech:
        assert speech.headers["content-type"] == "audio/mpeg"
        assert speech.headers["transfer-encoding"] == "chunked"
        audio = b"".join(speech.iter_bytes())
    assert len(audio) == len(text) * 1000 and audio.startswith(b"\xff\xfb")
    assert sim.stats()["requests"]["/v1/audio/speech"] == 1


def test_new_endpoints_take_scripted_faults_and_reads_do_not_use_the_script(sim: SimHandle) -> None:
    client = _openai(sim)
    stored = client.responses.create(model="gpt-4o-mini", input="hi", store=True)
    sim.script([{"status": 429, "retry_after": 3}, {"status": 503}, {}])
    assert client.responses.retrieve(stored.id).status == "completed"  # a read: the script waits
    with pytest.raises(openai.RateLimitError) as limited:
        client.moderations.create(input="hi")
    assert limited.value.response.headers["retry-after"] == "3"
    with pytest.raises(openai.InternalServerError):
        client.files.create(file=("a.txt", b"a"), purpose="user_data")
    assert client.audio.speech.create(model="tts-1", voice="alloy", input="hi").read()


def test_a_timeout_fault_counts_a_client_that_hangs_up(sim: SimHandle) -> None:
    sim.script([{"fault": "timeout", "seconds": 10}])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{sim.url}/chat/completions", timeout=0.3,
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    deadline = time.monotonic() + 2
    while sim.stats()["client_disconnects"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.stats()["client_disconnects"] == 1


def test_a_batch_completes_with_an_output_file_and_its_summed_usage(make_sim: Callable[..., SimHandle]) -> None:
    sim = make_sim(batch_s=0.2)
    client = _openai(sim)
    lines = b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "o4-mini", "max_tokens": 20,
                                            "messages": [{"role": "user", "content": "hello " * (400 * i)}]}})
                     + b"\n" for i in range(1, 6))
    uploaded = client.files.create(file=("requests.jsonl", lines), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(0.25)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.model == "o4-mini" and done.output_file_id
    assert done.request_counts is not None and done.request_counts.completed == 5
    results = [orjson.loads(line) for line in client.files.content(done.output_file_id).read().splitlines()]
    assert [r["custom_id"] for r in results] == ["r1", "r2", "r3", "r4", "r5"]
    usages = [r["response"]["body"]["usage"] for r in results]
    assert done.usage is not None
    assert done.usage.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert done.usage.output_tokens == sum(u["completion_tokens"] for u in usages)
    assert done.usage.input_tokens_details.cached_tokens == sum(u["prompt_tokens_details"]["cached_tokens"]
                                                                for u in usages) > 0
    assert done.usage.output_tokens_details.reasoning_tokens > 0


def test_an_absurd_fault_answers_normally_with_usage_no_call_can_have(make_sim: Callable[..., SimHandle]) -> None:
    sim = make_sim(faults={"absurd": 1.0})
    chat = _openai(sim).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content and chat.usage is not None
    assert chat.usage.prompt_tokens == 10**18


@pytest.mark.parametrize("model", ["gpt-4o-mini", "o3-mini"])
def test_reported_output_never_exceeds_max_tokens(make_sim: Callable[..., SimHandle], model: str) -> None:
    sim = make_sim(output_tokens=(200, 400))  # far above every limit asked for below
    for limit in (1, 2, 7, 40):
        chat = httpx.post(f"{sim.url}/chat/completions", json={
            "model": model, "max_tokens": limit, "messages": [{"role": "user", "content": "hi"}]}).json()
        assert 1 <= chat["usage"]["completion_tokens"] <= limit, (limit, chat["usage"])
        message = httpx.post(f"{sim.url}/messages", json={
            "model": "claude-haiku-4-5", "max_tokens": limit, "messages": [{"role": "user", "content": "hi"}]}).json()
        assert 1 <= message["usage"]["output_tokens"] <= limit
    reasoned = httpx.post(f"{sim.url}/chat/completions", json={
        "model": "o3-mini", "max_completion_tokens": 30, "messages": [{"role": "user", "content": "hi"}]}).json()
    assert reasoned["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    assert reasoned["usage"]["completion_tokens"] <= 30

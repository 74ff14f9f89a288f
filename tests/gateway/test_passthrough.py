"""Every other /v1/ path: forwarded unchanged, streamed both ways, counted under its family."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from tests.conftest import GatewayHandle, LoopThread, track
from tokenbooth.control.keys import KeyStore
from tokenbooth.gateway.passthrough import family
from tokenbooth.ledger.schema import connect
from tokenbooth.record import Operation


class Echo:
    """A real HTTP upstream on loopback that answers what it was sent: method, path, query,
    headers, and the body's size and digest (read in chunks, as it streams in)."""

    def __init__(self, loop_thread: LoopThread) -> None:
        self.loop_thread = loop_thread
        self.seen: list[dict[str, Any]] = []
        self.download = os.urandom(3 * 1024 * 1024)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/v1/download", self.send_download)
        app.router.add_route("*", "/v1/{tail:.*}", self.echo)
        self.runner, port = loop_thread.serve(app)
        self.url = f"http://127.0.0.1:{port}/v1"

    async def echo(self, request: web.Request) -> web.Response:
        digest, size, chunks = hashlib.sha256(), 0, 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
            chunks += 1
        seen = {"method": request.method, "path": request.path, "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()}, "size": size,
                "sha256": digest.hexdigest(), "chunks": chunks}
        self.seen.append(seen)
        if request.path == "/v1/images/generations":  # an answer with token usage: priced
            return web.json_response({"created": 1, "data": [{"b64_json": "AAAA"}],
                                      "usage": {"input_tokens": 50, "output_tokens": 1000, "total_tokens": 1050,
                                                "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}})
        if request.path == "/v1/missing":
            return web.json_response({"error": {"message": "no such thing", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=404)
        return web.json_response({"echo": seen}, headers={"x-request-id": "req_upstream_1", "x-custom": "kept"})

    async def send_download(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        await resp.prepare(request)
        for i in range(0, len(self.download), 256 * 1024):
            await resp.write(self.download[i:i + 256 * 1024])
        await resp.write_eof()
        return resp

    def close(self) -> None:
        self.loop_thread.run(self.runner.cleanup())


@pytest.fixture
def echo(loop_thread: LoopThread) -> Iterator[Echo]:
    e = Echo(loop_thread)
    yield e
    e.close()


@pytest.fixture
def gw(make_gateway: Callable[..., GatewayHandle], echo: Echo, monkeypatch: pytest.MonkeyPatch) -> GatewayHandle:
    monkeypatch.setenv("ECHO_KEY", "sk-echo-upstream")
    return make_gateway([{"name": "echo", "base_url": echo.url, "api_key_env": "ECHO_KEY"}])


def test_paths_are_counted_under_their_family() -> None:
    assert family("/v1/files") is Operation.FILES and family("/v1/uploads/u1/parts") is Operation.FILES
    assert family("/v1/audio/transcriptions") is Operation.AUDIO and family("/v1/batches/b1") is Operation.BATCHES
    assert family("/v1/responses/resp_1/input_items") is Operation.RESPONSES
    assert family("/v1/whatever_openai_adds_next") is Operation.OTHER


def test_any_method_path_and_query_reach_the_upstream_with_its_own_key(gw: GatewayHandle, echo: Echo) -> None:
    r = httpx.get(f"{gw.url}/vector_stores/vs_1/files?limit=2&order=desc",
                  headers={"authorization": "Bearer sk-client", "openai-beta": "assistants=v2"})
    assert r.status_code == 200
    seen = r.json()["echo"]
    assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/v1/vector_stores/vs_1/files",
                                                             "limit=2&order=desc")
    assert seen["headers"]["authorization"] == "Bearer sk-echo-upstream"  # the upstream's key, not the client's
    assert seen["headers"]["openai-beta"] == "assistants=v2"
    assert r.headers["x-upstream-request-id"] == "req_upstream_1" and r.headers["x-custom"] == "kept"
    assert r.headers["x-request-id"] != "req_upstream_1"
    assert httpx.delete(f"{gw.url}/files/file-1").json()["echo"]["method"] == "DELETE"
    rows = gw.rows()
    assert [(row.operation, row.outcome, row.model) for row in rows] == [("vector_stores", "success", ""),
                                                                         ("files", "success", "")]
    assert all(row.cost_usd is None for row in rows)  # no price applies: unknown, never $0
    assert gw.sample("tokenbooth_requests_total", operation="vector_stores", outcome="success") == 1


def test_an_upload_streams_through_whole_and_a_download_comes_back_whole(gw: GatewayHandle, echo: Echo) -> None:
    blob = os.urandom(40 * 1024 * 1024)
    files = {"file": ("data.jsonl", blob, "application/jsonl")}
    request = httpx.Request("POST", f"{gw.url}/files", data={"purpose": "batch"}, files=files)
    sent = request.read()
    with httpx.Client(timeout=60) as client:
        r = client.send(request)
    assert r.status_code == 200
    seen = r.json()["echo"]
    assert seen["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert seen["size"] > len(blob) and seen["chunks"] > 1  # sent on as it arrived, not in one piece
    assert seen["sha256"] == hashlib.sha256(sent).hexdigest() and seen["size"] == len(sent)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the client sends it chunked
        for i in range(0, len(blob), 1 << 20):
            yield blob[i:i + (1 << 20)]

    r = httpx.post(f"{gw.url}/uploads/up_1/parts", content=chunks(), timeout=60,
                   headers={"content-type": "application/octet-stream"})
    assert r.json()["echo"]["sha256"] == hashlib.sha256(blob).hexdigest()
    with httpx.stream("GET", f"{gw.url}/download", timeout=60) as down:
        got = b"".join(down.iter_bytes())
    assert got == echo.download
    assert [row.operation for row in gw.rows()] == ["files", "files", "other"]


def test_a_call_with_a_model_routes_by_it_and_is_priced_from_its_usage(
        make_gateway: Callable[..., GatewayHandle], echo: Echo, sim: Any) -> None:
    gw = make_gateway([{"name": "images", "base_url": echo.url, "models": ["gpt-image-1"]},
                       {"name": "rest", "base_url": sim.url}])
    r = httpx.post(f"{gw.url}/images/generations", json={"model": "gpt-image-1", "prompt": "a cat"})
    assert r.status_code == 200 and echo.seen[-1]["path"] == "/v1/images/generations"
    (row,) = gw.rows()
    assert (row.operation, row.model, row.upstream, row.input_tokens, row.output_tokens) == \
        ("images", "gpt-image-1", "images", 50, 1000)
    assert row.cost_usd is not None and row.cost_usd > 0


def test_an_upstream_error_passes_through_and_is_recorded(gw: GatewayHandle) -> None:
    r = httpx.get(f"{gw.url}/missing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such thing"
    (row,) = gw.rows()
    assert (row.operation, row.outcome, row.error_type, row.http_status) == ("other", "error", "bad_request", 404)


def test_paths_outside_v1_and_the_gateways_own_stay_its_own(gw: GatewayHandle, echo: Echo) -> None:
    assert httpx.get(f"{gw.base}/v2/files").status_code == 404
    assert httpx.get(f"{gw.base}/files").status_code == 404
    assert httpx.post(f"{gw.url}/models").status_code == 404
    assert echo.seen == [] and gw.rows() == []


def test_passthrough_can_be_turned_off(make_gateway: Callable[..., GatewayHandle], echo: Echo) -> None:
    gw = make_gateway([{"name": "echo", "base_url": echo.url}], passthrough={"enabled": False})
    assert httpx.get(f"{gw.url}/files").status_code == 404
    assert httpx.get(f"{gw.url}/chat/completions").status_code == 405
    assert echo.seen == []


def test_in_keys_mode_a_passed_through_call_needs_a_key_and_is_the_tenants(
        make_gateway: Callable[..., GatewayHandle], echo: Echo, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO_KEY", "sk-echo-upstream")
    db = f"sqlite:///{tmp_path / 'keys.db'}"
    secret = KeyStore(connect(db)).create("acme")[1]
    gw = make_gateway([{"name": "echo", "base_url": echo.url, "api_key_env": "ECHO_KEY"}],
                      ledger={"url": db, "flush_interval": 0.05}, auth={"mode": "keys"},
                      tenants={"acme": {"limits": {"rpm": 1}}})
    refused = httpx.get(f"{gw.url}/files")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{gw.url}/files", headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 200
    assert r.json()["echo"]["headers"]["authorization"] == "Bearer sk-echo-upstream"  # never the tb- key
    assert secret not in str(r.json())
    limited = httpx.get(f"{gw.url}/files", headers={"authorization": f"Bearer {secret}"})
    assert limited.status_code == 429 and "retry-after" in limited.headers
    assert len(echo.seen) == 1
    (row,) = gw.rows()
    assert (row.tenant, row.operation) == ("acme", "files") and row.key_id


def test_the_official_client_moderates_uploads_and_reads_stored_responses_through_the_gateway(
        gateway: GatewayHandle, sim: Any, tmp_path: Path) -> None:
    client = track(openai.OpenAI(base_url=gateway.url, api_key="k", max_retries=0))
    moderation = client.moderations.create(input=["hello", "there"])
    assert len(moderation.results) == 2 and not moderation.results[0].flagged
    upload = tmp_path / "batch.jsonl"
    upload.write_bytes(b'{"custom_id": "1"}\n' * 50_000)
    with upload.open("rb") as f:
        created = client.files.create(file=f, purpose="batch")
    assert created.bytes == upload.stat().st_size
    assert client.files.content(created.id).read()[:20] == upload.read_bytes()[:20]
    stored = client.responses.create(model="gpt-4o-mini", input="hi", store=True)
    again = client.responses.retrieve(stored.id)
    assert again.id == stored.id and again.usage is not None
    rows = gateway.rows()
    assert [r.operation for r in rows] == ["moderations", "files", "files", "chat", "responses"]
    moderated, uploaded, _, answered, retrieved = rows
    assert moderated.cost_usd == 0  # moderations are free
    assert uploaded.cost_usd is None  # no price applies to a file: unknown, never $0
    assert answered.cost_usd is not None and answered.cost_usd > 0
    # a read of a stored response is recorded, and never charged again
    assert (retrieved.cost_usd, retrieved.input_tokens, retrieved.output_tokens) == (0, 0, 0)
    assert sim.stats()["requests"]["/v1/moderations"] == 1


def test_codex_compaction_is_priced_and_token_counts_are_free(gateway: GatewayHandle, sim: Any) -> None:
    body = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "a long conversation " * 50}]}
    compacted = httpx.post(f"{gateway.url}/responses/compact", json=body)
    assert compacted.status_code == 200 and compacted.json()["object"] == "response.compaction"
    counted = httpx.post(f"{gateway.url}/responses/input_tokens", json=body)
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    compact_row, count_row = gateway.rows()
    usage = compacted.json()["usage"]
    assert (compact_row.operation, compact_row.input_tokens, compact_row.output_tokens) == \
        ("responses", usage["input_tokens"], usage["output_tokens"])
    assert compact_row.cost_usd is not None and compact_row.cost_usd > 0
    assert (count_row.operation, count_row.cost_usd, count_row.input_tokens) == ("responses", 0, 0)


def test_a_background_response_is_charged_once_when_a_poll_sees_it_done(gateway: GatewayHandle, sim: Any) -> None:
    client = track(openai.OpenAI(base_url=gateway.url, api_key="k", max_retries=0))
    queued = client.responses.create(model="gpt-4o-mini", input="write a haiku", background=True)
    assert queued.status in ("queued", "in_progress")
    deadline = time.monotonic() + 5
    polled = client.responses.retrieve(queued.id)
    while polled.status != "completed" and time.monotonic() < deadline:
        time.sleep(0.02)
        polled = client.responses.retrieve(queued.id)
    assert polled.status == "completed" and polled.usage is not None
    client.responses.retrieve(queued.id)  # one more look after it was done
    created, *polls = gateway.rows()
    assert (created.operation, created.cost_usd, created.input_tokens, created.tokens_estimated) == \
        ("chat", 0, 0, False)  # queued: nothing to charge yet, nothing estimated
    charged = [p for p in polls if p.cost_usd]
    assert len(charged) == 1 and len(polls) >= 2  # once, by the first poll that saw it completed
    assert (charged[0].input_tokens, charged[0].output_tokens) == (polled.usage.input_tokens,
                                                                    polled.usage.output_tokens)
    assert charged[0].model == "gpt-4o-mini" and charged[0].operation == "responses"
    assert gateway.sample("tokenbooth_cost_usd_total") == pytest.approx(float(charged[0].cost_usd), rel=1e-9)
    assert {r.response_id for r in [created, *polls]} == {queued.id}  # the create and its polls, linked


def _done(client: openai.OpenAI, response_id: str) -> Any:
    deadline = time.monotonic() + 5
    while (polled := client.responses.retrieve(response_id)).status != "completed" and time.monotonic() < deadline:
        time.sleep(0.02)
    return polled


def test_a_resumed_stream_of_a_background_response_charges_it_once(gateway: GatewayHandle) -> None:
    client = track(openai.OpenAI(base_url=gateway.url, api_key="k", max_retries=0))
    queued = client.responses.create(model="gpt-4o-mini", input="write a haiku", background=True)
    first = list(client.responses.retrieve(queued.id, stream=True))  # waits for it to finish, then replays
    again = list(client.responses.retrieve(queued.id, stream=True, starting_after=0))
    assert first[-1].type == again[-1].type == "response.completed" and len(again) == len(first) - 1
    usage = first[-1].response.usage
    assert usage is not None
    created, resumed, resumed_again = gateway.rows()
    assert (resumed.operation, resumed.input_tokens, resumed.output_tokens, resumed.served_model) == \
        ("responses", usage.input_tokens, usage.output_tokens, "gpt-4o-mini")
    assert resumed.cost_usd is not None and resumed.cost_usd > 0 and not resumed.tokens_estimated
    assert (resumed_again.cost_usd, resumed_again.output_tokens) == (0, 0)  # read again: never charged twice
    assert {r.response_id for r in (created, resumed, resumed_again)} == {queued.id}


def test_a_batch_is_charged_once_at_its_discount_when_a_poll_sees_it_done(
        make_gateway: Callable[..., GatewayHandle], make_sim: Callable[..., Any]) -> None:
    sim = make_sim(batch_s=0.3)
    gw = make_gateway([{"name": "default", "base_url": sim.url, "provider": "openai", "models": ["*"]}])
    client = track(openai.OpenAI(base_url=gw.url, api_key="k", max_retries=0))
    lines = b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "gpt-4o-mini", "max_tokens": 30,
                                            "messages": [{"role": "user", "content": "summarise " * 300 * i}]}})
                     + b"\n" for i in range(1, 4))
    upload = client.files.create(file=("requests.jsonl", lines), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 5
    while (polled := client.batches.retrieve(batch.id)).status != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    client.batches.retrieve(batch.id)  # one more look after it was done
    assert polled.status == "completed" and polled.usage is not None
    rows = [r for r in gw.rows() if r.operation == "batches"]
    charged = [r for r in rows if r.cost_usd]
    assert len(rows) >= 3 and len(charged) == 1  # the create and every other read cost nothing
    assert all(r.cost_usd == 0 for r in rows if r is not charged[0])
    (row,) = charged
    u = polled.usage
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.model) == \
        (u.input_tokens, u.input_tokens_details.cached_tokens, u.output_tokens, "gpt-4o-mini")
    cached = u.input_tokens_details.cached_tokens
    list_price = calc_price(GenaiUsage(input_tokens=u.input_tokens, cache_read_tokens=cached,
                                       output_tokens=u.output_tokens), "gpt-4o-mini", provider_id="openai").total_price
    assert abs(row.cost_usd - list_price / 2) < Decimal("1e-9") and row.price_source == "genai-prices+batch"
    assert {r.response_id for r in rows} == {batch.id}
    assert gw.sample("tokenbooth_cost_usd_total") == pytest.approx(float(list_price / 2), rel=1e-9)

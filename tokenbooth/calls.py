"""From what was seen of a call to its CallRecord: usage, estimates, price, metering.

The gateway and the SDK both fill a :class:`CallState` while a call runs and hand it to a
:class:`Recorder` when it ends, so the rules (reported usage wins, estimates fill in and
are marked, the serving model's price applies) are written once.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from tokenbooth.config import TokensConfig
from tokenbooth.errors import ErrorType
from tokenbooth.meter import Meter
from tokenbooth.pricing import PriceBook, batch_cost
from tokenbooth.record import NO_USAGE, CallRecord, Operation, Outcome, TokenUsage
from tokenbooth.streams import AnthropicStream, OpenAIStream, ResponsesStream, StreamFollower
from tokenbooth.tokens import TokenEstimator, differs, usage_from_anthropic, usage_from_openai, usage_from_responses

__all__ = ["ENDPOINTS", "CallState", "Endpoint", "Format", "Recorder", "follower_for", "response_text",
           "unfinished_background"]

log = logging.getLogger("tokenbooth.calls")


Format = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One proxied API route: what it is, where it goes upstream, which field it needs, which API."""

    operation: Operation
    upstream_path: str
    required: str
    fmt: Format = "openai"
    responses: bool = False  # the OpenAI Responses API: its own response shape and stream events


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(Operation.CHAT, "/chat/completions", "messages"),
    "/v1/completions": Endpoint(Operation.TEXT_COMPLETION, "/completions", "prompt"),
    "/v1/embeddings": Endpoint(Operation.EMBEDDINGS, "/embeddings", "input"),
    # no field is required: a call may continue with previous_response_id, a prompt or a conversation
    "/v1/responses": Endpoint(Operation.CHAT, "/responses", "", responses=True),
    "/v1/messages": Endpoint(Operation.CHAT, "/messages", "messages", "anthropic"),
    "/v1/messages/count_tokens": Endpoint(Operation.COUNT_TOKENS, "/messages/count_tokens", "messages", "anthropic"),
}

def follower_for(ep: Endpoint, strip_usage: bool = False) -> StreamFollower:
    """The stream follower for an endpoint's events."""
    if ep.fmt == "anthropic":
        return AnthropicStream()
    return ResponsesStream() if ep.responses else OpenAIStream(strip_usage)


def unfinished_background(parsed: dict[str, Any]) -> bool:
    """Whether a Responses API object is a background response still queued or in progress."""
    return parsed.get("background") is True and parsed.get("status") in ("queued", "in_progress")


def response_text(parsed: dict[str, Any], fmt: Format, responses: bool = False) -> str:
    """The generated text of a non-streamed response, for a local token estimate."""
    if responses:
        return "".join(part.get("text") or "" for item in parsed.get("output") or () if isinstance(item, dict)
                       for part in (item.get("content") or ()) if isinstance(part, dict))
    if fmt == "anthropic":
        return "".join(b.get("text", "") for b in parsed.get("content") or () if isinstance(b, dict))
    parts = []
    for choice in parsed.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)


class CallState:
    """What is known about one call so far; becomes a CallRecord at the end."""

    __slots__ = ("attempts", "error_type", "last_token", "outcome", "output_text", "path", "provider", "rate",
                 "reported", "response_headers", "response_id", "served_model", "status", "target_model", "ttft",
                 "unpriced", "upstream")

    def __init__(self, provider: str = "", upstream: str = "", target_model: str = "") -> None:
        self.attempts = 0  # requests sent upstream: none when every circuit was open
        self.response_headers: list[tuple[bytes, bytes]] = []  # the gateway's own, e.g. x-ratelimit-*
        self.path: list[str] = []  # targets left behind, "upstream:model!reason"
        self.unpriced = False  # a call no price applies to (a file upload): its cost is unknown, never $0
        self.rate: Decimal | None = None  # a batch's: the share of the list price it is billed at (0.5)
        self.response_id: str | None = None  # the stored response or batch it created or read
        self.serve(provider, upstream, target_model)

    def serve(self, provider: str, upstream: str, target_model: str) -> None:
        """Start an attempt at an upstream: forget what an earlier attempt left."""
        self.provider = provider
        self.upstream = upstream
        self.target_model = target_model  # the model asked of the upstream; priced at its rate
        self.outcome = Outcome.ERROR
        self.error_type = ErrorType.NONE
        self.status: int | None = None
        self.reported: TokenUsage | None = None  # usage as the upstream reported it
        self.output_text: str | None = None  # what was generated, when known, for estimates
        self.served_model: str | None = None
        self.ttft: float | None = None
        self.last_token: float | None = None

    def read_response(self, parsed: dict[str, Any], ep: Endpoint) -> None:
        """Take what a successful non-streamed response says: usage, text, served model."""
        if ep.operation is Operation.COUNT_TOKENS or (ep.responses and unfinished_background(parsed)):
            # counting tokens uses none; a background response is charged when it is done (a poll
            # sees it so), not when it is queued: nothing to bill or estimate now
            self.reported, self.output_text, self.served_model = NO_USAGE, None, None
            self.outcome = Outcome.SUCCESS
            self._take_id(parsed, ep)
            return
        if ep.fmt == "anthropic":
            self.reported = usage_from_anthropic(parsed.get("usage"))
        elif ep.responses:
            self.reported = usage_from_responses(parsed.get("usage"))
        else:
            self.reported = usage_from_openai(parsed.get("usage"))
        self.output_text = response_text(parsed, ep.fmt, ep.responses) if ep.operation is not Operation.EMBEDDINGS \
            else ""
        served = parsed.get("model")
        self.served_model = served if isinstance(served, str) else None
        self.outcome = Outcome.SUCCESS
        self._take_id(parsed, ep)

    def _take_id(self, parsed: dict[str, Any], ep: Endpoint) -> None:
        rid = parsed.get("id")
        if ep.responses and isinstance(rid, str):
            self.response_id = rid

    def take_stream(self, follower: StreamFollower) -> None:
        """Take what a followed stream showed, however it ended."""
        if isinstance(follower, ResponsesStream) and follower.response_id is not None:
            self.response_id = follower.response_id
        self.reported = follower.usage
        self.served_model = follower.served_model
        # an upstream error event with nothing generated bills nothing; anything else may have
        self.output_text = "".join(follower.text) if follower.text or follower.error is None else None


class Recorder:
    """Turns finished CallStates into CallRecords and hands them to the meter."""

    def __init__(self, meter: Meter, prices: PriceBook, tokens: TokensConfig | None = None,
                 estimator: TokenEstimator | None = None) -> None:
        self.meter = meter
        self.prices = prices
        self.tokens = tokens or TokensConfig()
        self.estimator = estimator or TokenEstimator()
        self._rng = random.Random()
        self._rejected: set[str] = set()  # providers whose absurd usage was logged

    def usage(self, call: CallState, model: str, payload: dict[str, Any]) -> tuple[TokenUsage, bool]:
        """The usage to record, and whether it disagrees with a local estimate.

        Reported usage of a finished call wins. Without it, or for a call cut short, the
        tokens are estimated (the parts the upstream did report are kept) and marked so.
        """
        reported = call.reported
        if reported is not None and call.outcome is Outcome.SUCCESS:
            sample = self.tokens.reconcile_sample
            if call.output_text is None or sample <= 0 or (sample < 1 and self._rng.random() >= sample):
                return reported, False
            est_in = self.estimator.prompt(model, payload)
            est_out = self.estimator.count(model, call.output_text)
            threshold = self.tokens.mismatch_threshold
            mismatch = differs(reported.input, est_in, threshold) or \
                differs(reported.output - reported.reasoning, est_out, threshold)
            return reported, mismatch
        if call.output_text is None and reported is None:
            return NO_USAGE, False  # nothing was generated: an error before any output
        est_out = self.estimator.count(model, call.output_text or "")
        if reported is not None:
            return TokenUsage(input=reported.input, output=max(reported.output, est_out),
                              cached_input=reported.cached_input, cache_write=reported.cache_write,
                              reasoning=reported.reasoning, estimated=True), False
        return TokenUsage(input=self.estimator.prompt(model, payload), output=est_out, estimated=True), False

    def _reject_usage(self, call: CallState, request_id: str) -> None:
        """An upstream reported usage no call can have (10**18 prompt tokens): it would poison
        the metrics and overflow the ledger's columns. The call is estimated instead, flagged,
        counted, and logged once per provider."""
        self.meter.metrics.usage_rejected.labels(call.provider).inc()
        if call.provider not in self._rejected:
            self._rejected.add(call.provider)
            log.warning("upstream %s reported usage out of range for request %s (%s); such calls are recorded "
                        "with a local estimate, counted in tokenbooth_usage_rejected_total",
                        call.upstream, request_id, call.reported)
        call.reported = None
        if call.output_text is None:
            call.output_text = ""

    def finish(self, call: CallState, *, request_id: str, operation: Operation, model: str,
               payload: dict[str, Any], started_at: float, duration: float, streamed: bool,
               session_id: str | None = None, tenant: str | None = None, key_id: str | None = None,
               cache: str | None = None, saved: TokenUsage | None = None) -> CallRecord:
        """Build the call's record, meter it, and return it. Never raises for a bad estimate.

        ``cache`` is the response cache's result for the call; on a hit, ``saved`` is the usage of
        the stored answer, priced as the call would be priced now (its saved cost).
        """
        if call.reported is not None and not call.reported.sane():
            self._reject_usage(call, request_id)
        try:
            usage, mismatch = self.usage(call, model, payload)
        except Exception:  # an estimate must never break the call's record
            log.exception("token estimate failed for request %s", request_id)
            usage, mismatch = call.reported or NO_USAGE, False
        target = call.target_model or model
        cost = None if call.unpriced else self.prices.cost(target, usage, provider=call.provider,
                                                           upstream=call.upstream, served_model=call.served_model,
                                                           at=started_at)
        if cost is not None and call.rate is not None:
            cost = batch_cost(cost, call.rate)
        saved_cost = None
        if saved is not None:
            saved_cost = self.prices.cost(target, saved, provider=call.provider, upstream=call.upstream,
                                          served_model=call.served_model, at=started_at)
        tpot = None
        if call.ttft is not None and call.last_token is not None and usage.output > 1:
            tpot = (call.last_token - call.ttft) / (usage.output - 1)
        record = CallRecord(
            request_id=request_id,
            started_at=started_at,
            provider=call.provider,
            upstream=call.upstream,
            model=model,
            operation=operation,
            outcome=call.outcome,
            duration_s=duration,
            served_model=call.served_model,
            error_type=call.error_type,
            http_status=call.status,
            streamed=streamed,
            usage=usage,
            cost=cost,
            ttft_s=call.ttft,
            tpot_s=tpot,
            tokens_mismatch=mismatch,
            attempts=call.attempts,
            fallback_path=">".join([*call.path, f"{call.upstream}:{target}"]) if call.path else None,
            session_id=session_id,
            tenant=tenant,
            key_id=key_id,
            response_id=call.response_id,
            cache=cache,
            saved=saved,
            saved_cost=saved_cost,
        )
        self.meter.record(record)
        return record

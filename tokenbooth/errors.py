"""The one exception tree of tokenbooth, and the error taxonomy.

Every error a user can meet is a ``TokenboothError``. Each exception carries what
renders it: an HTTP status and an OpenAI-style error body for the gateway, an exit
code for the CLI, and an ``error_type`` for metrics and the ledger.

    TokenboothError
    ├── ConfigError                 bad configuration; exit code 2
    ├── UsageError                  bad CLI usage; exit code 2
    ├── LedgerError                 the ledger database refused a command's work; exit code 1
    ├── RequestError                a client sent something we cannot serve
    │   ├── InvalidRequest          400  invalid JSON, missing or mistyped fields
    │   ├── RequestTooLarge         413  a body past limits.max_request_bytes
    │   ├── HeadersTooLarge         431  a head past limits.max_header_bytes or limits.max_headers
    │   ├── RequestTimeout          408  a head or a body that did not arrive in time
    │   ├── NotFound                404  unknown route
    │   ├── MethodNotAllowed        405
    │   └── ModelNotFound           404  no upstream serves the model
    ├── Refusal                     the gateway refused the call on purpose (control/)
    │   ├── AuthError               401  no key, or an unknown, revoked or expired one
    │   ├── RateLimited             429  an RPM, TPM or concurrency limit (with Retry-After)
    │   ├── BudgetExceeded          429  a hard budget (insufficient_quota; not to be retried)
    │   └── TooManyConnections      503  the process holds limits.max_connections connections
    └── UpstreamError               the upstream failed the call
        ├── UpstreamConnectError    502  connection refused, reset, DNS  (connection)
        ├── UpstreamConnectTimeout  504  no connection in time           (timeout_connect)
        ├── UpstreamReadTimeout     504  no bytes in time                (timeout_read)
        ├── UpstreamInvalidResponse 502  a 2xx body that is not what the API promises
        ├── CircuitOpen             503  the upstream's circuit breaker is open (fail fast)
        └── UpstreamStatusError     the upstream's own 4xx/5xx, passed through

Third-party exceptions are translated where they enter (``raise ... from exc``),
so nothing downstream has to guess at foreign exception types.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

__all__ = [
    "AuthError",
    "BudgetExceeded",
    "CircuitOpen",
    "ConfigError",
    "ErrorType",
    "HeadersTooLarge",
    "InvalidRequest",
    "LedgerError",
    "MethodNotAllowed",
    "ModelNotFound",
    "NotFound",
    "RateLimited",
    "Refusal",
    "RequestError",
    "RequestTimeout",
    "RequestTooLarge",
    "TokenboothError",
    "TooManyConnections",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamError",
    "UpstreamInvalidResponse",
    "UpstreamReadTimeout",
    "UpstreamStatusError",
    "UsageError",
    "classify_status",
]


class ErrorType(StrEnum):
    """The bounded set of error types used as the ``error_type`` label (PRODUCT.md F3)."""

    NONE = ""
    RATE_LIMITED = "rate_limited"
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    CONTEXT_LENGTH = "context_length"
    SERVER_ERROR = "server_error"
    TIMEOUT_CONNECT = "timeout_connect"
    TIMEOUT_READ = "timeout_read"
    CONNECTION = "connection"
    CANCELLED = "cancelled"
    INVALID_RESPONSE = "invalid_response"


_CONTEXT_MARKERS = (b"context_length_exceeded", b"maximum context length", b"prompt is too long")


def classify_status(status: int, body: bytes = b"") -> ErrorType:
    """Map an upstream HTTP status (and its body, for context-length errors) to an error type.

    >>> classify_status(429)
    <ErrorType.RATE_LIMITED: 'rate_limited'>
    """
    if status < 400:
        return ErrorType.NONE
    if status == 429:
        return ErrorType.RATE_LIMITED
    if status in (401, 403):
        return ErrorType.AUTH
    if status >= 500:
        return ErrorType.SERVER_ERROR
    lowered = body[:4096].lower()
    if any(marker in lowered for marker in _CONTEXT_MARKERS):
        return ErrorType.CONTEXT_LENGTH
    return ErrorType.BAD_REQUEST


class TokenboothError(Exception):
    """Base of every tokenbooth error."""

    status_code: int = 500
    exit_code: int = 1
    error_type: ErrorType = ErrorType.NONE
    openai_type: str = "api_error"
    code: str | None = None
    # the ``reason`` label of tokenbooth_rejected_requests_total when the gateway refuses a call itself
    reject_reason: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    anthropic_type: str = "api_error"

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers (e.g. Retry-After) the error is rendered with."""
        return []

    def openai_body(self) -> dict[str, Any]:
        """The error in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.openai_type, "param": None, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        """The error in Anthropic's format, for ``/v1/messages``: ``{"type": "error", "error": {...}}``."""
        return {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}


class ConfigError(TokenboothError):
    """A configuration value is missing or invalid; the message names the key and the value."""

    exit_code = 2


class UsageError(TokenboothError):
    """The command line was used wrongly."""

    exit_code = 2


class LedgerError(TokenboothError):
    """The ledger database refused what a command asked of it (e.g. a replay)."""

    exit_code = 1


class RequestError(TokenboothError):
    """The client sent a request the gateway cannot serve."""

    status_code = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class InvalidRequest(RequestError):
    """Malformed JSON or a missing or mistyped field."""

    reject_reason = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def openai_body(self) -> dict[str, Any]:
        body = super().openai_body()
        body["error"]["param"] = self.param
        return body


class RequestTooLarge(RequestError):
    """A request body past the gateway's limit (``limits.max_request_bytes``)."""

    status_code = 413
    code = "request_too_large"
    reject_reason = "too_large"

    def __init__(self, limit: int, what: str = "request body") -> None:
        super().__init__(f"The {what} is larger than this gateway accepts ({limit} bytes; "
                         "limits.max_request_bytes).")


class HeadersTooLarge(RequestError):
    """A request line and headers past ``limits.max_header_bytes``, or more headers than ``limits.max_headers``;
    refused by the connection layer (``gateway/connections.py``) before the head is whole where it can be."""

    status_code = 431
    code = "request_header_fields_too_large"
    reject_reason = "headers_too_large"


class RequestTimeout(RequestError):
    """A request whose head did not arrive within ``limits.header_timeout``, or whose body fell silent for
    ``limits.body_timeout``; the connection is closed after the answer."""

    status_code = 408
    code = "request_timeout"
    reject_reason = "timeout"


class NotFound(RequestError):
    """No such route."""

    status_code = 404
    code = "not_found"
    anthropic_type = "not_found_error"
    reject_reason = "not_found"


class MethodNotAllowed(RequestError):
    """The route exists but not for this HTTP method."""

    status_code = 405
    code = "method_not_allowed"
    reject_reason = "not_found"


class ModelNotFound(RequestError):
    """No configured upstream serves the requested model."""

    status_code = 404
    code = "model_not_found"
    anthropic_type = "not_found_error"
    reject_reason = "not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or is not served by this gateway.")
        self.model = model


class Refusal(TokenboothError):
    """The gateway refused a call by policy: authentication, a rate limit or a budget."""

    status_code = 429


class AuthError(Refusal):
    """No tokenbooth key, or one that is unknown, revoked or expired (the upstream is not contacted)."""

    status_code = 401
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"
    code = "invalid_api_key"
    reject_reason = "auth"


class RateLimited(Refusal):
    """A rate limit (RPM, TPM) or the concurrency cap of a key or tenant; ``retry_after`` in seconds."""

    openai_type = "requests"
    anthropic_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    reject_reason = "rate_limit"

    def __init__(self, message: str, retry_after: float, *, tokens: bool = False, concurrency: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        if tokens:
            self.openai_type = "tokens"
        if concurrency:
            self.reject_reason = "concurrency"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(max(math.ceil(self.retry_after), 1)).encode())]


class BudgetExceeded(Refusal):
    """A hard budget would be exceeded. ``x-should-retry: false``: the official clients would
    otherwise retry a 429, and a budget does not come back in seconds."""

    openai_type = "insufficient_quota"
    anthropic_type = "billing_error"
    code = "budget_exceeded"
    reject_reason = "budget"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-should-retry", b"false")]


class TooManyConnections(Refusal):
    """A connection taken past ``limits.max_connections``, from the reserve kept for the health and metrics
    probes, asked for something else. Worth retrying after a moment."""

    status_code = 503
    openai_type = "server_error"
    anthropic_type = "overloaded_error"
    code = "too_many_connections"
    reject_reason = "connection_limit"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", b"1")]


class UpstreamError(TokenboothError):
    """The upstream did not complete the call. ``upstream`` names it (never its key)."""

    status_code = 502
    openai_type = "upstream_error"

    def __init__(self, message: str, upstream: str = "") -> None:
        super().__init__(message)
        self.upstream = upstream


class UpstreamConnectError(UpstreamError):
    """The connection to the upstream failed or broke."""

    error_type = ErrorType.CONNECTION
    code = "upstream_unreachable"


class UpstreamConnectTimeout(UpstreamError):
    """No connection to the upstream within the connect timeout."""

    status_code = 504
    anthropic_type = "timeout_error"
    error_type = ErrorType.TIMEOUT_CONNECT
    code = "upstream_timeout"


class UpstreamReadTimeout(UpstreamError):
    """The upstream accepted the request but sent nothing within the read timeout."""

    status_code = 504
    anthropic_type = "timeout_error"
    error_type = ErrorType.TIMEOUT_READ
    code = "upstream_timeout"


class UpstreamInvalidResponse(UpstreamError):
    """The upstream answered 2xx with a body that is not what its API promises."""

    error_type = ErrorType.INVALID_RESPONSE
    code = "upstream_invalid_response"


class CircuitOpen(UpstreamError):
    """The upstream failed repeatedly; its circuit is open and calls fail fast until a probe succeeds.

    Counted as a ``server_error``: to the caller it is the upstream being unavailable.
    """

    status_code = 503
    error_type = ErrorType.SERVER_ERROR
    code = "circuit_open"
    anthropic_type = "overloaded_error"

    def __init__(self, upstream: str, retry_in: float) -> None:
        super().__init__(f"upstream '{upstream}' is failing and its circuit is open; "
                         f"calls resume in {retry_in:.0f} s", upstream)
        self.retry_in = retry_in

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(max(math.ceil(self.retry_in), 1)).encode())]


class UpstreamStatusError(UpstreamError):
    """The upstream answered with a 4xx or 5xx; its status and body are passed through."""

    def __init__(self, status: int, body: bytes, content_type: str, upstream: str = "",
                 retry_after: str | None = None, retry_after_ms: str | None = None) -> None:
        super().__init__(f"upstream answered HTTP {status}", upstream)
        self.status_code = status
        self.body = body
        self.content_type = content_type
        self.error_type = classify_status(status, body)
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = []
        if self.retry_after is not None:
            out.append((b"retry-after", self.retry_after.encode("latin-1")))
        if self.retry_after_ms is not None:
            out.append((b"retry-after-ms", self.retry_after_ms.encode("latin-1")))
        return out

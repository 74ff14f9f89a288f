"""One frozen record per LLM call, built by the gateway or the SDK and read by the meter."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum

from tokenbooth.errors import ErrorType

__all__ = ["CallRecord", "Cost", "Operation", "Outcome", "SessionRecord", "TokenUsage"]


class Operation(StrEnum):
    """What kind of API call this was (the ``operation`` label)."""

    CHAT = "chat"
    TEXT_COMPLETION = "text_completion"
    EMBEDDINGS = "embeddings"
    COUNT_TOKENS = "count_tokens"  # Anthropic's token counting: recorded, never billed
    # the families of the other /v1/ paths the gateway passes through
    RESPONSES = "responses"  # retrieving, deleting, cancelling, listing stored responses
    MODERATIONS = "moderations"
    AUDIO = "audio"
    IMAGES = "images"
    FILES = "files"
    BATCHES = "batches"
    FINE_TUNING = "fine_tuning"
    VECTOR_STORES = "vector_stores"
    ASSISTANTS = "assistants"  # assistants and threads
    OTHER = "other"  # any path not named above


class Outcome(StrEnum):
    """How the call ended (the ``outcome`` label)."""

    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one call by kind.

    ``input`` and ``output`` are totals: ``input`` includes ``cached_input`` and
    ``cache_write``, ``output`` includes ``reasoning``. ``estimated`` is true when the
    numbers were counted locally rather than reported by the upstream.
    """

    input: int = 0
    output: int = 0
    cached_input: int = 0
    cache_write: int = 0
    reasoning: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.input + self.output

    def sane(self) -> bool:
        """Whether every count is one a call can have: 0 to ``MAX_TOKENS``. Upstreams have
        reported 10**18, which would overflow the ledger's columns and the metrics."""
        return all(0 <= n <= MAX_TOKENS for n in (self.input, self.output, self.cached_input, self.cache_write,
                                                   self.reasoning))


MAX_TOKENS = 10**9  # of one kind in one call; the largest context windows hold ~10**7
NO_USAGE = TokenUsage()


@dataclass(frozen=True, slots=True)
class Cost:
    """An exact cost: ``amount`` in ``currency``, ``usd`` after the configured FX rate.

    ``source`` says where the price came from (``genai-prices``, ``price-file``).
    """

    amount: Decimal
    currency: str
    usd: Decimal
    source: str


@dataclass(frozen=True, slots=True)
class CallRecord:
    """Everything tokenbooth knows about one LLM call. Immutable once built."""

    request_id: str
    started_at: float  # unix time, seconds
    provider: str
    upstream: str
    model: str  # the model the caller asked for
    operation: Operation
    outcome: Outcome
    duration_s: float
    served_model: str | None = None  # the model the upstream says it served
    error_type: ErrorType = ErrorType.NONE
    http_status: int | None = None
    streamed: bool = False
    usage: TokenUsage = field(default=NO_USAGE)
    cost: Cost | None = None  # None: no price known (never silently zero)
    ttft_s: float | None = None
    tpot_s: float | None = None  # time per output token, first to last content chunk (streams)
    tokens_mismatch: bool = False  # a local estimate disagreed with the reported usage
    attempts: int = 1  # requests sent upstream (0: every circuit was open, nothing was sent)
    fallback_path: str | None = None
    session_id: str | None = None
    tenant: str | None = None
    key_id: str | None = None
    # the upstream's id of the stored response or batch the call created or read (resp_..., batch_...):
    # a background response's create, its polls and resumed streams share it
    response_id: str | None = None
    # the response cache's part in the call (hit, miss, bypass, store_skipped); None: no cache
    cache: str | None = None
    # a hit: the usage its stored answer had, and what that would cost today (the hit itself costs 0)
    saved: TokenUsage | None = None
    saved_cost: Cost | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """The roll-up of one agent session: what it did and what its LLM calls cost."""

    session_id: str
    agent: str
    started_at: float  # unix time, seconds
    duration_s: float
    outcome: str  # success, error
    steps: int
    tool_calls: int
    tool_errors: int
    llm_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal  # of its priced calls
    unpriced_calls: int = 0  # calls with usage but no known price, not in cost_usd

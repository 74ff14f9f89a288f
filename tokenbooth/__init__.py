"""tokenbooth: metering, monitoring and cost control for applications that call LLM APIs.

The SDK (``instrument``, ``agent_session``, ``track_tool``, ``push_to``,
``start_metrics_server``) and the metering core are public here; the gateway runs as
``tokenbooth serve``. Everything else lives in modules whose names say what they hold.
"""

from __future__ import annotations

from tokenbooth.catalog import CATALOG, Metrics
from tokenbooth.config import Settings, load_settings
from tokenbooth.errors import ErrorType, TokenboothError
from tokenbooth.meter import Meter, ModelLabels
from tokenbooth.pricing import Price, PriceBook, cost_of
from tokenbooth.record import CallRecord, Cost, Operation, Outcome, SessionRecord, TokenUsage
from tokenbooth.sdk import (
    AgentSession,
    Pusher,
    Step,
    agent_session,
    current_session,
    instrument,
    metrics_asgi_app,
    metrics_wsgi_app,
    push_to,
    start_metrics_server,
    track_tool,
)

__version__ = "0.1.0"

__all__ = [
    "CATALOG",
    "AgentSession",
    "CallRecord",
    "Cost",
    "ErrorType",
    "Meter",
    "Metrics",
    "ModelLabels",
    "Operation",
    "Outcome",
    "Price",
    "PriceBook",
    "Pusher",
    "SessionRecord",
    "Settings",
    "Step",
    "TokenUsage",
    "TokenboothError",
    "__version__",
    "agent_session",
    "cost_of",
    "current_session",
    "instrument",
    "load_settings",
    "metrics_asgi_app",
    "metrics_wsgi_app",
    "push_to",
    "start_metrics_server",
    "track_tool",
]

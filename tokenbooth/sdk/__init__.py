"""In-process metering for applications that call providers directly."""

from __future__ import annotations

from tokenbooth.sdk.agent import AgentSession, Step, agent_session, current_session, track_tool
from tokenbooth.sdk.exposition import metrics_asgi_app, metrics_registry, metrics_wsgi_app, start_metrics_server
from tokenbooth.sdk.instrument import instrument
from tokenbooth.sdk.pushgateway import Pusher, push_to

__all__ = [
    "AgentSession",
    "Pusher",
    "Step",
    "agent_session",
    "current_session",
    "instrument",
    "metrics_asgi_app",
    "metrics_registry",
    "metrics_wsgi_app",
    "push_to",
    "start_metrics_server",
    "track_tool",
]

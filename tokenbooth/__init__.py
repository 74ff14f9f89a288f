"""tokenbooth: metering, monitoring and cost control for applications that call LLM APIs.

The gateway (``tokenbooth serve``) and the metering core are public here; everything
else lives in modules whose names say what they hold.
"""

from __future__ import annotations

from tokenbooth.catalog import CATALOG, Metrics
from tokenbooth.config import Settings, load_settings
from tokenbooth.errors import ErrorType, TokenboothError
from tokenbooth.meter import Meter, ModelLabels
from tokenbooth.pricing import Price, PriceBook, cost_of
from tokenbooth.record import CallRecord, Cost, Operation, Outcome, TokenUsage

__version__ = "0.1.0"

__all__ = [
    "CATALOG",
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
    "Settings",
    "TokenUsage",
    "TokenboothError",
    "__version__",
    "cost_of",
    "load_settings",
]

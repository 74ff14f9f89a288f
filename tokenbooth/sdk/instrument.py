"""``instrument(client)``: meter an official OpenAI or Anthropic client in-process."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from tokenbooth.errors import UsageError
from tokenbooth.ledger.writer import LedgerWriter
from tokenbooth.sdk.runtime import get_runtime
from tokenbooth.sdk.transport import MeteringTransport

__all__ = ["instrument"]

C = TypeVar("C")

# Base-URL hosts of providers that speak the OpenAI API, by OpenTelemetry provider name.
_HOSTS = (
    ("api.deepseek.com", "deepseek"),
    ("openai.azure.com", "azure.ai.openai"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.x.ai", "x_ai"),
    ("api.groq.com", "groq"),
    ("api.anthropic.com", "anthropic"),
)


def _provider(client: Any) -> str:
    module = type(client).__module__.split(".")[0]
    if module == "anthropic":
        return "anthropic"
    host = str(getattr(client, "base_url", "")).split("://", 1)[-1].split("/", 1)[0]
    return next((name for suffix, name in _HOSTS if host.endswith(suffix)), "openai")


def instrument(client: C, *, registry: CollectorRegistry | None = None, ledger: str | LedgerWriter | None = None,
               tenant: str | None = None, provider: str | None = None) -> C:
    """Meter every API call a client makes; returns the same client.

    Takes ``openai.OpenAI``, ``openai.AsyncOpenAI``, ``anthropic.Anthropic`` or
    ``anthropic.AsyncAnthropic``. Chat completions, completions, embeddings and messages are
    metered, streaming included, into ``registry`` (prometheus_client's default when None)
    and, with ``ledger`` (a database URL), one ledger row per call. ``provider`` overrides
    the provider guessed from the client and its base URL. Instrumenting twice is a no-op.

    >>> client = tokenbooth.instrument(openai.OpenAI())   # doctest: +SKIP
    """
    http = getattr(client, "_client", None)
    transport = getattr(http, "_transport", None)
    if transport is None or not (hasattr(transport, "handle_request") or hasattr(transport, "handle_async_request")):
        raise UsageError(
            f"instrument() takes an openai.OpenAI, openai.AsyncOpenAI, anthropic.Anthropic or "
            f"anthropic.AsyncAnthropic client, not {type(client).__name__}"
        )
    if isinstance(transport, MeteringTransport):
        return client
    runtime = get_runtime(registry, ledger)
    name = provider or _provider(client)
    http._transport = MeteringTransport(transport, runtime, name, tenant)  # type: ignore[union-attr]
    mounts = getattr(http, "_mounts", None)
    if isinstance(mounts, dict):  # proxies from the environment are mounted transports
        for pattern, mounted in list(mounts.items()):
            if mounted is not None and not isinstance(mounted, MeteringTransport):
                mounts[pattern] = MeteringTransport(mounted, runtime, name, tenant)
    return client

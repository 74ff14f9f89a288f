"""The OpenAI-compatible metering gateway."""

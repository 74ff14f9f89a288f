"""Time scales of a generated stack: production, and a fast one for end-to-end tests.

Every rule window, ``for:`` duration and Alertmanager timer is written as its production value
divided by the profile's ``scale``, so the fast profile runs the same rules a minute-for-a-second:
a 5-minute error ratio becomes a 5-second one, and an alert fires and resolves within a test.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAST", "PRODUCTION", "Profile", "format_duration"]

_UNITS = (("d", 86400_000), ("h", 3600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def format_duration(seconds: float) -> str:
    """A Prometheus duration in the largest unit that divides it exactly.

    >>> format_duration(300), format_duration(5400), format_duration(0.5)
    ('5m', '90m', '500ms')
    """
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"a duration must be positive, not {seconds!r} s")
    for unit, size in _UNITS:
        if ms % size == 0:
            return f"{ms // size}{unit}"
    raise AssertionError("unreachable: 1 ms divides every whole number of milliseconds")


@dataclass(frozen=True)
class Profile:
    """How fast the generated stack runs: scrape and evaluation intervals, and a time scale."""

    name: str
    scale: int = 1  # production durations are divided by this
    scrape_interval: float = 15.0  # seconds, as written to prometheus.yml
    evaluation_interval: float = 15.0
    slow_interval: float = 60.0  # rule groups over windows of an hour and more

    def d(self, seconds: float) -> str:
        """A production duration, scaled to this profile and formatted for Prometheus."""
        return format_duration(seconds / self.scale)

    def s(self, seconds: float) -> float:
        """A production duration in seconds, scaled to this profile."""
        return seconds / self.scale


PRODUCTION = Profile("production")
# One second stands for one minute: windows of 5 s, `for: 5s`, a 1 s scrape.
FAST = Profile("fast", scale=60, scrape_interval=1.0, evaluation_interval=1.0, slow_interval=1.0)

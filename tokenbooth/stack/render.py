"""``tokenbooth stack init``: every file of a ready-to-run monitoring directory, from the settings.

The thresholds come from ``settings.stack`` (flags or the config file's ``stack:`` section), cost
thresholds in ``stack.currency`` converted to USD with ``pricing.fx``. The Grafana dashboards are
the JSON shipped in ``tokenbooth/stack/grafana/`` (see :mod:`tokenbooth.stack.dashboards`).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from tokenbooth.catalog import DURATION_BUCKETS, TTFT_BUCKETS
from tokenbooth.config import Settings, StackConfig
from tokenbooth.errors import ConfigError, UsageError
from tokenbooth.stack.alertmanager import COMPOSE_GATEWAY, AlertmanagerOptions, alertmanager_config
from tokenbooth.stack.alerts import alert_set
from tokenbooth.stack.compose import compose_files
from tokenbooth.stack.profile import PRODUCTION, Profile
from tokenbooth.stack.prometheus import prometheus_config
from tokenbooth.stack.readme import stack_readme
from tokenbooth.stack.recording import recording_groups
from tokenbooth.stack.ruletests import rule_tests
from tokenbooth.stack.yamlfile import dump_yaml

__all__ = ["SHIPPED_DASHBOARDS", "StackExists", "fx_rate", "init_stack", "stack_files"]

SHIPPED_DASHBOARDS = Path(__file__).parent / "grafana"
_HEADER = "Written by `tokenbooth stack init`; regenerate rather than edit, or keep your edits under version control."


class StackExists(UsageError):
    """``stack init`` would overwrite files (pass ``--force`` to allow it)."""


def _bounded(stack: StackConfig, key: str, buckets: Sequence[float], exact: bool = False) -> None:
    value = getattr(stack, key)
    if exact and value not in buckets:
        raise ConfigError(f"Config 'stack.{key}' has value {value!r}: it must be one of the duration histogram's "
                          f"buckets ({', '.join(f'{b:g}' for b in buckets)}).")
    if not buckets[0] < value <= buckets[-2]:
        raise ConfigError(f"Config 'stack.{key}' has value {value!r}: it must be above {buckets[0]:g} s and at most "
                          f"{buckets[-2]:g} s, where the histogram's buckets can tell it from its neighbours.")


def fx_rate(settings: Settings) -> Decimal:
    """USD per unit of the cost thresholds' currency (``pricing.fx``)."""
    currency = settings.stack.currency
    if currency not in settings.pricing.fx:
        raise ConfigError(f"Config 'stack.currency' has value '{currency}': add its rate to pricing.fx "
                          f"(known: {', '.join(sorted(settings.pricing.fx))}).")
    return settings.pricing.fx[currency]


def stack_files(settings: Settings, *, profile: Profile = PRODUCTION, chat: Sequence[str] = (),
                gateway_url: str = COMPOSE_GATEWAY) -> dict[str, str]:
    """Every file of the stack, by path relative to its directory."""
    from tokenbooth import __version__

    stack = settings.stack
    for key in ("latency_p95", "latency_p99"):
        _bounded(stack, key, DURATION_BUCKETS)
    _bounded(stack, "slo_latency", DURATION_BUCKETS, exact=True)
    _bounded(stack, "ttft_p95", TTFT_BUCKETS)
    fx = fx_rate(settings)
    try:
        am = AlertmanagerOptions(chat=tuple(chat), gateway_url=gateway_url,
                                 gateway_admin_key=settings.auth_mode == "keys")
    except ValueError as exc:
        raise UsageError(f"--chat: {exc}") from None
    alerts = alert_set(stack, fx, profile)
    files = {
        "README.md": stack_readme(stack, alerts, profile, chat, __version__),
        "prometheus.yml": prometheus_config(profile),
        "rules/recording.yml": dump_yaml({"groups": recording_groups(stack, profile)}, _HEADER),
        "rules/alerts.yml": dump_yaml({"groups": alerts.rule_groups(profile)}, _HEADER),
        "alertmanager.yml": dump_yaml(alertmanager_config(profile, am), _HEADER),
        **compose_files(chat),
    }
    if profile.scale == 1:  # the unit tests state production durations
        files["rules/tests.yml"] = dump_yaml(rule_tests(alerts, stack, fx, ["recording.yml", "alerts.yml"]),
                                             "promtool test rules rules/tests.yml  (or: tokenbooth stack check DIR)",
                                             fast=True)
    for path in sorted(SHIPPED_DASHBOARDS.glob("*.json")):
        files[f"grafana/dashboards/{path.name}"] = path.read_text(encoding="utf-8")
    return files


def init_stack(directory: Path, files: dict[str, str], *, force: bool = False) -> list[Path]:
    """Write ``files`` under ``directory``; refuses to overwrite any file unless ``force``."""
    targets = {directory / rel: text for rel, text in files.items()}
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p.relative_to(directory)) for p in existing[:5])
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        raise StackExists(f"{directory} already has {shown}{more}; pass --force to overwrite.")
    for path, text in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return sorted(targets)

"""Alertmanager's configuration (PRODUCT.md F13): routing by team and severity, grouping, inhibition.

Routes, first match wins unless ``continue``:

=====================================  =================  ========================================
labels                                 receiver           why
=====================================  =================  ========================================
``team="finance"``                     ``finance``        cost alerts: email and a cost channel
``severity="critical"``                ``platform-pager`` PagerDuty, then ``continue`` to chat
``severity="critical"``                ``platform-chat``  Slack, and the gateway's chat adapters
``severity="warning"``, ``slo`` set    ``tickets``        generic webhook, then ``continue``
``severity="warning"``                 ``platform-chat``
anything else                          ``platform-chat``  the root's receiver
=====================================  =================  ========================================

Alerts are grouped by ``alertname`` and ``model``; a critical silences the warning of the same
alertname and model. Chat and email receivers say when an alert is resolved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenbooth.stack.profile import Profile

__all__ = ["CHAT_KINDS", "COMPOSE_GATEWAY", "ROUTE_CASES", "AlertmanagerOptions", "alertmanager_config"]

CHAT_KINDS = ("dingtalk", "wecom", "feishu", "slack")
COMPOSE_GATEWAY = "http://tokenbooth:8080"  # the gateway as docker compose names it; `stack up` rewrites it

_SLACK_TITLE = ('[{{ .Status | toUpper }}{{ if eq .Status "firing" }}:{{ .Alerts.Firing | len }}{{ end }}] '
                "{{ .CommonLabels.alertname }}{{ if .CommonLabels.model }} {{ .CommonLabels.model }}{{ end }}")
_SLACK_TEXT = ("{{ range .Alerts }}*{{ .Labels.severity }}* {{ .Annotations.summary }}\n"
               "{{ .Annotations.description }}\n{{ end }}")

# (labels of an alert, the receivers it must reach): checked with `amtool config routes test`.
ROUTE_CASES: tuple[tuple[dict[str, str], tuple[str, ...]], ...] = (
    ({"alertname": "TokenboothCostPerHourHigh", "severity": "warning", "team": "finance"}, ("finance",)),
    ({"alertname": "TokenboothModelDown", "severity": "critical", "team": "platform", "model": "gpt-4o"},
     ("platform-pager", "platform-chat")),
    ({"alertname": "TokenboothHighErrorRate", "severity": "warning", "team": "platform", "model": "gpt-4o"},
     ("platform-chat",)),
    ({"alertname": "TokenboothAvailabilityBurnRate", "severity": "warning", "team": "platform", "slo": "availability"},
     ("tickets", "platform-chat")),
    ({"alertname": "TokenboothAvailabilityBurnRate", "severity": "critical", "team": "platform",
      "slo": "availability"}, ("platform-pager", "platform-chat")),
    ({"alertname": "SomethingElse"}, ("platform-chat",)),
)


@dataclass(frozen=True)
class AlertmanagerOptions:
    """Where notifications go. Secrets (Slack URL, PagerDuty key, SMTP password) live in ``secrets/``."""

    chat: Sequence[str] = ()  # the gateway's adapters to post to: dingtalk, wecom, feishu, slack
    gateway_url: str = COMPOSE_GATEWAY
    platform_channel: str = "#llm-alerts"
    finance_channel: str = "#llm-cost"
    finance_email: str = "finance@example.com"
    smtp_smarthost: str = "smtp.example.com:587"
    smtp_from: str = "alertmanager@example.com"
    ticket_webhook: str = "http://ticket-bridge.example.com:8080/alertmanager"
    # the gateway runs in keys mode: its webhook endpoints need the admin key, read from secrets/
    gateway_admin_key: bool = False

    def __post_init__(self) -> None:
        unknown = [c for c in self.chat if c not in CHAT_KINDS]
        if unknown:
            raise ValueError(f"unknown chat adapter {', '.join(unknown)}: use {', '.join(CHAT_KINDS)}")


def _slack(channel: str) -> dict[str, Any]:
    return {"channel": channel, "send_resolved": True, "title": _SLACK_TITLE, "text": _SLACK_TEXT}


def alertmanager_config(profile: Profile, options: AlertmanagerOptions = AlertmanagerOptions()) -> dict[str, Any]:
    """The whole ``alertmanager.yml`` as a mapping."""
    chat: dict[str, Any] = {"name": "platform-chat", "slack_configs": [_slack(options.platform_channel)]}
    if options.chat:
        chat["webhook_configs"] = [{"url": f"{options.gateway_url}/alertmanager/webhook/{kind}", "send_resolved": True}
                                   for kind in options.chat]
        if options.gateway_admin_key:
            for hook in chat["webhook_configs"]:
                hook["http_config"] = {"authorization": {"type": "Bearer",
                                                         "credentials_file": "secrets/gateway_admin_key"}}
    return {
        "global": {
            "resolve_timeout": profile.d(300),
            "smtp_smarthost": options.smtp_smarthost,
            "smtp_from": options.smtp_from,
            "smtp_auth_username": "alertmanager",
            "smtp_auth_password_file": "secrets/smtp_password",
            "slack_api_url_file": "secrets/slack_api_url",
        },
        "route": {
            "receiver": "platform-chat",
            "group_by": ["alertname", "model"],
            "group_wait": profile.d(30),
            "group_interval": profile.d(300),
            "repeat_interval": profile.d(4 * 3600),
            "routes": [
                {"receiver": "finance", "matchers": ['team="finance"'], "repeat_interval": profile.d(12 * 3600)},
                {"receiver": "platform-pager", "matchers": ['severity="critical"'], "continue": True},
                {"receiver": "platform-chat", "matchers": ['severity="critical"']},
                {"receiver": "tickets", "matchers": ['severity="warning"', 'slo=~".+"'], "continue": True},
                {"receiver": "platform-chat", "matchers": ['severity="warning"']},
            ],
        },
        "inhibit_rules": [
            {"source_matchers": ['severity="critical"'], "target_matchers": ['severity="warning"'],
             "equal": ["alertname", "model"]},
        ],
        "receivers": [
            chat,
            {"name": "platform-pager", "pagerduty_configs": [{
                "routing_key_file": "secrets/pagerduty_routing_key", "send_resolved": True,
                "severity": "{{ .CommonLabels.severity }}",
                "description": "{{ .CommonLabels.alertname }}: {{ .CommonAnnotations.summary }}"}]},
            {"name": "finance",
             "email_configs": [{"to": options.finance_email, "send_resolved": True}],
             "slack_configs": [_slack(options.finance_channel)]},
            {"name": "tickets", "webhook_configs": [{"url": options.ticket_webhook, "send_resolved": True}]},
        ],
    }

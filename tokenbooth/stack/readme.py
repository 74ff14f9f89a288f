"""The README of a generated stack: how to run and check it, the thresholds, routing, and a runbook."""

from __future__ import annotations

from collections.abc import Sequence

from tokenbooth.config import StackConfig
from tokenbooth.stack.alerts import AlertSet
from tokenbooth.stack.profile import Profile
from tokenbooth.stack.runbook import RUNBOOKS

__all__ = ["stack_readme"]

_FILES = (
    ("prometheus.yml", "what Prometheus scrapes (gateway, Pushgateway with `honor_labels`, Alertmanager), its "
                       "rules; commented Kubernetes discovery and remote write"),
    ("rules/recording.yml", "recording rules, `level:metric:operations`"),
    ("rules/alerts.yml", "alert rules, with the thresholds below"),
    ("rules/tests.yml", "`promtool test rules` unit tests of every alert, for these thresholds"),
    ("alertmanager.yml", "routing by team and severity, grouping, inhibition, receivers"),
    ("secrets/", "the Slack URL, PagerDuty key and SMTP password Alertmanager reads (not committed)"),
    ("grafana/", "data source and dashboard provisioning; dashboards: overview, cost and tenants, agents, "
                 "gateway internals"),
    ("docker-compose.yml", "gateway, Prometheus, Alertmanager, Pushgateway and Grafana"),
    ("tokenbooth/Dockerfile", "the gateway's image (`TOKENBOOTH_SPEC` picks what pip installs)"),
)

_ROUTES = """\
| alert labels | receiver | delivers to |
|---|---|---|
| `team="finance"` (every cost alert) | `finance` | email to finance, Slack cost channel |
| `severity="critical"` | `platform-pager`, then `platform-chat` | PagerDuty, then chat (`continue: true`) |
| `severity="warning"` with an `slo` label | `tickets`, then `platform-chat` | generic webhook (a ticket), then chat |
| `severity="warning"` | `platform-chat` | Slack{adapters} |

Alerts are grouped by `alertname` and `model`. While a critical fires, the warning of the same
`alertname` and `model` is inhibited. Chat and email receivers send a message when an alert resolves.
"""


def _for(profile: Profile, seconds: int) -> str:
    return profile.d(seconds) if seconds else "at once"


def stack_readme(stack: StackConfig, alerts: AlertSet, profile: Profile, chat: Sequence[str], version: str) -> str:
    """The generated stack's README.md."""
    out = [
        "# tokenbooth monitoring stack",
        "",
        f"Written by `tokenbooth stack init` (tokenbooth {version}, profile `{profile.name}`). Change a threshold "
        "with a flag or the `stack:` section of the tokenbooth config, then run `tokenbooth stack init DIR --force` "
        "again: the rules and their tests are regenerated together.",
        "",
        "## What is here",
        "",
        "| path | what |",
        "|---|---|",
        *(f"| `{path}` | {what} |" for path, what in _FILES),
        "",
        "## Run it",
        "",
        "With Docker:",
        "",
        "```sh",
        "export TOKENBOOTH_UPSTREAM=https://api.openai.com/v1",
        *(f"export {kind.upper()}_WEBHOOK_URL=...   # the {kind} robot" for kind in chat),
        "docker compose up -d",
        "```",
        "",
        "Grafana is on http://localhost:3000 (admin / `GRAFANA_ADMIN_PASSWORD`, default `admin`), Prometheus on "
        ":9090, Alertmanager on :9093, the Pushgateway on :9091, the gateway on :8080.",
        "",
        "Without Docker (Debian packages `prometheus`, `prometheus-alertmanager`, `prometheus-pushgateway`), next to "
        "a running gateway:",
        "",
        "```sh",
        "tokenbooth stack up DIR --gateway 127.0.0.1:8080   # Ctrl-C stops all three",
        "```",
        "",
        "## Check it",
        "",
        "```sh",
        "tokenbooth stack check DIR",
        "```",
        "",
        "runs `promtool check config`, `promtool check rules`, the rule unit tests (`promtool test rules`), "
        "`amtool check-config`, a PromQL check of every rule and dashboard query against the metric catalog, and "
        "`docker compose config` when Docker is installed. Once it runs, next to the gateway:",
        "",
        "```sh",
        "tokenbooth doctor --config tokenbooth.yaml --stack DIR",
        "```",
        "",
        "asks Prometheus, the Pushgateway and Alertmanager for the failures that leave dashboards empty and alerts "
        "silent (a target down, `honor_labels` missing, no rules loaded, no Alertmanager, stale groups, a route "
        "to nowhere), and says what to do about each.",
        "",
        "## Thresholds",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| `stack.{name}` | {getattr(stack, name)} |" for name in type(stack).model_fields),
        "",
        "## Routing",
        "",
        _ROUTES.format(adapters=", and the gateway's " + ", ".join(chat) + " adapter" if chat else ""),
        "## Runbook",
    ]
    for name in dict.fromkeys(a.name for a in alerts.all()):
        variants = [a for a in alerts.all() if a.name == name]
        out += ["", f"### {name}", "", RUNBOOKS[name], "",
                "| severity | team | for | fires when |", "|---|---|---|---|"]
        for a in variants:
            condition = " ".join(a.expr.split()).replace("|", "\\|")
            out.append(f"| {a.severity} | {a.team} | {_for(profile, a.for_)} | `{condition}` |")
    return "\n".join(out) + "\n"

"""``docker-compose.yml`` and what it mounts: Grafana provisioning, the gateway's image, secrets.

Five services: the tokenbooth gateway, Prometheus, Alertmanager, the Pushgateway and Grafana,
with named volumes for their data. The gateway is built from a two-line Dockerfile that
installs ``TOKENBOOTH_SPEC`` (a version, a git URL or a wheel URL) with pip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenbooth.stack.yamlfile import dump_yaml

__all__ = ["DATASOURCE_UID", "compose_files"]

DATASOURCE_UID = "tokenbooth-prometheus"  # every dashboard panel names this data source
IMAGES = {
    "prometheus": "prom/prometheus:v2.53.2",
    "alertmanager": "prom/alertmanager:v0.27.0",
    "pushgateway": "prom/pushgateway:v1.9.0",
    "grafana": "grafana/grafana:11.2.0",
}

DOCKERFILE = """\
# The tokenbooth gateway. TOKENBOOTH_SPEC is anything pip installs: a version, a git URL, a wheel URL.
FROM python:3.11-slim
ARG TOKENBOOTH_SPEC=tokenbooth
RUN pip install --no-cache-dir "${TOKENBOOTH_SPEC}"
ENTRYPOINT ["tokenbooth"]
"""

SECRETS_README = """\
# Secrets read by Alertmanager (never commit them; .gitignore keeps them out)

| file | what |
|---|---|
| `slack_api_url` | the Slack incoming-webhook URL, one line |
| `pagerduty_routing_key` | the PagerDuty Events API v2 integration (routing) key |
| `smtp_password` | the password of the SMTP account in `alertmanager.yml` (`smtp_auth_username`) |
| `gateway_admin_key` | in keys mode (`auth.mode: keys`): the gateway's admin key (what `auth.admin_key_env` names) |

Chat robots (DingTalk, WeCom, Feishu, Slack via the gateway's adapter) are configured on the
gateway: see `notify:` in the tokenbooth configuration and the environment in `docker-compose.yml`.
"""


def _gateway(chat: Sequence[str]) -> dict[str, Any]:
    env: dict[str, str] = {
        "TOKENBOOTH_UPSTREAM": "${TOKENBOOTH_UPSTREAM:-https://api.openai.com/v1}",
        "TOKENBOOTH_DB": "sqlite:////data/tokenbooth.db",
    }
    for kind in chat:
        var = f"{kind.upper()}_WEBHOOK_URL"
        env[f"TOKENBOOTH_NOTIFY__{kind.upper()}__URL"] = f"${{{var}:?set {var} to the {kind} robot's URL}}"
        if kind in ("dingtalk", "feishu"):
            env[f"TOKENBOOTH_NOTIFY__{kind.upper()}__SECRET_ENV"] = f"{kind.upper()}_SECRET"
            env[f"{kind.upper()}_SECRET"] = f"${{{kind.upper()}_SECRET:-}}"
    return {
        "build": {"context": "./tokenbooth", "args": {"TOKENBOOTH_SPEC": "${TOKENBOOTH_SPEC:-tokenbooth}"}},
        "command": ["serve", "--host", "0.0.0.0", "--port", "8080"],
        "environment": env,
        "ports": ["8080:8080"],
        "volumes": ["tokenbooth-data:/data"],
        "restart": "unless-stopped",
    }


def compose_files(chat: Sequence[str] = ()) -> dict[str, str]:
    """``docker-compose.yml``, the gateway's Dockerfile, Grafana provisioning and ``secrets/``, by path."""
    services = {
        "tokenbooth": _gateway(chat),
        "prometheus": {
            "image": IMAGES["prometheus"],
            "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
                        "--storage.tsdb.retention.time=15d", "--web.enable-lifecycle"],
            "volumes": ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro", "./rules:/etc/prometheus/rules:ro",
                        "prometheus-data:/prometheus"],
            "ports": ["9090:9090"],
            "restart": "unless-stopped",
        },
        "alertmanager": {
            "image": IMAGES["alertmanager"],
            "command": ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"],
            "volumes": ["./alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro",
                        "./secrets:/etc/alertmanager/secrets:ro", "alertmanager-data:/alertmanager"],
            "ports": ["9093:9093"],
            "restart": "unless-stopped",
        },
        "pushgateway": {"image": IMAGES["pushgateway"], "ports": ["9091:9091"], "restart": "unless-stopped"},
        "grafana": {
            "image": IMAGES["grafana"],
            "environment": {"GF_SECURITY_ADMIN_PASSWORD": "${GRAFANA_ADMIN_PASSWORD:-admin}",
                            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/overview.json"},
            "volumes": ["./grafana/provisioning:/etc/grafana/provisioning:ro",
                        "./grafana/dashboards:/var/lib/grafana/dashboards:ro", "grafana-data:/var/lib/grafana"],
            "ports": ["3000:3000"],
            "restart": "unless-stopped",
        },
    }
    volumes: dict[str, Any] = {name: {} for name in ("tokenbooth-data", "prometheus-data", "alertmanager-data",
                                                      "grafana-data")}
    datasource = {"apiVersion": 1, "datasources": [{
        "name": "Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
        "url": "http://prometheus:9090", "isDefault": True, "jsonData": {"timeInterval": "15s"}}]}
    dashboards = {"apiVersion": 1, "providers": [{
        "name": "tokenbooth", "folder": "tokenbooth", "type": "file", "disableDeletion": False,
        "allowUiUpdates": True, "options": {"path": "/var/lib/grafana/dashboards"}}]}
    return {
        "docker-compose.yml": dump_yaml({"services": services, "volumes": volumes},
                                        "The tokenbooth monitoring stack: `docker compose up -d`, then Grafana on "
                                        "http://localhost:3000.\nSet TOKENBOOTH_UPSTREAM (and the robot URLs) in "
                                        "the environment or an .env file next to this one."),
        "tokenbooth/Dockerfile": DOCKERFILE,
        "grafana/provisioning/datasources/tokenbooth.yml": dump_yaml(datasource, "Grafana data source, provisioned."),
        "grafana/provisioning/dashboards/tokenbooth.yml": dump_yaml(dashboards, "Grafana dashboards, provisioned "
                                                                    "from grafana/dashboards."),
        "secrets/README.md": SECRETS_README,
        "secrets/.gitignore": "*\n!README.md\n!.gitignore\n",
    }

"""``prometheus.yml``: what Prometheus scrapes, its rule files, its Alertmanager.

Targets use the host names of the generated ``docker-compose.yml`` (``tokenbooth:8080``,
``pushgateway:9091``, ``alertmanager:9093``); ``tokenbooth stack up`` rewrites them to the
local ports. Commented examples show Kubernetes service discovery and remote write for long
retention; ``tests/stack`` checks they are valid once uncommented.
"""

from __future__ import annotations

from typing import Any

from tokenbooth.stack.profile import Profile, format_duration
from tokenbooth.stack.yamlfile import dump_yaml

__all__ = ["COMPOSE_TARGETS", "RULE_FILES", "prometheus_config"]

RULE_FILES = ("rules/recording.yml", "rules/alerts.yml")
# Job name -> target in docker compose. Every job name starts with "tokenbooth" so that
# TokenboothInstanceDown (`up{job=~"tokenbooth.*"} == 0`) covers the whole stack.
COMPOSE_TARGETS = {
    "tokenbooth": "tokenbooth:8080",
    "tokenbooth-pushgateway": "pushgateway:9091",
    "tokenbooth-alertmanager": "alertmanager:9093",
    "tokenbooth-prometheus": "localhost:9090",
}

KUBERNETES_EXAMPLE = """\
  # Kubernetes: scrape every gateway pod instead of a fixed address. Label the pods
  # app.kubernetes.io/name=tokenbooth and name their port "http", then uncomment:
#   - job_name: tokenbooth-kubernetes
#     kubernetes_sd_configs:
#       - role: pod
#     relabel_configs:
#       - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name]
#         regex: tokenbooth
#         action: keep
#       - source_labels: [__meta_kubernetes_pod_container_port_name]
#         regex: http
#         action: keep
#       - source_labels: [__meta_kubernetes_namespace]
#         target_label: namespace
#       - source_labels: [__meta_kubernetes_pod_name]
#         target_label: pod
"""

REMOTE_WRITE_EXAMPLE = """\

# Long retention: keep Prometheus local (15 days) and send every sample to a store built for
# months and years (VictoriaMetrics, Thanos Receive, Mimir). Uncomment and set the URL:
# remote_write:
#   - url: http://victoriametrics:8428/api/v1/write
#     queue_config:
#       max_samples_per_send: 10000
"""


def prometheus_config(profile: Profile) -> str:
    """The text of ``prometheus.yml`` (with its commented examples)."""
    scrape_timeout = format_duration(min(10.0, profile.scrape_interval))
    jobs: list[dict[str, Any]] = []
    for job, target in COMPOSE_TARGETS.items():
        entry: dict[str, Any] = {"job_name": job}
        if job == "tokenbooth-pushgateway":
            # Keep the job and instance labels the batch jobs pushed, not the Pushgateway's own.
            entry["honor_labels"] = True
        entry["static_configs"] = [{"targets": [target]}]
        jobs.append(entry)
    config = {
        "global": {
            "scrape_interval": format_duration(profile.scrape_interval),
            "scrape_timeout": scrape_timeout,
            "evaluation_interval": format_duration(profile.evaluation_interval),
        },
        "rule_files": list(RULE_FILES),
        "alerting": {"alertmanagers": [
            {"static_configs": [{"targets": [COMPOSE_TARGETS["tokenbooth-alertmanager"]]}]}]},
        "scrape_configs": jobs,
    }
    header = ("Prometheus for tokenbooth, written by `tokenbooth stack init`.\n"
              "Several gateway replicas: list each under the tokenbooth job; the rules sum over instances.")
    return dump_yaml(config, header) + KUBERNETES_EXAMPLE + REMOTE_WRITE_EXAMPLE

"""The monitoring stack as code (PRODUCT.md F12-F15): ``tokenbooth stack init | check | up``.

- :mod:`~tokenbooth.stack.recording`, :mod:`~tokenbooth.stack.alerts`: Prometheus rules from the thresholds
- :mod:`~tokenbooth.stack.ruletests`, :mod:`~tokenbooth.stack.series`: ``promtool test rules`` for every alert
- :mod:`~tokenbooth.stack.alertmanager`: routing, grouping, inhibition, receivers
- :mod:`~tokenbooth.stack.dashboards`: Grafana dashboards as code (shipped as JSON in ``grafana/``)
- :mod:`~tokenbooth.stack.prometheus`, :mod:`~tokenbooth.stack.compose`: scrape config, docker compose, provisioning
- :mod:`~tokenbooth.stack.render`: ``stack init``; :mod:`~tokenbooth.stack.check`: ``stack check``;
  :mod:`~tokenbooth.stack.up`: ``stack up`` (local binaries, no Docker)
- :mod:`~tokenbooth.stack.queries`: PromQL checks against the metric catalog
"""

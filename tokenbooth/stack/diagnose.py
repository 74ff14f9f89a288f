"""The monitoring checks of ``tokenbooth doctor``: Prometheus, the Pushgateway and Alertmanager, asked
through their HTTP APIs for the failures that leave dashboards empty and alerts silent. A service
that does not answer fails its checks with the fix each :class:`~tokenbooth.doctor.Check` names."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from tokenbooth.doctor import Check, Context, Finding, fail, get_json, ok, warn

__all__ = ["CHECKS", "route_receivers"]

_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_WINDOW = re.compile(r"\[((?:\d+(?:ms|s|m|h|d|w|y))+)(?::[^\]]*)?\]")


def seconds(duration: str) -> float:
    """A Prometheus duration in seconds: ``seconds("1m30s") == 90``."""
    return sum(int(n) * _UNIT[unit] for n, unit in _DURATION.findall(duration))


def _prometheus_config(ctx: Context) -> dict[str, Any]:
    data = get_json(f"{ctx.prometheus}/api/v1/status/config")
    loaded: dict[str, Any] = yaml.safe_load(data["data"]["yaml"]) or {}
    return loaded


def _host_port(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return f"{parts.hostname}:{parts.port or 80}"


def _scrapes(job: Mapping[str, Any], address: str) -> bool:
    return any(_host_port(t) == address for s in job.get("static_configs", []) for t in s.get("targets", []))


def _targets(ctx: Context) -> Finding:
    active = get_json(f"{ctx.prometheus}/api/v1/targets?state=active")["data"]["activeTargets"]
    wanted = _host_port(ctx.gateway) if ctx.gateway else None
    mine = [t for t in active if (wanted and _host_port(t["scrapeUrl"]) == wanted)
            or (not wanted and t["labels"].get("job") == "tokenbooth")]
    if not mine:
        jobs = sorted({t["labels"].get("job", "?") for t in active})
        return Finding("prometheus.targets", *fail(
            f"no target scrapes the gateway{f' at {wanted}' if wanted else ''} (jobs: {', '.join(jobs) or 'none'})",
            "add a scrape job for the gateway's /metrics (tokenbooth stack init writes one)"))
    down = [t for t in mine if t["health"] != "up"]
    if down:
        t = down[0]
        return Finding("prometheus.targets", *fail(
            f"job '{t['labels'].get('job')}' target {t['scrapeUrl']} is {t['health']}: "
            f"{t.get('lastError') or 'not scraped yet'}",
            "check the gateway runs and that Prometheus can reach that address (in Docker: not localhost)"))
    return Finding("prometheus.targets", *ok(f"job '{mine[0]['labels'].get('job')}' is up ({mine[0]['scrapeUrl']})"))


def _honor_labels(ctx: Context) -> Finding:
    config = _prometheus_config(ctx)
    exported = get_json(f"{ctx.prometheus}/api/v1/query?query="
                        + quote('count by (exported_job) ({exported_job!="", __name__=~"tokenbooth_.+"})'))
    address = _host_port(ctx.pushgateway) if ctx.pushgateway else None
    jobs = [j for j in config.get("scrape_configs", [])
            if (address and _scrapes(j, address)) or (not address and "pushgateway" in j.get("job_name", ""))]
    if exported["data"]["result"]:
        seen = sorted(r["metric"].get("exported_job", "") for r in exported["data"]["result"])
        return Finding("prometheus.honor_labels", *fail(
            f"series carry exported_job ({', '.join(seen)}): pushed job labels were renamed at scrape",
            "set honor_labels: true on the job that scrapes the Pushgateway, then reload Prometheus"))
    if not jobs:
        if address is None:
            return Finding("prometheus.honor_labels", *ok("no Pushgateway job (none configured)"))
        return Finding("prometheus.honor_labels", *fail(
            f"no scrape job targets the Pushgateway at {address}: batch jobs' pushes never reach Prometheus",
            "add a job for it with honor_labels: true (tokenbooth stack init writes one)"))
    bare = [j["job_name"] for j in jobs if not j.get("honor_labels")]
    if bare:
        return Finding("prometheus.honor_labels", *fail(
            f"job '{bare[0]}' scrapes the Pushgateway without honor_labels: every pushed series gets job="
            f"'{bare[0]}' and queries by the batch job's name come back empty",
            f"set honor_labels: true on job '{bare[0]}' in prometheus.yml, then reload Prometheus"))
    return Finding("prometheus.honor_labels", *ok(f"job '{jobs[0]['job_name']}' scrapes the Pushgateway with "
                                                  "honor_labels: true"))


def _series(ctx: Context) -> Finding:
    result = get_json(f"{ctx.prometheus}/api/v1/query?query="
                      + quote('count({__name__=~"tokenbooth_.+"})'))["data"]["result"]
    count = int(float(result[0]["value"][1])) if result else 0
    if not count:
        return Finding("prometheus.series", *fail("Prometheus holds no tokenbooth_* series: dashboards show "
                                                  "'No data'", "fix prometheus.targets first; a scrape "
                                                                "interval later they appear"))
    return Finding("prometheus.series", *ok(f"{count} tokenbooth_* series"))


def _rules(ctx: Context) -> Finding:
    groups = get_json(f"{ctx.prometheus}/api/v1/rules")["data"]["groups"]
    if not groups:
        return Finding("prometheus.rules", *fail(
            "no rule groups loaded: no alert can fire",
            "check rule_files in prometheus.yml: a path that matches no file loads nothing, silently"))
    rules = [(g["name"], r) for g in groups for r in g["rules"]]
    broken = [(g, r) for g, r in rules if r.get("health") not in ("ok", "unknown")]
    if broken:
        group, rule = broken[0]
        return Finding("prometheus.rules", *fail(
            f"{len(broken)} rule(s) fail to evaluate, e.g. '{rule['name']}' in '{group}': {rule.get('lastError')}",
            "run tokenbooth stack check on the stack directory, fix the rule, reload Prometheus"))
    never = [g["name"] for g in groups if str(g.get("lastEvaluation", "")).startswith("0001-")]
    if never:
        return Finding("prometheus.rules", *warn(
            f"{len(never)} of {len(groups)} rule groups not evaluated yet ({never[0]})",
            "wait one evaluation interval; if it stays, Prometheus's log says why"))
    tokenbooth = sum(1 for _, r in rules if r["name"].startswith("Tokenbooth"))
    return Finding("prometheus.rules", *ok(f"{len(groups)} groups, {len(rules)} rules loaded and evaluated "
                                           f"({tokenbooth} tokenbooth alerts)"))


def _alertmanagers(ctx: Context) -> Finding:
    active = get_json(f"{ctx.prometheus}/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
    if not active:
        return Finding("prometheus.alertmanagers", *fail(
            "Prometheus has no Alertmanager: alerts fire and nobody is notified",
            "add alerting.alertmanagers to prometheus.yml (tokenbooth stack init writes it)"))
    urls = [a["url"] for a in active]
    wanted = _host_port(ctx.alertmanager) if ctx.alertmanager else None
    if wanted and not any(_host_port(u) == wanted for u in urls):
        return Finding("prometheus.alertmanagers", *fail(
            f"Prometheus sends alerts to {', '.join(urls)}, not to the Alertmanager at {wanted}",
            "point alerting.alertmanagers at it"))
    return Finding("prometheus.alertmanagers", *ok("alerts go to " + ", ".join(urls)))


def _windows(ctx: Context) -> Finding:
    config = _prometheus_config(ctx)
    groups = get_json(f"{ctx.prometheus}/api/v1/rules")["data"]["groups"]
    default = seconds(config.get("global", {}).get("scrape_interval", "1m"))
    intervals = [seconds(j["scrape_interval"]) for j in config.get("scrape_configs", []) if "scrape_interval" in j]
    interval = max([default, *intervals])
    short = sorted({w for g in groups for r in g["rules"] for w in _WINDOW.findall(r.get("query", ""))
                    if seconds(w) < 4 * interval}, key=seconds)
    if short:
        return Finding("prometheus.windows", *warn(
            f"rate window(s) {', '.join(short)} under 4 × the {interval:g} s scrape interval: rate() sees too few "
            "samples and returns nothing or noise", "lengthen the windows or shorten scrape_interval"))
    return Finding("prometheus.windows", *ok(f"every rule window is at least 4 × the {interval:g} s scrape interval"))


def _pushgateway(ctx: Context) -> Finding:
    groups = get_json(f"{ctx.pushgateway}/api/v1/metrics")["data"]
    stale = ctx.settings.stack.pushgateway_stale if ctx.settings is not None else 3600.0
    now = ctx.now()
    old, failed = [], []
    for g in groups:
        labels = ",".join(f"{k}={v}" for k, v in sorted(g["labels"].items()))
        pushed = float(g.get("push_time_seconds", {}).get("metrics", [{}])[0].get("value", 0))
        failure = float(g.get("push_failure_time_seconds", {}).get("metrics", [{}])[0].get("value", 0))
        if failure > pushed:
            failed.append(labels)
        elif now - pushed > stale:
            old.append(f"{labels} ({(now - pushed) / 60:.0f} min)")
    if failed:
        return Finding("pushgateway.groups", *fail(
            f"the last push of {', '.join(failed)} failed (push_failure_time_seconds is newer than push_time_seconds)",
            "the job's log has the Pushgateway's answer: usually a metric pushed with another type or help"))
    if old:
        return Finding("pushgateway.groups", *fail(
            f"{len(old)} group(s) older than stack.pushgateway_stale ({stale:g} s): {', '.join(old)}",
            "check the job's scheduler; delete a retired job's group: curl -X DELETE "
            f"{ctx.pushgateway}/metrics/job/JOB"))
    return Finding("pushgateway.groups", *ok(f"{len(groups)} group(s), each pushed within {stale:g} s"))


def _alertmanager_config(ctx: Context) -> dict[str, Any]:
    status = get_json(f"{ctx.alertmanager}/api/v2/status")
    loaded: dict[str, Any] = yaml.safe_load(status["config"]["original"]) or {}
    return loaded


_MATCHER = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"?(.*?)"?\s*$')


def _matches(route: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    tests: list[tuple[str, str, str]] = [(k, "=", v) for k, v in route.get("match", {}).items()]
    tests += [(k, "=~", v) for k, v in route.get("match_re", {}).items()]
    for text in route.get("matchers", []):
        found = _MATCHER.match(text)
        if found:
            tests.append((found[1], found[2], found[3]))
    for name, op, value in tests:
        have = labels.get(name, "")
        hit = have == value if op in ("=", "!=") else re.fullmatch(value, have) is not None
        if hit != (op in ("=", "=~")):
            return False
    return True


def route_receivers(route: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The receivers Alertmanager's route tree sends an alert with ``labels`` to, as it walks it:
    the first matching child (more with ``continue: true``), else the route's own receiver."""
    found: list[str] = []
    for child in route.get("routes", []):
        if _matches(child, labels):
            inherited = {**child, "receiver": child.get("receiver", route.get("receiver"))}
            found += route_receivers(inherited, labels)
            if not child.get("continue"):
                return found
    return found or [route["receiver"]]


def _route(ctx: Context) -> Finding:
    from tokenbooth.stack.alertmanager import ROUTE_CASES

    config = _alertmanager_config(ctx)
    silences = get_json(f"{ctx.alertmanager}/api/v2/silences")
    receivers = {r["name"]: r for r in config.get("receivers", [])}
    samples = [labels for labels, _ in ROUTE_CASES if labels["alertname"].startswith("Tokenbooth")]
    silent = []
    for labels in samples:
        names = route_receivers(config["route"], labels)
        if not any(k.endswith("_configs") and v for n in names for k, v in receivers.get(n, {}).items()):
            silent.append(f"{labels['alertname']} ({labels.get('severity')}) -> {', '.join(names)}")
    if silent:
        return Finding("alertmanager.route", *fail(
            f"tokenbooth alerts reach receivers that send nowhere: {'; '.join(silent)}",
            "give those receivers a *_configs entry (webhook, email, Slack, PagerDuty), or route the alerts "
            "to one that has it"))
    active = [s for s in silences if s["status"]["state"] == "active"
              and any(_silences(s, labels) for labels in samples)]
    if active:
        return Finding("alertmanager.route", *warn(
            f"{len(active)} active silence(s) swallow tokenbooth alerts, e.g. {active[0]['comment']!r} until "
            f"{active[0]['endsAt']}", f"expire it if it is no longer wanted: amtool silence expire {active[0]['id']}"))
    return Finding("alertmanager.route", *ok(f"{len(samples)} kinds of tokenbooth alert reach receivers that "
                                             "deliver; no silence covers them"))


def _silences(silence: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    def one(m: Mapping[str, Any]) -> bool:
        have = labels.get(m["name"], "")
        hit = re.fullmatch(m["value"], have) is not None if m.get("isRegex") else have == m["value"]
        return hit is bool(m.get("isEqual", True))

    matchers: Sequence[Mapping[str, Any]] = silence["matchers"]
    return all(one(m) for m in matchers)


_PROMETHEUS_DOWN = "start Prometheus, or pass the right --prometheus URL"

CHECKS = [
    Check("prometheus.targets", "prometheus", _targets, _PROMETHEUS_DOWN),
    Check("prometheus.honor_labels", "prometheus", _honor_labels, _PROMETHEUS_DOWN),
    Check("prometheus.series", "prometheus", _series, _PROMETHEUS_DOWN),
    Check("prometheus.rules", "prometheus", _rules, _PROMETHEUS_DOWN),
    Check("prometheus.alertmanagers", "prometheus", _alertmanagers, _PROMETHEUS_DOWN),
    Check("prometheus.windows", "prometheus", _windows, _PROMETHEUS_DOWN),
    Check("pushgateway.groups", "pushgateway", _pushgateway,
          "start the Pushgateway, or correct the URL batch jobs push to"),
    Check("alertmanager.route", "alertmanager", _route, "start Alertmanager, or pass the right --alertmanager URL"),
]

"""``tokenbooth doctor`` against real Prometheus, Pushgateway and Alertmanager processes: a healthy
``stack up`` next to a running gateway, and each service started wrong on purpose."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from tests.conftest import GatewayHandle, SimHandle, free_port, need, serving
from tokenbooth.cli import main
from tokenbooth.config import load_settings
from tokenbooth.doctor import Context, run_checks
from tokenbooth.stack.profile import FAST
from tokenbooth.stack.render import init_stack, stack_files
from tokenbooth.stack.up import LocalStack, Ports


def doctor(*args: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    """Run ``tokenbooth doctor --json`` in this process: exit code, findings by id, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["doctor", "--json", *args])
    return code, {f["id"]: f for f in orjson.loads(out.getvalue())["checks"]}, err.getvalue()


def _until(what: str, done: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        time.sleep(0.2)


def test_a_healthy_stack_next_to_a_running_gateway_is_all_green(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    gateway = make_gateway([{"name": "sim", "base_url": sim.url}], ledger={"url": db, "flush_interval": 0.05})
    config = tmp_path / "tokenbooth.yaml"
    config.write_text(yaml.safe_dump({"port": gateway.port, "upstreams": [{"name": "sim", "base_url": sim.url}],
                                      "ledger": {"url": db}}))
    directory = tmp_path / "stack"
    init_stack(directory, stack_files(load_settings(environ={}), profile=FAST, chat=["dingtalk"]))
    ports = Ports(free_port(), free_port(), free_port())
    with LocalStack(directory, gateway=f"127.0.0.1:{gateway.port}", ports=ports) as stack:
        httpx.post(f"{gateway.url}/chat/completions", json={"model": "gpt-4o", "messages": [
            {"role": "user", "content": "hi"}]})
        httpx.put(f"{stack.url('pushgateway')}/metrics/job/nightly", content=b"tokenbooth_requests_total 1\n")
        prometheus = stack.url("prometheus")

        def evaluated() -> bool:
            groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
            targets = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
            alertmanagers = httpx.get(f"{prometheus}/api/v1/alertmanagers").json()["data"]["activeAlertmanagers"]
            return bool(groups and targets and alertmanagers) and all(t["health"] == "up" for t in targets) \
                and all(not g["lastEvaluation"].startswith("0001-") for g in groups)

        _until("every target up and every rule group evaluated", evaluated)
        code, found, err = doctor("--config", str(config), "--stack", str(directory))
    not_ok = {k: (f["status"], f["evidence"]) for k, f in found.items() if f["status"] not in ("ok", "skip")}
    assert not_ok == {} and code == 0, (not_ok, err)
    assert {k for k, f in found.items() if f["status"] == "skip"} == {"redis.ping"}  # no redis.url configured


def test_a_prometheus_without_honor_labels_rules_or_alertmanager_is_named_with_each_fix(tmp_path: Path) -> None:
    gateway, pushgateway = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"  # nothing listens on either
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules" / "no-such-file.yml")],
        "scrape_configs": [{"job_name": "tokenbooth", "static_configs": [{"targets": [gateway]}]},
                           {"job_name": "pushgateway", "static_configs": [{"targets": [pushgateway]}]}],
    }))
    port = free_port()
    command = [need("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    with serving(command, f"http://127.0.0.1:{port}") as prometheus:
        def scraped() -> bool:  # target discovery sends its first update after up to 5 s
            targets = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
            return len(targets) == 2 and all(t["lastScrape"] > "0001-01-02" for t in targets)

        _until("both targets scraped once", scraped)
        code, found, err = doctor("--prometheus", prometheus, "--gateway", gateway, "--pushgateway", pushgateway)
    assert code == 1 and err.startswith("tokenbooth: error: ")
    fails = {k: f for k, f in found.items() if f["status"] == "fail"}
    assert "connection refused" in fails["prometheus.targets"]["evidence"]
    assert "job 'pushgateway' scrapes the Pushgateway without honor_labels" in fails["prometheus.honor_labels"][
        "evidence"]
    assert "honor_labels: true" in fails["prometheus.honor_labels"]["fix"]
    assert "no rule groups loaded" in fails["prometheus.rules"]["evidence"]
    assert "rule_files" in fails["prometheus.rules"]["fix"]
    assert "no Alertmanager" in fails["prometheus.alertmanagers"]["evidence"]
    assert "no tokenbooth_* series" in fails["prometheus.series"]["evidence"]
    assert fails["gateway.health"]["evidence"].endswith("connection refused (nothing listens there)")
    assert "connection refused" in fails["pushgateway.groups"]["evidence"]


def test_a_pushgateway_group_past_the_stale_threshold_fails(tmp_path: Path) -> None:
    port = free_port()
    command = [need("pushgateway"), f"--web.listen-address=127.0.0.1:{port}",
               f"--persistence.file={tmp_path / 'pushgateway.data'}"]
    with serving(command, f"http://127.0.0.1:{port}") as url:
        httpx.put(f"{url}/metrics/job/nightly/instance/worker-1", content=b"tokenbooth_requests_total 3\n")
        settings = load_settings(overrides={"stack": {"pushgateway_stale": 3600}}, environ={})
        fresh = run_checks(Context(settings=settings, pushgateway=url), skip=["config", "upstreams", "ledger"])
        later = run_checks(Context(settings=settings, pushgateway=url, now=lambda: time.time() + 7200),
                           skip=["config", "upstreams", "ledger"])
    (now,) = [f for f in fresh.findings if f.id == "pushgateway.groups"]
    assert now.status == "ok" and "1 group(s)" in now.evidence
    (stale,) = [f for f in later.findings if f.id == "pushgateway.groups"]
    assert stale.status == "fail" and later.failed()
    assert "instance=worker-1,job=nightly (120 min)" in stale.evidence
    assert f"curl -X DELETE {url}/metrics/job/JOB" in stale.fix


def test_alerts_routed_to_a_receiver_that_sends_nowhere_or_silenced_are_found(tmp_path: Path) -> None:
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump({
        "route": {"receiver": "nobody", "routes": [{"receiver": "chat", "matchers": ['team="finance"']}]},
        "receivers": [{"name": "nobody"}, {"name": "chat", "webhook_configs": [{"url": "http://127.0.0.1:9/x"}]}],
    }))
    port = free_port()
    command = [need("alertmanager"), f"--config.file={tmp_path / 'alertmanager.yml'}",
               f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
               "--cluster.listen-address="]
    with serving(command, f"http://127.0.0.1:{port}") as url:
        code, found, _ = doctor("--alertmanager", url)
        assert code == 1
        route = found["alertmanager.route"]
        assert route["status"] == "fail" and "TokenboothModelDown (critical) -> nobody" in route["evidence"]
        assert "TokenboothCostPerHourHigh" not in route["evidence"]  # finance's alerts reach the chat receiver
        (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "chat"},
            "receivers": [{"name": "chat", "webhook_configs": [{"url": "http://127.0.0.1:9/x"}]}]}))
        assert httpx.post(f"{url}/-/reload").status_code == 200
        assert doctor("--alertmanager", url)[1]["alertmanager.route"]["status"] == "ok"
        now = time.time()
        httpx.post(f"{url}/api/v2/silences", json={
            "matchers": [{"name": "alertname", "value": "Tokenbooth.*", "isRegex": True, "isEqual": True}],
            "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60)),
            "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 3600)),
            "createdBy": "test", "comment": "maintenance"}).raise_for_status()
        code, found, _ = doctor("--alertmanager", url)
        strict, _, _ = doctor("--alertmanager", url, "--strict")
    silenced = found["alertmanager.route"]
    assert silenced["status"] == "warn" and "'maintenance'" in silenced["evidence"]
    assert silenced["fix"].startswith("expire it if it is no longer wanted: amtool silence expire ")
    assert (code, strict) == (0, 1)  # a warning fails only --strict

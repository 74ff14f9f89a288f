"""Alertmanager configuration: amtool validates and routes it, a real Alertmanager inhibits with it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, need, serving
from tokenbooth.stack.alertmanager import ROUTE_CASES

from .conftest import load, run


def test_amtool_accepts_the_config(stack_dir: Path) -> None:
    proc = run("amtool", ["check-config", "alertmanager.yml"], stack_dir)
    assert proc.returncode == 0, proc.stdout
    assert "4 receivers" in proc.stdout and "1 inhibit rules" in proc.stdout


@pytest.mark.parametrize(("labels", "receivers"), ROUTE_CASES, ids=[
    "cost-to-finance", "critical-pages-and-chats", "warning-to-chat", "slo-ticket-and-chat", "slo-page", "default"])
def test_amtool_routes_each_kind_of_alert(stack_dir: Path, labels: dict[str, str], receivers: tuple[str, ...]) -> None:
    proc = run("amtool", ["config", "routes", "test", "--config.file=alertmanager.yml",
                          f"--verify.receivers={','.join(receivers)}", *(f"{k}={v}" for k, v in labels.items())],
               stack_dir)
    assert proc.returncode == 0, proc.stdout


def test_receivers_cover_slack_email_pagerduty_webhook_and_say_resolved(stack_dir: Path) -> None:
    config = load(stack_dir / "alertmanager.yml")
    kinds = {kind for r in config["receivers"] for kind in r if kind.endswith("_configs")}
    assert kinds == {"slack_configs", "email_configs", "pagerduty_configs", "webhook_configs"}
    for receiver in config["receivers"]:
        for kind, entries in receiver.items():
            if kind.endswith("_configs"):
                assert all(e["send_resolved"] is True for e in entries), (receiver["name"], kind)
    assert config["route"]["group_by"] == ["alertname", "model"]
    chat = next(r for r in config["receivers"] if r["name"] == "platform-chat")
    assert chat["webhook_configs"][0]["url"] == "http://tokenbooth:8080/alertmanager/webhook/dingtalk"


@pytest.fixture
def alertmanager(stack_dir: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with serving([need("alertmanager"), f"--config.file={stack_dir / 'alertmanager.yml'}",
                  f"--storage.path={tmp_path}", f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                 f"http://127.0.0.1:{port}") as url:
        yield url


def _alert(severity: str, model: str) -> dict[str, Any]:
    return {"labels": {"alertname": "TokenboothHighErrorRate", "severity": severity, "team": "platform",
                       "model": model, "provider": "openai"},
            "annotations": {"summary": f"{model} failing"}}


def test_a_critical_inhibits_the_warning_of_the_same_alertname_and_model(alertmanager: str) -> None:
    alerts = [_alert("critical", "gpt-4o"), _alert("warning", "gpt-4o"), _alert("warning", "gpt-4o-mini")]
    httpx.post(f"{alertmanager}/api/v2/alerts", json=alerts).raise_for_status()
    deadline = time.monotonic() + 10
    while True:
        got = httpx.get(f"{alertmanager}/api/v2/alerts").json()
        states = {(a["labels"]["severity"], a["labels"]["model"]): a["status"] for a in got}
        if len(states) == 3 and states[("warning", "gpt-4o")]["state"] == "suppressed":
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.1)
    assert states[("warning", "gpt-4o")]["inhibitedBy"]
    assert states[("critical", "gpt-4o")]["state"] == "active"
    assert states[("warning", "gpt-4o-mini")]["state"] == "active"  # another model: not inhibited


def test_a_keys_mode_gateway_gets_its_admin_key_from_alertmanager(tmp_path: Path) -> None:
    from tokenbooth.config import load_settings
    from tokenbooth.stack.render import init_stack, stack_files

    for mode, expected in (("keys", {"type": "Bearer", "credentials_file": "secrets/gateway_admin_key"}),
                           ("open", None)):
        settings = load_settings(overrides={"auth": {"mode": mode}}, environ={})
        directory = tmp_path / mode
        init_stack(directory, stack_files(settings, chat=["dingtalk"]))
        config = load(directory / "alertmanager.yml")
        hooks = [h for r in config["receivers"] for h in r.get("webhook_configs", ())
                 if "/alertmanager/webhook/" in h["url"]]
        assert hooks and all(h.get("http_config", {}).get("authorization") == expected for h in hooks)
        assert run("amtool", ["check-config", "alertmanager.yml"], directory).returncode == 0
    assert "gateway_admin_key" in (tmp_path / "keys" / "secrets" / "README.md").read_text()

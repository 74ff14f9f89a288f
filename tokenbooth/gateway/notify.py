"""Alertmanager webhooks turned into chat-robot messages (PRODUCT.md F13).

Alertmanager's ``webhook_configs`` post to ``POST /alertmanager/webhook/{kind}``; the gateway
rewrites the payload into the robot's own format and posts it to the URL in ``notify.{kind}``:

- ``dingtalk``: a markdown message; with ``secret_env`` set, the URL is signed with
  ``timestamp`` and ``sign`` = base64(HMAC-SHA256(secret, "{timestamp}\\n{secret}")).
- ``wecom``: a WeCom (企业微信) group-robot markdown message.
- ``feishu``: an interactive card, red or orange while firing and green once resolved; signed
  in the body when ``secret_env`` is set.
- ``slack``: Block Kit blocks for an incoming webhook, with a plain ``text`` fallback.

Every message says whether the group is firing or resolved, and each alert's severity and summary.
The robot URLs hold access tokens: they never appear in logs or error messages. Configuration::

    notify:
      dingtalk: {url: "https://oapi.dingtalk.com/robot/send?access_token=...", secret_env: DINGTALK_SECRET}
      wecom: {url: "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=..."}
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from tokenbooth.config import NotifyConfig, RobotConfig, TimeoutConfig, environment_proxy
from tokenbooth.errors import (
    InvalidRequest,
    NotFound,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamInvalidResponse,
    UpstreamReadTimeout,
)
from tokenbooth.gateway.client import Pool

__all__ = ["KINDS", "PATH_PREFIX", "Notification", "Notifier", "dingtalk_sign", "feishu_sign", "parse_payload"]

PATH_PREFIX = "/alertmanager/webhook/"
KINDS = ("dingtalk", "wecom", "feishu", "slack")
_SHOWN = 10  # alerts listed in one message; the rest are counted
_LABELS = ("model", "provider", "upstream", "tool", "job", "instance", "slo")


@dataclass(frozen=True)
class Notification:
    """One Alertmanager webhook payload: a group of alerts and its state."""

    status: str  # firing or resolved
    alerts: list[dict[str, Any]]
    common_labels: dict[str, str]
    external_url: str

    @property
    def firing(self) -> bool:
        """Whether the group as a whole is still firing."""
        return self.status == "firing"

    def title(self) -> str:
        """``[FIRING:2] TokenboothHighErrorRate gpt-4o``, or ``[RESOLVED] ...``."""
        count = sum(1 for a in self.alerts if a.get("status") == "firing")
        state = f"FIRING:{count}" if self.firing else "RESOLVED"
        name = self.common_labels.get("alertname") or "alerts"
        model = self.common_labels.get("model")
        return f"[{state}] {name}" + (f" {model}" if model else "")

    def severity(self) -> str:
        """The highest severity in the group: critical, warning, or info."""
        severities = {str(a.get("labels", {}).get("severity", "")) for a in self.alerts}
        return "critical" if "critical" in severities else "warning" if "warning" in severities else "info"


def parse_payload(body: bytes) -> Notification:
    """Read Alertmanager's webhook JSON (version 4); a malformed payload is a 400."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The webhook body is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("alerts"), list) or data.get("status") not in (
            "firing", "resolved"):
        raise InvalidRequest("The webhook body is not an Alertmanager notification "
                             "(it needs 'status' firing or resolved, and a list of 'alerts').")
    alerts = [a for a in data["alerts"] if isinstance(a, dict)]
    labels = data.get("commonLabels")
    return Notification(data["status"], alerts, labels if isinstance(labels, dict) else {},
                        str(data.get("externalURL") or ""))


def _lines(n: Notification, bold: Callable[[str], str]) -> list[str]:
    """One block of lines per alert: severity and summary, description, labels, times."""
    out = []
    for alert in n.alerts[:_SHOWN]:
        labels, notes = alert.get("labels", {}), alert.get("annotations", {})
        state = "resolved" if alert.get("status") == "resolved" else str(labels.get("severity", "firing"))
        summary = notes.get("summary") or labels.get("alertname", "alert")
        lines = [f"{bold(state.upper())} {summary}"]
        if notes.get("description"):
            lines.append(str(notes["description"]))
        shown = ", ".join(f"{k}: {labels[k]}" for k in _LABELS if labels.get(k))
        if shown:
            lines.append(shown)
        start = _time(alert.get("startsAt"))
        if alert.get("status") == "resolved":
            lines.append(f"from {start} to {_time(alert.get('endsAt'))} UTC")
        elif start:
            lines.append(f"since {start} UTC")
        out.append("\n".join(lines))
    if len(n.alerts) > _SHOWN:
        out.append(f"... and {len(n.alerts) - _SHOWN} more")
    return out


def _time(value: Any) -> str:
    """``2026-01-02T03:04:05.678Z`` as ``2026-01-02 03:04:05``."""
    return str(value or "")[:19].replace("T", " ")


def _md(text: str) -> str:
    return f"**{text}**"


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's robot signature: base64(HMAC-SHA256(secret, "{timestamp}\\n{secret}"))."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def feishu_sign(secret: str, timestamp_s: int) -> str:
    """Feishu's robot signature: base64(HMAC-SHA256(key="{timestamp}\\n{secret}", message=""))."""
    digest = hmac.new(f"{timestamp_s}\n{secret}".encode(), b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def dingtalk_message(n: Notification) -> dict[str, Any]:
    """A DingTalk robot markdown message."""
    text = "\n\n".join([f"### {n.title()}", *(block.replace("\n", "\n\n") for block in _lines(n, _md))])
    return {"msgtype": "markdown", "markdown": {"title": n.title(), "text": text}}


def wecom_message(n: Notification) -> dict[str, Any]:
    """A WeCom group-robot markdown message (at most 4096 bytes)."""
    color = ("warning" if n.firing else "info")
    content = "\n".join([f'## <font color="{color}">{n.title()}</font>', *_lines(n, _md)])
    raw = content.encode()
    if len(raw) > 4096:
        content = raw[:4090].decode(errors="ignore") + "\n..."
    return {"msgtype": "markdown", "markdown": {"content": content}}


def feishu_message(n: Notification) -> dict[str, Any]:
    """A Feishu interactive card; the header's colour says critical, warning or resolved."""
    template = "green" if not n.firing else "red" if n.severity() == "critical" else "orange"
    elements: list[dict[str, Any]] = [{"tag": "div", "text": {"tag": "lark_md", "content": block}}
                                      for block in _lines(n, _md)]
    return {"msg_type": "interactive", "card": {
        "config": {"wide_screen_mode": True},
        "header": {"title": {"tag": "plain_text", "content": n.title()}, "template": template},
        "elements": elements}}


def slack_message(n: Notification) -> dict[str, Any]:
    """A Slack incoming-webhook message in Block Kit, with ``text`` as the notification fallback."""
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": n.title()[:150]}}]
    for block in _lines(n, lambda s: f"*{s}*"):
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": block[:3000]}})
    if n.external_url:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{n.external_url}|Alertmanager>"}]})
    return {"text": n.title(), "blocks": blocks}


class Notifier:
    """Posts Alertmanager notifications to the configured chat robots."""

    def __init__(self, config: NotifyConfig) -> None:
        self.config = config
        # one keep-alive pool per configured robot; HTTPS_PROXY / NO_PROXY apply as for upstreams
        wait = TimeoutConfig(connect=config.timeout, read=config.timeout, total=config.timeout)
        self._pools: dict[str, Pool] = {}
        for kind in KINDS:
            robot: RobotConfig | None = getattr(config, kind)
            if robot is not None:
                self._pools[kind] = Pool(_origin(robot.url), wait, upstream=f"{kind} robot",
                                         proxy=environment_proxy(robot.url, f"notify.{kind}"))

    def close(self) -> None:
        """Close the robots' idle connections."""
        for pool in self._pools.values():
            pool.close()

    def robot(self, kind: str) -> RobotConfig:
        """The robot for a ``kind`` in the URL path; unknown or unconfigured kinds are a 404."""
        if kind not in KINDS:
            raise NotFound(f"Unknown chat robot '{kind}': use one of {', '.join(KINDS)}.")
        robot: RobotConfig | None = getattr(self.config, kind)
        if robot is None:
            raise NotFound(f"No {kind} robot is configured: set notify.{kind}.url.")
        return robot

    def request(self, kind: str, n: Notification, now: float | None = None) -> tuple[str, dict[str, Any]]:
        """The URL and JSON body to post for one notification."""
        robot = self.robot(kind)
        now = time.time() if now is None else now
        url, secret = robot.url, robot.secret()
        if kind == "dingtalk":
            body = dingtalk_message(n)
            if secret:
                ts = int(now * 1000)
                query = urllib.parse.urlencode({"timestamp": ts, "sign": dingtalk_sign(secret, ts)})
                url = f"{url}{'&' if '?' in url else '?'}{query}"
        elif kind == "wecom":
            body = wecom_message(n)
        elif kind == "feishu":
            body = feishu_message(n)
            if secret:
                body = {"timestamp": str(int(now)), "sign": feishu_sign(secret, int(now)), **body}
        else:
            body = slack_message(n)
        return url, body

    async def handle(self, kind: str, body: bytes) -> bytes:
        """Convert one webhook call and post it; returns the JSON the gateway answers Alertmanager with."""
        self.robot(kind)
        url, message = self.request(kind, parse_payload(body))
        name = f"{kind} robot"
        target = urllib.parse.urlsplit(url)
        path = urllib.parse.quote(target.path or "/", safe=_PATH_SAFE)
        if target.query:
            path += "?" + urllib.parse.quote(target.query, safe=_QUERY_SAFE)
        try:
            resp = await self._pools[kind].request(path.encode("ascii"), orjson.dumps(message),
                                                   [(b"content-type", b"application/json")])
            try:
                reply = await resp.read()
            finally:
                resp.release()  # back to the pool when the answer was whole, closed otherwise
        except (UpstreamReadTimeout, UpstreamConnectTimeout) as exc:
            raise UpstreamReadTimeout(f"The {name} did not answer within {self.config.timeout:g} s.", name) from exc
        except UpstreamConnectError as exc:
            reason = exc.message.partition(": ")[2] or "connection failed"
            raise UpstreamConnectError(f"The {name} is unreachable ({reason}).", name) from exc
        _check_reply(name, kind, resp.status, reply)
        return orjson.dumps({"status": "sent", "robot": kind})


_PATH_SAFE = "/%:@!$&'()*+,;="  # what a robot URL's path may hold as is; the rest is percent-encoded
_QUERY_SAFE = _PATH_SAFE + "?"


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _check_reply(name: str, kind: str, status: int, reply: bytes) -> None:
    """Robots answer 200 with an error code in the body; a non-zero code is a refusal."""
    detail = reply[:200].decode(errors="replace")
    if status >= 300:
        raise UpstreamInvalidResponse(f"The {name} answered HTTP {status}: {detail}", name)
    if kind == "slack":
        return
    try:
        data = orjson.loads(reply)
    except orjson.JSONDecodeError:
        raise UpstreamInvalidResponse(f"The {name} answered with something that is not JSON: {detail}", name) from None
    code = data.get("errcode", data.get("code", data.get("StatusCode", 0))) if isinstance(data, dict) else 0
    if code not in (0, None):
        raise UpstreamInvalidResponse(f"The {name} refused the message: {detail}", name)

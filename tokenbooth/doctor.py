"""``tokenbooth doctor``: read-only checks of a deployment, each saying what it saw and what to do.

Each check has a stable id (``prometheus.honor_labels``), runs with a 2-second budget, and gives
one :class:`Finding`: ``ok``, ``warn`` or ``fail``, one line of evidence and, unless it is ``ok``,
one line of what to do. Checks that need a service run only when its URL is known: given as a
flag, found in the config (the gateway's own address), or in a ``stack up`` directory. The
monitoring checks (Prometheus, the Pushgateway, Alertmanager) live in
:mod:`tokenbooth.stack.diagnose`.

>>> report = run_checks(Context(settings=None, config_error="", gateway="http://127.0.0.1:8080"))  # doctest: +SKIP
>>> print(render_text(report, colour=False))  # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from tokenbooth.config import Settings
from tokenbooth.errors import TokenboothError

__all__ = ["Check", "Context", "DoctorFailed", "Finding", "Report", "all_checks", "render_json", "render_text",
           "run_checks"]

TIMEOUT = 2.0  # seconds, for each check and each request it makes
SCHEMA_VERSION = 1  # of the --json output, documented in docs/doctor.md

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class Finding:
    """What one check saw. ``fix`` is empty when there is nothing to do."""

    id: str
    status: Status
    evidence: str
    fix: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Context:
    """What the checks look at; a URL left None turns its checks off."""

    settings: Settings | None
    config_error: str = ""
    config_file: str | None = None
    ledger_url: str | None = None
    gateway: str | None = None
    prometheus: str | None = None
    pushgateway: str | None = None
    alertmanager: str | None = None
    now: Callable[[], float] = time.time  # injected, so tests move time instead of waiting


@dataclass(frozen=True)
class Check:
    """One check: its id, what it needs (a Context attribute that must be set), the function, and
    what to do when the service it asks raises :class:`Unreachable`."""

    id: str
    needs: str
    run: Callable[[Context], Finding]
    unreachable: str = ""


@dataclass(frozen=True)
class Report:
    findings: list[Finding] = field(default_factory=list)

    def failed(self, strict: bool = False) -> bool:
        """Whether the run should exit 1: a ``fail``, or with ``strict`` a ``warn`` too."""
        bad = {"fail", "warn"} if strict else {"fail"}
        return any(f.status in bad for f in self.findings)


def ok(evidence: str) -> tuple[Status, str, str]:
    return "ok", evidence, ""


def warn(evidence: str, fix: str) -> tuple[Status, str, str]:
    return "warn", evidence, fix


def fail(evidence: str, fix: str) -> tuple[Status, str, str]:
    return "fail", evidence, fix


class DoctorFailed(TokenboothError):
    """A check failed (or, with ``--strict``, warned); the findings were printed above."""


# ----- HTTP, with the failure said in words


class Unreachable(Exception):
    """A service did not answer: the message says how (refused, no such host, TLS, timeout)."""


def _reason(exc: BaseException) -> str:
    inner = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(inner, socket.gaierror):
        return f"the host name does not resolve (DNS: {inner.strerror})"
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(inner, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({inner.verify_message}); set SSL_CERT_FILE to its CA bundle"
    if isinstance(inner, ssl.SSLError):
        return f"TLS failed ({inner.reason or inner})"
    if isinstance(inner, TimeoutError | socket.timeout):
        return f"no answer within {TIMEOUT:g} s"
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror.lower()
    return str(inner)


def http(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, bytes]:
    """``(status, body)`` of one request; any HTTP status is an answer, no answer is :class:`Unreachable`."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback services: never a proxy
    try:
        with opener.open(request, timeout=TIMEOUT) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unreachable(f"{url}: {_reason(exc)}") from None


def get_json(url: str) -> Any:
    """The JSON of a 200 answer, or :class:`Unreachable` saying what came instead."""
    status, body = http(url)
    if status != 200:
        raise Unreachable(f"HTTP {status} from {url}: {body[:120].decode(errors='replace').strip()}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Unreachable(f"{url} did not answer JSON") from None


# ----- configuration


def _config_valid(ctx: Context) -> Finding:
    if ctx.settings is None:
        return Finding("config.valid", *fail(ctx.config_error, "correct the key the message names"))
    s = ctx.settings
    where = f"config '{ctx.config_file}'" if ctx.config_file else "the defaults and TOKENBOOTH_* variables"
    return Finding("config.valid", *ok(f"{where}: valid, {len(s.upstreams)} upstream(s), {len(s.routes)} "
                                       f"route(s), auth {s.auth_mode}"))


def _config_keys(ctx: Context) -> Finding:
    assert ctx.settings is not None
    from tokenbooth.errors import ConfigError

    try:
        unset = ctx.settings.check_upstream_keys()
    except ConfigError as exc:
        return Finding("config.keys", *fail(exc.message, "export each variable before `tokenbooth serve`"))
    if unset:
        return Finding("config.keys", *warn("; ".join(unset), "export the variable, or remove api_key_env if "
                                                               "clients bring their own upstream keys"))
    keyed = [u.name for u in ctx.settings.upstreams if u.api_key_env]
    return Finding("config.keys", *ok(f"every api_key_env is set ({', '.join(keyed)})" if keyed
                                      else "no upstream names a key variable: clients' own keys are forwarded"))


def _config_prices(ctx: Context) -> Finding:
    assert ctx.settings is not None
    from tokenbooth.errors import ConfigError
    from tokenbooth.pricing import load_price_file

    path = ctx.settings.pricing.price_file
    if path is None:
        return Finding("config.prices", *ok("no price file: genai-prices' bundled prices apply"))
    try:
        prices = load_price_file(path, ctx.settings.pricing.fx)
    except ConfigError as exc:
        return Finding("config.prices", *fail(exc.message, "fix the price file, or pricing.price_file"))
    return Finding("config.prices", *ok(f"price file '{path}' loads: {len(prices)} price(s)"))


def _config_paths(ctx: Context) -> Finding:
    assert ctx.settings is not None
    ledger = ctx.settings.ledger
    paths = {"ledger.spill_path": ledger.spill_path.parent, "ledger journal": ledger.journal_path().parent}
    if ledger.url.startswith("sqlite:///") and not ledger.url.endswith(":memory:"):
        paths["ledger.url"] = Path(ledger.url.removeprefix("sqlite:///")).parent
    missing = [f"{key} ({folder.resolve()})" for key, folder in paths.items() if not folder.is_dir()]
    if missing:
        return Finding("config.paths", *fail("these folders do not exist: " + ", ".join(missing),
                                             "create them; relative paths in a config file are read from its folder"))
    return Finding("config.paths", *ok("every folder the gateway writes to exists"))


# ----- upstreams


def _upstreams(ctx: Context) -> Finding:
    assert ctx.settings is not None
    problems, fine = [], []
    for u in ctx.settings.upstreams:
        headers = {"Authorization": f"Bearer {u.api_key()}"} if u.api_key() else {}
        try:
            status, _ = http(f"{u.base_url}/models", headers)
        except Unreachable as exc:
            problems.append(f"'{u.name}' {exc}")
            continue
        if status in (401, 403):
            problems.append(f"'{u.name}': GET /models got {status}: the key is refused"
                            + ("" if u.api_key() else " (no key configured)"))
        elif status >= 500:
            problems.append(f"'{u.name}': GET /models got {status}: the upstream is failing")
        else:
            fine.append(f"'{u.name}' {status}")
    if problems:
        return Finding("upstreams.reachable", *fail("; ".join(problems),
                                                    "check base_url, the network or proxy, and the key"))
    return Finding("upstreams.reachable", *ok("GET /models answered: " + ", ".join(fine) if fine else "no upstreams"))


# ----- ledger


def _ledger(ctx: Context) -> Finding:
    from sqlalchemy import insert, select

    from tokenbooth.errors import ConfigError
    from tokenbooth.ledger.schema import SCHEMA_VERSION as CURRENT
    from tokenbooth.ledger.schema import connect, meta, safe_url

    assert ctx.ledger_url is not None
    where = safe_url(ctx.ledger_url)
    try:
        engine = connect(ctx.ledger_url, create=False)
    except ConfigError as exc:
        return Finding("ledger.reachable", *fail(exc.message, "start the gateway once with this --db, or fix "
                                                              "ledger.url"))
    try:
        with engine.connect() as conn:
            version = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
            try:  # the write path, undone: a read-only or full database fails here
                conn.execute(insert(meta).values(key="doctor-probe", value="1"))
            finally:
                conn.rollback()
    except Exception as exc:  # a database error of any driver
        return Finding("ledger.reachable", *fail(f"{where}: a write (rolled back) failed: "
                                                 f"{str(exc).splitlines()[0]}",
                                                 "check the database's permissions, disk space and locks"))
    finally:
        engine.dispose()
    if version is None or int(version) < CURRENT:
        return Finding("ledger.reachable", *warn(f"{where}: schema version {version}, this tokenbooth has {CURRENT}",
                                                 "the gateway migrates it at its next start"))
    return Finding("ledger.reachable", *ok(f"{where}: schema {version}, a write and rollback succeeded"))


def _ledger_spill(ctx: Context) -> Finding:
    assert ctx.settings is not None
    path = ctx.settings.ledger.spill_path
    if not path.exists():
        return Finding("ledger.spill", *ok(f"no spill file at '{path}'"))
    with path.open("rb") as f:
        rows = sum(1 for _ in f)
    return Finding("ledger.spill", *warn(f"spill file '{path}' holds {rows} row(s) the database did not take",
                                         f"tokenbooth ledger replay {path}" + (
                                             f" --config {ctx.config_file}" if ctx.config_file else
                                             f" --db {ctx.ledger_url}" if ctx.ledger_url else "")))


def _ledger_journal(ctx: Context) -> Finding:
    assert ctx.settings is not None
    from tokenbooth.ledger.journal import pending

    directory = ctx.settings.ledger.journal_path()
    missing = pending(directory)
    if missing:
        return Finding("ledger.journal", *warn(f"the last gateway run ended without a clean shutdown: up to "
                                               f"{missing} calls may be missing from the ledger",
                                               "stop the gateway with SIGTERM (it drains and writes every row); "
                                               "the next start clears the journal"))
    return Finding("ledger.journal", *ok(f"journal '{directory}': the last run ended cleanly"))


def _token_truth(ctx: Context) -> Finding:
    from sqlalchemy import case, func, select

    from tokenbooth.errors import ConfigError
    from tokenbooth.ledger.schema import calls, connect

    assert ctx.ledger_url is not None and ctx.settings is not None
    try:
        engine = connect(ctx.ledger_url, create=False)
    except ConfigError as exc:
        return Finding("tokens.mismatch", *fail(exc.message, "see ledger.reachable"))
    since = dt.datetime.fromtimestamp(ctx.now(), dt.UTC).replace(tzinfo=None) - dt.timedelta(days=1)
    try:
        with engine.connect() as conn:
            checked, mismatched = conn.execute(select(
                func.count(), func.sum(case((calls.c.tokens_mismatch.is_(True), 1), else_=0)),
            ).where(calls.c.started_at >= since, calls.c.tokens_estimated.is_(False))).one()
    finally:
        engine.dispose()
    share = (mismatched or 0) / checked if checked else 0.0
    if share > 0.05:
        return Finding("tokens.mismatch", *warn(
            f"{mismatched} of {checked} reported calls in the last day ({share:.1%}) differ from the local "
            f"count by over {ctx.settings.tokens.mismatch_threshold:.0%}",
            "compare `tokenbooth report --by upstream` with the provider's bill: a relay may inflate usage"))
    return Finding("tokens.mismatch", *ok(f"{mismatched or 0} of {checked} reported calls in the last day "
                                          "differ from the local count"))


# ----- Redis, the gateway


def _redis(ctx: Context) -> Finding:
    from tokenbooth.control.resp import RedisAddress

    assert ctx.settings is not None and ctx.settings.redis.url is not None
    address = RedisAddress.parse(ctx.settings.redis.url)
    commands = []
    if address.password:
        auth = [address.username, address.password] if address.username else [address.password]
        commands.append(["AUTH", *auth])
    commands.append(["PING"])
    started = time.monotonic()
    try:
        if address.path:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(TIMEOUT)
            sock.connect(address.path)
        else:
            sock = socket.create_connection((address.host, address.port), timeout=TIMEOUT)
        with sock:
            if address.tls:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=address.host)
            for command in commands:
                sock.sendall(b"*%d\r\n" % len(command) + b"".join(
                    b"$%d\r\n%s\r\n" % (len(part.encode()), part.encode()) for part in command))
                reply = sock.recv(512)
    except OSError as exc:
        return Finding("redis.ping", *fail(f"{address.safe()}: {_reason(exc)}",
                                           "start Redis, or correct redis.url"))
    latency = (time.monotonic() - started) * 1000
    if not reply.startswith(b"+PONG"):
        return Finding("redis.ping", *fail(f"{address.safe()} answered {reply[:80]!r}",
                                           "check the password in redis.url"))
    if latency > ctx.settings.redis.timeout * 1000:
        return Finding("redis.ping", *warn(f"{address.safe()}: PONG in {latency:.0f} ms, over redis.timeout",
                                           "a Redis this slow counts as down: move it closer or raise redis.timeout"))
    return Finding("redis.ping", *ok(f"{address.safe()}: PONG in {latency:.1f} ms"))


def _gateway_health(ctx: Context) -> Finding:
    assert ctx.gateway is not None
    status, _ = http(f"{ctx.gateway}/healthz")
    if status != 200:
        return Finding("gateway.health", *fail(f"{ctx.gateway}/healthz answered {status}",
                                               "the gateway's log says why"))
    return Finding("gateway.health", *ok(f"{ctx.gateway}/healthz answered 200"))


def _gateway_metrics(ctx: Context) -> Finding:
    from tokenbooth.catalog import CATALOG

    assert ctx.gateway is not None
    status, body = http(f"{ctx.gateway}/metrics")
    text = body.decode(errors="replace")
    described = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}
    missing = sorted(spec.name for spec in CATALOG if spec.name not in described)
    if status != 200 or missing:
        return Finding("gateway.metrics", *fail(
            f"{ctx.gateway}/metrics (HTTP {status}) lacks {len(missing)} catalog metric(s): "
            + ", ".join(missing[:5]), "point --gateway at a tokenbooth gateway of this version"))
    return Finding("gateway.metrics", *ok(f"{ctx.gateway}/metrics carries all {len(CATALOG)} catalog metrics"))


def all_checks() -> list[Check]:
    """Every check, in the order they are reported."""
    from tokenbooth.stack import diagnose

    return [
        Check("config.valid", "", _config_valid),
        Check("config.keys", "settings", _config_keys),
        Check("config.prices", "settings", _config_prices),
        Check("config.paths", "settings", _config_paths),
        Check("upstreams.reachable", "settings", _upstreams),
        Check("ledger.reachable", "ledger_url", _ledger),
        Check("ledger.spill", "settings", _ledger_spill),
        Check("ledger.journal", "settings", _ledger_journal),
        Check("tokens.mismatch", "ledger_url", _token_truth),
        Check("redis.ping", "redis", _redis),
        Check("gateway.health", "gateway", _gateway_health, "start it: tokenbooth serve --config FILE"),
        Check("gateway.metrics", "gateway", _gateway_metrics, "see gateway.health"),
        *diagnose.CHECKS,
    ]


def _runnable(check: Check, ctx: Context) -> bool:
    if check.needs == "redis":
        return ctx.settings is not None and ctx.settings.redis.url is not None
    return not check.needs or getattr(ctx, check.needs) is not None


_WANTING = {"settings": "the config does not validate", "ledger_url": "no ledger (pass --config or --db)",
            "redis": "no redis.url", "gateway": "no --gateway", "prometheus": "no --prometheus",
            "pushgateway": "no --pushgateway", "alertmanager": "no --alertmanager"}


def _skipped(check_id: str, skip: Sequence[str]) -> bool:
    return any(check_id == s or check_id.startswith(s + ".") for s in skip)


def run_checks(ctx: Context, skip: Sequence[str] = ()) -> Report:
    """Run every check whose inputs are known, in parallel, each within :data:`TIMEOUT` seconds."""
    checks = all_checks()
    unknown = [s for s in skip if not any(c.id == s or c.id.startswith(s + ".") for c in checks)]
    if unknown:
        from tokenbooth.errors import UsageError

        raise UsageError(f"--skip {unknown[0]}: no such check; the ids are {', '.join(c.id for c in checks)}")
    chosen = [c for c in checks if _runnable(c, ctx) and not _skipped(c.id, skip)]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="tokenbooth-doctor")
    started = {c.id: time.monotonic() for c in chosen}
    futures = {c.id: pool.submit(c.run, ctx) for c in chosen}
    findings = []
    for check in checks:
        if check.id not in futures:
            reason = "skipped (--skip)" if _skipped(check.id, skip) else "not run: " + _WANTING[check.needs]
            findings.append(Finding(check.id, "skip", reason))
            continue
        left = max(0.0, started[check.id] + TIMEOUT + 0.5 - time.monotonic())
        try:
            found = futures[check.id].result(timeout=left)
        except Unreachable as exc:
            found = Finding(check.id, "fail", str(exc), check.unreachable)
        except concurrent.futures.TimeoutError:
            found = Finding(check.id, "fail", f"did not finish within {TIMEOUT:g} s", "the service is too slow to "
                                                                                       "answer; check its load")
        except Exception as exc:  # a check's own bug must not hide the others' findings
            found = Finding(check.id, "fail", f"the check itself failed: {exc.__class__.__name__}: {exc}",
                            "report this as a tokenbooth bug")
        findings.append(Finding(found.id, found.status, found.evidence, found.fix,
                                round(time.monotonic() - started[check.id], 3)))
    pool.shutdown(wait=False, cancel_futures=True)
    return Report(findings)


_MARK = {"ok": "✓", "warn": "!", "fail": "✗"}
_COLOUR = {"ok": "\x1b[32m", "warn": "\x1b[33m", "fail": "\x1b[31m"}


def render_text(report: Report, *, colour: bool) -> str:
    """One line per check that ran (mark, id, evidence), then its fix indented; then what was skipped."""
    ran = [f for f in report.findings if f.status != "skip"]
    width = max((len(f.id) for f in ran), default=0)
    out = []
    for f in ran:
        mark = f"{_COLOUR[f.status]}{_MARK[f.status]}\x1b[0m" if colour else _MARK[f.status]
        out.append(f"{mark} {f.id:<{width}}  {f.evidence}")
        if f.fix:
            out.append(f"  {'':<{width}}  fix: {f.fix}")
    skipped = [f"{f.id} ({f.evidence.removeprefix('not run: ')})" for f in report.findings if f.status == "skip"]
    if skipped:
        out.append("not run: " + ", ".join(skipped))
    counts = {s: sum(f.status == s for f in ran) for s in ("ok", "warn", "fail")}
    out.append(f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failure(s)")
    return "\n".join(out) + "\n"


def render_json(report: Report, *, strict: bool) -> str:
    """The findings as the JSON document described in docs/doctor.md."""
    return orjson.dumps({"schema": SCHEMA_VERSION, "ok": not report.failed(strict), "strict": strict,
                         "checks": [vars(f) for f in report.findings]}, option=orjson.OPT_INDENT_2).decode() + "\n"

"""The ``tokenbooth`` command: parse, build the config, call. Errors are one line and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from tokenbooth.errors import ConfigError, LedgerError, TokenboothError, UsageError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _via(proxy: str | None) -> str:
    """The start-up line's ' via proxy HOST:PORT', never the proxy's credentials."""
    if proxy is None:
        return ""
    parts = urlsplit(proxy)
    return f" via proxy {parts.hostname}:{parts.port or 80}"


def _redis_where(url: str) -> str:
    from tokenbooth.control.resp import RedisAddress

    return RedisAddress.parse(url).safe()


def _date(value: str) -> dt.date:
    today = dt.datetime.now(dt.UTC).date()
    named = {"today": today, "yesterday": today - dt.timedelta(days=1)}
    if value in named:
        return named[value]
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date; use YYYY-MM-DD, today or yesterday") from None


def _parser() -> _Parser:
    p = _Parser(prog="tokenbooth", description="Metering, monitoring and cost control for LLM API calls.")
    from tokenbooth import __version__

    p.add_argument("--version", action="version", version=f"tokenbooth {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="run the OpenAI-compatible metering gateway")
    s.add_argument("--config", "-c", help="YAML config file (or TOKENBOOTH_CONFIG)")
    s.add_argument("--upstream", help="send every model to this OpenAI-compatible base URL")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default 8080)")
    s.add_argument("--db", help="ledger database URL (default sqlite:///tokenbooth.db)")
    s.add_argument("--price-file", help="YAML price file for relays and private models")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--workers", type=int, help="gateway processes sharing the port (default 1)")

    m = sub.add_parser("simulate", help="run a simulated OpenAI-compatible upstream")
    m.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    m.add_argument("--port", type=int, default=8000, help="port to listen on, 0 for any free one (default 8000)")
    m.add_argument("--ttft-ms", type=float, default=0.0, help="median time to first token, ms (default 0)")
    m.add_argument("--token-ms", type=float, default=0.0, help="median time per output token, ms (default 0)")
    m.add_argument("--jitter", type=float, default=0.0, help="log-normal sigma applied to delays (default 0)")
    m.add_argument("--faults", default="",
                   help="fault rates, e.g. 429=0.05,500=0.02,timeout=0.01 (default none)")
    m.add_argument("--retry-after", type=float, default=1.0,
                   help="Retry-After seconds on simulated 429s (default 1)")
    m.add_argument("--timeout-s", type=float, default=30.0, help="how long a timeout fault stalls, s (default 30)")
    m.add_argument("--seed", type=int, help="random seed, for the same run twice (default: a new one each run)")

    d = sub.add_parser("demo", help="gateway + simulated upstream + traffic, on an embedded SQLite ledger")
    d.add_argument("--duration", type=float, default=60.0, help="seconds to run (Ctrl-C ends it sooner)")
    d.add_argument("--port", type=int, default=8080, help="gateway port")
    d.add_argument("--db", default="sqlite:///tokenbooth-demo.db", help="ledger database URL")
    d.add_argument("--concurrency", type=int, default=4, help="parallel simulated clients")

    r = sub.add_parser("report", help="cost and usage from the ledger")
    r.add_argument("--db", help="ledger database URL (default: the config's, or sqlite:///tokenbooth.db)")
    r.add_argument("--config", "-c", help="YAML config file, for its ledger URL")
    from tokenbooth.ledger.report import GROUPS

    r.add_argument("--by", choices=GROUPS, default="model")
    r.add_argument("--since", type=_date, help="first UTC day to include (YYYY-MM-DD, today, yesterday)")
    r.add_argument("--until", type=_date, help="first UTC day to leave out (YYYY-MM-DD, today, yesterday)")
    r.add_argument("--format", choices=["table", "csv", "json"], default="table")

    lg = sub.add_parser("ledger", help="ledger maintenance")
    lverbs = lg.add_subparsers(dest="ledger_command", required=True, parser_class=_Parser)
    rp = lverbs.add_parser("replay", help="load a spill file's rows into the ledger (rows it holds are skipped)")
    rp.add_argument("file", type=Path, help="the spill file, e.g. tokenbooth-ledger-spill.jsonl")
    rp.add_argument("--db", help="ledger database URL (default: the config's, or sqlite:///tokenbooth.db)")
    rp.add_argument("--config", "-c", help="YAML config file, for its ledger URL")

    pr = sub.add_parser("prices", help="show the price that applies to a model and where it comes from")
    pr.add_argument("model")
    pr.add_argument("--provider", default="", help="provider, e.g. openai, anthropic, deepseek")
    pr.add_argument("--upstream", dest="for_upstream", default="",
                    help="upstream name, for price-file entries bound to one")
    pr.add_argument("--price-file", help="YAML price file")
    pr.add_argument("--config", "-c", help="YAML config file, for its price file and FX rates")
    _stack_parser(sub)
    _keys_parser(sub)
    _doctor_parser(sub)
    b = sub.add_parser("budgets", help="each budget's limit, spent, reserved, remaining and reset time")
    b.add_argument("--config", "-c", help="YAML config file: its tenants' budgets, ledger and Redis")
    b.add_argument("--db", help="ledger database URL (default: the config's)")
    b.add_argument("--format", choices=["table", "json"], default="table")
    return p


def _expiry(value: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


def _keys_parser(sub: Any) -> None:
    k = sub.add_parser("keys", help="client keys: create, list, revoke (stored hashed in the ledger database)")
    verbs = k.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)

    def where(p: Any) -> None:
        p.add_argument("--config", "-c", help="YAML config file, for its ledger URL")
        p.add_argument("--db", help="ledger database URL (default: the config's, or sqlite:///tokenbooth.db)")

    c = verbs.add_parser("create", help="make a key; its secret is printed once, on the last line")
    c.add_argument("--tenant", required=True, help="the tenant its calls are billed to")
    c.add_argument("--name", help="a label, e.g. the app or person using it")
    c.add_argument("--budget", action="append", default=[], metavar="AMOUNT[CUR]/WINDOW",
                   help="e.g. 50/month, 300CNY/day, 5/total; ':soft' only counts (repeatable)")
    c.add_argument("--rpm", type=int, help="requests per minute")
    c.add_argument("--tpm", type=int, help="tokens per minute")
    c.add_argument("--concurrency", type=int, help="calls in flight at once")
    c.add_argument("--expires", type=_expiry, help="when it stops working, UTC (YYYY-MM-DD or YYYY-MM-DDTHH:MM)")
    where(c)
    ls = verbs.add_parser("list", help="every key: id, prefix, tenant, name, limits, created, last used, revoked")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    where(ls)
    r = verbs.add_parser("revoke", help="revoke a key by its id or prefix (every gateway stops taking it within 5 s)")
    r.add_argument("key", metavar="ID_OR_PREFIX")
    where(r)


def _doctor_parser(sub: Any) -> None:
    dr = sub.add_parser("doctor", help="check the config, ledger, gateway and monitoring stack; say what to fix")
    dr.add_argument("--config", "-c", help="YAML config file (or TOKENBOOTH_CONFIG): its upstreams, ledger, Redis")
    dr.add_argument("--db", help="ledger database URL (default: the config's, when --config is given)")
    dr.add_argument("--gateway", help="gateway base URL (default: the config's host and port, when --config is given)")
    dr.add_argument("--prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    dr.add_argument("--pushgateway", help="Pushgateway base URL, e.g. http://127.0.0.1:9091")
    dr.add_argument("--alertmanager", help="Alertmanager base URL, e.g. http://127.0.0.1:9093")
    dr.add_argument("--stack", type=Path, metavar="DIR",
                    help="a stack directory: the URLs its `stack up` uses, else the compose ports on localhost")
    dr.add_argument("--json", action="store_true", help="print the findings as JSON (docs/doctor.md)")
    dr.add_argument("--strict", action="store_true", help="exit 1 on a warning too")
    dr.add_argument("--skip", nargs="+", action="extend", default=[], metavar="ID",
                    help="leave out these checks, by id or prefix (e.g. upstreams, prometheus.windows)")


def _stack_parser(sub: Any) -> None:
    from tokenbooth.config import StackConfig

    st = sub.add_parser("stack", help="the monitoring stack: Prometheus rules, Alertmanager, Grafana, compose")
    verbs = st.add_subparsers(dest="stack_command", required=True, parser_class=_Parser)
    i = verbs.add_parser("init", help="write a ready-to-run monitoring directory")
    i.add_argument("directory", type=Path)
    i.add_argument("--config", "-c", help="YAML config file; its 'stack:' section holds the thresholds")
    i.add_argument("--force", action="store_true", help="overwrite files that exist")
    i.add_argument("--chat", action="append", default=[], metavar="KIND",
                   help="also notify through the gateway's adapter: dingtalk, wecom, feishu or slack (repeatable)")
    for name, field in StackConfig.model_fields.items():
        i.add_argument(f"--{name.replace('_', '-')}", dest=f"stack_{name}", metavar="VALUE",
                       help=f"threshold stack.{name} (default {field.default})")
    c = verbs.add_parser("check", help="validate a stack directory with promtool, amtool and PromQL checks")
    c.add_argument("directory", type=Path)
    u = verbs.add_parser("up", help="run local Prometheus, Alertmanager and Pushgateway on a stack directory")
    u.add_argument("directory", type=Path)
    u.add_argument("--gateway", default="127.0.0.1:8080", help="the gateway to scrape, HOST:PORT")
    u.add_argument("--prometheus-port", type=int, default=9090)
    u.add_argument("--alertmanager-port", type=int, default=9093)
    u.add_argument("--pushgateway-port", type=int, default=9091)


def _settings(args: argparse.Namespace) -> Any:
    from tokenbooth.config import load_settings, one_line_upstream

    overrides: dict[str, Any] = {}
    for name in ("host", "port", "log_level", "workers"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "upstream", None):
        overrides["upstreams"] = [one_line_upstream(args.upstream)]
    if getattr(args, "db", None):
        overrides["ledger"] = {"url": args.db}
    if getattr(args, "price_file", None):
        overrides["pricing"] = {"price_file": args.price_file}
    return load_settings(getattr(args, "config", None), overrides)


def _serve(args: argparse.Namespace) -> None:
    from tokenbooth.gateway.app import build_gateway
    from tokenbooth.gateway.server import GatewayServer, bind_socket, report_lost_rows, run_workers, uvicorn_config
    from tokenbooth.ledger.schema import connect, engine_for, safe_url

    settings = _settings(args)
    if not settings.upstreams:
        raise ConfigError("No upstreams configured: pass --upstream URL, or a config file with 'upstreams'.")
    # Everything that can refuse comes before anything is printed or created: the settings, the
    # upstreams' proxies, the price file, the ledger's URL, the port; the banner comes once the
    # gateway listens.
    settings.check_exposure()
    settings.check_shared_state()
    unset_keys = settings.check_upstream_keys()
    ups = ", ".join(f"{u.name} ({u.provider}) {u.base_url}{_via(u.proxy_url())}" for u in settings.upstreams)
    if settings.pricing.price_file:
        from tokenbooth.pricing import load_price_file

        load_price_file(settings.pricing.price_file, settings.pricing.fx)
    if settings.ledger.enabled:
        engine_for(settings.ledger.url).dispose()  # a URL no driver serves; creates nothing
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ConfigError(f"Cannot listen on {settings.host}:{settings.port}: {reason}") from None
    port = sock.getsockname()[1]  # the one chosen, for --port 0
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for warning in unset_keys:
        print(f"tokenbooth: warning: {warning}", file=sys.stderr, flush=True)
    report_lost_rows(settings)
    workers = f" on {settings.workers} workers" if settings.workers > 1 else ""

    def banner() -> None:
        print(f"tokenbooth gateway on http://{settings.host}:{port}/v1{workers} -> {ups}", flush=True)
        print(f"  ledger {safe_url(settings.ledger.url) if settings.ledger.enabled else 'off'}; "
              f"metrics http://{settings.host}:{port}/metrics; auth {settings.auth_mode}"
              + (f"; budgets and limits in Redis {_redis_where(settings.redis.url)}" if settings.redis.url and
                 settings.auth_mode == "keys" else ""), flush=True)

    if settings.workers > 1:
        if settings.ledger.enabled:
            connect(settings.ledger.url).dispose()  # create the schema once, before the workers race to
        sock.listen(2048)
        banner()
        run_workers(settings, sock)
        return
    gateway = build_gateway(settings)
    GatewayServer(uvicorn_config(gateway, settings), on_started=banner).run(sockets=[sock])


def _simulate(args: argparse.Namespace) -> None:
    from tokenbooth.simulate import SimConfig, Simulator, parse_faults

    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        raise UsageError(f"--faults: {exc}") from None
    config = SimConfig(ttft_ms=args.ttft_ms, token_ms=args.token_ms, jitter=args.jitter, faults=faults,
                       retry_after=args.retry_after, timeout_s=args.timeout_s, seed=args.seed)

    async def run() -> None:
        sim = Simulator(config)
        try:
            port = await sim.start(args.host, args.port)
        except OSError as exc:
            raise ConfigError(f"Cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
        print(f"simulated upstream on http://{args.host}:{port}/v1", flush=True)
        try:
            await _wait_for_signal()
        finally:
            await sim.stop()

    _run_async(run())


async def _wait_for_signal() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _run_async(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(coro)


def _existing_ledger(args: argparse.Namespace) -> Any:
    """An engine for the ledger that ``--db`` or the config names, which must exist already."""
    from tokenbooth.ledger.schema import connect

    url = args.db or _settings(argparse.Namespace(config=args.config)).ledger.url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            raise ConfigError(f"No ledger at '{path}': run the gateway first, or pass --db URL.")
    return connect(url, create=False)


def _report(args: argparse.Namespace) -> None:
    from tokenbooth.ledger.report import render, report

    engine = _existing_ledger(args)
    try:
        rows = report(engine, args.by, args.since, args.until)
    finally:
        engine.dispose()
    sys.stdout.write(render(rows, args.format, args.by))


def _ledger(args: argparse.Namespace) -> None:
    from tokenbooth.ledger.replay import replay

    if not args.file.is_file():  # the file first: it is what the user named
        raise UsageError(f"No spill file at '{args.file}'" + (": it is a directory" if args.file.exists() else "")
                         + "; the gateway writes it at ledger.spill_path (tokenbooth-ledger-spill.jsonl by default)")
    engine = _existing_ledger(args)
    try:
        result = replay(engine, args.file)
    finally:
        engine.dispose()
    for line in result.bad:
        print(f"tokenbooth: not loaded: {line}", file=sys.stderr)
    print(f"{result.inserted} rows inserted, {result.skipped} already in the ledger; '{args.file}' is left "
          "as it was: remove it once no gateway writes to it any more (a replay again skips what it holds)")
    if result.bad:
        raise LedgerError(f"{len(result.bad)} lines of '{args.file}' were not loaded (listed above); "
                          "the others were")


def _prices(args: argparse.Namespace) -> None:
    from tokenbooth.pricing import PriceBook, load_price_file

    settings = _settings(args)
    fx = settings.pricing.fx
    local = load_price_file(settings.pricing.price_file, fx) if settings.pricing.price_file else []
    book = PriceBook(local, fx)
    known = book.known_providers() | {u.provider for u in settings.upstreams}
    if args.provider and args.provider not in known:
        raise UsageError(f"Unknown provider '{args.provider}'; known: {', '.join(sorted(known))}")
    price = book.lookup(args.model, provider=args.provider, upstream=args.for_upstream)
    if price is None:
        raise ConfigError(
            f"No price known for model '{args.model}'"
            + (f" from provider '{args.provider}'" if args.provider else "")
            + ": its calls will be counted as unpriced. Add it to a price file (--price-file)."
        )
    where = "price file " + str(settings.pricing.price_file) if price.source == "price-file" else \
        f"genai-prices (provider {price.provider}, model {price.model})"
    print(f"{args.model}: {where}")
    print(f"  currency       {price.currency}" + (f"  (1 {price.currency} = {fx[price.currency]} USD)"
                                                  if price.currency != "USD" else ""))
    if price.effective:
        print(f"  effective      {price.effective.isoformat()}")
    if price.tiered is not None:
        print("  note           rates rise with prompt length (tiered); base rates shown")
    for label, value in (("input", price.input), ("output", price.output), ("cached input", price.cached_input),
                         ("cache write", price.cache_write), ("reasoning", price.reasoning)):
        print(f"  {label:<14} {value.normalize():f} per 1M tokens")
    if price.per_request:
        print(f"  per request    {price.per_request.normalize():f}")


def _demo(args: argparse.Namespace) -> None:
    from tokenbooth.demo import run_demo

    _run_async(run_demo(duration=args.duration, port=args.port, db=args.db, concurrency=args.concurrency))


def _stack(args: argparse.Namespace) -> None:
    if args.stack_command == "init":
        from tokenbooth.config import load_settings
        from tokenbooth.stack.render import init_stack, stack_files

        thresholds = {k.removeprefix("stack_"): v for k, v in vars(args).items()
                      if k.startswith("stack_") and k != "stack_command" and v is not None}
        settings = load_settings(args.config, {"stack": thresholds} if thresholds else None)
        written = init_stack(args.directory, stack_files(settings, chat=args.chat), force=args.force)
        print(f"wrote {len(written)} files to {args.directory}; next: tokenbooth stack check {args.directory}")
    elif args.stack_command == "check":
        from tokenbooth.stack.check import StackCheckFailed, format_results, run_checks

        results = run_checks(args.directory)
        sys.stdout.write(format_results(results))
        failed = [r.name for r in results if r.status == "fail"]
        if failed:
            raise StackCheckFailed(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    else:
        from tokenbooth.stack.up import LocalStack, Ports

        ports = Ports(args.prometheus_port, args.alertmanager_port, args.pushgateway_port)
        stack = LocalStack(args.directory, gateway=args.gateway, ports=ports)
        stack.start()
        try:
            print(f"prometheus {stack.url('prometheus')}  alertmanager {stack.url('alertmanager')}  "
                  f"pushgateway {stack.url('pushgateway')}  (scraping {args.gateway}; Ctrl-C stops)", flush=True)
            _run_async(_wait_for_signal())
        finally:
            stack.stop()
        print("stopped", flush=True)


def _key_store(args: argparse.Namespace, *, must_exist: bool) -> Any:
    from tokenbooth.control.keys import KeyStore
    from tokenbooth.ledger.schema import connect

    if must_exist:
        engine = _existing_ledger(args)
        engine.dispose()
    url = args.db or _settings(argparse.Namespace(config=args.config)).ledger.url
    return KeyStore(connect(url))


def _keys(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from tokenbooth.config import BudgetConfig, LimitsConfig
    from tokenbooth.control.keys import describe_limits

    if args.keys_command == "create":
        budgets = []
        for text in args.budget:
            try:
                budgets.append(BudgetConfig.model_validate(text))
            except ValidationError as exc:
                raise UsageError(f"--budget {text!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}; "
                                 "write AMOUNT[CURRENCY]/WINDOW with window day, month or total") from None
        try:
            limits = LimitsConfig(rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise UsageError(f"--{err['loc'][0]}: {err['msg']}") from None
        fx = _settings(argparse.Namespace(config=args.config)).pricing.fx
        unknown = sorted({b.currency for b in budgets if b.currency not in fx})
        if unknown:
            raise UsageError(f"--budget in {unknown[0]}: the gateway has no exchange rate for it; configure "
                             f"pricing.fx.{unknown[0]} (known: {', '.join(sorted(fx))})")
        store = _key_store(args, must_exist=False)
        try:
            key, secret = store.create(args.tenant, name=args.name, budgets=tuple(budgets), limits=limits,
                                       expires_at=args.expires)
        finally:
            store.engine.dispose()
        print(f"created key {key.id} (prefix {key.prefix}) for tenant {key.tenant}"
              + (f"; {describe_limits(key)}" if describe_limits(key) != "-" else ""))
        print("the key is shown once and stored only as a hash; keep it now:")
        print(secret)
        return
    store = _key_store(args, must_exist=True)
    try:
        if args.keys_command == "revoke":
            key = store.revoke(args.key)
            print(f"revoked key {key.id} (prefix {key.prefix}, tenant {key.tenant}) at "
                  f"{key.revoked_at.isoformat() if key.revoked_at else '?'}Z; gateways refuse it within 5 s")
            return
        from tokenbooth.control.keys import render_keys

        sys.stdout.write(render_keys(store.list(), args.format))
    finally:
        store.engine.dispose()


def _budgets(args: argparse.Namespace) -> None:
    from tokenbooth.control.status import budget_status, render_budgets

    settings = _settings(argparse.Namespace(config=args.config, db=args.db))
    engine = _existing_ledger(argparse.Namespace(config=args.config, db=args.db))
    try:
        rows = budget_status(settings, engine)
    finally:
        engine.dispose()
    sys.stdout.write(render_budgets(rows, args.format))


def _doctor(args: argparse.Namespace) -> None:
    import os

    from tokenbooth.doctor import Context, DoctorFailed, render_json, render_text, run_checks
    from tokenbooth.stack.up import stack_urls

    config_file = args.config or os.environ.get("TOKENBOOTH_CONFIG")
    settings, problem = None, ""
    try:
        settings = _settings(argparse.Namespace(config=args.config, db=args.db))
    except ConfigError as exc:
        problem = exc.message
    urls = stack_urls(args.stack) if args.stack else {}
    if settings is not None and config_file and "gateway" not in urls:
        urls["gateway"] = f"{settings.host}:{settings.port}"
    for name in ("gateway", "prometheus", "pushgateway", "alertmanager"):
        if getattr(args, name):
            urls[name] = getattr(args, name)
    urls = {k: (v if "://" in v else f"http://{v}").rstrip("/") for k, v in urls.items()}
    ledger = args.db or (settings.ledger.url if settings is not None and config_file and settings.ledger.enabled
                         else None)
    ctx = Context(settings=settings, config_error=problem, config_file=config_file, ledger_url=ledger,
                  gateway=urls.get("gateway"), prometheus=urls.get("prometheus"),
                  pushgateway=urls.get("pushgateway"), alertmanager=urls.get("alertmanager"))
    report = run_checks(ctx, args.skip)
    if args.json:
        sys.stdout.write(render_json(report, strict=args.strict))
    else:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        sys.stdout.write(render_text(report, colour=colour))
    sys.stdout.flush()
    if report.failed(args.strict):
        bad = [f.id for f in report.findings if f.status == "fail" or (args.strict and f.status == "warn")]
        raise DoctorFailed(f"{len(bad)} check(s) need attention: {', '.join(bad)}")


_COMMANDS = {"serve": _serve, "keys": _keys, "budgets": _budgets,
             "simulate": _simulate, "demo": _demo, "report": _report, "ledger": _ledger,
             "prices": _prices, "stack": _stack, "doctor": _doctor}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokenbooth`` console script."""
    try:
        args = _parser().parse_args(argv)
        _COMMANDS[args.command](args)
    except TokenboothError as exc:
        print(f"tokenbooth: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

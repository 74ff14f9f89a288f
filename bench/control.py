"""Control overhead: what keys, a hard budget and rate limits cost a call, in process and in Redis.

    python bench/control.py [--duration 10] [--concurrency 1 16] [--repeat 3]
    python bench/control.py --micro [--calls 5000] [--repeat 3]

Needs wrk (Debian package ``wrk``) and redis-server (``redis-server``). The same chat calls as
``overhead.py`` go to four targets, one after another within each repeat:

- **direct**: the simulated upstream;
- **plain**: ``tokenbooth serve`` as ``overhead.py`` runs it (open mode, no control);
- **keys**: ``auth.mode: keys``, every call carrying a ``tb-...`` key of tenant ``acme``, whose
  hard monthly budget and RPM and TPM limits are kept in process;
- **keys+redis**: the same, with the budget and limits kept in a ``redis-server`` on loopback
  that the script starts itself (one EVALSHA to admit a call, one to settle it). Far from its
  limits, as here, a call is admitted without waiting for Redis's answer (``redis.fast_admission``);
- **keys+redis wait**: the same with ``redis.fast_admission: false``: every admission waits for
  Redis, as every call does near a limit.

Budgets and limits are far beyond what a run can use, so nothing is refused: a non-2xx answer
is an error. The gateways run on CPU 0; wrk, the simulated upstream and redis-server on CPU 1.
Figures: requests/s, p50/p99 from wrk, latency added against direct, the gateway's CPU time
per call and redis-server's (both user + system from /proc), and EVALSHAs Redis ran per call.

``--micro`` measures, in this process (pinned to CPU 0, on uvloop), the CPU time of one EVALSHA
round trip through redis-py's asyncio client and through tokenbooth's own
:class:`~tokenbooth.control.resp.RedisConnection`, replaying the admission and settlement
commands the gateway sends (recorded from :class:`~tokenbooth.control.redis.RedisStore`).
redis-py is not a dependency of tokenbooth: ``.venv/bin/pip install redis`` for this mode.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import hiredis
import httpx
from _common import (
    GATEWAY_CPU,
    LOAD_CPU,
    TB,
    Processes,
    can_pin,
    cpu_seconds,
    exit_on_sigterm,
    free_port,
    log_tail,
    pinned,
    rss_mb,
    run_wrk,
    start_simulator,
    start_tokenbooth,
)

BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":16}'
TENANT = "acme"
# Far beyond a run: ~20,000 calls/s is 1.2 million a minute and 40 million tokens a minute.
BUDGET = {"window": "month", "limit": "100000", "currency": "USD", "mode": "hard"}
LIMITS = {"rpm": 100_000_000, "tpm": 10_000_000_000}


# --- redis-server -------------------------------------------------------------------------------

def redis_command(port: int, *args: Any) -> Any:
    """One command on a fresh connection to the benchmark's redis-server; its reply, decoded by hiredis."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(hiredis.pack_command(args))
        reader = hiredis.Reader()
        while (reply := reader.gets()) is False:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("redis-server closed the connection")
            reader.feed(data)
        return reply


def start_redis(procs: Processes, tmp: Path) -> tuple[subprocess.Popen[str], int]:
    """Start a throw-away redis-server (no persistence) on the load CPU; returns it and its port."""
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is needed: apt-get install redis-server")
    port = free_port()
    log = tmp / "redis.log"
    cmd = ["redis-server", "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1",
           "--dir", str(tmp)]
    with log.open("w") as out:
        proc = procs.start(pinned(LOAD_CPU, cmd), grace=10, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"redis-server exited with code {proc.returncode}" + log_tail(log))
        try:
            if redis_command(port, "PING") == b"PONG":
                return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not answer PING within 10 s" + log_tail(log))


def evalsha_calls(port: int) -> int:
    """EVALSHA commands the server has run since it started (``INFO commandstats``)."""
    for line in redis_command(port, "INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


# --- gateway load -------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    url: str  # the /v1 base
    headers: dict[str, str]
    proc: subprocess.Popen[str] | None = None  # the gateway; None for direct
    log: Path | None = None
    uses_redis: bool = False


def create_key(db: Path) -> str:
    """A new key of the benchmark's tenant in the ledger at ``db``: the secret, from the CLI's last line."""
    done = subprocess.run([*TB, "keys", "create", "--tenant", TENANT, "--name", "bench", "--db", f"sqlite:///{db}"],
                          capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("tb-"):
        raise SystemExit(f"tokenbooth keys create failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return lines[-1].strip()


def keyed_config(path: Path, redis_port: int | None, fast: bool = True) -> Path:
    """Write the keys-mode config: one tenant, a hard monthly budget, RPM and TPM; Redis if a port is given."""
    budget = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in BUDGET.items())
    limits = ", ".join(f"{k}: {v}" for k, v in LIMITS.items())
    text = (f"auth: {{mode: keys}}\n"
            f"tenants:\n"
            f"  {TENANT}:\n"
            f"    budgets: [{{{budget}}}]\n"
            f"    limits: {{{limits}}}\n")
    if redis_port is not None:
        text += f"redis: {{url: 'redis://127.0.0.1:{redis_port}/0', fast_admission: {str(fast).lower()}}}\n"
    path.write_text(text)
    return path


def start_keyed(procs: Processes, name: str, sim_url: str, tmp: Path, redis_port: int | None,
                fast: bool = True) -> Target:
    db = tmp / f"{name.replace(' ', '-')}.db"
    secret = create_key(db)  # before the gateway starts, so its first look at the keys finds it
    config = keyed_config(tmp / f"{name.replace(' ', '-')}.yaml", redis_port, fast)
    log = tmp / f"{name.replace(' ', '-')}.log"
    gw, url = start_tokenbooth(procs, sim_url, db, log=log, config=config)
    return Target(name, url, {"Authorization": f"Bearer {secret}"}, gw, log, uses_redis=redis_port is not None)


def checked_call(t: Target) -> None:
    """One call that must be answered 200 with a completion (and, for a keyed gateway, a call
    without its key that must be refused with 401), so a misconfigured gateway fails loudly."""
    url = f"{t.url}/chat/completions"
    problem = ""
    try:
        r = httpx.post(url, content=BODY, headers={"Content-Type": "application/json", **t.headers}, timeout=10)
        if r.status_code != 200 or "choices" not in r.json():
            problem = f"answered {r.status_code}: {r.text[:500]}"
        elif "Authorization" in t.headers:
            bare = httpx.post(url, content=BODY, headers={"Content-Type": "application/json"}, timeout=10)
            if bare.status_code != 401:
                problem = f"answered {bare.status_code} to a call without a key (expected 401): {bare.text[:300]}"
    except (httpx.HTTPError, ValueError) as exc:
        problem = f"{exc.__class__.__name__}: {exc}"
    if problem:
        raise SystemExit(f"{t.name} at {url} {problem}" + log_tail(t.log))


def measure(t: Target, concurrency: int, duration: float, tmp: Path, redis: tuple[int, int]) -> dict[str, float]:
    redis_pid, redis_port = redis
    gw_before = cpu_seconds(t.proc.pid) if t.proc else 0.0
    redis_before, evals_before = cpu_seconds(redis_pid), evalsha_calls(redis_port)
    try:
        result = run_wrk(f"{t.url}/chat/completions", BODY, concurrency, duration, tmp, t.headers)
    except RuntimeError as exc:
        raise SystemExit(f"{t.name}: {exc}" + log_tail(t.log)) from None
    calls = max(result["requests"], 1)
    if t.proc:
        result["cpu_ms"] = (cpu_seconds(t.proc.pid) - gw_before) * 1000 / calls
    result["redis_ms"] = (cpu_seconds(redis_pid) - redis_before) * 1000 / calls
    result["evalsha"] = (evalsha_calls(redis_port) - evals_before) / calls
    return result


def load(args: argparse.Namespace) -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    with exit_on_sigterm(), tempfile.TemporaryDirectory() as tmpdir, Processes() as procs:
        tmp = Path(tmpdir)
        redis_proc, redis_port = start_redis(procs, tmp)
        sim_url = start_simulator(procs)
        plain, plain_url = start_tokenbooth(procs, sim_url, tmp / "plain.db", log=tmp / "plain.log")
        targets = [
            Target("direct", sim_url, {}),
            Target("plain", plain_url, {}, plain, tmp / "plain.log"),
            start_keyed(procs, "keys", sim_url, tmp, None),
            start_keyed(procs, "keys+redis", sim_url, tmp, redis_port),
            start_keyed(procs, "keys+redis wait", sim_url, tmp, redis_port, fast=False),
        ]
        for t in targets:
            checked_call(t)
        redis = (redis_proc.pid, redis_port)
        pinning = "gateways pinned to CPU 0, wrk, upstream and redis-server to CPU 1" if can_pin() else "unpinned"
        print(f"# tokenbooth control overhead: chat, median of {args.repeat} runs of {args.duration:.0f} s, {pinning}")
        print("| target | conc | rps | p50 ms | p99 ms | added p50 ms | added p99 ms | gateway CPU ms/call "
              "| Redis CPU ms/call | EVALSHA/call | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        errors = 0.0
        for conc in args.concurrency:
            for t in targets[1:]:
                run_wrk(f"{t.url}/chat/completions", BODY, conc, 2, tmp, t.headers)  # warm-up
            runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
            for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every target
                for t in targets:
                    runs[t.name].append(measure(t, conc, args.duration, tmp, redis))
            med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
            direct = med["direct"]
            for t in targets:
                m = med[t.name]
                errors += sum(r["errors"] for r in runs[t.name])
                added = (f"{m['p50'] - direct['p50']:.3f} | {m['p99'] - direct['p99']:.3f}" if t.proc else "- | -")
                cpu = f"{m['cpu_ms']:.3f}" if t.proc else "-"
                rds = f"{m['redis_ms']:.3f} | {m['evalsha']:.2f}" if t.uses_redis else "- | -"
                print(f"| {t.name} | {conc} | {m['rps']:.0f} | {m['p50']:.3f} | {m['p99']:.3f} | {added} | {cpu} "
                      f"| {rds} | {sum(r['errors'] for r in runs[t.name]):.0f} |", flush=True)
        print("\ngateway RSS after load: "
              + ", ".join(f"{t.name} {rss_mb(t.proc.pid):.1f} MB" for t in targets if t.proc))
        for t in targets:  # anything a gateway logged at warning level or above
            if t.log is not None and any(w in t.log.read_text(errors="replace")
                                         for w in ("WARNING", "ERROR", "Traceback")):
                print(f"\n{t.name} logged warnings or errors:" + log_tail(t.log))
        if errors:
            raise SystemExit(f"{errors:.0f} calls were answered with an error (non-2xx or socket errors): "
                             "the figures above do not measure admitted calls")


# --- micro: one EVALSHA round trip, redis-py against RedisConnection -----------------------------

class _Recorder:
    """Stands in for a RedisStore's connection and keeps every command the store sends."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.commands: list[tuple[Any, ...]] = []

    async def execute(self, *args: Any) -> Any:
        self.commands.append(args)
        return await self.conn.execute(*args)

    async def execute_packed(self, command: bytes) -> Any:
        import hiredis

        reader = hiredis.Reader()
        reader.feed(command)
        args = reader.gets()  # the command as its arguments, for redis-py to send too
        self.commands.append(tuple(a.decode() for a in args))
        return await self.conn.execute_packed(command)

    async def close(self) -> None:
        await self.conn.close()


async def gateway_commands(port: int, call_id: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The EVALSHA commands that admit and settle one call of the benchmark's tenant (a hard
    monthly budget, RPM and TPM, as the load benchmark configures), as RedisStore sends them."""
    from zoneinfo import ZoneInfo

    from tokenbooth.config import BudgetConfig, LimitsConfig
    from tokenbooth.control.policy import budget_check, rate_checks, to_units
    from tokenbooth.control.redis import RedisStore

    now = time.time()
    budget = budget_check(BudgetConfig.model_validate(BUDGET), tenant=TENANT, key_id=None, now=now,
                          zone=ZoneInfo("UTC"))
    rpm, tpm = rate_checks(LimitsConfig.model_validate(LIMITS), tenant=TENANT, key_id=None)
    # a chat call of ~30 tokens at max_tokens 16 reserves about this much
    checks = [budget, rpm, tpm]
    amounts = [to_units(Decimal("0.00002"), up=True), 1, 30]
    store = RedisStore(f"redis://127.0.0.1:{port}/0")
    recorder = _Recorder(store.conn)
    store.conn = recorder  # type: ignore[assignment]
    try:
        first = await store.admit("seed-" + call_id, checks, amounts, now, now + 600)
        for i in first.need_seed:  # a new budget is seeded from the ledger first; here it is empty
            await store.seed(checks[i], 0)
        recorder.commands.clear()
        admission = await store.admit(call_id, checks, amounts, now, now + 600)
        if admission.refused is not None or admission.need_seed:
            raise SystemExit(f"the recorded admission was not admitted: {admission}")
        await store.settle(call_id, checks, amounts, [to_units(Decimal("0.000015")), 1, 28], now)
    finally:
        await store.close()
    evals = [c for c in recorder.commands if c[0] == "EVALSHA"]
    if len(evals) != 2:
        raise SystemExit(f"expected one EVALSHA to admit and one to settle, RedisStore sent {recorder.commands}")
    return evals[0], evals[1]


def _with_id(cmd: tuple[Any, ...], old: str, new: str) -> tuple[Any, ...]:
    return tuple(a.replace(old, new) if isinstance(a, str) else a for a in cmd)


async def _timed(execute: Callable[..., Awaitable[Any]], commands: Sequence[tuple[Any, ...]],
                 redis_pid: int) -> tuple[float, float, float]:
    """CPU seconds of this process, wall seconds and redis-server CPU seconds for ``commands``,
    each awaited before the next is sent."""
    cpu0, wall0, server0 = time.process_time(), time.perf_counter(), cpu_seconds(redis_pid)
    for cmd in commands:
        await execute(*cmd)
    return time.process_time() - cpu0, time.perf_counter() - wall0, cpu_seconds(redis_pid) - server0


async def micro_run(port: int, redis_pid: int, calls: int, repeat: int, pinning: str) -> None:
    try:
        import redis
        import redis.asyncio as aioredis
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        raise SystemExit("--micro compares against redis-py: .venv/bin/pip install redis "
                         "(for this benchmark only; tokenbooth does not use it)") from None
    from tokenbooth.control.resp import RedisAddress, RedisConnection

    base = "base-00000000"  # the length of the gateway's call ids; every replayed id has it too
    admit, settle = await gateway_commands(port, base)
    lean = RedisConnection(RedisAddress(port=port), timeout=5)
    pyclient = aioredis.Redis(host="127.0.0.1", port=port, protocol=2, single_connection_client=True)

    async def py_evalsha(*cmd: Any) -> Any:
        return await pyclient.evalsha(*cmd[1:])  # EVALSHA sha numkeys keys... args...

    clients: dict[str, Callable[..., Awaitable[Any]]] = {"redis-py": py_evalsha, "RedisConnection": lean.execute}
    parser = {"redis-py": "hiredis" if HIREDIS_AVAILABLE else "pure Python", "RedisConnection": "hiredis"}

    short = {"redis-py": "py", "RedisConnection": "tb"}

    def commands(tag: str, n: int) -> list[tuple[Any, ...]]:
        """``n`` EVALSHAs: a new call admitted, then settled, and so on; ``tag`` is 4 characters."""
        out: list[tuple[Any, ...]] = []
        for i in range(n // 2):
            call = f"{tag}-{i:08d}"
            out += (_with_id(admit, base, call), _with_id(settle, base, call))
        return out

    for name, execute in clients.items():  # warm-up: connections opened, code paths hot
        for cmd in commands(f"w-{short[name]}", 400):
            reply = await execute(*cmd)
            if cmd[1] == admit[1] and reply[0] != b"ok":  # the timed runs replay only admitted calls
                raise SystemExit(f"{name}: the replayed admission was answered {reply!r}")
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in clients}
    try:
        for rep in range(repeat):  # interleaved, so drift on a shared machine hits both
            for name, execute in clients.items():
                cmds = commands(f"{rep:02d}{short[name]}", calls)
                results[name].append(await _timed(execute, cmds, redis_pid))
    finally:
        await lean.close()
        await pyclient.aclose()
    n = calls // 2 * 2
    print(f"# one EVALSHA round trip (the gateway's admission and settlement scripts, alternating): "
          f"median of {repeat} runs of {n} calls each, uvloop, {pinning}")
    print(f"redis-py {redis.__version__}, hiredis {hiredis.__version__}; time.process_time() of this process")
    print("| client | RESP parser | CPU µs/EVALSHA | wall µs/EVALSHA | redis-server CPU µs/EVALSHA |")
    print("|---|---|---|---|---|")
    cpu: dict[str, float] = {}
    for name, rs in results.items():
        cpu[name], wall, server = (statistics.median(r[i] for r in rs) * 1e6 / n for i in range(3))
        print(f"| {name} | {parser[name]} | {cpu[name]:.1f} | {wall:.1f} | {server:.1f} |")
    stats = await lean.execute("INFO", "commandstats")
    print("EVALSHA inside Redis (INFO commandstats): "
          + next(line.split(",usec_per_call=")[1].split(",")[0] + " µs per call" for line in stats.decode().split()
                 if line.startswith("cmdstat_evalsha:")))
    print(f"\nredis-py spends {cpu['redis-py'] / cpu['RedisConnection']:.1f}× the CPU of RedisConnection per "
          f"EVALSHA: {2 * (cpu['redis-py'] - cpu['RedisConnection']):.0f} µs more per gateway call (admit + settle)")


def micro(args: argparse.Namespace) -> None:
    import uvloop

    pin = can_pin()
    with exit_on_sigterm(), tempfile.TemporaryDirectory() as tmpdir, Processes() as procs:
        redis_proc, port = start_redis(procs, Path(tmpdir))  # on the load CPU
        if pin:  # and this process where the gateway runs (after starting redis-server, which inherits it)
            os.sched_setaffinity(0, {GATEWAY_CPU})
        pinning = f"pinned to CPU {GATEWAY_CPU}, redis-server to CPU {LOAD_CPU}" if pin else "unpinned"
        uvloop.run(micro_run(port, redis_proc.pid, args.calls, args.repeat, pinning))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario; medians are reported")
    parser.add_argument("--micro", action="store_true",
                        help="instead: CPU per EVALSHA, redis-py's asyncio client against RedisConnection")
    parser.add_argument("--calls", type=int, default=5000, help="EVALSHAs per client and run in --micro")
    args = parser.parse_args()
    if args.micro:
        micro(args)
    else:
        load(args)


if __name__ == "__main__":
    main()

"""Gateway overhead: the same calls direct to the simulated upstream and through tokenbooth.

    python bench/overhead.py [--duration 10] [--concurrency 1 16] [--stream]

Needs wrk (Debian package ``wrk``). The simulated upstream answers at once, so every
microsecond measured through the gateway is the gateway's. The gateway runs with
metering and an SQLite ledger on, pinned to CPU 0; wrk and the upstream share CPU 1.
Figures: requests/s, p50/p99 latency from wrk, added latency against direct, and the
gateway's CPU time per call from /proc (user + system).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TB = [sys.executable, "-m", "tokenbooth.cli"]
BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":16}'
STREAM_BODY = BODY[:-1] + ',"stream":true,"stream_options":{"include_usage":true}}'
CLK = os.sysconf("SC_CLK_TCK")


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu), *cmd]
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str) -> None:
    for _ in range(400):
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def run_wrk(url: str, body: str, concurrency: int, duration: float, tmp: Path) -> dict[str, float]:
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{body}]]\n"
    )
    out = subprocess.run(
        pinned(1, ["wrk", "-t1", f"-c{concurrency}", f"-d{int(duration)}s", "--latency", "-s", str(script), url]),
        capture_output=True, text=True, check=True,
    ).stdout
    result = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--stream", action="store_true", help="also measure streamed calls")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario; medians are reported")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sim = subprocess.Popen(pinned(1, [*TB, "simulate", "--port", "0", "--seed", "1"]),
                               stdout=subprocess.PIPE, text=True)
        assert sim.stdout is not None
        sim_url = re.search(r"http://\S+/v1", sim.stdout.readline()).group(0)  # type: ignore[union-attr]
        port = free_port()
        gw = subprocess.Popen(pinned(0, [*TB, "serve", "--upstream", sim_url, "--port", str(port),
                                         "--db", f"sqlite:///{tmp / 'ledger.db'}", "--log-level", "warning"]),
                              stdout=subprocess.DEVNULL)
        gw_url = f"http://127.0.0.1:{port}/v1"
        try:
            wait_up(f"http://127.0.0.1:{port}/healthz")
            scenarios = [("chat", BODY, c) for c in args.concurrency]
            if args.stream:
                scenarios += [("chat-stream", STREAM_BODY, c) for c in args.concurrency]
            print(f"# tokenbooth overhead: median of {args.repeat} runs of {args.duration:.0f} s, "
                  "gateway pinned to CPU 0")
            print("| scenario | conc | direct rps | gateway rps | direct p50 ms | gateway p50 ms | added p50 ms "
                  "| direct p99 ms | gateway p99 ms | added p99 ms | gateway CPU ms/call | errors |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for name, body, conc in scenarios:
                run_wrk(f"{gw_url}/chat/completions", body, conc, 2, tmp)  # warm-up
                runs = []
                for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits both sides
                    d = run_wrk(f"{sim_url}/chat/completions", body, conc, args.duration, tmp)
                    before = cpu_seconds(gw.pid)
                    v = run_wrk(f"{gw_url}/chat/completions", body, conc, args.duration, tmp)
                    v["cpu_ms"] = (cpu_seconds(gw.pid) - before) * 1000 / v["requests"]
                    runs.append((d, v))
                direct = {k: statistics.median(d[k] for d, _ in runs) for k in runs[0][0]}
                via = {k: statistics.median(v[k] for _, v in runs) for k in runs[0][1]}
                cpu_ms = via["cpu_ms"]
                print(f"| {name} | {conc} | {direct['rps']:.0f} | {via['rps']:.0f} | {direct['p50']:.3f} | "
                      f"{via['p50']:.3f} | {via['p50'] - direct['p50']:.3f} | {direct['p99']:.3f} | "
                      f"{via['p99']:.3f} | {via['p99'] - direct['p99']:.3f} | {cpu_ms:.3f} | "
                      f"{via['errors']:.0f} |", flush=True)
            print(f"\ngateway RSS after load: {rss_mb(gw.pid):.1f} MB")
        finally:
            gw.send_signal(signal.SIGTERM)
            gw.wait(60)
            sim.send_signal(signal.SIGINT)
            sim.wait(10)


if __name__ == "__main__":
    main()

"""After a burst: does the gateway let go of its upstream connections and its memory?

    python bench/burst.py [--calls 2000] [--keepalive 5]

A simulated upstream that takes 300 ms to answer gets ``--calls`` chat calls at once through
``tokenbooth serve`` (``upstreams[].timeout.keepalive`` set to ``--keepalive``), so the gateway
opens about that many upstream connections. Printed: the gateway's RSS at rest, at the burst's
peak and once the connections have been idle past the keep-alive (plus 3 s), and the upstream
connections established at the peak and afterwards (counted in ``/proc/net/tcp``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
from _common import GATEWAY_CPU, LOAD_CPU, TB, Processes, free_port, pinned, rss_mb, wait_up

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a burst"}], "max_tokens": 16}


def established(port: int) -> int:
    """TCP connections in state ESTABLISHED whose remote port is ``port`` (IPv4, loopback)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[3] == "01":
            count += 1
    return count


async def burst(url: str, calls: int) -> int:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one() -> int:
            async with session.post(f"{url}/chat/completions", json=BODY) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(calls)))
    return sum(s == 200 for s in statuses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--keepalive", type=float, default=5.0, help="upstreams[].timeout.keepalive, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir, Processes() as procs:
        tmp = Path(tmpdir)
        sim_port = free_port()
        procs.start(pinned(LOAD_CPU, [*TB, "simulate", "--port", str(sim_port), "--ttft-ms", "300"]),
                    stdout=subprocess.DEVNULL)
        wait_up(f"http://127.0.0.1:{sim_port}/v1/models", timeout=30)
        port = free_port()
        config = tmp / "burst.yaml"
        config.write_text(json.dumps({
            "port": port, "ledger": {"url": f"sqlite:///{tmp / 'burst.db'}"},
            "upstreams": [{"name": "sim", "base_url": f"http://127.0.0.1:{sim_port}/v1", "models": ["*"],
                           "timeout": {"keepalive": args.keepalive}}]}))
        gw = procs.start(pinned(GATEWAY_CPU, [*TB, "serve", "--config", str(config), "--log-level", "warning"]))
        url = f"http://127.0.0.1:{port}/v1"
        wait_up(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=gw)
        asyncio.run(burst(url, 10))  # warm: prices, tokenizer, first connections
        time.sleep(args.keepalive + 1)
        rest = rss_mb(gw.pid)
        peak_rss, peak_conns = rest, 0

        async def watched() -> int:
            nonlocal peak_rss, peak_conns
            task = asyncio.create_task(burst(url, args.calls))
            while not task.done():
                peak_rss = max(peak_rss, rss_mb(gw.pid))
                peak_conns = max(peak_conns, established(sim_port))
                await asyncio.sleep(0.05)
            return await task

        ok = asyncio.run(watched())
        time.sleep(args.keepalive + 3)
        after, conns = rss_mb(gw.pid), established(sim_port)
        print(f"{ok} of {args.calls} calls answered 200")
        print(f"RSS at rest {rest:.1f} MB, at the peak {peak_rss:.1f} MB, "
              f"{args.keepalive + 3:.0f} s after {after:.1f} MB")
        print(f"upstream connections: {peak_conns} at the peak, {conns} after the keep-alive")


if __name__ == "__main__":
    main()

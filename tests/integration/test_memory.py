"""Resident memory stays flat under sustained load: nothing in the gateway grows with the call count.

The 2-minute soak runs at a modest rate; growth of a few hundred bytes per call only shows at
tens of thousands of calls. (Found this way: a circuit-breaker window of one entry per call,
and a prepared-statement cache filling with one INSERT per batch size.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_cli import Gateway

_BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}'


def _wrk(url: str, seconds: int, script: Path) -> int:
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.fail("wrk is not installed: run scripts/system-deps.sh as root, or 'apt-get install wrk'")
    out = subprocess.run([wrk, "-t1", "-c16", f"-d{seconds}s", "-s", str(script), f"{url}/chat/completions"],
                         capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    match = re.search(r"(\d+) requests in", out)
    assert match and "Non-2xx" not in out, out
    return int(match.group(1))


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def test_resident_memory_stays_flat_over_tens_of_thousands_of_calls(tmp_path: Path, sim_url: str) -> None:
    script = tmp_path / "post.lua"
    script.write_text(f"wrk.method = 'POST'\nwrk.headers['Content-Type'] = 'application/json'\nwrk.body = '{_BODY}'\n")
    gw = Gateway(tmp_path, sim_url)
    try:
        _wrk(gw.url, 3, script)  # pools, caches and allocator arenas reach their working size
        before = _rss_kib(gw.proc.pid)
        calls = _wrk(gw.url, 6, script)
        after = _rss_kib(gw.proc.pid)
    finally:
        code, err = gw.stop()
    assert code == 0, err
    assert calls >= 10_000, f"only {calls} calls in 6 s"
    grown = (after - before) * 1024
    assert grown < 40 * calls, f"RSS grew {grown / 1024:.0f} KiB over {calls} calls ({grown / calls:.0f} B per call)"

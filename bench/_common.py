"""Helpers shared by the benchmarks in ``bench/``: processes, CPU pinning, /proc readers and wrk.

The scripts import this module as ``_common``: when a script runs as ``python bench/NAME.py``,
its own directory is the first entry of ``sys.path``.

Every process a benchmark starts goes through :class:`Processes`, which starts each one in its
own session (so a Ctrl-C in the terminal reaches the benchmark, not the servers under test, and
the benchmark decides the order of shutdown) and, on leaving its ``with`` block for any reason,
stops every process group it started: SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import httpx

__all__ = [
    "CLK",
    "GATEWAY_CPU",
    "LOAD_CPU",
    "TB",
    "Processes",
    "can_pin",
    "cpu_seconds",
    "exit_on_sigterm",
    "free_port",
    "log_tail",
    "pinned",
    "rss_mb",
    "run_wrk",
    "start_simulator",
    "start_tokenbooth",
    "tokenbooth_command",
    "tree_cpu_seconds",
    "tree_pids",
    "tree_rss_mb",
    "wait_up",
]

TB = [sys.executable, "-m", "tokenbooth.cli"]
CLK = os.sysconf("SC_CLK_TCK")
GATEWAY_CPU = 0  # the gateway under test
LOAD_CPU = 1  # wrk and the simulated upstream


def can_pin() -> bool:
    """True when ``taskset`` exists and this process may run on at least two CPUs."""
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) > 1


def pinned(cpu: int, cmd: Sequence[str]) -> list[str]:
    """``cmd`` prefixed with ``taskset -c CPU`` where the machine allows it, else unchanged."""
    if can_pin():
        return ["taskset", "-c", str(cpu), *cmd]
    return list(cmd)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, *, timeout: float = 20.0, proc: subprocess.Popen[str] | None = None,
            log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits first. A failure message
    ends with the last lines of ``log``, where the server's output went."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with code {proc.returncode} before it came up"
                             + log_tail(log))
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up within {timeout:.0f} s" + log_tail(log))


def log_tail(log: Path | None, lines: int = 30) -> str:
    """The last ``lines`` lines of ``log``, indented, for an error message ("" without a log)."""
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log.name} ---\n" + "\n".join(f"  {line}" for line in tail)


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads), in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every live descendant of it, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process tree: user + system of each live process, plus what their reaped
    children used (cutime + cstime), so a worker that exits between two readings still counts."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            fields = _stat_fields(p)
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / CLK


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_rss_mb(pid: int) -> float:
    """Sum of the resident set sizes of a process tree, in MiB (shared pages count once per process)."""
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += rss_mb(p)
    return total


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return {"us": value / 1000, "ms": value, "s": value * 1000, "m": value * 60_000}[unit]


UNIQUE = "@N@"  # in a body given to run_wrk: replaced by a counter, so that every request differs


def _lua(body: str, headers: Mapping[str, str]) -> str:
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    if UNIQUE in body:
        run = os.urandom(4).hex()  # wrk's counter starts at 0 in every run: the run's own prefix keeps them apart
        template = body.replace("%", "%%").replace(UNIQUE, f"{run}-%d")
        lines += [f"local template = [==[{template}]==]", "local n = 0", "request = function()", "  n = n + 1",
                  "  return wrk.format(nil, nil, nil, string.format(template, n))", "end"]
    else:
        lines.append(f"wrk.body = [==[{body}]==]")
    return "\n".join(lines) + "\n"


def run_wrk(url: str, body: str, concurrency: int, duration: float, tmp: Path,
            headers: Mapping[str, str] | None = None) -> dict[str, float]:
    """POST ``body`` to ``url`` with wrk (one thread, ``concurrency`` keep-alive connections); a body
    holding ``UNIQUE`` gets a counter there, a different number in every request.

    Returns ``rps``, ``requests`` (completed), ``p50`` and ``p99`` in ms (whole response: for a
    stream, until its last byte) and ``errors`` (non-2xx/3xx answers plus socket errors).
    wrk runs on the load CPU.
    """
    script = tmp / f"post-{os.getpid()}.lua"
    script.write_text(_lua(body, headers or {}))
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "30s",
           "--latency", "-s", str(script), url]
    done = subprocess.run(pinned(LOAD_CPU, cmd), capture_output=True, text=True)
    out = done.stdout
    if done.returncode != 0 or "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed (exit {done.returncode}) against {url}:\n{out}{done.stderr}")

    def grab(pattern: str) -> str:
        m = re.search(pattern, out, re.M)
        if not m:
            raise RuntimeError(f"cannot find {pattern!r} in wrk's output:\n{out}")
        return m.group(1)

    result = {
        "rps": float(grab(r"Requests/sec:\s+([\d.]+)")),
        "requests": float(grab(r"(\d+) requests in")),
        "p50": _ms(grab(r"^\s+50%\s+(\S+)")),
        "p99": _ms(grab(r"^\s+99%\s+(\S+)")),
    }
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    result["errors"] = float(errors)
    return result


class Processes:
    """Starts servers for a benchmark and stops all of them when its ``with`` block ends.

    >>> with Processes() as procs:
    ...     sim = procs.start(["tokenbooth", "simulate", "--port", "0"], stdout=subprocess.PIPE)
    """

    def __init__(self) -> None:
        self._procs: list[tuple[subprocess.Popen[str], signal.Signals, float]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()

    def start(self, cmd: Sequence[str], *, stop_signal: signal.Signals = signal.SIGTERM, grace: float = 60.0,
              env: Mapping[str, str] | None = None, cwd: Path | None = None,
              stdout: int | IO[str] | None = subprocess.DEVNULL,
              stderr: int | IO[str] | None = None) -> subprocess.Popen[str]:
        """Start ``cmd`` in a new session; :meth:`stop_all` sends it ``stop_signal`` and waits
        up to ``grace`` seconds before killing its whole process group."""
        proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, cwd=cwd, stdout=stdout,
                                stderr=stderr, text=True, start_new_session=True)
        self._procs.append((proc, stop_signal, grace))
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """Stop one process started here (and its process group)."""
        for entry in list(self._procs):
            if entry[0] is proc:
                self._procs.remove(entry)
                _stop(*entry)

    def stop_all(self) -> None:
        """Stop every process still running, the most recently started first. A Ctrl-C meanwhile
        cuts the grace periods short but still stops every one of them."""
        interrupted = False
        while self._procs:
            proc, sig, grace = self._procs.pop()
            try:
                _stop(proc, sig, 1.0 if interrupted else grace)
            except KeyboardInterrupt:
                interrupted = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if interrupted:
            raise KeyboardInterrupt


def _stop(proc: subprocess.Popen[str], sig: signal.Signals, grace: float) -> None:
    # Each process leads its own session, so its pid is its process group id: signalling the
    # group also reaches any worker it forked.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        print(f"warning: pid {proc.pid} ignored {sig.name} for {grace:.0f} s; killing it", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``SystemExit`` while inside, so ``finally`` blocks and
    :class:`Processes` clean up as they do on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def start_simulator(procs: Processes, stderr: int | IO[str] | None = None) -> str:
    """Start ``tokenbooth simulate`` (0 ms latency, no faults) on the load CPU; returns its ``/v1`` URL.
    ``stderr``: where its error output goes (a file, to keep aiohttp's Tracebacks), else the terminal."""
    sim = procs.start(pinned(LOAD_CPU, [*TB, "simulate", "--port", "0", "--seed", "1"]),
                      stop_signal=signal.SIGINT, grace=10, stdout=subprocess.PIPE, stderr=stderr)
    assert sim.stdout is not None
    line = sim.stdout.readline()
    m = re.search(r"http://\S+/v1", line)
    if not m:
        raise SystemExit(f"the simulated upstream did not start (it printed {line!r})")
    return m.group(0)


def tokenbooth_command(upstream: str, port: int, db: Path, config: Path | None = None) -> list[str]:
    """``tokenbooth serve`` in the one-line form, metering and SQLite ledger on (the defaults);
    with ``config``, that YAML file supplies every other setting (the flags still win)."""
    extra = ["--config", str(config)] if config is not None else []
    return [*TB, "serve", *extra, "--upstream", upstream, "--port", str(port), "--db", f"sqlite:///{db}",
            "--log-level", "warning"]


def start_tokenbooth(procs: Processes, upstream: str, db: Path, log: Path | None = None,
                     config: Path | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start ``tokenbooth serve`` on the gateway CPU with metering and an SQLite ledger at ``db``
    (and the YAML ``config`` file, if given); returns the process and its ``/v1`` URL once
    ``/healthz`` answers. Its output goes to ``log`` when given (else stderr stays on the terminal)."""
    port = free_port()
    cmd = pinned(GATEWAY_CPU, tokenbooth_command(upstream, port, db, config))
    if log is None:
        gw = procs.start(cmd)
    else:
        with log.open("w") as out:
            gw = procs.start(cmd, stdout=out, stderr=subprocess.STDOUT)
    wait_up(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=gw, log=log)
    return gw, f"http://127.0.0.1:{port}/v1"

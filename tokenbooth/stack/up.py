"""``tokenbooth stack up DIR``: Prometheus, Alertmanager and the Pushgateway as local processes.

For machines without Docker: the Debian packages' binaries run on the stack's own files. The
configuration names hosts as docker compose does (``tokenbooth:8080``, ``alertmanager:9093``),
so the files are copied to ``DIR/.run/`` with those names replaced by local addresses, and each
process keeps its data (Prometheus's TSDB, Alertmanager's silences, the Pushgateway's persistence
file) and log there, never in the packages' shared /var/lib/prometheus. :meth:`LocalStack.stop`
(or leaving the ``with`` block, or Ctrl-C in the CLI) ends all three: SIGTERM, then SIGKILL after
a grace period.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tokenbooth.errors import ConfigError
from tokenbooth.stack.alertmanager import COMPOSE_GATEWAY
from tokenbooth.stack.prometheus import COMPOSE_TARGETS
from tokenbooth.stack.tools import find_tool
from tokenbooth.stack.yamlfile import dump_yaml

__all__ = ["LocalStack", "Ports", "stack_urls"]

# Where docker compose publishes the stack on the host (the generated README says the same).
_COMPOSE_URLS = {"gateway": "http://127.0.0.1:8080", "prometheus": "http://127.0.0.1:9090",
                 "alertmanager": "http://127.0.0.1:9093", "pushgateway": "http://127.0.0.1:9091"}


def stack_urls(directory: Path) -> dict[str, str]:
    """The URLs of a stack directory's services: those of its running ``stack up`` (``.run/urls.json``),
    else where docker compose publishes them."""
    path = directory / ".run" / "urls.json"
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory: pass the one `tokenbooth stack init` wrote.")
    try:
        found: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dict(_COMPOSE_URLS)
    return found


@dataclass(frozen=True)
class Ports:
    """Where the three local processes listen (on 127.0.0.1)."""

    prometheus: int = 9090
    alertmanager: int = 9093
    pushgateway: int = 9091


class LocalStack:
    """Prometheus, Alertmanager and the Pushgateway on a stack directory's configuration.

    >>> with LocalStack(Path("monitoring"), gateway="127.0.0.1:8080") as stack:  # doctest: +SKIP
    ...     print(stack.url("prometheus"))
    """

    def __init__(self, directory: Path, gateway: str = "127.0.0.1:8080", ports: Ports = Ports()) -> None:
        self.directory = directory.resolve()
        self.run_dir = self.directory / ".run"
        self.gateway = gateway
        self.ports = ports
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, name: str) -> str:
        """The base URL of ``prometheus``, ``alertmanager`` or ``pushgateway``."""
        return f"http://127.0.0.1:{getattr(self.ports, name)}"

    def _local(self, target: str) -> str:
        local = {COMPOSE_TARGETS["tokenbooth"]: self.gateway,
                 COMPOSE_TARGETS["tokenbooth-pushgateway"]: f"127.0.0.1:{self.ports.pushgateway}",
                 COMPOSE_TARGETS["tokenbooth-alertmanager"]: f"127.0.0.1:{self.ports.alertmanager}",
                 COMPOSE_TARGETS["tokenbooth-prometheus"]: f"127.0.0.1:{self.ports.prometheus}"}
        return local.get(target, target)

    def prepare(self) -> tuple[Path, Path]:
        """Write the local copies of ``prometheus.yml`` and ``alertmanager.yml``; returns their paths."""
        for rel in ("prometheus.yml", "alertmanager.yml"):
            if not (self.directory / rel).is_file():
                raise ConfigError(f"{self.directory} has no {rel}: write the stack with `tokenbooth stack init`.")
        self.run_dir.mkdir(exist_ok=True)
        prom: dict[str, Any] = yaml.safe_load((self.directory / "prometheus.yml").read_text(encoding="utf-8"))
        prom["rule_files"] = [str(self.directory / f) for f in prom.get("rule_files", [])]
        for section in [*prom.get("scrape_configs", []), *prom.get("alerting", {}).get("alertmanagers", [])]:
            for static in section.get("static_configs", []):
                static["targets"] = [self._local(t) for t in static.get("targets", [])]
        prom_path = self.run_dir / "prometheus.yml"
        prom_path.write_text(dump_yaml(prom, "Local copy for `tokenbooth stack up`; edit ../prometheus.yml."))
        text = (self.directory / "alertmanager.yml").read_text(encoding="utf-8")
        am: dict[str, Any] = yaml.safe_load(text.replace(COMPOSE_GATEWAY, f"http://{self.gateway}"))
        for key, value in list(am.get("global", {}).items()):
            if key.endswith("_file") and not Path(value).is_absolute():
                am["global"][key] = str(self.directory / value)
        for receiver in am.get("receivers", []):
            for configs in receiver.values():
                for config in configs if isinstance(configs, list) else []:
                    for key, value in list(config.items()):
                        if key.endswith("_file") and not Path(value).is_absolute():
                            config[key] = str(self.directory / value)
        am_path = self.run_dir / "alertmanager.yml"
        am_path.write_text(dump_yaml(am, "Local copy for `tokenbooth stack up`; edit ../alertmanager.yml."))
        return prom_path, am_path

    def commands(self, prom_path: Path, am_path: Path) -> dict[str, list[str]]:
        """The command line of each process; every file each one writes is under ``DIR/.run/``."""
        return {
            "prometheus": [find_tool("prometheus"), f"--config.file={prom_path}",
                           f"--storage.tsdb.path={self.run_dir / 'prometheus-data'}",
                           f"--web.listen-address=127.0.0.1:{self.ports.prometheus}", "--web.enable-lifecycle"],
            "alertmanager": [find_tool("alertmanager"), f"--config.file={am_path}",
                             f"--storage.path={self.run_dir / 'alertmanager-data'}",
                             f"--web.listen-address=127.0.0.1:{self.ports.alertmanager}",
                             "--cluster.listen-address="],  # one instance: no gossip port
            # Debian's default persistence file, /var/lib/prometheus/pushgateway.data, is shared by every
            # Pushgateway on the machine: groups pushed elsewhere would show up here.
            "pushgateway": [find_tool("pushgateway"), f"--web.listen-address=127.0.0.1:{self.ports.pushgateway}",
                            f"--persistence.file={self.run_dir / 'pushgateway.data'}"],
        }

    def start(self, timeout: float = 30.0) -> None:
        """Start the three processes and wait until each answers ``/-/ready``."""
        commands = self.commands(*self.prepare())
        try:
            for name, cmd in commands.items():
                log = (self.run_dir / f"{name}.log").open("wb")
                # A session of their own: Ctrl-C reaches us, and we stop them in order.
                self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.run_dir,
                                                    start_new_session=True)
                log.close()
            deadline = time.monotonic() + timeout
            for name in commands:
                self._wait_ready(name, deadline)
            urls = {name: self.url(name) for name in commands} | {"gateway": f"http://{self.gateway}"}
            (self.run_dir / "urls.json").write_text(json.dumps(urls, indent=2) + "\n")  # for `tokenbooth doctor`
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, name: str, deadline: float) -> None:
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise ConfigError(f"{name} exited with code {proc.returncode}: {self._log_tail(name)}")
            try:
                with urllib.request.urlopen(f"{self.url(name)}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"{name} did not become ready on {self.url(name)}: {self._log_tail(name)}")
            time.sleep(0.1)

    def _log_tail(self, name: str) -> str:
        path = self.run_dir / f"{name}.log"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return " | ".join(lines[-3:]) or "no output"

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process: SIGTERM, then SIGKILL for any still running after ``grace`` seconds."""
        (self.run_dir / "urls.json").unlink(missing_ok=True)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

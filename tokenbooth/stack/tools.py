"""Finding the Prometheus tools on this machine, and saying how to install them when they are not.

Debian and Ubuntu package them as ``prometheus`` (``prometheus``, ``promtool``),
``prometheus-alertmanager`` (``prometheus-alertmanager``, ``amtool``) and
``prometheus-pushgateway``; the upstream release archives name two of them differently.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tokenbooth.errors import ConfigError

__all__ = ["INSTALL_HINT", "MissingTool", "find_tool", "run_tool"]

INSTALL_HINT = ("apt-get install prometheus prometheus-alertmanager prometheus-pushgateway "
                "(Debian/Ubuntu), or put the binaries from prometheus.io on PATH")

_NAMES = {
    "prometheus": ("prometheus",),
    "promtool": ("promtool",),
    "alertmanager": ("prometheus-alertmanager", "alertmanager"),
    "amtool": ("amtool",),
    "pushgateway": ("prometheus-pushgateway", "pushgateway"),
}


class MissingTool(ConfigError):
    """A Prometheus binary this command needs is not installed."""

    def __init__(self, tool: str) -> None:
        super().__init__(f"{tool} is not installed: {INSTALL_HINT}.")
        self.tool = tool


def find_tool(tool: str) -> str:
    """The path of ``tool`` (``promtool``, ``amtool``, ``prometheus``, ``alertmanager``, ``pushgateway``)."""
    for name in _NAMES[tool]:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
        if found:
            return found
    raise MissingTool(tool)


def run_tool(tool: str, args: Sequence[str], cwd: Path | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run a tool; returns its exit code and its output (stdout and stderr interleaved, as printed)."""
    proc = subprocess.run([find_tool(tool), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout.strip()

"""Fixtures for the monitoring stack: a generated stack directory, the real Prometheus tools."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import need
from tokenbooth.config import load_settings
from tokenbooth.stack.render import init_stack, stack_files


def run(tool: str, args: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a real tool; its stdout and stderr are interleaved in ``stdout``, as a terminal shows them."""
    return subprocess.run([need(tool), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120, check=False)


def load(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)


def write_stack(directory: Path, overrides: dict[str, Any] | None = None, chat: Sequence[str] = ("dingtalk",)) -> Path:
    settings = load_settings(overrides=overrides, environ={})
    init_stack(directory, stack_files(settings, chat=chat))
    return directory


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stack written with the default thresholds (read-only: copy it before changing a file)."""
    return write_stack(tmp_path_factory.mktemp("stack"))

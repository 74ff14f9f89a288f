"""Every ``tokenbooth ...`` command that the README, docs/ or a generated stack's README (its runbook)
tells users to run exists, and its arguments parse as written."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from tokenbooth.cli import _parser
from tokenbooth.config import load_settings
from tokenbooth.errors import UsageError
from tokenbooth.stack.render import stack_files

ROOT = Path(__file__).parents[1]
_INLINE = re.compile(r"`(tokenbooth [^`]+)`")
_SHELL = re.compile(r"\$\(date[^)]*\)")


def _commands(text: str) -> set[str]:
    """``tokenbooth ...`` in inline code (across line breaks) and at the start of shell lines in code blocks."""
    found = {" ".join(m.split()) for m in _INLINE.findall(text)}
    in_block = False
    for line in text.replace("\\\n", " ").splitlines():  # shell continuation lines joined
        if line.startswith("```"):
            in_block = line.strip() in ("```sh", "```bash") and not in_block
            continue
        line = line.strip().removeprefix("$ ")
        if in_block and line.startswith("tokenbooth "):
            found.add(line.split("  #")[0].split(" # ")[0].strip())
    return found


def _documented() -> dict[str, str]:
    texts = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    texts |= {f"docs/{p.name}": p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md")}
    texts["generated stack README.md"] = stack_files(load_settings(environ={}), chat=["dingtalk"])["README.md"]
    return {command: where for where, text in texts.items() for command in sorted(_commands(text))}


DOCUMENTED = _documented()


def test_the_runbook_and_readme_cite_commands() -> None:
    assert any(c.startswith("tokenbooth doctor") for c in DOCUMENTED)
    assert "tokenbooth report --by month" in DOCUMENTED
    assert any("--since today" in c for c in DOCUMENTED)
    assert len(DOCUMENTED) > 20


def _exists(words: list[str]) -> bool:
    try:
        _parser().parse_args([*words, "--help"])
    except SystemExit as exc:
        return exc.code == 0
    except UsageError:
        return False
    return False


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_a_documented_command_parses_as_written(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Run as a dry form: the command line is parsed as the CLI parses it. A mention of a command in
    prose (``tokenbooth stack init``, ``--budget`` named without its value) must name one that exists."""
    argv = [{"N": "2"}.get(w, w) for w in shlex.split(_SHELL.sub("2026-01-31", command).replace("...", "x"))[1:]]
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        words = [w for w in argv if not w.startswith("-")][:2]
        mention = "required" in exc.message or "expected one argument" in exc.message
        if not (mention and _exists(words)):
            pytest.fail(f"{DOCUMENTED[command]}: `{command}`: {exc.message}")
        return
    except SystemExit as exc:  # --help, --version
        assert exc.code == 0
        return
    finally:
        capsys.readouterr()
    assert isinstance(args, argparse.Namespace)

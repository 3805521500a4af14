"""Every ``python -m parapolicy.<command> ...`` line of the README and the docs pages composes against
today's ``conf/``: no key, group option or launcher that the configs no longer have.

Hydra commands are composed in-process (no simulator starts); a sweep (``-m a=1,2``) is composed at
each of its points. Placeholders (``<time>``, ``...``) and shell-only parts (``&``, comments) are left out.
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parent.parent
HYDRA_COMMANDS = {"eval", "bench", "serve", "serve_bench", "train", "collect"}  # conf/<name>.yaml each
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines(text: str) -> list[str]:
    """``python -m parapolicy.*`` commands: whole lines in fenced blocks (``\\`` continuations joined)
    and inline code spans in prose."""
    found, fence, pending = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fence, pending = not fence, ""
            continue
        if fence:
            line = f"{pending} {line.strip()}" if pending else line
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1]
                continue
            pending = ""
            match = re.search(r"python -m parapolicy\.\w+.*", line)
            if match:
                found.append(match.group(0))
        else:
            found += re.findall(r"`(python -m parapolicy\.[^`]*)`", line)
    return found


def parse(line: str) -> tuple[str, bool, list[str]] | None:
    """(command, multirun, overrides) of a Hydra command line, None for other commands or placeholders."""
    words = shlex.split(line.replace("$PWD", "/tmp"), comments=True)
    command = words[2].removeprefix("parapolicy.")
    words = [w for w in words[3:] if w not in ("&", ";")]
    if command not in HYDRA_COMMANDS or any("<" in w or "..." in w for w in words):
        return None
    return command, "-m" in words, [w for w in words if w != "-m"]


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """A multirun's overrides, one list per point of its sweep (``a=1,2 b=x,y``: four lists)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        choices.append([f"{override.get_key_element()}={v}" for v in values])
    return [list(point) for point in itertools.product(*choices)]


COMMANDS = sorted({(page.name, line) for page in PAGES for line in command_lines(page.read_text())})


def test_the_pages_have_commands_of_every_kind():
    kinds = {parse(line)[0] for _, line in COMMANDS if parse(line)}
    assert {"eval", "bench", "serve", "train", "collect"} <= kinds


@pytest.mark.parametrize("page, line", COMMANDS)
def test_a_documented_command_composes(page, line):
    parsed = parse(line)
    if parsed is None:
        pytest.skip("not a Hydra command, or a placeholder")
    command, multirun, overrides = parsed
    points = sweep_points(overrides) if multirun else [overrides]
    with initialize_config_module("parapolicy.conf", version_base=None):
        for point in points:
            cfg = compose(config_name=command, overrides=point, return_hydra_config=True)
            assert cfg is not None

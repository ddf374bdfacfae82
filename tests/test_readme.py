"""The README's quickstart and CI must not drift apart."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_has_exactly_two_commands():
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    assert "scripts/setup.sh" in commands[0] and "scripts/setup.sh --test" in commands[1]


def test_ci_runs_the_readme_test_command():
    test_command = _quickstart_commands()[1]
    ci_lines = [l.strip() for l in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()]
    assert test_command in ci_lines

"""The lower bounds in pyproject.toml are versions CI runs the suite on (.ci/oldest.txt), not guesses."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)$")
_FLOOR = re.compile(r'^\s*"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)"', re.M)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = _PIN.match(line)
            assert match, f".ci/oldest.txt: '{line}' is not a name==version pin"
            pins[_normal(match[1])] = match[2]
    return pins


def _floors() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    dependencies = text[text.index("dependencies = [") : text.index("]", text.index("dependencies = ["))]
    return {_normal(name): version for name, version in _FLOOR.findall(dependencies)}


def test_each_tested_floor_is_pyprojects_lower_bound():
    pins, floors = _pins(), _floors()
    assert set(pins) == {"diffusers", "transformers", "peft", "accelerate"}
    assert {name: floors.get(name) for name in pins} == pins


def test_ci_installs_the_floors_and_runs_the_suite_on_them():
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install = script.index('fresh_install "$work/oldest" -c .ci/oldest.txt')
    assert "python -m pytest" in script[install:]

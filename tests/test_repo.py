"""Repository promises: the README's two set-up commands, CI calling the test command,
every module importable without side effects."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README must open with a bash block holding the set-up commands"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_has_exactly_two_setup_commands():
    main_job, tests = _setup_commands()  # exactly two: unpacking fails otherwise
    assert "mor-bench run smoke" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _setup_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


@pytest.mark.parametrize("package", ["mor", "baselines", "evals", "reports"])
def test_every_module_imports(package):
    pkg = importlib.import_module(package)
    names = [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}.")]
    assert names
    for name in names:
        importlib.import_module(name)

"""Where a number came from: code version, library versions, hardware.

Every result record carries this block (STYLE.md: modded-nanogpt / AlgoPerf), so a table
built from records can always say what produced each row. The hardware block comes from
`evals.training.device.hardware_info`; its one-line summary for reports is
`evals.suite.record.hardware_summary`.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from evals.training.device import hardware_info

__all__ = ["git_info", "hardware_info", "library_versions", "provenance"]

_LIBRARIES = ("mor-bench", "torch", "numpy", "pandas", "tokenizers", "safetensors", "rich",
              "datasets", "transformers", "lm_eval")
_REPO = Path(__file__).resolve().parents[2]


def git_info(repo: Path = _REPO) -> dict[str, Any]:
    """Commit and dirty flag of the source tree mor-bench runs from (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                 text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance() -> dict[str, Any]:
    return {"git": git_info(), "versions": library_versions(), "hardware": hardware_info(),
            "argv": sys.argv}

"""Where a number came from: code version, library versions, hardware.

Every result record carries this block (STYLE.md: modded-nanogpt / AlgoPerf), so a table
built from records can always say what produced each row.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {"name": props.name, "count": torch.cuda.device_count(),
                        "memory_bytes": props.total_memory, "version": torch.version.cuda}
    return info


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def hardware_summary(hw: dict[str, Any]) -> str:
    """One line for tables and figure captions."""
    if hw.get("cuda"):
        return f"{hw['cuda']['name']} x{hw['cuda']['count']}"
    return f"{hw.get('cpu')} ({hw.get('torch_threads')} threads)"


def provenance() -> dict[str, Any]:
    return {"git": git_info(), "versions": library_versions(), "hardware": hardware_info(),
            "argv": sys.argv}

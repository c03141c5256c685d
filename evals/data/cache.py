"""Where mor-bench keeps what it downloads or builds once (tokenizers, token shards, the
few-shot benchmark files): `$MOR_BENCH_CACHE`, else `~/.cache/mor-bench`. It lives at the
data layer so every layer above (perf tools, the runner, the CLI) reads the same default."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("MOR_BENCH_CACHE", Path.home() / ".cache" / "mor-bench"))

__all__ = ["DEFAULT_CACHE"]

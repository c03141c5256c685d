"""Result records: one self-describing JSON file per run, the only input of reports.

Written atomically (temporary file + rename), so a crash never leaves half a record.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mor.errors import MorBenchError

SCHEMA = "mor-bench/run-record/v1"
RECORD = "record.json"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records under a suite run directory (or a single record.json), sorted by id."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        files = [run_dir]
    elif run_dir.is_dir():
        files = sorted(run_dir.rglob(RECORD))
    else:
        raise MorBenchError(f"run directory '{run_dir}' does not exist; pass the directory "
                            "that `mor-bench run` printed")
    records = []
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise MorBenchError(f"'{f}' is not valid JSON ({e}); delete or re-run it") from None
        schema = rec.get("schema") if isinstance(rec, dict) else None
        if schema != SCHEMA:
            raise MorBenchError(f"'{f}' is not a mor-bench run record (schema "
                                f"{schema!r}, expected {SCHEMA!r})")
        records.append(rec)
    if not records:
        raise MorBenchError(f"no {RECORD} files under '{run_dir}'; is this a mor-bench run "
                            "directory?")
    # One report = one suite run: records of several runs would be averaged as if they were
    # seeds of one model.
    origins = sorted({str(r.get("suite", {}).get("run_dir")) for r in records})
    ids = [r.get("run_id") for r in records]
    if len(origins) > 1:
        raise MorBenchError(f"'{run_dir}' holds records of {len(origins)} suite runs "
                            f"({', '.join(origins[:3])}{', ...' if len(origins) > 3 else ''}); "
                            "pass one run directory")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise MorBenchError(f"'{run_dir}' holds run {', '.join(map(str, dup))} more than once "
                            "(a copied run directory?); pass one run directory")
    return sorted(records, key=lambda r: r["run_id"])

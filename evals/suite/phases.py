"""Suite phases that run after training, over every successful run of a suite run
directory: generation throughput (`[infer]`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from evals.perf.generation import bench_models, load_models
from evals.suite.record import write_json_atomic
from evals.suite.spec import InferSettings

INFER_FILE = "infer.json"


def suite_phase(run_dir: str | Path, settings: InferSettings, log=print) -> dict[str, Any]:
    """Benchmark every successful run of a suite run directory side by side, write
    RUN_DIR/infer.json and each record's metrics["infer"] (for MoR the depth-wise row;
    with scheduler "both" the sequence-wise one is kept as metrics["infer"]["sequence"])."""
    import json


    run_dir = Path(run_dir)
    models = load_models([run_dir])
    res = bench_models(models, settings, log=log)
    write_json_atomic(run_dir / INFER_FILE, res)
    by_model: dict[str, dict[str, Any]] = {}
    for row in res["rows"]:
        by_model.setdefault(row["model"], {})[row["scheduler"]] = row
    keep = ("tokens_per_s", "ms_per_token", "ms_per_iteration", "batch_size", "kv_cache_bytes",
            "param_bytes", "mean_depth", "shared_batch_fill", "capped_frac",
            "rel_tokens_per_s", "reference", "scheduler", "routing", "tokens", "time_s")
    for name, rows in by_model.items():
        rec_file = run_dir / name / "record.json"
        if not rec_file.is_file():
            continue
        primary = rows.get("depth") or rows["sequence"]
        entry = {k: primary.get(k) for k in keep}
        if "depth" in rows and "sequence" in rows:
            entry["sequence"] = {k: rows["sequence"].get(k) for k in keep}
        entry["settings"] = res["settings"]
        entry["max_len"] = res["max_len"]
        rec = json.loads(rec_file.read_text())
        rec.setdefault("metrics", {})["infer"] = entry
        write_json_atomic(rec_file, rec)
    return res


def _phase_child(run_dir: str, settings: dict[str, Any]) -> None:
    import sys
    import traceback

    try:
        suite_phase(run_dir, InferSettings(**settings),
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    except BaseException as e:  # the training results stay; the error is kept
        Path(run_dir, "infer_error.txt").write_text(traceback.format_exc())
        print(f"inference phase failed: {type(e).__name__}: {e} (see {run_dir}/"
              "infer_error.txt)", file=sys.stderr, flush=True)
        sys.exit(1)


def run_suite_phase(run_dir: str | Path, settings: InferSettings) -> bool:
    """`suite_phase` in its own process (a clean heap and thread pool, like each training
    run). Returns False if it failed; the error is in RUN_DIR/infer_error.txt."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_phase_child, args=(str(run_dir), dataclasses.asdict(settings)),
                       name="mor-bench-infer")
    proc.start()
    try:
        proc.join()
    finally:
        if proc.is_alive():  # interrupted: no orphan process
            proc.terminate()
            proc.join(10)
    if proc.exitcode != 0:
        err = Path(run_dir, "infer_error.txt")
        if not err.is_file():  # killed before it could say why
            err.write_text(f"inference phase exited with code {proc.exitcode}\n")
        return False
    return True

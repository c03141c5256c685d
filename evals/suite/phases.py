"""Suite phases that run after training, over every successful run of a suite run
directory, each in its own spawned process (a clean heap and thread pool, like each
training run): generation throughput (`[infer]`, `infer_phase`) and interleaved
training-speed ratios (`[speed]`, `speed_phase`) and the efficiency-knob sweep of MoR
models (`[sweep]`, `sweep_phase`).

A phase that fails leaves the training results as they are and writes its traceback to
RUN_DIR/<phase>_error.txt. Phases never print: the lines they log travel to the parent,
which hands them to its `on_log` callback (the runner turns them into `SuiteEvent`s).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue as queue_mod
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evals.suite.record import (
    INFER_FILE,
    RECORD,
    SPEED_FILE,
    SWEEP_DIR,
    SWEEP_FILE,
    load_records,
    read_json,
    write_json_atomic,
)
from evals.suite.spec import InferSettings, SpeedSettings, SweepSettings
from evals.suite.status import LoadMeter

Log = Callable[[str], None]

PHASE_NAMES = ("infer", "speed", "sweep")


def error_file(run_dir: str | Path, phase: str) -> Path:
    """Where a failed phase leaves its traceback: RUN_DIR/<phase>_error.txt."""
    return Path(run_dir) / f"{phase}_error.txt"


def _update_record(run_dir: Path, run_id: str, key: str, entry: dict[str, Any]) -> None:
    rec_file = run_dir / run_id / RECORD
    if not rec_file.is_file():
        return
    rec = read_json(rec_file)
    rec.setdefault("metrics", {})[key] = entry
    write_json_atomic(rec_file, rec)


# --------------------------------------------------------------------------------------------
# [infer]


def infer_phase(run_dir: str | Path, settings: InferSettings, log: Log | None = None
                ) -> dict[str, Any]:
    """Benchmark every successful run of a suite run directory side by side, write
    RUN_DIR/infer.json and each record's metrics["infer"] (for MoR the depth-wise row;
    with scheduler "both" the sequence-wise one is kept as metrics["infer"]["sequence"]).
    The throughput model's card of a row stays in its own field, metrics["infer"]["modelled"]
    (None without a device profile), apart from the measured figures."""
    import torch

    from evals.perf.generation import bench_models, load_models

    run_dir = Path(run_dir)
    models = load_models([run_dir])
    meter = LoadMeter().start()
    res = bench_models(models, settings, log=log)
    res["load"] = meter.stop(torch.get_num_threads())
    write_json_atomic(run_dir / INFER_FILE, res)
    by_model: dict[str, dict[str, Any]] = {}
    for row in res["rows"]:
        by_model.setdefault(row["model"], {})[row["scheduler"]] = row
    keep = ("tokens_per_s", "ms_per_token", "ms_per_iteration", "batch_size", "kv_cache_bytes",
            "param_bytes", "mean_depth", "shared_batch_fill", "capped_frac",
            "rel_tokens_per_s", "reference", "scheduler", "routing", "tokens", "time_s",
            "selected_fractions", "scheduler_choice", "modelled")
    for name, rows in by_model.items():
        primary = rows.get("depth") or rows["sequence"]
        entry = {k: primary.get(k) for k in keep}
        if "depth" in rows and "sequence" in rows:
            entry["sequence"] = {k: rows["sequence"].get(k) for k in keep}
        entry["settings"] = res["settings"]
        entry["max_len"] = res["max_len"]
        entry["load"] = res["load"]
        _update_record(run_dir, name, "infer", entry)
    return res


# --------------------------------------------------------------------------------------------
# [speed]


def speed_references(records: list[dict[str, Any]]) -> dict[str, str | None]:
    """Each run's speed reference: the vanilla run of the same seed, else the first vanilla
    run (records sorted by run id), None when the suite has no vanilla model."""
    vanilla = [r for r in records if r.get("family") == "vanilla"]
    out: dict[str, str | None] = {}
    for rec in records:
        same_seed = [v for v in vanilla if v.get("seed") == rec.get("seed")]
        pick = same_seed or vanilla
        out[rec["run_id"]] = pick[0]["run_id"] if pick else None
    return out


def speed_phase(run_dir: str | Path, settings: SpeedSettings, train_cfg: dict[str, Any],
                log: Log | None = None) -> dict[str, Any]:
    """Training-step throughput of every successful run, measured interleaved in this one
    process (`evals.perf.train_speed.interleaved_train_speed`) from its checkpoint on the
    suite's training windows (RUN_DIR/data/train.npy) with the suite's [train] settings.
    Writes RUN_DIR/speed.json and each record's metrics["speed"]; rel_tokens_per_s is to the
    vanilla run of the same seed (`speed_references`). The checkpoints are not changed."""
    import numpy as np
    import torch

    from evals.perf.train_speed import interleaved_train_speed, paired_speed_ratio
    from evals.training.loop import TrainConfig
    from mor.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    records = [r for r in load_records(run_dir) if r.get("status") == "ok"]
    tcfg = TrainConfig(**train_cfg)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    refs = speed_references(records)
    first_ref = next((ref for ref in refs.values() if ref is not None), None)
    models = {r["run_id"]: load_checkpoint(run_dir / r["run_id"]) for r in records}
    windows = torch.from_numpy(np.load(run_dir / "data" / "train.npy").astype(np.int64))
    if log:
        log(f"  {len(models)} models, {settings.rounds} rounds x {settings.steps_per_round} "
            f"steps (+{settings.warmup_steps} warm-up), reference {first_ref or '-'}")
    meter = LoadMeter().start()
    res = interleaved_train_speed(models, windows, tcfg, rounds=settings.rounds,
                                  steps_per_round=settings.steps_per_round,
                                  warmup_steps=settings.warmup_steps, reference=first_ref,
                                  seed=0, log=log)
    res = {**res, "settings": dataclasses.asdict(settings), "references": refs,
           "load": meter.stop(torch.get_num_threads())}
    write_json_atomic(run_dir / SPEED_FILE, res)
    rows = res["rows"]
    for run_id, row in rows.items():
        ref = refs.get(run_id)
        rel = (paired_speed_ratio(rows[ref]["round_s"], row["round_s"]) if ref in rows
               else None)
        entry = {"tokens_per_s": row["tokens_per_s"], "rel_tokens_per_s": rel,
                 "reference": ref if rel is not None else None,
                 "rounds": res["rounds"], "steps_per_round": res["steps_per_round"],
                 "tokens_per_step": res["tokens_per_step"], "load": res["load"]}
        _update_record(run_dir, run_id, "speed", entry)
        if log:
            rel = entry["rel_tokens_per_s"]
            log(f"  {run_id}: {row['tokens_per_s']:,.0f} tokens/s"
                + (f" ({rel:.2f}x {ref})" if rel is not None else ""))
    return res


# --------------------------------------------------------------------------------------------
# [sweep]


def sweep_phase(run_dir: str | Path, settings: SweepSettings, models: list[str],
                cache_dir: str | None, log: Log | None = None) -> dict[str, Any]:
    """Sweep the knob on every successful run of the suite models named `models`, the
    vanilla and recursive runs of the same seed as reference points; writes
    RUN_DIR/sweeps/<run_id>.json per run, each record's metrics["sweep"] (the file and the
    knob), and the index RUN_DIR/sweep.json last."""
    from evals.perf.sweep import held_out_windows, load_sweep_model, run_sweep, suite_references

    run_dir = Path(run_dir)
    records = [r for r in load_records(run_dir) if r.get("status") == "ok"]
    targets = [r for r in records if r.get("model_name") in models]
    windows = held_out_windows(run_dir, run_dir / "data" / "val.npy")
    out_dir = run_dir / SWEEP_DIR
    out_dir.mkdir(exist_ok=True)
    index = {"knob": settings.knob, "calibrate": settings.calibrate, "runs": {}}
    for rec in targets:
        run_id = rec["run_id"]
        refs = [load_sweep_model(p) for p in suite_references(run_dir / run_id)]
        if log:
            log(f"  {run_id}: {settings.knob} sweep, {len(settings.values) or 1} point(s), "
                f"references {', '.join(r.name for r in refs) or '-'}")
        res = run_sweep(load_sweep_model(run_dir / run_id), refs, windows, settings,
                        cache_dir=Path(cache_dir) if cache_dir else None, log=log)
        rel = f"{SWEEP_DIR}/{run_id}.json"
        write_json_atomic(run_dir / rel, res)
        index["runs"][run_id] = rel
        _update_record(run_dir, run_id, "sweep", {"file": rel, "knob": settings.knob,
                                                   "calibrate": settings.calibrate,
                                                   "points": len(res["points"])})
    write_json_atomic(run_dir / SWEEP_FILE, index)
    return index


# --------------------------------------------------------------------------------------------
# one phase, in its own process


_TARGETS: dict[str, Callable[..., dict[str, Any]]] = {"infer": infer_phase,
                                                      "speed": speed_phase,
                                                      "sweep": sweep_phase}


def _phase_main(phase: str, run_dir: str, args: tuple, log_queue) -> None:
    """A phase process: run the phase, its log lines on the queue; on any error keep the
    traceback in RUN_DIR/<phase>_error.txt and exit 1 (the parent reports it)."""
    try:
        _TARGETS[phase](run_dir, *args, log=log_queue.put)
    except BaseException:  # recorded for the parent, which keeps the training results
        error_file(run_dir, phase).write_text(traceback.format_exc())
        sys.exit(1)
    finally:
        log_queue.close()
        log_queue.join_thread()  # every line reaches the parent before exit


def relay(q, proc, emit: Callable[[Any], None]) -> None:
    """Pass what a child process puts on queue `q` to `emit` until the process exits, then
    whatever arrived between the last read and the exit."""
    while True:
        try:
            emit(q.get(timeout=0.2))
        except queue_mod.Empty:
            if not proc.is_alive():
                break
    while True:
        try:
            emit(q.get_nowait())
        except queue_mod.Empty:
            return


def run_phase(phase: str, run_dir: str | Path, args: tuple, on_log: Log | None = None
              ) -> bool:
    """Run `phase` ("infer": args (InferSettings,); "speed": args (SpeedSettings, train
    config dict); "sweep": args (SweepSettings, model names, cache dir)) in its own spawned
    process, passing its log lines to `on_log`. Returns False if it failed; the error is in
    `error_file(run_dir, phase)`."""
    if phase not in _TARGETS:
        raise ValueError(f"unknown phase {phase!r}; known: {', '.join(_TARGETS)}")
    on_log = on_log or (lambda line: None)
    ctx = mp.get_context("spawn")
    log_queue = ctx.Queue()
    proc = ctx.Process(target=_phase_main, args=(phase, str(run_dir), args, log_queue),
                       name=f"mor-bench-{phase}")
    proc.start()
    try:
        relay(log_queue, proc, on_log)
        proc.join()
    finally:
        if proc.is_alive():  # interrupted: no orphan process
            proc.terminate()
            proc.join(10)
        log_queue.close()
    if proc.exitcode != 0:
        err = error_file(run_dir, phase)
        if not err.is_file():  # killed before it could say why
            err.write_text(f"{phase} phase exited with code {proc.exitcode}\n")
        return False
    return True

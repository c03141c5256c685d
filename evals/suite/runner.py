"""Run a suite: prepare data once, train every planned run in its own process, write one
record per run, then render the comparison report.

Layout of a suite run directory (never reused; the id holds a timestamp and random bits):

    RUN_DIR/suite.toml          the suite text, verbatim
    RUN_DIR/plan.json           every planned run (what --dry-run prints)
    RUN_DIR/data/               packed train/val windows (.npy) and the tokenizer spec
    RUN_DIR/<run_id>/record.json, model.safetensors, config.json   one per run
    RUN_DIR/<run_id>/fewshot_items.json   per-item few-shot scores, by routing mode ([eval])
    RUN_DIR/<run_id>/depth_sample.json    per-token depths of a validation window (MoR)
    RUN_DIR/<run_id>/run.log              the run process's output (live terminal view only)
    RUN_DIR/infer.json, speed.json        the after-training phases ([infer], [speed])
    RUN_DIR/report.md, report.csv, index.html, figures/   (the command line renders them)

Progress: each run process reports its phase (data, training, validation, few-shot,
saving) and training steps to the parent through a queue as typed `RunEvent`s; the parent
adds `SuiteEvent`s of its own and hands every event, in order, to the caller's `on_event`
(`evals.suite.events`). Nothing here prints: the command line draws the events.

One process per run makes the CPU peak-memory figure that run's own, and a crash in one run
leaves the others' records intact (the failed run gets a record with status "failed").
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from evals.suite.events import PHASES, OnEvent, RunEvent, SuiteEvent, ignore
from evals.suite.phases import relay
from evals.suite.record import (
    DEPTH_SAMPLE,
    FEWSHOT_ITEMS,
    INFER_FILE,
    PLAN_FILE,
    RECORD,
    SCHEMA,
    SPEED_FILE,
    failed_record,
    read_json,
    utc_now,
    write_json_atomic,
)
from evals.suite.spec import RunSpec, Suite, plan_runs, plan_table
from evals.training.budget import plan_training
from mor.errors import ConfigError

DEFAULT_CACHE = Path(os.environ.get("MOR_BENCH_CACHE", Path.home() / ".cache" / "mor-bench"))


def make_run_dir(out_root: Path, suite_name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_root.mkdir(parents=True, exist_ok=True)
    while True:
        path = out_root / f"{suite_name}-{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()  # exist_ok=False: a run id never collides
            return path
        except FileExistsError:
            continue


# --------------------------------------------------------------------------------------------
# data


def load_suite_data(suite: Suite, corpus: str | None, cache_dir: Path):
    """Load, split, tokenize and pack the suite's corpus once (before any run directory
    exists, so a bad corpus leaves nothing behind)."""
    from evals.data.corpus import prepare_data

    spec = dataclasses.replace(suite.data, corpus=corpus) if corpus else suite.data
    return prepare_data(spec, cache_dir)


def save_suite_data(suite: Suite, prepared, run_dir: Path) -> dict[str, Any]:
    """Save the packed arrays the run processes load, and describe them."""
    from evals.data.tokenizer import tokenizer_to_spec

    d, spec = suite.data, prepared.spec
    data_dir = run_dir / "data"
    data_dir.mkdir()
    val = prepared.val.windows[: d.val_windows]
    # uint16 halves the file (and each run's memory) whenever the vocabulary fits.
    dtype = np.uint16 if prepared.tokenizer.vocab_size <= 2**16 else np.int32
    np.save(data_dir / "train.npy", prepared.train.windows.numpy().astype(dtype))
    np.save(data_dir / "val.npy", val.numpy().astype(dtype))
    if prepared.val.classes is not None:
        np.save(data_dir / "val_classes.npy", prepared.val.classes[: d.val_windows].numpy())
    bytes_per_token = prepared.val.n_bytes / max(1, prepared.val.n_tokens)
    meta = {
        "corpus": spec.corpus, "tokenizer": prepared.tokenizer.name,
        "vocab_size": prepared.tokenizer.vocab_size, "seq_len": spec.seq_len,
        "fingerprint": prepared.fingerprint, "n_train_docs": prepared.n_train_docs,
        "n_val_docs": prepared.n_val_docs, "train_windows": int(prepared.train.windows.shape[0]),
        "train_tokens": int(prepared.train.windows.shape[0] * spec.seq_len),
        "val_windows": int(val.shape[0]), "val_bytes_per_token": bytes_per_token,
    }
    if spec.corpus == "synthetic":  # reports name the depth-by-class rows with these
        from evals.data.synthetic import DIFFICULTY_CLASSES

        meta["difficulty_classes"] = list(DIFFICULTY_CLASSES)
    write_json_atomic(data_dir / "data.json", meta)
    write_json_atomic(data_dir / "tokenizer.json", tokenizer_to_spec(prepared.tokenizer))
    return meta


# --------------------------------------------------------------------------------------------
# one run, in its own process


__all__ = ["DEFAULT_CACHE", "PHASES", "RunEvent", "SuiteEvent", "dry_run", "execute_run",
           "make_run_dir", "run_suite"]


class EventSender:
    """The run process's side of progress reporting: `RunEvent`s on a multiprocessing
    queue (the parent's `run_suite` relays them, in order, to its `on_event`). Training
    steps are throttled to one event per `min_interval_s` for live views, except the
    milestones -- every ~10% of the steps and the last -- which plain logs print."""

    def __init__(self, run_id: str, queue=None, min_interval_s: float = 0.25):
        self.run_id, self.queue = run_id, queue
        self.min_interval_s = min_interval_s
        self._last_sent = 0.0
        self._t_train = time.perf_counter()

    def _send(self, phase: str, **fields: Any) -> None:
        if self.queue is not None:
            self.queue.put(RunEvent(self.run_id, phase, time.time(), **fields))

    def phase(self, name: str, **fields: Any) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}")
        if name == "training":
            self._t_train = time.perf_counter()
        self._send(name, **fields)

    def step_callback(self, total: int):
        """An `on_step(step, loss, lr)` for `evals.training.loop.train`."""
        every = max(1, total // 10)

        def on_step(step: int, loss: float, lr: float) -> None:
            now = time.perf_counter()
            milestone = (step + 1) % every == 0 or step + 1 == total
            if milestone or now - self._last_sent >= self.min_interval_s:
                self._last_sent = now
                self._send("training", step=step + 1, total=total, loss=loss, lr=lr,
                           train_s=now - self._t_train, milestone=milestone)
        return on_step


def execute_run(spec: RunSpec, suite_info: dict[str, Any], run_dir: Path,
                train_cfg: dict[str, Any], status: EventSender | None = None
                ) -> dict[str, Any]:
    """Train one model and write its checkpoint and record. Runs in a child process."""
    import torch

    from evals.data.corpus import iterate_batches
    from evals.suite.provenance import provenance
    from evals.training.device import measure_matmul_peak, resolve_device
    from evals.training.loop import TrainConfig, train
    from mor import build_model, flops, save_checkpoint
    from mor.routing import routing_label

    status = status or EventSender(spec.run_id)
    status.phase("data")
    started = utc_now()
    tcfg = TrainConfig(**train_cfg)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    device = resolve_device(tcfg.device)
    # The MFU denominator, measured by this process with its thread count right before it
    # trains, so a busy machine depresses numerator and denominator alike. (Before seeding:
    # its random matrices must not shift the model's initialisation.)
    peak_flops = measure_matmul_peak(device.type)
    torch.manual_seed(spec.seed)
    data_dir = run_dir / "data"
    data_meta = read_json(data_dir / "data.json")
    # Kept compact (uint16/int32): iterate_batches widens each batch to int64.
    train_windows = torch.from_numpy(np.load(data_dir / "train.npy").astype(np.int32))
    val_windows = torch.from_numpy(np.load(data_dir / "val.npy").astype(np.int64))
    model = build_model(spec.config)
    batches = iterate_batches(train_windows, tcfg.batch_size, seed=spec.seed)
    status.phase("training", step=0, total=spec.plan.steps)
    result = train(model, batches, spec.plan, tcfg, warmup_steps=spec.warmup_steps,
                   device=device, on_step=status.step_callback(spec.plan.steps))
    cfg = spec.config
    status.phase("validation")
    val, val_by_mode, depth_by_mode = _evaluate(model, cfg, val_windows, data_dir, tcfg, device)
    out_dir = run_dir / spec.run_id
    eval_info = suite_info.get("eval")
    fewshot = None
    if eval_info and eval_info.get("tasks"):
        status.phase("few-shot")
        fewshot, items = _fewshot(model, cfg, eval_info, data_dir, device)
        write_json_atomic(out_dir / FEWSHOT_ITEMS, items)
    status.phase("saving")
    tokenizer_spec = read_json(data_dir / "tokenizer.json")
    save_checkpoint(model, out_dir, extra={"tokenizer": tokenizer_spec, "run_id": spec.run_id})
    if cfg.family == "mor":
        _depth_sample(model, tokenizer_spec, val_windows, data_meta["corpus"],
                      out_dir / DEPTH_SAMPLE)

    # Training compute actually done: 3x the exact forward FLOPs (backward = 2x forward).
    train_flops_exact = 3 * spec.plan.flops_per_token_exact * result.tokens
    achieved = train_flops_exact / result.train_time_s
    metrics = {
        "val_nll": val["val_nll"],
        "val_bpb": val["val_nll"] / np.log(2) / data_meta["val_bytes_per_token"],
        "val_tokens": val["val_tokens"],
        "val_nll_by_routing": {m: v["val_nll"] for m, v in val_by_mode.items()},
        "val_routing_by_mode": {m: _routing_stats(v) for m, v in val_by_mode.items()},
        "depth_by_mode": depth_by_mode,
        "fewshot": fewshot,
        "final_train_loss": result.final_train_loss,
        "train_time_s": result.train_time_s, "tokens_per_s": result.tokens_per_s,
        "peak_mem_bytes": result.peak_mem_bytes, "peak_mem_kind": result.peak_mem_kind,
        "steps": result.steps, "tokens": result.tokens,
        "flops_used": spec.plan.flops_used, "train_flops_exact": train_flops_exact,
        "achieved_flops_per_s": achieved,
        "mfu": achieved / peak_flops if peak_flops else None,
        "routing": result.routing,
        "val_routing": _routing_stats(val),
        # The paper convention with the routing the run actually took (training average).
        "flops_per_token_effective": (flops.effective_flops_per_token(
            cfg, data_meta["seq_len"], result.routing) if cfg.family == "mor"
            else spec.plan.flops_per_token),
    }
    metrics["flops_used_effective"] = metrics["flops_per_token_effective"] * result.tokens

    record = {
        "schema": SCHEMA, "status": "ok", **spec.to_dict(),
        "family": spec.config.family,
        "params": flops.param_counts(spec.config),
        "layer_plan": spec.config.layer_plan,
        "eval_routing": routing_label(cfg) if cfg.family == "mor" else None,
        "router": cfg.router if cfg.family == "mor" else None,
        "kv": cfg.kv if cfg.family == "mor" else None,
        "suite": suite_info, "data": data_meta, "train": dataclasses.asdict(tcfg),
        # What reports need of the model, written here so they never import model code:
        # the analytic KV cache of one sequence of the suite's length (bf16, mor.flops).
        "kv_cache": {"seq_len": data_meta["seq_len"],
                     "bytes_per_seq": flops.kv_cache_bytes(cfg, data_meta["seq_len"],
                                                           batch_size=1)},
        "metrics": metrics, "loss_curve": result.loss_curve,
        "peak_flops_per_s": peak_flops, "device": str(device),
        "checkpoint": str(out_dir), "started_at": started, "finished_at": utc_now(),
        "provenance": provenance(),
    }
    write_json_atomic(out_dir / RECORD, record)
    return record


def _routing_stats(val: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("val_"): v for k, v in val.items()
            if k not in ("val_nll", "val_tokens")}


def _evaluate(model, cfg, val_windows, data_dir: Path, tcfg, device):
    """Validation NLL and routing statistics -- for expert-choice MoR under BOTH routing
    modes (the paper's top-k, not causal, and the causal rule), so no number is mistaken
    for the other -- and per-token depth summaries (by difficulty class where the corpus
    has them). Returns (result of the configured mode, results by mode, depths by mode)."""
    import torch

    from evals.data.synthetic import DIFFICULTY_CLASSES
    from evals.suite.depths import depth_summary, token_depths
    from evals.training.loop import evaluate_nll
    from mor.routing import eval_modes, routing_label, use_routing

    modes = eval_modes(cfg)
    if not modes:
        return evaluate_nll(model, val_windows, batch_size=tcfg.val_batch_size,
                            device=device), {}, {}
    classes_file = data_dir / "val_classes.npy"
    classes = (torch.from_numpy(np.load(classes_file))[:, :-1] if classes_file.is_file()
               else None)
    by_mode, depths = {}, {}
    for mode in modes:
        with use_routing(model, mode):
            by_mode[mode] = evaluate_nll(model, val_windows, batch_size=tcfg.val_batch_size,
                                         device=device)
            d = token_depths(model, val_windows[:, :-1], batch_size=tcfg.val_batch_size)
        depths[mode] = depth_summary(d, cfg.num_recursions, classes, DIFFICULTY_CLASSES)
    return by_mode[routing_label(cfg)], by_mode, depths


def _depth_sample(model, tokenizer_spec: dict[str, Any], val_windows, corpus: str,
                  path: Path) -> None:
    """Per-token recursion depths of one text for the report's depth map, routed as the
    model is evaluated (its `eval_routing`). On the synthetic corpus: a fixed sentence that
    holds every difficulty class side by side; on any other corpus: the first held-out
    validation window, decoded. An error here fails the run (its checkpoint is saved)."""
    from evals.data.tokenizer import tokenizer_from_spec
    from evals.suite.depths import DEFAULT_SAMPLE_TEXT, depth_export, write_depth_export

    tokenizer = tokenizer_from_spec(tokenizer_spec)
    if corpus == "synthetic":
        text, source = DEFAULT_SAMPLE_TEXT, "fixed sample (synthetic corpus classes)"
    else:
        text, source = tokenizer.decode(val_windows[0, :-1].tolist()), "validation window 0"
    data = depth_export(model, tokenizer, text, max_tokens=256)
    write_depth_export(path, {**data, "source": source})


def _fewshot(model, cfg, eval_info: dict[str, Any], data_dir: Path, device):
    """Few-shot accuracy through lm-evaluation-harness: per task the metrics, their stderr
    and the number of items; expert-choice MoR under both routing modes. Returns (the
    record's summary, per-item scores {routing mode: {task: [{doc_id, acc, acc_norm}]}})
    -- the items go to their own file, not into the record."""
    from evals.data.tokenizer import tokenizer_from_spec
    from evals.lmeval.tasks import use_offline_if_local

    tasks, paths = eval_info["tasks"], eval_info["include_paths"]
    use_offline_if_local(tasks, paths)  # before lm-eval (and datasets) is imported
    from evals.lmeval.adapter import MorBenchLM, run_tasks
    from mor.routing import eval_modes, routing_label, use_routing

    tokenizer = tokenizer_from_spec(read_json(data_dir / "tokenizer.json"))
    primary = routing_label(cfg)
    by_mode, items = {}, {}
    # Every mode the model can be evaluated under; one label for models without a router.
    for mode in eval_modes(cfg) or (primary,):
        with use_routing(model, mode if eval_modes(cfg) else None):
            lm = MorBenchLM(model=model, tokenizer=tokenizer,
                            batch_size=eval_info["batch_size"], device=str(device))
            res = run_tasks(lm, tasks, include_paths=paths,
                            num_fewshot=eval_info["num_fewshot"], limit=eval_info["limit"],
                            log_samples=True)
        by_mode[mode] = res["tasks"]
        items[mode] = res["items"]
    return {"tasks": by_mode[primary], "by_routing": by_mode, "routing": primary,
            "num_fewshot": eval_info["num_fewshot"], "limit": eval_info["limit"],
            "lm_eval_version": res["lm_eval_version"]}, items


def check_eval_tasks(suite: Suite, cache_dir: Path) -> None:
    """Before any data or training: the suite's [eval] tasks can all be found."""
    from evals.lmeval.tasks import check_tasks

    check_tasks(suite.evaluation.tasks, cache_dir, where=f"{suite.source}: [eval] ")


def prepare_eval(suite: Suite, run_dir: Path, cache_dir: Path) -> dict[str, Any] | None:
    """Write the generated task files the suite's [eval] tasks need and say where every
    local task YAML lives. Raises before any training when a task cannot be found."""
    ev = suite.evaluation
    if not ev.tasks:
        return None
    from evals.lmeval.tasks import task_include_paths

    paths = task_include_paths(ev.tasks, cache_dir=cache_dir,
                               synthetic_dir=run_dir / "data" / "fewshot")
    return {"tasks": list(ev.tasks), "include_paths": paths, "num_fewshot": ev.num_fewshot,
            "limit": ev.limit, "batch_size": ev.batch_size}


def _child_main(spec: RunSpec, suite_info: dict, run_dir: str, train_cfg: dict,
                status_queue=None, live: bool = False) -> None:
    """A run process: train, evaluate, save; on any error write a failure record (and the
    traceback to error.txt) and exit 1. The parent reports the failure.

    live=True (the parent draws a live table on the terminal): this process's own output
    (lm-eval's notes, warnings) goes to RUN_DIR/<run_id>/run.log instead of the terminal."""
    run_dir_p = Path(run_dir)
    out_dir = run_dir_p / spec.run_id
    if live:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(out_dir / "run.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log_fd, 1)  # fd level: C extensions and tqdm bars land there too
        os.dup2(log_fd, 2)
        os.close(log_fd)
    status = EventSender(spec.run_id, status_queue)
    try:
        execute_run(spec, suite_info, run_dir_p, train_cfg, status)
    except BaseException as e:  # record the failure, keep the other runs going
        from evals.suite.provenance import provenance

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "error.txt").write_text(traceback.format_exc())
        write_json_atomic(out_dir / RECORD, failed_record(
            spec.to_dict(), family=spec.config.family, suite=suite_info,
            error=f"{type(e).__name__}: {e}", provenance=provenance()))
        sys.exit(1)
    finally:
        if status_queue is not None:
            status_queue.close()
            status_queue.join_thread()  # every event reaches the parent before exit


# --------------------------------------------------------------------------------------------
# the suite


def run_suite(suite: Suite, out_root: Path, *, corpus: str | None = None,
              cache_dir: Path = DEFAULT_CACHE, on_event: OnEvent | None = None,
              live: bool = False) -> tuple[Path, list[dict], list[str]]:
    """Train every planned run, then the suite's after-training phases ([infer], [speed]);
    returns the run directory, the records written (failed runs included, with status
    "failed") and the ids of the runs that failed.

    `on_event(event)` receives, in order (`evals.suite.events`): SuiteEvent "start" and
    "data"; RunEvent "queued" for every run once the plan is final; then per run a
    SuiteEvent "run" and its RunEvents "data", "training" (repeated with step/total/loss),
    "validation", "few-shot" (suites with [eval]), "saving", and "done" (val_nll,
    tokens_per_s, wall_s) or "failed" (error); SuiteEvent "finished"; then for each phase
    "phase", "phase_log"..., and "phase_done" or "phase_failed". `live`: the caller draws on
    the terminal, so run processes write their own output to run.log rather than stderr."""
    from evals.data.corpus import check_corpus
    from evals.training.device import resolve_device

    emit = on_event or ignore
    runs = plan_runs(suite)  # validates everything before any data or compute
    try:
        resolve_device(suite.train.device)  # e.g. device = "cuda" on a machine without one
    except ConfigError as e:
        raise ConfigError(f"{suite.source}: [train] {e}") from None
    check_corpus(corpus or suite.data.corpus)
    check_eval_tasks(suite, cache_dir)
    t_data = time.perf_counter()
    prepared = load_suite_data(suite, corpus, cache_dir)
    run_dir = make_run_dir(out_root, suite.name)
    (run_dir / "suite.toml").write_text(suite.text)

    def suite_event(kind: str, phase: str | None = None, **info: Any) -> None:
        emit(SuiteEvent(kind, suite.name, str(run_dir), phase, info))

    suite_event("start", runs=len(runs))
    data_meta = save_suite_data(suite, prepared, run_dir)
    del prepared
    suite_event("data", corpus=data_meta["corpus"], tokenizer=data_meta["tokenizer"],
                train_tokens=data_meta["train_tokens"], val_windows=data_meta["val_windows"],
                seconds=time.perf_counter() - t_data)
    runs = [_with_vocab(r, data_meta["vocab_size"], suite) for r in runs]
    write_json_atomic(run_dir / PLAN_FILE, plan_table(runs))
    train_cfg = dataclasses.asdict(suite.train)
    suite_info = {"name": suite.name, "source": suite.source, "sha256": suite.sha256,
                  "run_dir": str(run_dir), "eval": prepare_eval(suite, run_dir, cache_dir)}
    for spec in runs:
        emit(RunEvent(spec.run_id, "queued", time.time(), model=spec.model_name,
                      total=spec.plan.steps))
    ctx = mp.get_context("spawn")
    status_queue = ctx.Queue()
    # SIGTERM (a CI timeout, `kill`) as KeyboardInterrupt, so the running run process is
    # stopped too rather than left behind.
    on_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    try:
        records, failed = _run_all(runs, ctx, status_queue, suite_info, run_dir, train_cfg,
                                   emit, suite_event, live)
        if len(failed) < len(runs):
            if suite.infer is not None:
                records = _after_training(
                    "infer", (suite.infer,), run_dir, records, suite_event,
                    samples=suite.infer.samples, gen_mean=suite.infer.gen_mean,
                    batch_size=suite.infer.batch_size, repeats=suite.infer.repeats)
            if suite.speed is not None:
                records = _after_training("speed", (suite.speed, train_cfg), run_dir, records,
                                          suite_event, **dataclasses.asdict(suite.speed))
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, old_handler)
        status_queue.close()
    return run_dir, records, failed


def _after_training(phase: str, args: tuple, run_dir: Path, records: list[dict],
                    suite_event, **settings: Any) -> list[dict]:
    """An after-training phase (`evals.suite.phases`) in its own process; returns the
    records re-read (the phase adds metrics[phase] to them). A failure keeps the training
    results and leaves RUN_DIR/<phase>_error.txt."""
    from evals.suite.phases import error_file, run_phase

    t0 = time.perf_counter()
    suite_event("phase", phase, **settings)
    ok = run_phase(phase, run_dir, args,
                   on_log=lambda line: suite_event("phase_log", phase, message=line))
    if not ok:
        suite_event("phase_failed", phase, error_file=str(error_file(run_dir, phase)))
        return records
    out = {"infer": INFER_FILE, "speed": SPEED_FILE}[phase]
    suite_event("phase_done", phase, seconds=time.perf_counter() - t0,
                file=str(run_dir / out))
    return [read_json(run_dir / r["run_id"] / RECORD)
            if (run_dir / r["run_id"] / RECORD).is_file() else r for r in records]


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run_all(runs, ctx, status_queue, suite_info, run_dir, train_cfg, emit, suite_event,
             live):
    """Each run in its own process, one after the other; returns (records, failed ids)."""
    records, failed = [], []
    t0 = time.perf_counter()
    for i, spec in enumerate(runs, 1):
        suite_event("run", index=i, count=len(runs), run_id=spec.run_id,
                    family=spec.config.family, layers=spec.config.layer_plan,
                    steps=spec.plan.steps, tokens_per_step=spec.plan.tokens_per_step)
        t_run = time.perf_counter()
        proc = ctx.Process(target=_child_main, name=f"mor-bench-{spec.run_id}",
                           args=(spec, suite_info, str(run_dir), train_cfg, status_queue, live))
        proc.start()
        try:
            relay(status_queue, proc, emit)
            proc.join()
        finally:
            if proc.is_alive():  # interrupted (Ctrl-C, an error in the view): no orphans
                proc.terminate()
                proc.join(10)
        rec_file = run_dir / spec.run_id / RECORD
        if proc.exitcode != 0 or not rec_file.is_file():
            failed.append(spec.run_id)
            if not rec_file.is_file():  # killed before it could write its failure record
                write_json_atomic(rec_file, failed_record(
                    spec.to_dict(), family=spec.config.family, suite=suite_info,
                    error=f"process exited with code {proc.exitcode}"))
        rec = read_json(rec_file)
        records.append(rec)
        wall = time.perf_counter() - t_run
        if rec.get("status") == "ok" and spec.run_id not in failed:
            m = rec.get("metrics", {})
            emit(RunEvent(spec.run_id, "done", time.time(), val_nll=m.get("val_nll"),
                          tokens_per_s=m.get("tokens_per_s"), wall_s=wall))
        else:
            emit(RunEvent(spec.run_id, "failed", time.time(), error=rec.get("error"),
                          wall_s=wall))
    suite_event("finished", ok=len(runs) - len(failed), count=len(runs),
                seconds=time.perf_counter() - t0)
    return records, failed


def _with_vocab(spec: RunSpec, vocab_size: int, suite: Suite) -> RunSpec:
    """The run with the tokenizer's real vocabulary (known only once data is loaded), its
    plan recomputed: paper FLOPs ignore the head, but exact FLOPs and params do not."""
    if spec.config.vocab_size == vocab_size:
        return spec
    cfg = spec.config.replace(vocab_size=vocab_size)
    t = suite.train
    plan = plan_training(cfg, spec.budget, suite.data.seq_len, t.batch_size, t.grad_accum,
                         spec.plan.world_size, spec.plan.step_rule)
    return dataclasses.replace(spec, config=cfg, plan=plan)


def dry_run(suite: Suite) -> list[dict[str, Any]]:
    return plan_table(plan_runs(suite))

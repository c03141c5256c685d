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

import contextlib
import dataclasses
import multiprocessing as mp
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from evals.data.cache import DEFAULT_CACHE
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
    SWEEP_FILE,
    failed_record,
    read_json,
    utc_now,
    write_json_atomic,
)
from evals.suite.spec import RunSpec, Suite, check_memory, plan_runs, plan_table, sweep_targets
from evals.suite.spec import check_corpus as check_suite_corpus
from evals.suite.status import (
    LoadMeter,
    busy_cores_warning,
    loadavg,
    peak_rss_bytes,
    suite_status,
    total_memory_bytes,
    write_suite_status,
)
from evals.training.budget import plan_training
from evals.training.loop import for_world
from mor.errors import ConfigError

INIT_FILE = "init.json"


def _uptrain_init(spec: RunSpec, run_dir: Path, train_windows):
    """The run's model initialised from its pretrained source (baselines/uptrain.py): for MoR
    with `fit_gate`, router_alpha set so that fresh routers give the least-squares gate g*
    fitted on 8 training windows. Returns (model, what was done)."""
    import torch

    from baselines.uptrain import (
        alpha_for_gate,
        describe_pretrained,
        gate_scale,
        init_from_pretrained,
        load_weights,
    )
    from mor import build_model

    source = spec.init["source"]
    path = source
    if source.startswith("run:"):
        path = str(run_dir / source[4:])
        if not (run_dir / source[4:] / "model.safetensors").is_file():
            raise ConfigError(f"{spec.run_id}: its init run {source[4:]} left no checkpoint "
                              "(did it fail?)")
    src = load_weights(describe_pretrained(path))
    cfg = spec.config
    gate = None
    if cfg.family == "mor" and spec.init.get("fit_gate"):
        rows = np.asarray(train_windows[:8])[:, : cfg.max_seq_len].astype(np.int64)
        g = gate_scale(src, cfg, torch.from_numpy(rows))
        alpha = alpha_for_gate(cfg, g)
        gate = {"g_star": g, "router_alpha": alpha, "router_alpha_config": cfg.router_alpha}
        if alpha is not None:
            cfg = cfg.replace(router_alpha=alpha)
    torch.manual_seed(spec.seed)  # the fresh routers as a plain build would draw them
    model = build_model(cfg)
    done = init_from_pretrained(model, src, spec.init.get("method"))
    done["gate"] = gate
    if source.startswith("run:"):
        done["run"] = source[4:]
    return model, done


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

    def __init__(self, run_id: str, queue=None, min_interval_s: float = 0.25,
                 emit: OnEvent | None = None):
        self.run_id, self.queue, self.emit = run_id, queue, emit
        self.min_interval_s = min_interval_s
        self._last_sent = 0.0
        self._t_train = time.perf_counter()

    def _send(self, phase: str, **fields: Any) -> None:
        self.put(RunEvent(self.run_id, phase, time.time(), **fields))

    def put(self, event) -> None:
        """Any event (a run's `SuiteEvent` "warning" too) to the parent, or to `emit` when
        the run trains in the suite's own process (torchrun)."""
        if self.queue is not None:
            self.queue.put(event)
        elif self.emit is not None:
            self.emit(event)

    def warning(self, message: str, suite_name: str = "", run_dir: str = "") -> None:
        self.put(SuiteEvent("warning", suite_name, run_dir, None,
                            {"message": message, "run_id": self.run_id}))

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

    def fewshot_callback(self, mode: str):
        """An `on_progress(task, done, total)` for `evals.lmeval.adapter.run_tasks`:
        "few-shot" events with the requests scored and the rate, throttled like training
        steps; the event that completes a task's requests is a milestone (a log line)."""
        started: dict[str, float] = {}

        def on_progress(task: str, done: int, total: int) -> None:
            now = time.perf_counter()
            t0 = started.setdefault(task, now)
            milestone = done >= total
            if milestone or now - self._last_sent >= self.min_interval_s:
                self._last_sent = now
                self._send("few-shot", step=done, total=total, task=f"{task} ({mode})",
                           rate=done / (now - t0) if now > t0 else None,
                           train_s=now - t0, milestone=milestone)
        return on_progress


TRAIN_RESULT = "train_result.json"
"""RUN_DIR/<run_id>/train_result.json: the finished training's figures, written with the
weights before evaluation, so an interruption during evaluation never retrains."""


def execute_run(spec: RunSpec, suite_info: dict[str, Any], run_dir: Path,
                train_cfg: dict[str, Any], status: EventSender | None = None, *,
                info=None, should_stop=None) -> dict[str, Any] | None:
    """Train one model and write its checkpoint and record (in a child process, or in every
    process of a torchrun group: `info`). Resumes from the run's own checkpoints when it
    has any. Returns the record (None on ranks other than 0)."""
    import torch

    from evals.data.corpus import Batches
    from evals.suite.provenance import provenance
    from evals.training import distributed as D
    from evals.training.device import configure_backend, measure_matmul_peak, resolve_device
    from evals.training.loop import TrainConfig, TrainResult, train
    from evals.training.tracking import Tracker
    from mor import build_model, flops, load_checkpoint, save_checkpoint
    from mor.routing import routing_label

    info = info or D.SINGLE
    status = status or EventSender(spec.run_id)
    status.phase("data")
    started = utc_now()
    tcfg = TrainConfig(**train_cfg)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    device = D.device_for(info, resolve_device(tcfg.device))
    backend = configure_backend(device, deterministic=tcfg.deterministic)
    # The MFU denominator, measured by this process with its thread count right before it
    # trains, so a busy machine depresses numerator and denominator alike. (Before seeding:
    # its random matrices must not shift the model's initialisation.)
    peak_flops = measure_matmul_peak(device.type)
    torch.manual_seed(spec.seed)
    data_dir = run_dir / "data"
    data_meta = read_json(data_dir / "data.json")
    val_windows = torch.from_numpy(np.load(data_dir / "val.npy").astype(np.int64))
    out_dir = run_dir / spec.run_id
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    D.barrier(info)
    finished = out_dir / TRAIN_RESULT
    if finished.is_file() and (out_dir / "model.safetensors").is_file():
        # Interrupted after training: the trained weights and figures are on disk.
        model = load_checkpoint(out_dir).train()
        result = TrainResult(**read_json(finished))
    else:
        # Memory-mapped and kept compact (uint16/int32): every process of a torchrun group
        # reads only its own batches' rows; iterate_batches widens each batch to int64.
        train_windows = _load_windows(data_dir / "train.npy")
        model = build_model(spec.config)
        if spec.init is not None:  # uptraining: weights from the pretrained source
            model, init_info = _uptrain_init(spec, run_dir, train_windows)
            if info.is_main:
                write_json_atomic(out_dir / INIT_FILE, init_info)
        batches = Batches(train_windows, tcfg.batch_size, seed=spec.seed, rank=info.rank,
                          world_size=info.world_size)
        status.phase("training", step=0, total=spec.plan.steps)

        def make_tracker(first_step: int):
            return Tracker(out_dir / "tensorboard", run_name=spec.run_id,
                           tensorboard=tcfg.tensorboard, wandb_project=tcfg.wandb_project,
                           config=spec.to_dict(), resume_step=first_step if first_step > 1
                           else None, enabled=info.is_main)

        meter = LoadMeter().start()  # the load this process trains under: the record's
        result = train(model, batches, spec.plan, tcfg, warmup_steps=spec.warmup_steps,
                       device=device, on_step=status.step_callback(spec.plan.steps),
                       info=info, checkpoint_dir=out_dir / "checkpoints",
                       should_stop=should_stop, make_tracker=make_tracker,
                       on_warning=status.warning)
        result.load = meter.stop(torch.get_num_threads())  # "load" (kept in TRAIN_RESULT)
        # Weights first (every rank joins the gather), then evaluation on rank 0 alone.
        weights = D.full_state_dict(model)
        if info.is_main:
            status.phase("saving")
            tokenizer_spec = read_json(data_dir / "tokenizer.json")
            save_checkpoint(model, out_dir, state_dict=weights,
                            extra={"tokenizer": tokenizer_spec, "run_id": spec.run_id})
            write_json_atomic(finished, dataclasses.asdict(result))
        if info.active and tcfg.parallel == "fsdp" and info.is_main:
            model = build_model(spec.config)  # an unsharded copy to evaluate
            model.load_state_dict(weights)
        del weights
    if not info.is_main:
        D.barrier(info)  # rank 0 evaluates and writes the record
        return None
    model = D.unwrap(model).to(device)
    cfg = spec.config
    status.phase("validation")
    val, val_by_mode, depth_by_mode = _evaluate(model, cfg, val_windows, data_dir, tcfg, device)
    eval_info = suite_info.get("eval")
    fewshot = None
    if eval_info and eval_info.get("tasks"):
        status.phase("few-shot")
        fewshot, items = _fewshot(model, cfg, eval_info, data_dir, device, status)
        write_json_atomic(out_dir / FEWSHOT_ITEMS, items)
    tokenizer_spec = read_json(data_dir / "tokenizer.json")
    if cfg.family == "mor":
        _depth_sample(model, tokenizer_spec, val_windows, data_meta["corpus"],
                      out_dir / DEPTH_SAMPLE)

    # Training compute actually done: 3x the exact forward FLOPs (backward = 2x forward).
    train_flops_exact = 3 * spec.plan.flops_per_token_exact * result.tokens
    achieved = train_flops_exact / result.train_time_s  # all processes together
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
        # Over the peak of all processes (each measured its own: rank 0's figure here).
        "mfu": achieved / (peak_flops * info.world_size) if peak_flops else None,
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
        "distributed": {"world_size": info.world_size, "parallel": (
            tcfg.parallel if info.world_size > 1 else None),
            "global_batch_sequences": tcfg.batch_size * tcfg.grad_accum * info.world_size},
        # Resumed runs: where each resume continued from; the timing figures above count
        # the steps that completed once (the work lost to a kill is not in them).
        "resumed": result.resumed or None,
        # Uptraining: the pretrained source (hash), method, layer map and gate it started from
        "init": read_json(out_dir / INIT_FILE) if (out_dir / INIT_FILE).is_file() else None,
        "backend": backend,
        # The machine load over this process's training (evals.suite.status.LoadMeter): a
        # contended run's timings understate the model.
        "load": result.load,
        "checkpoint": str(out_dir), "started_at": started, "finished_at": utc_now(),
        "provenance": provenance(),
    }
    write_json_atomic(out_dir / RECORD, record)
    D.barrier(info)
    return record


def _load_windows(path: Path):
    import warnings

    import torch

    array = np.load(path, mmap_mode="r")
    with warnings.catch_warnings():  # read-only mapping: the loop only ever reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


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


def _fewshot(model, cfg, eval_info: dict[str, Any], data_dir: Path, device,
             status: EventSender | None = None):
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
    by_mode, items, scoring = {}, {}, {}
    # Every mode the model can be evaluated under; one label for models without a router.
    for mode in eval_modes(cfg) or (primary,):
        with use_routing(model, mode if eval_modes(cfg) else None):
            lm = MorBenchLM(model=model, tokenizer=tokenizer,
                            batch_size=eval_info["batch_size"], device=str(device))
            res = run_tasks(lm, tasks, include_paths=paths,
                            num_fewshot=eval_info["num_fewshot"], limit=eval_info["limit"],
                            log_samples=True, on_progress=None if status is None
                            else status.fewshot_callback(mode))
        by_mode[mode] = res["tasks"]
        items[mode] = res["items"]
        scoring[mode] = res.get("scoring")  # shared_prefix (causal) or plain (top-k)
    return {"tasks": by_mode[primary], "by_routing": by_mode, "routing": primary,
            "scoring": scoring[primary], "scoring_by_routing": scoring,
            "num_fewshot": eval_info["num_fewshot"], "limit": eval_info["limit"],
            "lm_eval_version": res["lm_eval_version"]}, items


def check_eval_tasks(suite: Suite, cache_dir: Path, *, require_offline: bool = True
                     ) -> list[str]:
    """Before any data or training: the suite's [eval] (and [sweep]) tasks can all be
    found. Synthetic task names are always checked strictly. `require_offline=False` (a dry
    run): when the offline benchmark copies were never fetched under `cache_dir`, the tasks
    that need them are returned as notes (one message per section) instead of raised."""
    from evals.lmeval.tasks import _benchmark_tasks_dir, check_tasks

    notes = []
    for section, tasks in (("eval", suite.evaluation.tasks),
                           ("sweep", suite.sweep.tasks if suite.sweep is not None else ())):
        if not tasks:
            continue
        where = f"{suite.source}: [{section}] "
        _check_synthetic_task_names(tasks, where)
        try:
            check_tasks(tasks, cache_dir, where=where)
        except ConfigError as e:
            if require_offline or _benchmark_tasks_dir(cache_dir).is_dir():
                raise
            notes.append(str(e))
    return notes


def _check_synthetic_task_names(tasks, where: str) -> None:
    """`check_tasks` takes every "mor_synth_*" name for a generated task; only the names
    `evals.lmeval.synthetic_tasks` writes exist (a typo would fail after training)."""
    import difflib

    from evals.lmeval.synthetic_tasks import SYNTHETIC_GROUP, SYNTHETIC_TASKS

    known = (SYNTHETIC_GROUP, *SYNTHETIC_TASKS)
    for task in tasks:
        if task.startswith("mor_synth") and task not in known:
            close = difflib.get_close_matches(task, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}unknown synthetic task {task!r}; {hint}known: "
                              f"{', '.join(known)}")


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


INTERRUPTED_EXIT = 3
"""A run process's exit code when SIGTERM/SIGINT stopped it after saving its state."""


class SuiteInterrupted(Exception):
    """SIGTERM/SIGINT stopped the suite; every finished run's record and the interrupted
    run's checkpoint are on disk (`mor-bench run SUITE --resume RUN_DIR` continues)."""

    def __init__(self, run_dir: Path, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}; resume with --resume {run_dir}")
        self.run_dir, self.signum = run_dir, signum


class StopFlag:
    """Set by SIGTERM/SIGINT; the training loop checks it after every step and saves."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        def handler(signum, frame):
            self.signum = signum
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)


def _die_with_parent() -> None:
    """Linux: the kernel kills this run process when the suite process dies (even by
    SIGKILL), so no orphan keeps training; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _failure(spec: RunSpec, suite_info: dict, out_dir: Path, e: BaseException) -> None:
    from evals.suite.provenance import provenance

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "error.txt").write_text(traceback.format_exc())
    rec = failed_record(spec.to_dict(), family=spec.config.family, suite=suite_info,
                        error=f"{type(e).__name__}: {e}", provenance=provenance())
    diagnostics = getattr(e, "diagnostics", None)
    if diagnostics is not None:  # a diverged run: where and how it went
        rec["diagnostics"] = diagnostics
    write_json_atomic(out_dir / RECORD, rec)


def _interrupted_record(spec: RunSpec, suite_info: dict, out_dir: Path, step: int | None,
                        signum: int | None) -> None:
    rec = failed_record(spec.to_dict(), family=spec.config.family, suite=suite_info,
                        error=f"interrupted by signal {signum}")
    rec.update(status="interrupted", interrupted_at_step=step)
    write_json_atomic(out_dir / RECORD, rec)


def _child_process(spec: RunSpec, suite_info: dict, run_dir: str, train_cfg: dict,
                   status_queue, live: bool, parent_pid: int) -> None:
    """The target of a run process: tie its life to the suite process, turn SIGTERM/SIGINT
    into a stop request, then `_child_main`. (The process-wide parts live here, so that
    `_child_main` can be called in a test's own process.)"""
    _die_with_parent()
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect
    stop = StopFlag()
    stop.install()
    _child_main(spec, suite_info, run_dir, train_cfg, status_queue, live, stop=stop)


def _child_main(spec: RunSpec, suite_info: dict, run_dir: str, train_cfg: dict,
                status_queue=None, live: bool = False, stop: StopFlag | None = None) -> None:
    """A run process: train, evaluate, save; on any error write a failure record (and the
    traceback to error.txt) and exit 1. The parent reports the failure. SIGTERM/SIGINT:
    save a resumable checkpoint after the current step, record "interrupted", exit
    `INTERRUPTED_EXIT`.

    live=True (the parent draws a live table on the terminal): this process's own output
    (lm-eval's notes, warnings) goes to RUN_DIR/<run_id>/run.log instead of the terminal."""
    from evals.training.loop import TrainingInterrupted

    stop = stop or StopFlag()  # never set unless installed (`_child_process`)
    run_dir_p = Path(run_dir)
    out_dir = run_dir_p / spec.run_id
    if live:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(out_dir / "run.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log_fd, 1)  # fd level: C extensions and tqdm bars land there too
        os.dup2(log_fd, 2)
        os.close(log_fd)
    status = EventSender(spec.run_id, status_queue)
    code = 0
    try:
        execute_run(spec, suite_info, run_dir_p, train_cfg, status, should_stop=stop)
        if stop():  # the signal came after training: the weights are saved, redo the rest
            _interrupted_record(spec, suite_info, out_dir, spec.plan.steps, stop.signum)
            code = INTERRUPTED_EXIT
    except TrainingInterrupted as e:
        _interrupted_record(spec, suite_info, out_dir, e.step, stop.signum)
        code = INTERRUPTED_EXIT
    except BaseException as e:  # record the failure, keep the other runs going
        _failure(spec, suite_info, out_dir, e)
        code = 1
    finally:
        if status_queue is not None:
            status_queue.close()
            status_queue.join_thread()  # every event reaches the parent before exit
    sys.exit(code)


# --------------------------------------------------------------------------------------------
# the suite


def suite_differences(old_text: str, new_text: str) -> list[str]:
    """Dotted keys whose values differ between two suite files (comments and layout do
    not count), e.g. ["train.lr", "models[2].num_recursions"]."""
    import tomllib

    def flat(obj, prefix: str = "") -> dict[str, Any]:
        if isinstance(obj, dict):
            out: dict[str, Any] = {}
            for k, v in obj.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else k))
            return out
        if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
            out = {}
            for i, v in enumerate(obj):
                out.update(flat(v, f"{prefix}[{i}]"))
            return out
        return {prefix: obj}

    old, new = flat(tomllib.loads(old_text)), flat(tomllib.loads(new_text))
    return sorted(k for k in old.keys() | new.keys() if old.get(k, None) != new.get(k, None)
                  or (k in old) != (k in new))


def _prepare(suite: Suite, out_root: Path, corpus: str | None, cache_dir: Path,
             resume: Path | None, world_size: int, emit: OnEvent):
    """Validate, then make (or, resuming, check) the suite run directory and its data.
    Returns (run_dir, runs, suite_info, suite_event)."""
    from evals.data.corpus import DataError, check_corpus
    from evals.training.device import resolve_device
    from evals.training.tracking import check_tracking

    runs = plan_runs(suite, world_size)  # validates everything before any data or compute
    try:
        resolve_device(suite.train.device)  # e.g. device = "cuda" on a machine without one
        check_tracking(suite.train.tensorboard, suite.train.wandb_project)
    except ConfigError as e:
        raise ConfigError(f"{suite.source}: {e}") from None
    check_eval_tasks(suite, cache_dir)
    check_memory(suite, runs)  # a run that cannot fit this machine, before any data
    if resume is not None:
        run_dir = _check_resumable(suite, resume, corpus)
        data_meta = read_json(run_dir / "data" / "data.json")
    else:
        check_suite_corpus(suite, corpus)  # `[data] require_corpus`: no synthetic text
        if corpus is not None:
            check_corpus(corpus)  # --corpus: its own message names it
        else:
            try:
                check_corpus(suite.data.corpus)
            except DataError as e:
                raise DataError(f"{suite.source}: [data] corpus: {e}") from None
        t_data = time.perf_counter()
        prepared = load_suite_data(suite, corpus, cache_dir)
        run_dir = make_run_dir(out_root, suite.name)
        (run_dir / "suite.toml").write_text(suite.text)

    def suite_event(kind: str, phase: str | None = None, **info: Any) -> None:
        emit(SuiteEvent(kind, suite.name, str(run_dir), phase, info))

    if resume is None:
        suite_event("start", runs=len(runs))
        data_meta = save_suite_data(suite, prepared, run_dir)
        del prepared
        suite_event("data", corpus=data_meta["corpus"], tokenizer=data_meta["tokenizer"],
                    train_tokens=data_meta["train_tokens"],
                    val_windows=data_meta["val_windows"],
                    seconds=time.perf_counter() - t_data)
    runs = [_with_vocab(r, data_meta["vocab_size"], suite) for r in runs]
    table = plan_table(runs)
    if resume is not None:
        saved = {r["run_id"]: r for r in read_json(run_dir / PLAN_FILE)}
        for row in table:
            old = saved.get(row["run_id"])
            if old is None or (old["steps"], old.get("world_size", 1)) != (
                    row["steps"], row["world_size"]):
                was = (f"{old['steps']} steps on {old.get('world_size', 1)} process(es)"
                       if old else "absent")
                raise ConfigError(
                    f"--resume {run_dir}: run {row['run_id']} was planned as {was}, now "
                    f"{row['steps']} steps on {row['world_size']}; resume with the original "
                    "number of processes (torchrun --nproc-per-node)")
    else:
        write_json_atomic(run_dir / PLAN_FILE, table)
    suite_info = {"name": suite.name, "source": suite.source, "sha256": suite.sha256,
                  "run_dir": str(run_dir), "eval": prepare_eval(suite, run_dir, cache_dir)}
    return run_dir, runs, suite_info, suite_event


def _check_resumable(suite: Suite, run_dir: Path, corpus: str | None) -> Path:
    run_dir = Path(run_dir)
    saved = run_dir / "suite.toml"
    if not saved.is_file() or not (run_dir / PLAN_FILE).is_file() or not (
            run_dir / "data" / "data.json").is_file():
        raise ConfigError(f"--resume {run_dir}: not a suite run directory (expected "
                          "suite.toml, plan.json and data/ written by `mor-bench run`)")
    marker = suite_status(run_dir)  # another host's "running" cannot be checked: allowed
    if (marker["status"] == "running" and marker.get("pid") != os.getpid()
            and marker.get("host") == socket.gethostname()):
        raise ConfigError(f"--resume {run_dir}: suite process {marker.get('pid')} is still "
                          f"running in it (since {marker.get('started')}); stop it first "
                          "(SIGTERM saves its state) or wait for it")
    if corpus is not None:
        raise ConfigError(f"--resume {run_dir}: the run directory's prepared data is reused; "
                          "drop --corpus")
    diff = suite_differences(saved.read_text(), suite.text)
    if diff:
        raise ConfigError(f"--resume {run_dir}: the suite differs from the one this "
                          f"directory was started with ({saved}) in: {', '.join(diff)}; "
                          "resume with the same suite file, or start a new run")
    return run_dir


def run_state(run_dir: Path, run_id: str) -> tuple[str, int]:
    """(what a resumed suite does with a run, its previous attempts): "done" (an ok
    record), "failed" (failed twice: kept), or "run" (no record, interrupted, or failed
    once: retried)."""
    rec_file = run_dir / run_id / RECORD
    if not rec_file.is_file():
        return "run", 0
    rec = read_json(rec_file)
    attempts = int(rec.get("attempt", 1))
    if rec.get("status") == "ok":
        return "done", attempts
    if rec.get("status") == "failed" and attempts >= 2:
        return "failed", attempts
    return "run", attempts if rec.get("status") == "failed" else attempts - 1


def run_suite(suite: Suite, out_root: Path, *, corpus: str | None = None,
              cache_dir: Path = DEFAULT_CACHE, on_event: OnEvent | None = None,
              live: bool = False, resume: Path | None = None, warn_busy: bool = False
              ) -> tuple[Path, list[dict], list[str]]:
    """Train every planned run, then the suite's after-training phases ([infer], [speed]);
    returns the run directory, the records written (failed runs included, with status
    "failed") and the ids of the runs that failed.

    `resume`: continue that suite run directory -- runs with an ok record are skipped, an
    interrupted or partial run resumes from its newest checkpoint, a failed run is retried
    once; a suite that differs from the directory's is refused (the keys named).

    Under torchrun (WORLD_SIZE > 1) every process calls this: runs train data-parallel in
    these processes (one process group for the suite), rank 0 alone writes and emits.
    SIGTERM/SIGINT: the running run saves a checkpoint and `SuiteInterrupted` is raised.

    `on_event(event)` receives, in order (`evals.suite.events`): SuiteEvent "start" and
    "data" (or "resume"); RunEvent "queued" for every run once the plan is final; then per
    run a SuiteEvent "run" (or "skip") and its RunEvents "data", "training" (repeated with
    step/total/loss), "validation", "few-shot" (suites with [eval]), "saving", and "done"
    (val_nll, tokens_per_s, wall_s) or "failed" (error); SuiteEvent "finished"; then for
    each phase "phase", "phase_log"..., and "phase_done" or "phase_failed". `live`: the
    caller draws on the terminal, so run processes write their own output to run.log
    rather than stderr. `warn_busy`: after "start"/"resume", a SuiteEvent "warning" when the
    machine's load leaves fewer free cores than each run's threads (the command line)."""
    from evals.training import distributed as D

    emit = on_event or ignore
    world = D.env_world_size()
    if world > 1:
        return _run_suite_torchrun(suite, out_root, corpus, cache_dir, emit, resume)
    # Sampled before the data preparation, whose own work (tokenizer training, encoding)
    # raises the load average it would then warn about.
    busy = _busy_warning(suite) if warn_busy else None
    run_dir, runs, suite_info, suite_event = _prepare(suite, out_root, corpus, cache_dir,
                                                      resume, 1, emit)
    if busy is not None:
        suite_event("warning", **busy)
    todo = _announce(runs, run_dir, resume, emit, suite_event)
    train_cfg = dataclasses.asdict(for_world(suite.train, 1))
    ctx = mp.get_context("spawn")
    status_queue = ctx.Queue()
    # SIGTERM (a CI timeout, `kill`, a scheduler's preemption) as KeyboardInterrupt: the
    # running run process gets SIGTERM too, saves its state, and the suite stops.
    on_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    try:
        with _status_marker(run_dir) as outcome:
            records, failed = _run_all(runs, todo, ctx, status_queue, suite_info, run_dir,
                                       train_cfg, emit, suite_event, live)
            records = _phases(suite, run_dir, records, failed, runs, train_cfg, suite_event,
                              cache_dir)
            outcome["failed"] = len(failed)
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, old_handler)
        status_queue.close()
    return run_dir, records, failed


@contextlib.contextmanager
def _status_marker(run_dir: Path, enabled: bool = True):
    """RUN_DIR/suite_status.json (`evals.suite.status`) around the suite's work: "running"
    with this process's pid, then "finished" (with what the block put in the yielded dict),
    "interrupted" (SIGTERM/SIGINT) or "failed". After a SIGKILL it still says "running";
    `evals.suite.status.suite_status` sees that the process is gone."""
    if not enabled:  # torchrun ranks other than 0
        yield {}
        return
    write_suite_status(run_dir, "running")
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except SuiteInterrupted as e:
        write_suite_status(run_dir, "interrupted",
                           signal=None if e.signum is None else int(e.signum))
        raise
    except KeyboardInterrupt:  # SIGINT/SIGTERM outside a run (an after-training phase)
        write_suite_status(run_dir, "interrupted")
        raise
    except BaseException as e:
        write_suite_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    write_suite_status(run_dir, "finished", **outcome)


def _busy_warning(suite: Suite) -> dict[str, Any] | None:
    """The "warning" event's fields when the machine's 1-minute load average leaves fewer
    free cores than each run process's threads (`evals.suite.status.busy_cores_warning`),
    else None."""
    threads = suite.train.threads or os.cpu_count() or 1  # torch's default: every core
    message = busy_cores_warning(threads)
    if message is None:
        return None
    return {"message": message, "threads": threads, "loadavg": loadavg()}


def _announce(runs, run_dir: Path, resume, emit, suite_event) -> dict[str, tuple[str, int]]:
    states = {r.run_id: run_state(run_dir, r.run_id) if resume is not None else ("run", 0)
              for r in runs}
    if resume is not None:
        suite_event("resume", done=sum(s == "done" for s, _ in states.values()),
                    todo=sum(s == "run" for s, _ in states.values()))
    for spec in runs:
        emit(RunEvent(spec.run_id, "queued", time.time(), model=spec.model_name,
                      total=spec.plan.steps))
    return states


def _phases(suite, run_dir, records, failed, runs, train_cfg, suite_event, cache_dir):
    if len(failed) < len(runs):
        if suite.infer is not None and (not (run_dir / INFER_FILE).is_file()):
            records = _after_training(
                "infer", (suite.infer,), run_dir, records, suite_event,
                samples=suite.infer.samples, gen_mean=suite.infer.gen_mean,
                batch_size=suite.infer.batch_size, repeats=suite.infer.repeats)
        if suite.speed is not None and (not (run_dir / SPEED_FILE).is_file()):
            records = _after_training("speed", (suite.speed, train_cfg), run_dir, records,
                                      suite_event, **dataclasses.asdict(suite.speed))
        if suite.sweep is not None and (not (run_dir / SWEEP_FILE).is_file()):
            names = [m.name for m in sweep_targets(suite.sweep, suite.models)]
            records = _after_training(
                "sweep", (suite.sweep, names, str(cache_dir)), run_dir, records, suite_event,
                knob=suite.sweep.knob, values=list(suite.sweep.values), models=names)
    return records


def _run_suite_torchrun(suite, out_root, corpus, cache_dir, emit, resume):
    """Every process of a torchrun group runs the suite: rank 0 prepares and writes, all
    train each run data-parallel in this process (no process per run)."""
    from evals.training import distributed as D
    from evals.training.device import resolve_device

    info = D.init_from_env(resolve_device(suite.train.device).type)
    stop = StopFlag()
    stop.install()
    try:
        prepared = None
        problem = None
        if info.is_main:
            try:
                prepared = _prepare(suite, out_root, corpus, cache_dir, resume,
                                    info.world_size, emit)
            except ConfigError as e:
                problem = str(e)
        problem = D.broadcast_object(info, problem)
        if problem is not None:
            raise ConfigError(problem)
        shared = D.broadcast_object(info, None if prepared is None else (
            str(prepared[0]), prepared[1], prepared[2]))
        run_dir, runs, suite_info = Path(shared[0]), shared[1], shared[2]
        suite_event = prepared[3] if prepared is not None else (lambda *a, **k: None)
        out = emit if info.is_main else ignore
        todo = D.broadcast_object(info, _announce(runs, run_dir, resume, out, suite_event)
                                  if info.is_main else None)
        with _status_marker(run_dir, enabled=info.is_main) as outcome:
            records, failed = _torchrun_runs(suite, runs, todo, run_dir, suite_info, info,
                                             stop, out, emit, suite_event, cache_dir)
            outcome["failed"] = len(failed)
        D.barrier(info)
        return run_dir, records, failed
    finally:
        D.shutdown()


def _torchrun_runs(suite, runs, todo, run_dir: Path, suite_info, info, stop, out, emit,
                   suite_event, cache_dir):
    """`_run_suite_torchrun`'s runs, in this process (every rank), then rank 0's
    after-training phases; returns (records, failed ids) (empty on other ranks)."""
    from evals.training import distributed as D
    from evals.training.loop import TrainingInterrupted

    train_cfg = dataclasses.asdict(for_world(suite.train, info.world_size))
    records, failed = [], []
    t0 = time.perf_counter()
    for i, spec in enumerate(runs, 1):
        state, attempts = todo[spec.run_id]
        if state != "run":
            if info.is_main:
                _skip(spec, state, run_dir, records, failed, suite_event)
            continue
        _run_started(suite_event, i, len(runs), spec)
        t_run = time.perf_counter()
        sender = EventSender(spec.run_id, emit=out)
        out_dir = run_dir / spec.run_id
        try:
            rec = execute_run(spec, suite_info, run_dir, train_cfg, sender, info=info,
                              should_stop=stop)
        except TrainingInterrupted as e:
            if info.is_main:
                _interrupted_record(spec, suite_info, out_dir, e.step, stop.signum)
                suite_event("interrupted", run_id=spec.run_id, step=e.step)
            raise SuiteInterrupted(run_dir, stop.signum or signal.SIGTERM) from None
        except Exception as e:  # noqa: BLE001 -- the run's failure record, as a run
            # process writes it (`_child_main`); the suite goes on with the next run
            if info.is_main:
                _failure(spec, suite_info, out_dir, e)
        if info.is_main:
            rec = _stamp_attempt(out_dir / RECORD, attempts + 1)
            records.append(rec)
            _emit_outcome(spec, rec, rec.get("status") != "ok", emit,
                          time.perf_counter() - t_run, failed)
        D.barrier(info)
        if stop():
            if info.is_main:
                suite_event("interrupted", run_id=None, step=None)
            raise SuiteInterrupted(run_dir, stop.signum)
    if info.is_main:
        suite_event("finished", ok=len(runs) - len(failed), count=len(runs),
                    seconds=time.perf_counter() - t0)
        records = _phases(suite, run_dir, records, failed, runs, train_cfg, suite_event,
                      cache_dir)
    return records, failed


def _skip(spec, state: str, run_dir: Path, records: list, failed: list, suite_event) -> None:
    """A resumed suite's run that is done (or failed twice): keep its record."""
    records.append(read_json(run_dir / spec.run_id / RECORD))
    suite_event("skip", run_id=spec.run_id, reason=f"{state} already")
    if state == "failed":
        failed.append(spec.run_id)


def _run_started(suite_event, index: int, count: int, spec) -> None:
    suite_event("run", index=index, count=count, run_id=spec.run_id,
                family=spec.config.family, layers=spec.config.layer_plan,
                steps=spec.plan.steps, tokens_per_step=spec.plan.tokens_per_step)


def _stamp_attempt(rec_file: Path, attempt: int) -> dict:
    rec = read_json(rec_file)
    rec["attempt"] = attempt
    write_json_atomic(rec_file, rec)
    return rec


def _emit_outcome(spec, rec, is_failed: bool, emit, wall: float, failed: list) -> None:
    if is_failed:
        failed.append(spec.run_id)
        emit(RunEvent(spec.run_id, "failed", time.time(), error=rec.get("error"),
                      wall_s=wall))
    else:
        m = rec.get("metrics", {})
        emit(RunEvent(spec.run_id, "done", time.time(), val_nll=m.get("val_nll"),
                      tokens_per_s=m.get("tokens_per_s"), wall_s=wall))


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
    out = {"infer": INFER_FILE, "speed": SPEED_FILE, "sweep": SWEEP_FILE}[phase]
    suite_event("phase_done", phase, seconds=time.perf_counter() - t0,
                file=str(run_dir / out))
    return [read_json(run_dir / r["run_id"] / RECORD)
            if (run_dir / r["run_id"] / RECORD).is_file() else r for r in records]


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


CHECKPOINT_GRACE_S = 600.0
"""How long an interrupted suite waits for its run process to save its checkpoint."""


def _run_all(runs, todo, ctx, status_queue, suite_info, run_dir, train_cfg, emit,
             suite_event, live):
    """Each run in its own process, one after the other; returns (records, failed ids)."""
    records, failed = [], []
    t0 = time.perf_counter()
    for i, spec in enumerate(runs, 1):
        state, attempts = todo[spec.run_id]
        rec_file = run_dir / spec.run_id / RECORD
        if state != "run":
            _skip(spec, state, run_dir, records, failed, suite_event)
            continue
        _run_started(suite_event, i, len(runs), spec)
        t_run = time.perf_counter()
        if rec_file.is_file():  # a previous attempt's record: this attempt writes its own
            rec_file.unlink()
        proc = ctx.Process(target=_child_process, name=f"mor-bench-{spec.run_id}",
                           args=(spec, suite_info, str(run_dir), train_cfg, status_queue, live,
                                 os.getpid()))
        proc.start()
        peak = _PeakMemory(proc.pid)  # what error.txt can say if the OOM killer strikes
        try:
            relay(status_queue, proc, peak.watching(emit))
            proc.join()
        except KeyboardInterrupt as e:  # SIGTERM / Ctrl-C: let the run save, then stop
            signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
                proc.join(CHECKPOINT_GRACE_S)
            relay(status_queue, proc, emit)
            rec = read_json(rec_file) if rec_file.is_file() else {}
            suite_event("interrupted", run_id=spec.run_id,
                        step=rec.get("interrupted_at_step"))
            raise SuiteInterrupted(run_dir, signum) from None
        finally:
            if proc.is_alive():  # an error in the view: no orphans
                proc.terminate()
                proc.join(CHECKPOINT_GRACE_S)
                if proc.is_alive():
                    proc.kill()
        if proc.exitcode == INTERRUPTED_EXIT:  # the run process alone got the signal
            suite_event("interrupted", run_id=spec.run_id,
                        step=read_json(rec_file).get("interrupted_at_step"))
            raise SuiteInterrupted(run_dir, signal.SIGTERM)
        if not rec_file.is_file():  # killed before it could write its failure record
            error = f"process exited with code {proc.exitcode}"
            if proc.exitcode == -signal.SIGKILL:
                error = _write_killed_error(run_dir / spec.run_id, proc.pid, peak.bytes)
            write_json_atomic(rec_file, failed_record(
                spec.to_dict(), family=spec.config.family, suite=suite_info, error=error))
        rec = _stamp_attempt(rec_file, attempts + 1)
        records.append(rec)
        _emit_outcome(spec, rec, proc.exitcode != 0 or rec.get("status") != "ok", emit,
                      time.perf_counter() - t_run, failed)
    suite_event("finished", ok=len(runs) - len(failed), count=len(runs),
                seconds=time.perf_counter() - t0)
    return records, failed


KILLED_HINT = (
    "Nothing in the run process itself reports this: SIGKILL cannot be caught. The suite "
    "process did not send it, so it came from outside -- most likely the kernel's "
    "out-of-memory killer (check `dmesg` or `journalctl -k` for \"Out of memory: Killed "
    "process {pid}\"). If so, use less memory per step: a smaller [train] batch_size with a "
    "larger grad_accum keeps the same global batch (and so the same results' meaning), or "
    "choose a smaller preset; then `mor-bench run SUITE --resume RUN_DIR` retries this run.")
"""error.txt of a run process killed by SIGKILL (`_write_killed_error`)."""


class _PeakMemory:
    """The peak resident memory of a run process as last seen by the suite process: read
    from /proc whenever the run sends an event (a process killed by SIGKILL cannot report
    its own). A lower bound of the peak at the kill."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.bytes: int | None = None

    def sample(self) -> None:
        now = peak_rss_bytes(self.pid)
        if now is not None and (self.bytes is None or now > self.bytes):
            self.bytes = now

    def watching(self, emit: OnEvent) -> OnEvent:
        def emit_and_sample(event) -> None:
            self.sample()
            emit(event)
        return emit_and_sample


def _write_killed_error(out_dir: Path, pid: int, peak_bytes: int | None = None) -> str:
    """The run process died of SIGKILL (no traceback, no record of its own): explain in
    out_dir/error.txt, and return the record's one-line error."""
    error = ("killed by SIGKILL (exit code -9), most likely by the kernel's out-of-memory "
             "killer; try a smaller batch_size with grad_accum, or a smaller preset")
    if peak_bytes is not None:
        total = total_memory_bytes()
        of = f" of the machine's {total / 2**20:,.0f} MiB" if total else ""
        memory = (f"Peak resident memory last seen: {peak_bytes / 2**20:,.0f} MiB{of} (read "
                  "while it ran; the peak at the kill was likely higher).")
    else:
        memory = "Its peak memory is unknown (it was not seen before the kill)."
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "error.txt").write_text(f"run process {pid} {error}.\n{memory}\n\n"
                                       f"{KILLED_HINT.format(pid=pid)}\n")
    return error


def _with_vocab(spec: RunSpec, vocab_size: int, suite: Suite) -> RunSpec:
    """The run with the tokenizer's real vocabulary (known only once data is loaded), its
    plan recomputed: paper FLOPs ignore the head, but exact FLOPs and params do not."""
    if spec.config.vocab_size == vocab_size:
        return spec
    cfg = spec.config.replace(vocab_size=vocab_size)
    t = for_world(suite.train, spec.plan.world_size)
    plan = plan_training(cfg, spec.budget, suite.data.seq_len, t.batch_size, t.grad_accum,
                         spec.plan.world_size, spec.plan.step_rule)
    return dataclasses.replace(spec, config=cfg, plan=plan)


def dry_run(suite: Suite) -> list[dict[str, Any]]:
    return plan_table(plan_runs(suite))

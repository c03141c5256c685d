"""The run-record schema: one self-describing JSON file per run, the only input of reports.

A suite run directory holds, per run, ``RUN_DIR/<run_id>/record.json`` (`RECORD`) and
optionally the side files named below; the suite writes ``infer.json`` / ``speed.json`` /
``plan.json`` next to the run folders. Every file is written atomically (temporary file +
rename, `write_json_atomic`), so a crash never leaves half a record. docs/records.md
describes every field.

This module is a leaf: it imports only the standard library, so reports (and anything else
that reads records) work in a Python without torch or the model code.
"""

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "DEPTH_SAMPLE", "FEWSHOT_ITEMS", "INFER_FILE", "PLAN_FILE", "RECORD", "SCHEMA",
    "SPEED_FILE", "SWEEP_DIR", "SWEEP_FILE", "DataInfo", "DepthExport", "FewshotResult",
    "FewshotTask", "InferMetrics",
    "KvCache", "Metrics", "Plan", "Record", "RecordError", "SpeedMetrics", "SuiteInfo",
    "check_depth_export", "failed_record", "hardware_summary", "load_records", "read_json",
    "utc_now", "write_json_atomic",
]

SCHEMA = "mor-bench/run-record/v1"
"""Value of every record's "schema" key; `load_records` rejects anything else."""

RECORD = "record.json"
"""A run's record: RUN_DIR/<run_id>/record.json."""
FEWSHOT_ITEMS = "fewshot_items.json"
"""Per-item few-shot outcomes of a run, next to its record.json."""
DEPTH_SAMPLE = "depth_sample.json"
"""Per-token recursion depths of one sample text (MoR runs), next to its record.json."""
INFER_FILE = "infer.json"
"""The suite's interleaved inference measurement, RUN_DIR/infer.json."""
SPEED_FILE = "speed.json"
SWEEP_FILE = "sweep.json"
"""RUN_DIR/sweep.json: the [sweep] phase's index (one entry per swept run); each run's sweep
document is RUN_DIR/sweeps/<run_id>.json (`evals.perf.sweep`)."""
SWEEP_DIR = "sweeps"
"""The suite's interleaved training-throughput measurement, RUN_DIR/speed.json."""
PLAN_FILE = "plan.json"
"""The planned runs of a suite, RUN_DIR/plan.json."""


class RecordError(ValueError):
    """A record (or a run directory) is missing, unreadable or not a mor-bench record."""


# --------------------------------------------------------------------------------------------
# Typed description of a record. `total=False` / NotRequired marks what may be absent; a
# value that may be JSON null is typed `X | None`. Failed runs carry only the keys of
# `failed_record` (and "metrics" is empty).
# --------------------------------------------------------------------------------------------

class Budget(TypedDict):
    kind: Literal["flops", "tokens", "steps"] | str
    value: float


class Plan(TypedDict):
    """What the planner chose for the run's budget."""
    flops_per_token: float          # paper convention (6N + attention)
    flops_per_token_exact: float    # counted from the layer plan
    flops_used: float
    steps: int
    tokens: int
    tokens_per_step: int


class SuiteInfo(TypedDict):
    name: str
    run_dir: str                    # the suite run directory; one report = one run_dir
    source: str                     # builtin:<name> or the suite file
    sha256: str                     # of the suite file
    eval: NotRequired[dict[str, Any] | None]  # few-shot settings of the suite


class DataInfo(TypedDict):
    corpus: str                     # "synthetic" or a dataset name
    fingerprint: str
    tokenizer: str
    vocab_size: int
    seq_len: int
    n_train_docs: int
    n_val_docs: int
    train_tokens: int
    train_windows: int
    val_windows: int
    val_bytes_per_token: float
    # Names of the synthetic corpus's difficulty classes, in class-id order; only when the
    # corpus is synthetic.
    difficulty_classes: NotRequired[list[str]]


class KvCache(TypedDict):
    """Analytic KV-cache bytes of ONE sequence of `seq_len` tokens (data seq_len)."""
    seq_len: int
    bytes_per_seq: int


class InferMetrics(TypedDict, total=False):
    """Interleaved inference measurement of the run (its primary scheduler's row of
    infer.json; all keys optional)."""
    tokens_per_s: float
    rel_tokens_per_s: float | None  # / the reference's tokens/s, same interleaved rounds
    reference: str | None           # the vanilla model it is relative to
    ms_per_token: float
    ms_per_iteration: float
    batch_size: int
    kv_cache_bytes: int             # measured, for the whole batch
    param_bytes: int
    mean_depth: float | None
    shared_batch_fill: float | None
    capped_frac: float | None
    scheduler: str                  # "depth" or "sequence"
    routing: str | None
    tokens: int
    time_s: float
    sequence: dict[str, Any]        # the "sequence" scheduler's row, when both ran
    settings: dict[str, Any]        # the suite's [infer] settings
    max_len: int


class SpeedMetrics(TypedDict):
    """Training-step throughput measured INTERLEAVED (A B A B rounds in one process, after
    all runs trained), so rel_tokens_per_s compares runs under the same machine state."""
    tokens_per_s: float
    rel_tokens_per_s: float | None  # / the reference's tokens/s; None without a reference
    # run_id of the vanilla run of the same seed, else the first vanilla run by run_id;
    # None when the suite has no vanilla model.
    reference: str | None
    rounds: int
    steps_per_round: int
    tokens_per_step: int


class FewshotTask(TypedDict):
    metrics: dict[str, float]       # e.g. {"acc_norm": 0.47}
    stderr: dict[str, float]
    n: int
    subtasks: list[str]


class FewshotResult(TypedDict, total=False):
    tasks: dict[str, FewshotTask]   # under the configured routing
    by_routing: dict[str, dict[str, FewshotTask]]  # MoR: both routing modes
    routing: str | None
    scoring: NotRequired[str | None]  # "shared_prefix" | "plain" (docs: README few-shot)
    scoring_by_routing: NotRequired[dict[str, str | None]]
    num_fewshot: int
    limit: int | float | None
    lm_eval_version: str


class Metrics(TypedDict, total=False):
    """All keys are absent from failed records; optional phases may be absent from ok ones."""
    val_nll: float
    val_bpb: float
    val_tokens: int
    val_nll_by_routing: dict[str, float]   # MoR expert-choice: "topk" and "causal"
    final_train_loss: float
    train_time_s: float
    tokens_per_s: float             # SEQUENTIAL: this run's own training, not comparable
    peak_mem_bytes: int | None
    peak_mem_kind: str | None
    steps: int
    tokens: int
    flops_used: float
    flops_used_effective: float
    flops_per_token_effective: float
    train_flops_exact: float
    achieved_flops_per_s: float | None
    mfu: float | None
    routing: dict[str, float]       # training-average routing statistics (MoR)
    val_routing: dict[str, float]
    val_routing_by_mode: dict[str, dict[str, float]]
    depth_by_mode: dict[str, dict[str, Any]]  # {mode: {mean_depth, depth_share, by_class}}
    fewshot: FewshotResult
    infer: InferMetrics
    speed: SpeedMetrics


class Record(TypedDict):
    schema: str                     # == SCHEMA
    status: Literal["ok", "failed", "interrupted"]  # interrupted: resumable (--resume)
    run_id: str
    model_name: str
    preset: str
    seed: int
    budget: Budget
    config: dict[str, Any]          # the model config (family, layer plan fields, ...)
    plan: Plan
    warmup_steps: int               # learning-rate warm-up steps of the plan
    family: str | None              # "vanilla" | "recursive" | "mor"
    suite: SuiteInfo
    metrics: Metrics
    finished_at: str                # UTC ISO-8601, seconds
    provenance: NotRequired[dict[str, Any]]  # git, versions, hardware, argv
    error: NotRequired[str]         # failed records only
    diagnostics: NotRequired[dict[str, Any]]  # a diverged run: last finite step, LR, grad norms
    interrupted_at_step: NotRequired[int]     # interrupted records: the checkpointed step
    attempt: NotRequired[int]       # 1, or 2 when --resume retried a failed run
    resumed: NotRequired[list[dict[str, Any]] | None]  # [{from_step, checkpoint}] per resume
    distributed: NotRequired[dict[str, Any]]  # world_size, parallel, global_batch_sequences
    backend: NotRequired[dict[str, Any]]      # TF32 / cuDNN / SDPA / deterministic in force
    # ok records only:
    params: NotRequired[dict[str, int]]       # total, unique, non_embedding
    layer_plan: NotRequired[str]
    eval_routing: NotRequired[str | None]
    router: NotRequired[str | None]
    kv: NotRequired[str | None]
    data: NotRequired[DataInfo]
    train: NotRequired[dict[str, Any]]        # the TrainConfig
    kv_cache: NotRequired[KvCache]
    loss_curve: NotRequired[list[dict[str, float]]]
    peak_flops_per_s: NotRequired[float | None]
    device: NotRequired[str]
    checkpoint: NotRequired[str]
    started_at: NotRequired[str]
    load: NotRequired[dict[str, Any] | None]  # the load a run trained under (contended?)


class DepthExport(TypedDict):
    """depth_sample.json: per-token depths of one sample text."""
    tokens: list[str]
    depths: list[int]               # each in 0..num_recursions
    routing: str | None
    num_recursions: int
    ids: NotRequired[list[int]]
    router: NotRequired[str]
    text: NotRequired[str]


# --------------------------------------------------------------------------------------------
# Reading and writing.
# --------------------------------------------------------------------------------------------

def utc_now() -> str:
    """Now, UTC, ISO-8601 to the second (the format of started_at / finished_at)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (0o644 under 0o022):
    what every file mor-bench writes gets, temporary-file-and-rename writes included."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` via a temporary file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; the result is an ordinary file
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any:
    """Parse one JSON file; RecordError naming the file when it is missing or not JSON."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecordError(f"'{path}' does not exist") from None
    except OSError as e:
        raise RecordError(f"cannot read '{path}': {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"'{path}' is not valid JSON ({e}); delete or re-run it") from None


def failed_record(spec: dict[str, Any], *, family: str | None, suite: dict[str, Any],
                  error: str, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a run that did not finish. `spec`: the run's spec as a dict (run_id,
    model_name, config, plan, ...); `error`: one line, e.g. "ValueError: ..."."""
    rec: dict[str, Any] = {"schema": SCHEMA, "status": "failed", **spec, "family": family,
                           "suite": suite, "error": error, "finished_at": utc_now(),
                           "metrics": {}}
    if provenance is not None:
        rec["provenance"] = provenance
    return rec


def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records under a suite run directory (or a single record.json), sorted by id.

    RecordError when the path does not exist, holds no record, holds a file that is not a
    record, or holds records of more than one suite run."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        files = [run_dir]
    elif run_dir.is_dir():
        files = sorted(run_dir.rglob(RECORD))
    else:
        raise RecordError(f"run directory '{run_dir}' does not exist; pass the directory "
                          "that `mor-bench run` printed")
    records = []
    for f in files:
        rec = read_json(f)
        schema = rec.get("schema") if isinstance(rec, dict) else None
        if schema != SCHEMA:
            raise RecordError(f"'{f}' is not a mor-bench run record (schema "
                              f"{schema!r}, expected {SCHEMA!r})")
        records.append(rec)
    if not records:
        raise RecordError(f"no {RECORD} files under '{run_dir}'; is this a mor-bench run "
                          "directory?")
    # One report = one suite run: records of several runs would be averaged as if they were
    # seeds of one model.
    origins = sorted({str(r.get("suite", {}).get("run_dir")) for r in records})
    ids = [r.get("run_id") for r in records]
    if len(origins) > 1:
        raise RecordError(f"'{run_dir}' holds records of {len(origins)} suite runs "
                          f"({', '.join(origins[:3])}{', ...' if len(origins) > 3 else ''}); "
                          "pass one run directory")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise RecordError(f"'{run_dir}' holds run {', '.join(map(str, dup))} more than once "
                          "(a copied run directory?); pass one run directory")
    return sorted(records, key=lambda r: r["run_id"])


def hardware_summary(hw: dict[str, Any]) -> str:
    """One line for tables and figure captions, from record["provenance"]["hardware"]."""
    if hw.get("cuda"):
        return f"{hw['cuda']['name']} x{hw['cuda']['count']}"
    return f"{hw.get('cpu')} ({hw.get('torch_threads')} threads)"


def check_depth_export(data: Any, where: str = "depth export") -> None:
    """Raise RecordError unless `data` (a depth_sample.json) has matching tokens/depths and
    depths in 0..num_recursions."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in ("tokens", "depths", "routing", "num_recursions") if k not in data]
    if missing:
        raise RecordError(f"{where}: missing key(s) {', '.join(missing)}")
    tokens, depths, nr = data["tokens"], data["depths"], data["num_recursions"]
    if not isinstance(nr, int) or nr < 1:
        raise RecordError(f"{where}: num_recursions must be a positive int, got {nr!r}")
    if not isinstance(tokens, list) or not isinstance(depths, list) or \
            len(tokens) != len(depths):
        raise RecordError(f"{where}: tokens and depths must be lists of equal length")
    bad = [d for d in depths if not isinstance(d, int) or not 0 <= d <= nr]
    if bad:
        raise RecordError(f"{where}: depths must be ints in 0..{nr}, got {bad[:3]}")


"""Suite files: which models to compare, on what data, under which compute budget.

A suite is a TOML file; the built-ins ship in `evals/suite/builtins/` and are addressed by name
(`mor-bench run smoke`). Everything is validated here -- every model config is built and
every training length planned -- before any data is touched or any step is trained.

    name = "smoke"
    seeds = [0]
    [data]     corpus, tokenizer, seq_len, val_fraction, synthetic_docs, max_docs, val_windows
    [budget]   flops = [2e13]   (forward FLOPs, paper convention)   or   tokens = [1e6]
    [train]    any `evals.training.loop.TrainConfig` field
    [defaults] model config fields (and `preset`) applied to every model
    [[models]] name = "...", then `preset` and any `mor.ModelConfig` field; an optional
               `budget = {tokens = ...}` replaces the suite budget for that model
    [eval]     few-shot tasks through lm-evaluation-harness (`EvalSettings`)
    [infer]    generation-throughput benchmark after training (`evals.perf.generation`)
    [speed]    interleaved training-speed ratios after training (`evals.perf.train_speed`)
    [sweep]    the efficiency knob of each MoR model after training (`evals.perf.sweep`)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from evals.data.corpus import DataSpec
from evals.data.tokenizer import MIN_BPE_VOCAB, TOKENIZER_SPEC_FORMS
from evals.training.budget import Budget, TrainPlan, plan_training
from evals.training.loop import TrainConfig
from mor.config import PRESETS, ModelConfig
from mor.errors import ConfigError

_TOP_KEYS = {"name", "description", "seeds", "data", "budget", "train", "defaults", "models",
             "eval", "infer", "speed", "sweep"}


BATCH_MODES = ("max",)
SCHEDULER_CHOICES = ("auto", "sequence", "depth", "both")
THROUGHPUT_MODEL_CHOICES = ("auto", "quick", "off")
MAX_SEED = 2**32 - 1
"""Seeds (suite `seeds`, [infer] seed) are 0..2^32-1: what every RNG they feed (torch, numpy,
Python) accepts, with room for the derived per-epoch and per-request seeds."""
_INT64 = (-(2**63), 2**63 - 1)  # TOML's integer range; tomllib itself accepts any size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A finite int or float that is not a bool (NaN passes no range test the right way)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _settings_from_dict(cls, data: dict[str, Any], where: str, kind: str):
    """A settings table of a suite file: unknown keys named, field errors prefixed."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}unknown {kind} setting(s) {unknown}; known: "
                          f"{', '.join(sorted(known))}")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


@dataclass(frozen=True)
class InferSettings:
    """The benchmark's settings; a suite's [infer] table holds any of these fields."""

    samples: int = 64
    """Sequences generated per model and round (paper: 1000)."""
    gen_mean: float = 128.0
    """Mean generation length in tokens (paper: 256)."""
    gen_std: float = 32.0
    """Standard deviation of the generation length; lengths are clipped to [1, max_len - 1]."""
    max_len: int | None = None
    """Cache length per sequence (default: the longest drawn length + 1, at most each
    model's max_seq_len)."""
    batch_size: int | str = 32
    """Sequence slots decoded together: an integer, or "max" (see `memory_budget_mb`)."""
    memory_budget_mb: float | None = None
    """For batch_size = "max": parameter + KV-cache bytes allowed per model (MiB). Default:
    what the reference model needs at `reference_batch`."""
    reference_batch: int = 32
    """The reference (vanilla) model's batch that defines the default memory budget."""
    repeats: int = 3
    """Timed rounds per model (interleaved); medians are reported."""
    seed: int = 0
    """Seeds the generation lengths and every request's sampling stream."""
    temperature: float = 1.0
    """0 = greedy."""
    kv_capacity: str = "routed"
    """MoR cache per recursion step: "routed" (k_r = c_r * max_len tokens, the paper's
    memory) or "full" (every step can hold every token)."""
    scheduler: str = "auto"
    """MoR: "depth" (depth-wise batching), "sequence", "both", or "auto": the scheduler the
    throughput model predicts is faster for this model, batch and device (depth-wise when
    `throughput_model` is "off" or the device has no profile); the choice is recorded."""
    throughput_model: str = "auto"
    """Project every measurement with the throughput model (docs/throughput_model.md) and
    report its roofline card beside it: "auto" (on a CPU: calibrate this CPU first, ~12 s;
    on an H100/H200/A100: datasheet figures; other devices: none), "quick" (a ~1 s CPU
    calibration, coarser), or "off"."""
    threads: int | None = None
    """torch threads (None: torch's default)."""
    device: str = "cpu"
    """"cpu", "cuda" or "auto" (CUDA when available). Models decode in their stored dtype."""

    def __post_init__(self) -> None:
        def fail(field: str, msg: str) -> None:
            raise ConfigError(f"infer setting '{field}': {msg}")

        def integer(field: str, low: int, optional: bool = False) -> None:
            v = getattr(self, field)
            if not (optional and v is None) and (not _is_int(v) or v < low):
                fail(field, f"must be an integer >= {low}, got {v!r}")

        def number(field: str, low: float, strict: bool, optional: bool = False) -> None:
            v = getattr(self, field)
            if optional and v is None:
                return
            if not _is_real(v) or (v <= low if strict else v < low):
                fail(field, f"must be a finite number {'>' if strict else '>='} {low:g}, "
                     f"got {v!r}")

        integer("samples", 1)
        number("gen_mean", 1, strict=False)
        number("gen_std", 0, strict=False)
        if isinstance(self.batch_size, str):
            if self.batch_size not in BATCH_MODES:
                fail("batch_size", f"an integer >= 1 or \"max\", got {self.batch_size!r}")
        elif not _is_int(self.batch_size) or self.batch_size < 1:
            fail("batch_size", f"an integer >= 1 or \"max\", got {self.batch_size!r}")
        number("memory_budget_mb", 0, strict=True, optional=True)
        integer("reference_batch", 1)
        integer("repeats", 1)
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            fail("seed", f"must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        number("temperature", 0, strict=False)
        if self.kv_capacity not in ("routed", "full"):
            fail("kv_capacity", f"\"routed\" or \"full\", got {self.kv_capacity!r}")
        if self.scheduler not in SCHEDULER_CHOICES:
            fail("scheduler", f"one of {SCHEDULER_CHOICES}, got {self.scheduler!r}")
        if self.throughput_model not in THROUGHPUT_MODEL_CHOICES:
            fail("throughput_model", f"one of {THROUGHPUT_MODEL_CHOICES}, got "
                 f"{self.throughput_model!r}")
        integer("max_len", 2, optional=True)
        integer("threads", 1, optional=True)
        if self.device not in ("cpu", "cuda", "auto"):
            fail("device", f"\"cpu\", \"cuda\" or \"auto\", got {self.device!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> InferSettings:
        return _settings_from_dict(cls, data, where, "infer")


KNOBS = ("threshold", "capacity", "depth-bias")


@dataclass(frozen=True)
class SweepSettings:
    """The efficiency knob swept on a trained MoR checkpoint (`mor-bench sweep`, a suite's
    [sweep] table; docs/routing.md "The efficiency knob"). Each value is one point: a number
    or a per-step list "a:b:c" (see `evals.perf.sweep.knob_for` for what each knob's values
    mean)."""

    knob: str = "threshold"
    """"threshold" (expert-choice, causal rule), "capacity" (expert-choice, top-k), or
    "depth-bias" (token-choice)."""
    values: tuple[str, ...] = ()
    """The knob's values, one point each (strings or numbers). With calibrate (threshold
    knob) or for the capacity knob: target mean depths, or per-step fractions "1:0.5:0.2"."""
    calibrate: bool = False
    """Threshold knob: pick each point's thresholds on held-out windows to hit a target
    depth (the values), or, with no values, the trained capacities."""
    models: tuple[str, ...] = ()
    """Suite [sweep]: the model names to sweep (default: every MoR model of its knob's
    router kind)."""
    tasks: tuple[str, ...] = ("mor_synthetic",)
    """lm-eval tasks scored at each point (() = none)."""
    limit: int | None = 100
    """Items per task."""
    num_fewshot: int = 0
    samples: int = 64
    """Generated sequences per point and round (tokens/s)."""
    gen_mean: float = 64.0
    gen_std: float = 16.0
    batch_size: int = 16
    """Decode slots (the same for every point and reference)."""
    repeats: int = 3
    """Interleaved timing rounds; medians."""
    temperature: float = 1.0
    seed: int = 0
    val_windows: int | None = None
    """Held-out windows used (None: all); the first half calibrates, the second measures."""
    threads: int | None = None

    def __post_init__(self) -> None:
        def fail(field: str, msg: str) -> None:
            raise ConfigError(f"sweep setting '{field}': {msg}")

        if self.knob not in KNOBS:
            fail("knob", f"one of {', '.join(KNOBS)}, got {self.knob!r}")
        for field in ("values", "models", "tasks"):
            v = getattr(self, field)
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
                fail(field, f"must be a list, got {v!r}")
            object.__setattr__(self, field, tuple(str(x) for x in v))
        if not isinstance(self.calibrate, bool):
            fail("calibrate", f"true or false, got {self.calibrate!r}")
        if not self.values and not (self.calibrate and self.knob == "threshold"):
            fail("values", "needs at least one value (only the calibrated threshold knob has "
                 "a default point: the trained capacities)")
        if self.calibrate and self.knob != "threshold":
            fail("calibrate", f"applies to the threshold knob (the capacity knob always "
                 f"calibrates its decoding thresholds; depth-bias has none), not {self.knob!r}")
        for field, low, optional in (("limit", 1, True), ("num_fewshot", 0, False),
                                     ("samples", 1, False), ("batch_size", 1, False),
                                     ("repeats", 1, False), ("val_windows", 2, True),
                                     ("threads", 1, True)):
            v = getattr(self, field)
            if not (optional and v is None) and (not _is_int(v) or v < low):
                fail(field, f"must be an integer >= {low}, got {v!r}")
        for field, low in (("gen_mean", 1.0), ("gen_std", 0.0), ("temperature", 0.0)):
            v = getattr(self, field)
            if not _is_real(v) or v < low:
                fail(field, f"must be a finite number >= {low:g}, got {v!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            fail("seed", f"must be an integer in 0..{MAX_SEED}, got {self.seed!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> SweepSettings:
        return _settings_from_dict(cls, data, where, "sweep")


@dataclass(frozen=True)
class SpeedSettings:
    """A suite's [speed] table: after training, every successful run's checkpoint trains a
    few more steps on the suite's training windows, all models interleaved in one process
    (A B A B rounds, `evals.perf.train_speed.interleaved_train_speed`), so a busy machine
    slows every model alike and the ratios to vanilla stay comparable."""

    rounds: int = 3
    """Interleaved rounds; each model's median round is reported."""
    steps_per_round: int = 3
    """Timed training steps per model and round."""
    warmup_steps: int = 1
    """Untimed steps per model before the first round."""

    def __post_init__(self) -> None:
        for name, low in (("rounds", 1), ("steps_per_round", 1), ("warmup_steps", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"speed setting '{name}': must be an integer >= {low}, "
                                  f"got {v!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> SpeedSettings:
        return _settings_from_dict(cls, data, where, "speed")


@dataclass(frozen=True)
class EvalSettings:
    """A suite's [eval] table: few-shot tasks run through lm-evaluation-harness after
    training (expert-choice MoR under both top-k and causal routing)."""

    tasks: tuple[str, ...] = ()
    """lm-eval task or group names: "mor_synthetic" (generated with the run), the offline
    paper tasks ("mor_paper_local", "hellaswag_local", ... after `mor-bench data
    benchmarks`), or any lm-eval task name (needs the Hugging Face Hub)."""
    num_fewshot: int = 0
    """Shots per item (the paper's released configs: 0)."""
    limit: int | None = None
    """Evaluate only the first `limit` items of each task (quick runs)."""
    batch_size: int = 32
    """Requests per forward pass (scores do not depend on it)."""


@dataclass(frozen=True)
class DataSettings(DataSpec):
    """A suite's [data] table: the data spec plus how much of validation to use."""

    val_windows: int = 64
    """Held-out windows of seq_len tokens used for validation NLL (the paper: 500 x 2048)."""
    require_corpus: bool = False
    """A study of real text: the suite refuses the synthetic corpus, so `mor-bench run`
    needs `--corpus PATH` (or a `corpus` other than "synthetic"); `check_corpus`."""

    def planned_vocab(self) -> int | None:
        """Vocabulary size knowable without loading data (None for HF tokenizers)."""
        if self.tokenizer == "bytes":
            return 257
        if self.tokenizer.startswith("bpe:") and self.tokenizer[4:].isdigit():
            return int(self.tokenizer[4:])
        return None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: ModelConfig
    budgets: tuple[Budget, ...]
    preset: str | None = None
    init: dict[str, Any] | None = None
    """Uptraining (docs/uptraining.md): {"source": "hf:..." | a checkpoint path |
    "model:NAME", "method": stepwise | average | lower (recursive/MoR), "fit_gate": bool}."""
    seeds: tuple[int, ...] | None = None
    """The entry's own `seeds` (None = the suite's): e.g. one pretrained source shared by
    every seed of the models uptrained from it."""


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    source: str           # file path, or "builtin:NAME"
    text: str             # the TOML text, kept verbatim for provenance
    seeds: tuple[int, ...]
    data: DataSettings
    train: TrainConfig
    models: tuple[ModelEntry, ...]
    evaluation: EvalSettings = EvalSettings()
    infer: InferSettings | None = None
    """The [infer] table: after training, every model's generation throughput, measured
    side by side (`evals.perf.generation`); None = no inference phase."""
    speed: SpeedSettings | None = None
    """The [speed] table: after training, interleaved training-speed ratios
    (`evals.perf.train_speed`); None = no speed phase."""
    sweep: SweepSettings | None = None
    """The [sweep] table: after training, the efficiency knob of each MoR model swept
    (`evals.perf.sweep`), the suite's vanilla/recursive models as reference points."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class RunSpec:
    """One training run: a model at one budget with one seed."""

    run_id: str
    model_name: str
    config: ModelConfig
    budget: Budget
    seed: int
    plan: TrainPlan
    warmup_steps: int
    preset: str | None = None
    init: dict[str, Any] | None = None
    """The entry's `init`, with "model:NAME" resolved to "run:RUN_ID" (same seed)."""
    mem_estimate: int | None = None
    """Estimated peak bytes of one training process (`evals.training.memory`)."""

    def to_dict(self) -> dict[str, Any]:
        out = {
            "run_id": self.run_id, "model_name": self.model_name, "preset": self.preset,
            "config": self.config.to_dict(),
            "budget": {"kind": self.budget.kind, "value": self.budget.value},
            "seed": self.seed, "plan": self.plan.to_dict(), "warmup_steps": self.warmup_steps,
        }
        if self.init is not None:
            out["init_plan"] = dict(self.init)
        return out


def builtin_suites() -> dict[str, str]:
    """Built-in suite name -> TOML text."""
    root = resources.files("evals") / "suite" / "builtins"
    return {p.name.removesuffix(".toml"): p.read_text() for p in root.iterdir()
            if p.name.endswith(".toml")}


def load_suite(name_or_path: str) -> Suite:
    builtins = builtin_suites()
    if name_or_path in builtins:
        return parse_suite(builtins[name_or_path], f"builtin:{name_or_path}")
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"suite '{name_or_path}' is neither a built-in suite "
                          f"({', '.join(sorted(builtins))}) nor an existing TOML file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the suite file ({e.strerror or e}); check "
                          "its permissions") from None
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not an error
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at line {line}, "
                          f"offset {e.start}); TOML files are UTF-8: re-save the file as "
                          "UTF-8") from None
    return parse_suite(text, str(path))


def _check_keys(where: str, table: dict, allowed: set[str], source: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where} must be a table, got {table!r}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))} in "
                          f"{where}; allowed: {', '.join(sorted(allowed))}")


def _check_types(where: str, table: dict, cls: type, source: str) -> None:
    """Reject values of the wrong TOML type (lr = "fast") with a message naming the field,
    before the dataclasses compare them with numbers and raise a bare TypeError."""
    types = {f.name: f.type if isinstance(f.type, str) else str(f.type)
             for f in dataclasses.fields(cls)}
    number = (int, float)
    for key, value in table.items():
        base = types.get(key, "").split("|")[0].strip()
        is_num = isinstance(value, number) and not isinstance(value, bool)
        if base == "int":
            ok, want = is_num and isinstance(value, int), "an integer"
        elif base == "float":
            ok, want = is_num, "a number"
        elif base == "str":
            ok, want = isinstance(value, str), "a string"
        elif base == "bool":
            ok, want = isinstance(value, bool), "true or false"
        elif base.startswith("tuple["):
            inner = [t.strip() for t in base[6:-1].split(",")]
            size = None if "..." in inner else len(inner)
            ok = (isinstance(value, list | tuple) and (size is None or len(value) == size)
                  and all(isinstance(v, number) and not isinstance(v, bool) for v in value))
            want = f"a list of {size} numbers" if size else "a list of numbers"
        else:
            continue
        if not ok:
            raise ConfigError(f"{source}: {where} field '{key}' must be {want}, got {value!r}")


def _budgets(table: Any, where: str, source: str) -> tuple[Budget, ...]:
    if not isinstance(table, dict) or len(table) != 1 or next(iter(table)) not in ("flops",
                                                                                   "tokens"):
        raise ConfigError(f"{source}: {where} needs exactly one key, 'flops' or 'tokens' "
                          "(a number or a list of numbers)")
    kind, values = next(iter(table.items()))
    values = values if isinstance(values, list) else [values]
    if not values:
        raise ConfigError(f"{source}: {where}.{kind} is empty")
    if not all(_is_real(v) and v > 0 for v in values):
        raise ConfigError(f"{source}: {where}.{kind} must hold finite numbers > 0, got "
                          f"{values!r}")
    if kind == "tokens" and any(float(v) != int(v) for v in values):
        raise ConfigError(f"{source}: {where}.tokens must be whole numbers, got {values!r}")
    if len({f"{float(v):.6g}" for v in values}) != len(values):
        raise ConfigError(f"{source}: {where}.{kind} lists the same budget twice ({values}); "
                          "budgets must differ in their first 6 significant digits")
    try:
        if kind == "flops":
            return tuple(Budget(flops=float(v)) for v in values)
        return tuple(Budget(tokens=int(v)) for v in values)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{source}: {where}: {e}") from None
        raise ConfigError(f"{source}: {where}.{kind} must hold numbers, got {values!r}") from None


def _check_int_range(value: Any, where: str, source: str) -> None:
    """TOML integers are 64-bit; tomllib accepts any size, so a 30-digit seed or batch size
    would reach torch (or a string conversion limit) and fail deep inside a run."""
    if isinstance(value, dict):
        for key, v in value.items():
            _check_int_range(v, f"{where}.{key}" if where else str(key), source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_int_range(v, f"{where}[{i}]", source)
    elif _is_int(value) and not _INT64[0] <= value <= _INT64[1]:
        raise ConfigError(f"{source}: '{where}' is an integer of {value.bit_length()} bits, "
                          "outside TOML's 64-bit range; use a smaller value")


def _check_name(value: Any, what: str, source: str) -> str:
    """A suite or model name: it becomes part of a directory name under --out."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: {what} needs a 'name' (a non-empty string)"
                          + ("" if value is None else f", got {value!r}"))
    bad = sorted({c for c in value if c in "/\\" or not c.isprintable()})
    if bad or value in (".", ".."):
        raise ConfigError(f"{source}: {what} name {value!r} cannot name a directory"
                          + (f" (it contains {', '.join(map(repr, bad))})" if bad else "")
                          + "; use letters, digits, '-', '_' or '.'")
    return value


def _check_data(data: DataSettings, source: str) -> None:
    """[data] values beyond their types (checked before)."""
    if not data.corpus:
        raise ConfigError(f"{source}: [data] corpus is empty; use 'synthetic', a file, a "
                          "directory, a glob or hf:DATASET")
    tok = data.tokenizer
    if tok.startswith("bpe:"):
        size = tok[4:]
        if not size.isdigit() or int(size) < MIN_BPE_VOCAB:
            raise ConfigError(f"{source}: [data] tokenizer {tok!r}: the BPE vocabulary size "
                              f"must be an integer >= {MIN_BPE_VOCAB}, e.g. 'bpe:8192'")
    elif tok != "bytes" and not (tok.startswith("hf:") and len(tok) > 3):
        raise ConfigError(f"{source}: [data] tokenizer {tok!r} is unknown; use "
                          f"{TOKENIZER_SPEC_FORMS}")
    if not isinstance(data.seq_len, int) or data.seq_len < 2:
        raise ConfigError(f"{source}: [data] seq_len must be an integer >= 2, got "
                          f"{data.seq_len!r}")
    if not 0 < data.val_fraction < 1:
        raise ConfigError(f"{source}: [data] val_fraction must be in (0, 1), got "
                          f"{data.val_fraction!r}")
    if not isinstance(data.val_windows, int) or data.val_windows < 1:
        raise ConfigError(f"{source}: [data] val_windows must be a positive integer, got "
                          f"{data.val_windows!r}")
    # Two documents at least: one for training, one for validation.
    if data.synthetic_docs < 2:
        raise ConfigError(f"{source}: [data] synthetic_docs must be an integer >= 2 (a "
                          f"training and a validation document), got {data.synthetic_docs!r}")
    if data.max_docs is not None and data.max_docs < 2:
        raise ConfigError(f"{source}: [data] max_docs must be an integer >= 2 (a training "
                          f"and a validation document), got {data.max_docs!r}")


def parse_suite(text: str, source: str) -> Suite:
    try:
        raw = tomllib.loads(text)
    except ValueError as e:  # TOMLDecodeError, or int() past Python's 4300-digit limit
        raise ConfigError(f"{source}: not valid TOML ({e}); fix the file's syntax") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid TOML (arrays or tables nested too deeply); "
                          "fix the file's syntax") from None
    _check_keys("the top level", raw, _TOP_KEYS, source)
    _check_int_range(raw, "", source)
    if "name" not in raw:
        raise ConfigError(f"{source}: missing 'name' (a string naming the suite)")
    name = _check_name(raw["name"], "the suite", source)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{source}: 'description' must be a string, got {description!r}")
    seeds = _seeds(raw.get("seeds", [0]), "", source)

    data_raw = raw.get("data", {})
    _check_keys("[data]", data_raw, {f.name for f in dataclasses.fields(DataSettings)},
                source)
    _check_types("[data]", data_raw, DataSettings, source)
    data = DataSettings(**data_raw)
    _check_data(data, source)

    train_raw = raw.get("train", {})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    _check_keys("[train]", train_raw, train_fields, source)
    _check_types("[train]", train_raw, TrainConfig, source)
    try:
        train = TrainConfig(**train_raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: [train] {e}") from None

    if "budget" not in raw:
        raise ConfigError(f"{source}: missing [budget] (flops = [...] or tokens = [...])")
    suite_budgets = _budgets(raw["budget"], "[budget]", source)

    defaults = raw.get("defaults", {})
    _check_keys("[defaults]", defaults, set(defaults) if isinstance(defaults, dict) else set(),
                source)
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError(f"{source}: no [[models]] entries; add at least one model")
    models: list[ModelEntry] = []
    seen: set[str] = set()
    for i, entry in enumerate(models_raw):
        where = f"[[models]] #{i + 1}"
        _check_keys(where, entry, set(entry) if isinstance(entry, dict) else set(), source)
        entry = {**defaults, **entry}
        mname = _check_name(entry.pop("name", None), where, source)
        if mname in seen:
            raise ConfigError(f"{source}: model name {mname!r} appears twice; names must be "
                              "unique")
        seen.add(mname)
        where = f"model {mname!r}"
        budgets = (_budgets(entry.pop("budget"), f"{where} budget", source)
                   if "budget" in entry else suite_budgets)
        own_seeds = entry.pop("seeds", None)
        if own_seeds is not None:
            own_seeds = tuple(_seeds(own_seeds, where, source))
        preset = entry.pop("preset", None)
        if preset is not None and (not isinstance(preset, str) or not preset):
            raise ConfigError(f"{source}: {where}: 'preset' must name a preset ("
                              f"{', '.join(PRESETS)}), got {preset!r}")
        init_raw, method = entry.pop("init", None), entry.pop("init_method", None)
        pretrained = (_init_source(init_raw, models, data, where, source)
                      if init_raw is not None else None)
        if init_raw is None and method is not None:
            raise ConfigError(f"{source}: {where}: init_method needs an init (hf:NAME_OR_PATH, "
                              "a checkpoint directory or model:NAME)")
        if pretrained is not None and "vocab_size" not in entry:
            entry["vocab_size"] = pretrained.shapes["vocab_size"]
        if "vocab_size" not in entry and data.planned_vocab() is not None:
            entry["vocab_size"] = data.planned_vocab()
        _check_types(where, entry, ModelConfig, source)
        try:
            cfg = (ModelConfig.from_preset(preset, **entry) if preset
                   else ModelConfig.from_dict(entry))
            if data.seq_len > cfg.max_seq_len and "max_seq_len" not in entry:
                cfg = cfg.replace(max_seq_len=data.seq_len)  # RoPE tables must cover it
        except ConfigError as e:
            raise ConfigError(f"{source}: {where}: {e}") from None
        init = None
        if pretrained is not None:
            from baselines.uptrain import METHODS, check_compatible

            if cfg.family == "vanilla" and method is not None:
                raise ConfigError(f"{source}: {where}: init_method applies to recursive and "
                                  "MoR models (a vanilla model continues the pretrained one)")
            if cfg.family != "vanilla":
                method = "stepwise" if method is None else method
                if method not in METHODS:
                    raise ConfigError(f"{source}: {where}: init_method must be one of "
                                      f"{', '.join(METHODS)}, got {method!r}")
            try:
                check_compatible(cfg, pretrained, method)
            except ConfigError as e:
                raise ConfigError(f"{source}: {where}: {e}") from None
            init = {"source": init_raw, "method": method, "sha256": pretrained.sha256 or None,
                    # the gate fitted to the pretrained layers unless router_alpha is set
                    "fit_gate": cfg.family == "mor" and "router_alpha" not in entry}
        models.append(ModelEntry(mname, cfg, budgets, preset, init, own_seeds))
    eval_raw = raw.get("eval", {})
    _check_keys("[eval]", eval_raw, {f.name for f in dataclasses.fields(EvalSettings)}, source)
    tasks = eval_raw.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"{source}: [eval] tasks must be a list of lm-eval task names")
    for key in ("num_fewshot", "batch_size", "limit"):
        value = eval_raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < (0 if key == "num_fewshot" else 1)):
            raise ConfigError(f"{source}: [eval] {key} must be a "
                              f"{'non-negative' if key == 'num_fewshot' else 'positive'} "
                              f"integer, got {value!r}")
    evaluation = EvalSettings(**{**eval_raw, "tasks": tuple(tasks)})
    infer = None
    if "infer" in raw:
        if not isinstance(raw["infer"], dict):
            raise ConfigError(f"{source}: [infer] must be a table of benchmark settings")
        infer = InferSettings.from_dict(raw["infer"], where=f"{source}: [infer] ")
    speed = None
    if "speed" in raw:
        if not isinstance(raw["speed"], dict):
            raise ConfigError(f"{source}: [speed] must be a table of benchmark settings")
        speed = SpeedSettings.from_dict(raw["speed"], where=f"{source}: [speed] ")
    sweep = None
    if "sweep" in raw:
        if not isinstance(raw["sweep"], dict):
            raise ConfigError(f"{source}: [sweep] must be a table of sweep settings")
        sweep = SweepSettings.from_dict(raw["sweep"], where=f"{source}: [sweep] ")
        _check_sweep_models(sweep, models, source)
    return Suite(name=name, description=description, source=source,
                 text=text, seeds=tuple(seeds), data=data, train=train, models=tuple(models),
                 evaluation=evaluation, infer=infer, speed=speed, sweep=sweep)


def _source_seed(src: ModelEntry, seed: int, suite: Suite, name: str) -> int:
    """The seed of the pretrained run that model `name`'s seed-`seed` run starts from: the
    same seed, or the source's only seed when it runs one (a shared pretrained model)."""
    src_seeds = src.seeds or suite.seeds
    if seed in src_seeds:
        return seed
    if len(src_seeds) == 1:
        return src_seeds[0]
    raise ConfigError(f"{suite.source}: model {name!r}: init \"model:{src.name}\" runs seeds "
                      f"{list(src_seeds)}, which lack seed {seed}; give {src.name!r} one seed "
                      "(shared by all) or every seed of the models that start from it")


def _seeds(seeds: Any, where: str, source: str) -> list[int]:
    """A `seeds` list (the suite's, or a model entry's own): distinct integers 0..MAX_SEED."""
    at = f"{where}: " if where else ""
    if (not isinstance(seeds, list) or not seeds
            or not all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds)):
        raise ConfigError(f"{source}: {at}'seeds' must be a non-empty list of integers in "
                          f"0..{MAX_SEED}, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: {at}'seeds' lists a seed twice ({seeds}); each seed is "
                          "one run, list it once")
    return seeds


def check_corpus(suite: Suite, corpus: str | None) -> None:
    """Before any compute: a suite with `[data] require_corpus = true` runs on real text
    only -- `corpus` (the --corpus override) or the suite's own, not "synthetic"."""
    if suite.data.require_corpus and (corpus or suite.data.corpus) == "synthetic":
        raise ConfigError(f"{suite.source}: suite {suite.name!r} studies real text and "
                          "refuses the synthetic corpus; pass --corpus PATH (a .txt, .jsonl "
                          "or .jsonl.gz file, e.g. the prose corpus "
                          "../shared/data/corpus/prose_en.jsonl.gz) or hf:DATASET")


def _init_source(init: Any, models: list[ModelEntry], data: DataSettings, where: str,
                 source: str):
    """The pretrained source a model entry's `init` names, described before any compute
    (configuration and weight hash; no weights loaded): "hf:NAME_OR_PATH" (its tokenizer
    must be the suite's), a mor-bench vanilla checkpoint directory, or "model:NAME", an
    earlier vanilla entry of this suite with one budget, trained first (same seed)."""
    from baselines.uptrain import Pretrained, describe_pretrained

    if not isinstance(init, str) or not init:
        raise ConfigError(f"{source}: {where}: init must be \"hf:NAME_OR_PATH\", a "
                          f"checkpoint directory or \"model:NAME\", got {init!r}")
    if init.startswith("model:"):
        name = init[6:]
        entry = next((m for m in models if m.name == name), None)
        if entry is None:
            raise ConfigError(f"{source}: {where}: init {init!r}: no earlier model named "
                              f"{name!r} (the source must come before it in [[models]])")
        if entry.config.family != "vanilla" or len(entry.budgets) != 1:
            raise ConfigError(f"{source}: {where}: init {init!r}: the source must be a "
                              "vanilla model with one budget")
        c = entry.config
        return Pretrained(init, c.n_layers, {k: getattr(c, k) for k in (
            "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size")}, "", kind="run",
            config=c)
    try:
        src = describe_pretrained(init)
    except ConfigError as e:
        raise ConfigError(f"{source}: {where}: {e}") from None
    if init.startswith("hf:") and data.tokenizer != init:
        raise ConfigError(f"{source}: {where}: init {init!r} comes with its own tokenizer; "
                          f"set [data] tokenizer = \"{init}\" (now {data.tokenizer!r})")
    return src


def sweep_targets(sweep: SweepSettings, models) -> list:
    """The model entries a suite's [sweep] applies to: the named ones, or every MoR model
    whose router the knob drives (threshold/capacity: expert-choice; depth-bias: token)."""
    router = "token" if sweep.knob == "depth-bias" else "expert"
    if sweep.models:
        return [m for m in models if m.name in sweep.models]
    return [m for m in models if m.config.family == "mor" and m.config.router == router]


def _check_sweep_models(sweep: SweepSettings, models, source: str) -> None:
    names = {m.name: m for m in models}
    unknown = [n for n in sweep.models if n not in names]
    if unknown:
        raise ConfigError(f"{source}: [sweep] models {unknown} are not models of the suite "
                          f"({', '.join(names)})")
    router = "token" if sweep.knob == "depth-bias" else "expert"
    targets = sweep_targets(sweep, models)
    if not targets:
        raise ConfigError(f"{source}: [sweep] knob {sweep.knob!r} needs a {router}-choice MoR "
                          "model in the suite, and there is none")
    for m in targets:
        c = m.config
        if c.family != "mor" or c.router != router:
            raise ConfigError(f"{source}: [sweep] knob {sweep.knob!r} applies to {router}-"
                              f"choice MoR models; model {m.name!r} is "
                              + (f"{c.router}-choice MoR" if c.family == "mor"
                                 else f"a {c.family} model"))


def plan_runs(suite: Suite, world_size: int = 1) -> list[RunSpec]:
    """Every (model, budget, seed) run with its planned length (from the global batch over
    `world_size` data-parallel processes); raises before any compute if a budget cannot
    fund a single step."""
    runs: list[RunSpec] = []
    from evals.training.loop import for_world
    from evals.training.memory import train_memory

    t = for_world(suite.train, world_size)  # grad_accum from [train] global_batch
    for m in suite.models:
        try:
            plans = [plan_training(m.config, b, suite.data.seq_len, t.batch_size, t.grad_accum,
                                   world_size, t.step_rule) for b in m.budgets]
        except ConfigError as e:
            raise ConfigError(f"{suite.source}: model {m.name!r}: {e}") from None
        # The paper warms up over 5% of the smallest budget's steps, for every budget.
        warmup = max(1, round(t.warmup_frac * min(p.steps for p in plans)))
        for b, p in zip(m.budgets, plans):
            for seed in m.seeds or suite.seeds:
                run_id = f"{m.name}-{b.tag}-s{seed}"
                init = None
                if m.init is not None:
                    init = dict(m.init)
                    if init["source"].startswith("model:"):
                        src = next(e for e in suite.models
                                   if e.name == init["source"][6:])
                        init["source"] = f"run:{src.name}-{src.budgets[0].tag}-s" \
                                         f"{_source_seed(src, seed, suite, m.name)}"
                runs.append(RunSpec(run_id, m.name, m.config, b, seed, p,
                                    min(warmup, p.steps), m.preset, init))
    runs = [dataclasses.replace(r, mem_estimate=train_memory(
        r.config, suite.data.seq_len, t.batch_size)["total"]) for r in runs]
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):  # a guard: names, budgets and seeds are unique above
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"{suite.source}: run ids collide ({', '.join(dup)}); rename models")
    return runs


def check_memory(suite: Suite, runs: list[RunSpec]) -> None:
    """Before any compute of a real run (the dry run only shows the estimates: a paper
    suite is planned on a laptop and trained on a GPU): refuse a run whose estimated peak
    memory (`evals.training.memory.train_memory`, `RunSpec.mem_estimate`) exceeds what this
    machine (or its GPU) has at all -- it would fill memory and be killed mid-run."""
    from evals.training.loop import for_world
    from evals.training.memory import machine_memory, train_memory

    have, what = machine_memory(suite.train.device)
    if have is None:
        return
    batch_size = for_world(suite.train, 1).batch_size
    for r in runs:
        need = train_memory(r.config, suite.data.seq_len, batch_size)
        if need["total"] > have:
            preset = f"preset {r.preset!r}" if r.preset else "the model's shape"
            raise ConfigError(
                f"{suite.source}: model {r.model_name!r}: training needs ~"
                f"{need['total'] / 2**30:,.1f} GiB (weights + optimizer "
                f"{need['states'] / 2**30:,.1f}, activations "
                f"{(need['activations'] + need['head']) / 2**30:,.1f} at batch_size "
                f"{batch_size} x seq_len {suite.data.seq_len}) but this machine has "
                f"{have / 2**30:,.1f} GiB of {what}; use a smaller {preset}, or a lower "
                "[train] batch_size with grad_accum (or seq_len)")


def plan_table(runs: list[RunSpec]) -> list[dict[str, Any]]:
    """The dry-run view of a plan: one row per run, JSON-serialisable."""
    from mor import flops

    rows = []
    for r in runs:
        counts = flops.param_counts(r.config)
        rows.append({
            "run_id": r.run_id, "model": r.model_name, "family": r.config.family,
            "num_recursions": r.config.num_recursions, "sharing": (
                r.config.sharing if r.config.family != "vanilla" else None),
            "layers": r.config.layer_plan, "unrolled_depth": r.config.unrolled_depth,
            "params_unique": counts["unique"], "params_non_embedding": counts["non_embedding"],
            "flops_per_token_paper": r.plan.flops_per_token,
            "budget_kind": r.budget.kind, "budget": r.budget.value,
            "tokens": r.plan.tokens, "steps": r.plan.steps,
            "batch_tokens": r.plan.tokens_per_step, "flops_used": r.plan.flops_used,
            "world_size": r.plan.world_size, "step_rule": r.plan.step_rule,
            "warmup_steps": r.warmup_steps, "seed": r.seed,
            # estimated peak bytes of one training process (evals.training.memory)
            "mem_estimate_bytes": r.mem_estimate,
            "init": (None if r.init is None else r.init["source"] + (
                f" ({r.init['method']})" if r.init.get("method") else "")),
        })
    return rows


"""Property-based fuzzing of suite files through the real command line (issue 11).

Every example starts from BASE, a small VALID suite (micro preset, four models, every table),
and applies at least one corruption that is invalid by construction: a value of the wrong
TOML type, a number out of range (0, negative, NaN, infinity, past 64 bits), an unknown key
or value, a missing required key, a table of the wrong shape, a model whose shapes do not
fit together, broken TOML syntax, bytes that are not UTF-8, an empty file. Each one goes
through `mor-bench run FILE --out DIR` (in-process; a sample also as a real process) and
must end in exactly one stderr line `mor-bench: error: ...` that names the file and the
corrupted field or table, exit code 2, no traceback, and nothing under --out.

Naming the field is what keeps the fuzzing honest: an example rejected for some other
reason (or, worse, a valid suite that starts training) fails the test.
`test_base_suite_is_valid` shows the starting point passes validation and planning, so
every rejection is the corruption's doing. Each test runs every kind of its corruption
(parametrized), so a rare branch is never left undrawn.

Examples (derandomized, reproducible; hypothesis stops early where a kind has fewer distinct
values): wrong types 8 places x 20, out of range 10 kinds x 15, unknown keys and values
12 x 10, missing keys and misshapen tables 7 x 10, impossible models 16 x 8, broken files
9 x 7: about 680 in process, plus 6 as real `mor-bench` processes; about 35 s on 2 busy
cores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import io
import math
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from evals.cli.main import main
from evals.suite.spec import (
    _TOP_KEYS,
    MAX_SEED,
    DataSettings,
    EvalSettings,
    InferSettings,
    SpeedSettings,
    parse_suite,
    plan_runs,
)
from evals.training.loop import TrainConfig
from mor.config import PRESETS, ModelConfig

FILE = "suite.toml"

BASE: dict[str, Any] = {
    "name": "fuzz",
    "description": "a valid micro suite the fuzzing corrupts",
    "seeds": [0, 1],
    "data": {"corpus": "synthetic", "tokenizer": "bytes", "seq_len": 32, "val_fraction": 0.05,
             "synthetic_docs": 200, "seed": 0, "val_windows": 8},
    "budget": {"tokens": [1024, 2048]},
    "train": {"batch_size": 4, "grad_accum": 1, "lr": 3e-3, "weight_decay": 0.1,
              "betas": [0.9, 0.95], "grad_clip": 1.0, "warmup_frac": 0.05, "decay_frac": 0.2,
              "log_every": 2, "val_batch_size": 8, "device": "cpu", "threads": 1,
              "parallel": "ddp", "checkpoint_every": 0, "keep_checkpoints": 2,
              "compile": False, "deterministic": False, "step_rule": "floor",
              "tensorboard": False},
    "defaults": {"preset": "micro"},
    "models": [
        {"name": "vanilla", "family": "vanilla"},
        {"name": "rec-2", "family": "recursive", "sharing": "cycle", "num_recursions": 2},
        {"name": "mor-2", "family": "mor", "num_recursions": 2},
        {"name": "mor-3-token", "family": "mor", "router": "token", "num_recursions": 3,
         "budget": {"tokens": 1536}},
    ],
    "eval": {"tasks": [], "num_fewshot": 0, "limit": 10, "batch_size": 8},
    "infer": {"samples": 4, "gen_mean": 8.0, "gen_std": 2.0, "max_len": 32, "batch_size": 4,
              "memory_budget_mb": 64.0, "reference_batch": 4, "repeats": 1, "seed": 0,
              "temperature": 1.0, "kv_capacity": "routed", "scheduler": "auto",
              "throughput_model": "off", "threads": 1, "device": "cpu"},
    "speed": {"rounds": 1, "steps_per_round": 1, "warmup_steps": 0},
}
MODELS = {m["name"]: i for i, m in enumerate(BASE["models"])}
EXPERT, TOKEN = MODELS["mor-2"], MODELS["mor-3-token"]
NON_MOR = (MODELS["vanilla"], MODELS["rec-2"])
SEQ_LEN = BASE["data"]["seq_len"]
TOKENS_PER_STEP = BASE["train"]["batch_size"] * SEQ_LEN
INT64 = (-(2**63), 2**63 - 1)

# No shrinking: were a corruption ever accepted, the suite would really train (a minute), and
# shrinking would train it again and again. Each example's label (`note`) says what it is.
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                phases=(Phase.explicit, Phase.reuse, Phase.generate),
                report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------
# a TOML writer (enough for suite files: ASCII output, every string escaped)


def _toml_str(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif 0x20 <= ord(c) < 0x7F:
            out.append(c)
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(f"\\U{ord(c):08X}")
    return '"' + "".join(out) + '"'


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"test bug: cannot write {v!r} as TOML")


def dumps(doc: dict[str, Any]) -> str:
    def is_aot(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    lines = [f"{_toml_key(k)} = {toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict) and not is_aot(v)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{_toml_key(k)}]"] + [f"{_toml_key(a)} = {toml_value(b)}"
                                                  for a, b in v.items()]
    for k, v in doc.items():
        if is_aot(v):
            for entry in v:
                lines += ["", f"[[{_toml_key(k)}]]"] + [f"{_toml_key(a)} = {toml_value(b)}"
                                                        for a, b in entry.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# a case: the file's bytes and what the one error line must name


@dataclass(frozen=True)
class Case:
    content: bytes
    needles: tuple[str, ...]
    label: str


def case_of(doc: dict[str, Any], label: str, *needles: str) -> Case:
    return Case(dumps(doc).encode("ascii"), needles, label)


def with_value(path: tuple, value: Any, drop: bool = False) -> dict[str, Any]:
    """BASE with doc[path[0]][path[1]]... set to `value` (or the key removed)."""
    doc = copy.deepcopy(BASE)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if drop:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


# --------------------------------------------------------------------------------------------
# the fields of every table and what is invalid for them

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SAFE_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
DATES = st.dates() | st.times()
ALL_INTS = st.integers(*INT64)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
SMALL_LISTS = st.lists(st.integers(0, 9), max_size=3)
SMALL_TABLES = st.dictionaries(st.from_regex(r"[a-z]{1,4}", fullmatch=True), st.integers(0, 9),
                               max_size=2)

WRONG_TYPE = {
    "int": st.one_of(SAFE_TEXT, FLOATS, st.booleans(), DATES, SMALL_LISTS, SMALL_TABLES),
    "float": st.one_of(SAFE_TEXT, st.booleans(), DATES, SMALL_LISTS, SMALL_TABLES),
    "str": st.one_of(ALL_INTS, FLOATS, st.booleans(), DATES, SMALL_LISTS, SMALL_TABLES),
    "bool": st.one_of(ALL_INTS, FLOATS, SAFE_TEXT, DATES, SMALL_LISTS, SMALL_TABLES),
    # A list of numbers (capacities, betas): scalars, or lists of something else.
    "numbers": st.one_of(ALL_INTS, FLOATS, SAFE_TEXT, st.booleans(), DATES, SMALL_TABLES,
                         st.lists(st.booleans() | SAFE_TEXT | DATES, min_size=1, max_size=3)),
    "strings": st.one_of(ALL_INTS, FLOATS, SAFE_TEXT, st.booleans(), DATES, SMALL_TABLES,
                         st.lists(st.integers() | st.booleans(), min_size=1, max_size=3),
                         st.just([""])),
    "int_or_max": st.one_of(SAFE_TEXT.filter(lambda s: s != "max"), FLOATS, st.booleans(),
                            DATES, SMALL_LISTS, SMALL_TABLES),
}


def ints_below(low: int) -> st.SearchStrategy[int]:
    return st.integers(INT64[0], low - 1)


def floats_outside(ok: Callable[[float], bool]) -> st.SearchStrategy[float]:
    return st.one_of(NON_FINITE, st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda x: not ok(x)), st.integers(-(10**6), 10**6).filter(lambda x: not ok(x)))


@dataclass(frozen=True)
class Field:
    type: str
    bad: st.SearchStrategy | None = None
    """Values of the right type that are invalid (None: every value of the type is valid)."""


def pos_int(low: int = 1) -> Field:
    return Field("int", ints_below(low))


def choice(valid: tuple[str, ...], *, fold_case: bool = False) -> Field:
    def invalid(s: str) -> bool:
        return (s.lower() if fold_case else s) not in valid

    return Field("str", SAFE_TEXT.filter(invalid))


DATA = {
    "corpus": Field("str", st.just("")),
    "tokenizer": Field("str", st.one_of(
        SAFE_TEXT.filter(lambda s: s != "bytes" and ":" not in s),
        st.just("hf:"),
        st.integers(0, 257).map(lambda n: f"bpe:{n}"),
        SAFE_TEXT.filter(lambda s: not s.isdigit()).map(lambda s: f"bpe:{s}"))),
    "seq_len": pos_int(2),
    "val_fraction": Field("float", floats_outside(lambda x: 0 < x < 1)),
    "synthetic_docs": pos_int(2),
    "max_docs": pos_int(2),
    "seed": Field("int"),
    "val_windows": pos_int(1),
    "require_corpus": Field("bool"),  # True refuses the synthetic corpus at run time
}
TRAIN = {
    "batch_size": pos_int(), "grad_accum": pos_int(), "log_every": pos_int(),
    "val_batch_size": pos_int(), "keep_checkpoints": pos_int(),
    "checkpoint_every": pos_int(0),
    "threads": pos_int(),
    "global_batch": Field("int", st.one_of(  # a multiple of batch_size (4), at least 4
        ints_below(BASE["train"]["batch_size"]),
        st.integers(1, 10**6).filter(lambda n: n % BASE["train"]["batch_size"]))),
    "lr": Field("float", floats_outside(lambda x: 0 < x < math.inf)),
    "weight_decay": Field("float", floats_outside(lambda x: x >= 0)),
    "grad_clip": Field("float", st.one_of(  # inf is valid: no clipping
        st.just(math.nan), st.floats(max_value=0), st.integers(INT64[0], 0))),
    "warmup_frac": Field("float", floats_outside(lambda x: 0 <= x < 1)),
    "decay_frac": Field("float", floats_outside(lambda x: 0 <= x < 1)),
    "betas": Field("numbers", st.one_of(
        st.lists(st.floats(0, 0.99), max_size=5).filter(lambda b: len(b) != 2),
        st.lists(floats_outside(lambda x: 0 <= x < 1), min_size=2, max_size=2),
        st.tuples(st.floats(0, 0.99), floats_outside(lambda x: 0 <= x < 1)).map(list),
        st.tuples(floats_outside(lambda x: 0 <= x < 1), st.floats(0, 0.99)).map(list))),
    "device": choice(("auto", "cpu", "cuda")),
    "parallel": choice(("ddp", "fsdp")),
    "step_rule": choice(("floor",)),
    "compile": Field("bool"), "deterministic": Field("bool"), "tensorboard": Field("bool"),
    "wandb_project": Field("str"),
}
EVAL = {
    "tasks": Field("strings"),
    "num_fewshot": pos_int(0), "limit": pos_int(1), "batch_size": pos_int(1),
}
INFER = {
    "samples": pos_int(), "reference_batch": pos_int(), "repeats": pos_int(),
    "max_len": pos_int(2), "threads": pos_int(),
    "seed": Field("int", st.one_of(ints_below(0), st.integers(MAX_SEED + 1, INT64[1]))),
    "gen_mean": Field("float", floats_outside(lambda x: x >= 1)),
    "gen_std": Field("float", floats_outside(lambda x: x >= 0)),
    "temperature": Field("float", floats_outside(lambda x: x >= 0)),
    "memory_budget_mb": Field("float", floats_outside(lambda x: x > 0)),
    "batch_size": Field("int_or_max", ints_below(1)),
    "kv_capacity": choice(("routed", "full")),
    "scheduler": choice(("auto", "sequence", "depth", "both")),
    "throughput_model": choice(("auto", "quick", "off")),
    "device": choice(("cpu", "cuda", "auto")),
}
SPEED = {"rounds": pos_int(), "steps_per_round": pos_int(), "warmup_steps": pos_int(0)}
NONNEG = Field("float", floats_outside(lambda x: x >= 0))
MODEL = {
    **{name: pos_int() for name in ("vocab_size", "d_model", "n_layers", "n_heads",
                                     "n_kv_heads", "d_ff", "max_seq_len")},
    "head_dim": Field("int", st.one_of(ints_below(1), st.integers(0, 20).map(lambda k: 2 * k
                                                                              + 1))),
    "rope_theta": Field("float", floats_outside(lambda x: x > 0)),
    "norm_eps": Field("float", floats_outside(lambda x: x > 0)),
    "init_std": Field("float", floats_outside(lambda x: 0 < x < 1)),
    "tie_embeddings": Field("bool", st.just(False)),
    "family": choice(("vanilla", "recursive", "mor")),
    "num_recursions": Field("int", st.one_of(ints_below(1), st.integers(5, INT64[1]))),
    "sharing": choice(("cycle", "sequence", "middle_cycle", "middle_sequence")),
    "router": choice(("expert", "token")),
    "kv": choice(("cache", "share")),
    "router_arch": choice(("linear", "mlp")),
    "router_func": choice(("sigmoid", "tanh", "softmax")),
    "expert_aux": choice(("loss", "router")),
    "balancing": choice(("loss", "loss_free")),
    "eval_routing": choice(("topk", "causal")),
    "capacities": Field("numbers", st.one_of(
        st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6).filter(lambda c: len(c) != 2),
        st.lists(floats_outside(lambda x: 0 < x <= 1), min_size=2, max_size=2))),
    "router_alpha": Field("float", floats_outside(lambda x: 0 < x <= 10)),
    "aux_loss_coef": NONNEG, "router_z_coef": NONNEG, "balance_coef": NONNEG,
    "bias_update_rate": NONNEG,
    "capacity_warmup_steps": pos_int(0),
}
# On the expert-choice model (num_recursions = 2), `capacities` out of range above is invalid
# for every model: non-MoR models take none, token-choice none, and the lengths differ from 2.
PRESET = Field("str", SAFE_TEXT.filter(lambda s: s.lower() not in PRESETS))
TABLES: dict[str, dict[str, Field]] = {
    "data": DATA, "train": TRAIN, "eval": EVAL, "infer": INFER, "speed": SPEED,
    "defaults": {**MODEL, "preset": PRESET},
    "models": {**MODEL, "preset": PRESET, "name": Field("str")},
}
TOP = {"name": Field("str"), "description": Field("str")}


def test_the_field_lists_cover_every_settings_field():
    """A field added to a settings type without a fuzzing entry fails here."""
    for table, cls in (("data", DataSettings), ("train", TrainConfig), ("eval", EvalSettings),
                       ("infer", InferSettings), ("speed", SpeedSettings)):
        assert set(TABLES[table]) == {f.name for f in dataclasses.fields(cls)}, table
    assert set(MODEL) == {f.name for f in dataclasses.fields(ModelConfig) if f.init}


# Where a model field goes: any model, or [defaults] when no model overrides it.
OVERRIDDEN = set().union(*(m.keys() for m in BASE["models"]))


@st.composite
def model_target(draw, field: str) -> tuple:
    targets = [("models", i) for i in range(len(BASE["models"]))]
    if field not in OVERRIDDEN:
        targets.append(("defaults",))
    return draw(st.sampled_from(targets)) + (field,)


@st.composite
def field_target(draw, table: str | None = None) -> tuple[tuple, Field]:
    """(path into the document, field spec) of one field of `table` (default: any)."""
    table = table or draw(st.sampled_from(sorted(TABLES)))
    if table == "defaults":  # only fields no model overrides: the corruption must show
        field = draw(st.sampled_from(sorted(set(TABLES[table]) - OVERRIDDEN)))
        return ("defaults", field), TABLES[table][field]
    field = draw(st.sampled_from(sorted(TABLES[table])))
    if table == "models":
        return ("models", draw(st.integers(0, len(BASE["models"]) - 1)), field), \
            TABLES[table][field]
    return (table, field), TABLES[table][field]


# --------------------------------------------------------------------------------------------
# the corruptions: each strategy takes a `kind`, and every test runs every kind, so each
# kind gets its share of examples (a rare branch of one big strategy may never be drawn)


@st.composite
def wrong_types(draw, place: str) -> Case:
    """One field of one table (or of the top level) set to a value of another TOML type."""
    if place == "top":
        field = draw(st.sampled_from(sorted(TOP)))
        path, spec = (field,), TOP[field]
    else:
        path, spec = draw(field_target(place))
    value = draw(WRONG_TYPE[spec.type])
    return case_of(with_value(path, value), f"wrong type {path}={value!r}", path[-1])


WRONG_TYPE_PLACES = ["top", *sorted(TABLES)]


@st.composite
def out_of_range(draw, kind: str) -> Case:
    """A value of the right type but out of range: 0, negative, NaN, inf, past 64 bits,
    unknown choices, invalid names and seeds (booleans where numbers go: WRONG_TYPE)."""
    if kind == "int64":  # an integer TOML cannot hold, in any integer field
        path, spec = draw(field_target().filter(lambda t: t[1].type in ("int", "int_or_max")))
        value = draw(st.integers(INT64[1] + 1, 2**200) | st.integers(-(2**200), INT64[0] - 1))
        return case_of(with_value(path, value), f"int64 overflow {path}", path[-1])
    if kind == "seeds":
        seeds = draw(st.one_of(
            st.just([]),
            st.lists(ints_below(0) | st.integers(MAX_SEED + 1, INT64[1]), min_size=1,
                     max_size=3),
            st.integers(0, 5).map(lambda s: [s, s])))
        return case_of(with_value(("seeds",), seeds), f"seeds={seeds}", "seeds")
    if kind == "names":  # names that cannot name a directory
        base = draw(st.from_regex(r"[a-z]{0,4}", fullmatch=True))
        bad = draw(st.sampled_from(["/", "\\", "\x00", "\n", "\t", "\x7f", "\u2028", "\x1b"]))
        at = draw(st.integers(0, len(base)))
        name = draw(st.sampled_from(["", " ", ".", "..", base[:at] + bad + base[at:]]))
        where = draw(st.sampled_from([("name",), ("models", EXPERT, "name")]))
        return case_of(with_value(where, name), f"name {where}={name!r}", "name")
    path, spec = draw(field_target(kind).filter(lambda t: t[1].bad is not None))
    value = draw(spec.bad)
    return case_of(with_value(path, value), f"out of range {path}={value!r}", path[-1])


OUT_OF_RANGE_KINDS = ["int64", "seeds", "names", *sorted(TABLES)]
UNKNOWN_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
KNOWN = {
    "top": _TOP_KEYS, "data": set(DATA), "train": set(TRAIN), "eval": set(EVAL),
    "infer": set(INFER), "speed": set(SPEED),
    "defaults": set(MODEL) | {"name", "preset", "budget"},
    "models": set(MODEL) | {"name", "preset", "budget"},
}
CHOICE_FIELDS = {
    "model": ["family", "router", "sharing", "kv", "router_arch", "router_func",
              "expert_aux", "balancing", "eval_routing", "preset"],
    "train": ["device", "parallel", "step_rule"],
    "infer": ["kv_capacity", "scheduler", "throughput_model", "device"],
    "data": ["tokenizer"],
}


@st.composite
def unknown_keys_and_values(draw, kind: str) -> Case:
    """An unknown key in a table ("key:TABLE"), or an unknown family, router, sharing,
    preset, tokenizer, device, ... ("value:GROUP")."""
    what, where = kind.split(":")
    if what == "key":
        key = draw(UNKNOWN_NAME.filter(lambda k: k not in KNOWN[where]))
        value = draw(st.integers(0, 9) | SAFE_TEXT)
        if where == "top":
            path = (key,)
        elif where == "models":
            path = ("models", draw(st.integers(0, len(BASE["models"]) - 1)), key)
        else:
            path = (where, key)
        return case_of(with_value(path, value), f"unknown key {path}", key)
    field = draw(st.sampled_from(CHOICE_FIELDS[where]))
    if where == "model":
        path = draw(model_target(field))
        value = draw(TABLES[path[0]][field].bad)
    else:
        path, value = (where, field), draw(TABLES[where][field].bad)
    return case_of(with_value(path, value), f"unknown value {path}={value!r}", field)


UNKNOWN_KINDS = [f"key:{t}" for t in sorted(KNOWN)] + [f"value:{g}" for g in CHOICE_FIELDS]
TABLE_NEEDLES = {"data": "[data]", "train": "[train]", "eval": "[eval]", "infer": "[infer]",
                 "speed": "[speed]", "defaults": "[defaults]", "budget": "[budget]",
                 "models": "[[models]]"}
BAD_BUDGET_VALUES = st.lists(
    st.one_of(NON_FINITE, st.integers(INT64[0], 0), st.floats(max_value=0), SAFE_TEXT,
              st.booleans(), DATES, SMALL_LISTS), min_size=1, max_size=3)
BAD_BUDGET_SHAPES = st.one_of(
    st.just({}), st.just({"flops": [1e12], "tokens": [1024]}), st.just({"flops": []}),
    st.fixed_dictionaries({"tokens": st.lists(
        st.floats(1.5, 1e9).filter(lambda x: x != int(x)), min_size=1, max_size=2)}),
    st.integers(1, 10**6).map(lambda n: {"tokens": [n, n]}),
    st.floats(1e9, 1e15).map(lambda f: {"flops": [f, f * (1 + 1e-8)]}),
    UNKNOWN_NAME.filter(lambda k: k not in ("flops", "tokens")).map(lambda k: {k: [1e12]}),
    ALL_INTS, SAFE_TEXT, SMALL_LISTS)


@st.composite
def missing_and_misshapen(draw, kind: str) -> Case:
    """A required key missing, a table that is not a table, a budget of the wrong shape or
    with values that are not positive finite numbers."""
    if kind == "missing":
        path, needle = draw(st.sampled_from([
            (("name",), "name"), (("budget",), "[budget]"), (("models",), "[[models]]"),
            (("models", draw(st.integers(0, len(BASE["models"]) - 1)), "name"), "name")]))
        return case_of(with_value(path, None, drop=True), f"missing {path}", needle)
    if kind == "not a table":
        table = draw(st.sampled_from(["data", "train", "eval", "infer", "speed", "defaults",
                                      "budget"]))
        value = draw(st.one_of(ALL_INTS, SAFE_TEXT, st.booleans(), SMALL_LISTS))
        return case_of(with_value((table,), value), f"{table} = {value!r}",
                       TABLE_NEEDLES[table])
    if kind == "models":
        value = draw(st.one_of(st.just([]), ALL_INTS, SAFE_TEXT, SMALL_TABLES,
                               st.lists(ALL_INTS | SAFE_TEXT, min_size=1, max_size=3)))
        return case_of(with_value(("models",), value), f"models = {value!r}", "[[models]]")
    if kind.endswith("values"):
        budget = {draw(st.sampled_from(["flops", "tokens"])): draw(BAD_BUDGET_VALUES)}
    else:
        budget = draw(BAD_BUDGET_SHAPES)
    if kind.startswith("budget"):
        return case_of(with_value(("budget",), budget), f"budget = {budget!r}", "[budget]")
    i = draw(st.integers(0, len(BASE["models"]) - 1))
    return case_of(with_value(("models", i, "budget"), budget), f"models[{i}].budget = "
                   f"{budget!r}", "budget")


MISSING_KINDS = ["missing", "not a table", "models", "budget values", "budget shape",
                 "model budget values", "model budget shape"]


@st.composite
def inconsistent_models(draw, kind: str) -> Case:
    """Each field valid alone, the combination impossible: shapes that do not divide, more
    recursions than layers, capacities, routing options on the wrong family or router, a
    context shorter than the suite's windows, a budget too small for one step."""
    i = draw(st.integers(0, len(BASE["models"]) - 1))
    fields: dict[str, Any]
    if kind == "d_model % n_heads":
        h = draw(st.integers(2, 8))
        d = h * draw(st.integers(1, 16)) + draw(st.integers(1, h - 1))
        fields, needle = {"n_heads": h, "n_kv_heads": 1, "d_model": d}, "n_heads"
    elif kind == "n_heads % n_kv_heads":
        kv = draw(st.integers(2, 8))
        h = kv * draw(st.integers(0, 4)) + draw(st.integers(1, kv - 1))
        fields, needle = {"n_heads": h, "n_kv_heads": kv, "d_model": 2 * h}, "n_kv_heads"
    elif kind == "odd head_dim":
        h, hd = draw(st.integers(1, 8)), 2 * draw(st.integers(0, 8)) + 1
        fields = ({"n_heads": h, "n_kv_heads": 1, "d_model": h * hd}
                  if draw(st.booleans()) else {"head_dim": hd})
        needle = "head_dim"
    elif kind == "recursions > layers":
        i = draw(st.sampled_from([MODELS["rec-2"], EXPERT, TOKEN]))
        nr = draw(st.integers(2, 4))
        middle = i != MODELS["rec-2"]  # rec-2 shares with "cycle": no unique edge layers
        fields = {"num_recursions": nr,
                  "n_layers": draw(st.integers(1, nr + 1 if middle else nr - 1))}
        if i == EXPERT and draw(st.booleans()):
            fields["capacities"] = [1.0] * nr
        needle = "num_recursions"
    elif kind == "capacities":
        i = EXPERT
        caps = draw(st.one_of(
            st.lists(st.floats(0.01, 1.0), min_size=0, max_size=6).filter(lambda c: len(c)
                                                                          != 2),
            st.tuples(st.floats(0.01, 0.98), st.floats(0.01, 1.0)).filter(
                lambda c: c[1] > c[0]).map(list)))
        fields, needle = {"capacities": caps}, "capacities"
    elif kind == "kv share":
        i = EXPERT
        c0 = draw(st.floats(0.01, 0.99))
        fields = {"kv": "share", "capacities": [c0, draw(st.floats(0.01, c0))]}
        needle = "kv"
    elif kind == "routing on non-MoR":
        i = draw(st.sampled_from(NON_MOR))
        field, value = draw(st.sampled_from([
            ("router", "token"), ("kv", "share"), ("router_arch", "mlp"),
            ("router_func", "tanh"), ("router_alpha", 0.5), ("aux_loss_coef", 0.01),
            ("expert_aux", "router"), ("router_z_coef", 0.1), ("capacity_warmup_steps", 5),
            ("balancing", "loss_free"), ("balance_coef", 0.2), ("bias_update_rate", 0.01),
            ("eval_routing", "causal"), ("capacities", [1.0, 0.5])]))
        fields, needle = {field: value}, field
    elif kind == "vanilla recursions":
        i = MODELS["vanilla"]
        fields, needle = {"num_recursions": draw(st.integers(2, 4))}, "num_recursions"
    elif kind == "MoR sharing":
        i = draw(st.sampled_from([EXPERT, TOKEN]))
        fields = {"sharing": draw(st.sampled_from(["cycle", "sequence", "middle_sequence"]))}
        needle = "sharing"
    elif kind == "token-only on expert":
        i = EXPERT
        field, value = draw(st.sampled_from([
            ("balancing", st.just("loss_free")),
            ("balance_coef", st.floats(0, 5).filter(lambda x: x != 0.1)),
            ("bias_update_rate", st.floats(0, 5).filter(lambda x: x != 1e-3))]))
        fields, needle = {field: draw(value)}, field
    elif kind == "expert-only on token":
        i = TOKEN
        field, value = draw(st.sampled_from([
            ("capacities", st.just([1.0, 0.7, 0.3])), ("expert_aux", st.just("router")),
            ("capacity_warmup_steps", st.integers(1, 1000))]))
        fields, needle = {field: draw(value)}, field
    elif kind == "topk on token":
        i, fields, needle = TOKEN, {"eval_routing": "topk"}, "eval_routing"
    elif kind == "router_func":
        i = draw(st.sampled_from([EXPERT, TOKEN]))
        fields = {"router_func": "softmax" if i == EXPERT else "tanh"}
        needle = "router_func"
    elif kind == "max_seq_len < seq_len":
        fields, needle = {"max_seq_len": draw(st.integers(1, SEQ_LEN - 1))}, "max_seq_len"
    elif kind == "budget too small":
        fields = {"budget": draw(st.one_of(
            st.integers(1, TOKENS_PER_STEP - 1).map(lambda n: {"tokens": n}),
            st.floats(1.0, 1e6).map(lambda f: {"flops": [f]})))}
        needle = "too small"
    elif kind == "small bpe vocab":
        bpe = f"bpe:{draw(st.integers(0, 257))}"
        return case_of(with_value(("data", "tokenizer"), bpe), f"tokenizer {bpe}",
                       "tokenizer")
    else:
        raise AssertionError(f"test bug: unknown kind {kind!r}")
    doc = copy.deepcopy(BASE)
    doc["models"][i].update(fields)
    return case_of(doc, f"{kind}: models[{i}] + {fields}", needle)


INCONSISTENT_KINDS = [
    "d_model % n_heads", "n_heads % n_kv_heads", "odd head_dim", "recursions > layers",
    "capacities", "kv share", "routing on non-MoR", "vanilla recursions", "MoR sharing",
    "token-only on expert", "expert-only on token", "topk on token", "router_func",
    "max_seq_len < seq_len", "budget too small", "small bpe vocab"]


BROKEN_SNIPPETS = ["= 1", "key =", "key = [1, 2", 'key = "unterminated', "[[", "[data",
                   "key = 1 2", "key = {a = 1", "key = 0x", "key = 1__0", "key = .5",
                   "k\u00e9y = 1", "key = tru", "key = 1979-13-45", "[]", "key == 1"]
NOT_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\x80", b"\xe2\x82", b"\xe9", b"\xed\xa0\x80",
            b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]


@st.composite
def broken_files(draw, kind: str) -> Case:
    """Broken TOML syntax, bytes that are not UTF-8, empty or comment-only files."""
    text = dumps(BASE)
    lines = text.splitlines(keepends=True)
    if kind == "deep":  # nesting past Python's recursion limit inside tomllib
        n = draw(st.integers(1500, 20000))
        open_, close = draw(st.sampled_from([("[", "]"), ("{a = ", "}")]))
        return Case(f"x = {open_ * n}{close * n}\n{text}".encode(), ("TOML",), f"deep {n}")
    if kind == "long integer":  # past int()'s 4300-digit limit: tomllib raises ValueError
        k = draw(st.integers(4301, 6000))
        return Case(f"x = {'9' * k}\n{text}".encode(), ("TOML",), f"{k} digits")
    if kind == "snippet":
        at = draw(st.integers(0, len(lines)))
        snippet = draw(st.sampled_from(BROKEN_SNIPPETS))
        lines.insert(at, snippet + "\n")
        return Case("".join(lines).encode(), ("TOML",), f"snippet {snippet!r} at {at}")
    if kind == "header":
        headers = [i for i, line in enumerate(lines) if line.startswith("[")]
        i = draw(st.sampled_from(headers))
        lines[i] = lines[i].rstrip("\n").rstrip("]") + "\n"
        return Case("".join(lines).encode(), ("TOML",), f"header {lines[i]!r}")
    if kind == "duplicate key":
        pairs = [i for i, line in enumerate(lines) if " = " in line]
        i = draw(st.sampled_from(pairs))
        lines.insert(i + 1, lines[i])
        return Case("".join(lines).encode(), ("TOML",), f"duplicate {lines[i]!r}")
    if kind == "duplicate table":
        table = draw(st.sampled_from(["data", "train", "budget", "eval", "infer", "speed"]))
        return Case((text + f"\n[{table}]\n").encode(), ("TOML",), f"duplicate [{table}]")
    if kind == "not utf-8":
        data = text.encode()
        at = draw(st.integers(0, len(data)))
        bad = draw(st.sampled_from(NOT_UTF8))
        return Case(data[:at] + bad + data[at:], ("UTF-8",), f"{bad!r} at byte {at}")
    if kind == "utf-16":
        return Case(text.encode("utf-16"), ("UTF-8",), "utf-16")
    assert kind == "empty", f"test bug: unknown kind {kind!r}"
    content = draw(st.sampled_from(["", "\n", "   \n\t\n", "# only a comment\n",
                                    "\ufeff", "# a\n# b\n"]))
    return Case(content.encode(), ("'name'",), f"empty {content!r}")


BROKEN_KINDS = ["snippet", "header", "duplicate key", "duplicate table", "not utf-8", "utf-16",
                "empty", "deep", "long integer"]


# --------------------------------------------------------------------------------------------
# running a case through the command line


@pytest.fixture(scope="module")
def work_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where examples write their files (module-scoped: hypothesis reruns a test body many
    times, and function-scoped fixtures are not reset between examples)."""
    return tmp_path_factory.mktemp("fuzz")


def assert_names(line: str, needle: str) -> None:
    """`needle` in the line; identifiers as whole words ('kv' is not in 'n_kv_heads')."""
    if IDENT.fullmatch(needle):
        assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(needle)}(?![A-Za-z0-9_])", line), (
            f"{needle!r} not named in {line!r}")
    else:
        assert needle in line, f"{needle!r} not in {line!r}"


def check_rejected(rc: int, out: str, err: str, case: Case, out_dir: Path) -> None:
    lines = err.splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("mor-bench: error: "), lines[0]
    assert rc == 2, (rc, lines[0])
    assert out == "", out
    assert FILE in lines[0], f"the file is not named: {lines[0]!r}"
    for needle in case.needles:
        assert_names(lines[0], needle)
    assert not out_dir.exists(), f"{out_dir} was written: {sorted(out_dir.rglob('*'))}"


def run_in_process(case: Case, root: Path) -> None:
    note(case.label)
    work = Path(tempfile.mkdtemp(dir=root))
    try:
        path, out_dir = work / FILE, work / "runs"
        path.write_bytes(case.content)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(["run", str(path), "--out", str(out_dir),
                           "--cache-dir", str(work / "cache")])
            except SystemExit as e:  # argparse's exits count too
                rc = e.code
        check_rejected(rc, out.getvalue(), err.getvalue(), case, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the tests


def test_base_suite_is_valid():
    """The starting point passes validation and planning: every rejection below is the
    corruption's doing, and BASE would really start training."""
    suite = parse_suite(dumps(BASE), FILE)
    assert [m.name for m in suite.models] == list(MODELS)
    assert suite.infer is not None and suite.speed is not None
    assert len(plan_runs(suite)) == 2 * (2 + 2 + 2 + 1)  # seeds x budgets (mor-3-token: one)


def test_the_writer_round_trips():
    import tomllib

    assert tomllib.loads(dumps(BASE)) == BASE
    odd = {"name": "a\"b\\c\u00e9\x00\U0001F600", "x": [math.inf, -0.0, 1e-300, True],
           "t": {"d": datetime.date(2020, 2, 29), "k y": {"n": 1}}}
    loaded = tomllib.loads(dumps(odd))
    assert loaded["name"] == odd["name"] and loaded["t"] == odd["t"]
    assert loaded["x"][0] == math.inf and loaded["x"][2] == 1e-300


@pytest.mark.parametrize("place", WRONG_TYPE_PLACES)
@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_wrong_types_are_one_line_errors(place, data, work_root):
    run_in_process(data.draw(wrong_types(place)), work_root)


@pytest.mark.parametrize("kind", OUT_OF_RANGE_KINDS)
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_out_of_range_values_are_one_line_errors(kind, data, work_root):
    run_in_process(data.draw(out_of_range(kind)), work_root)


@pytest.mark.parametrize("kind", UNKNOWN_KINDS)
@settings(FUZZ, max_examples=10)
@given(data=st.data())
def test_unknown_keys_and_values_are_one_line_errors(kind, data, work_root):
    run_in_process(data.draw(unknown_keys_and_values(kind)), work_root)


@pytest.mark.parametrize("kind", MISSING_KINDS)
@settings(FUZZ, max_examples=10)
@given(data=st.data())
def test_missing_keys_and_misshapen_tables_are_one_line_errors(kind, data, work_root):
    run_in_process(data.draw(missing_and_misshapen(kind)), work_root)


@pytest.mark.parametrize("kind", INCONSISTENT_KINDS)
@settings(FUZZ, max_examples=8)
@given(data=st.data())
def test_inconsistent_models_are_one_line_errors(kind, data, work_root):
    run_in_process(data.draw(inconsistent_models(kind)), work_root)


@pytest.mark.parametrize("kind", BROKEN_KINDS)
@settings(FUZZ, max_examples=7)
@given(data=st.data())
def test_broken_files_are_one_line_errors(kind, data, work_root):
    run_in_process(data.draw(broken_files(kind)), work_root)


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("mor-bench")
    return [str(script)] if script.exists() else [sys.executable, "-m", "evals.cli.main"]


PROCESS_SAMPLE = [(wrong_types, "models"), (out_of_range, "int64"),
                  (unknown_keys_and_values, "key:defaults"),
                  (missing_and_misshapen, "budget values"),
                  (inconsistent_models, "recursions > layers"), (broken_files, "not utf-8")]


@pytest.mark.parametrize("strategy,kind", PROCESS_SAMPLE,
                         ids=[f"{s.__name__}-{k}" for s, k in PROCESS_SAMPLE])
@settings(FUZZ, max_examples=1)
@given(data=st.data())
def test_process_level_contract(strategy, kind, data, work_root):
    """The real process: exit status 2, exactly one stderr line, no traceback, no --out."""
    case = data.draw(strategy(kind))
    note(case.label)
    work = Path(tempfile.mkdtemp(dir=work_root))
    try:
        path, out_dir = work / FILE, work / "runs"
        path.write_bytes(case.content)
        res = subprocess.run([*_console_script(), "run", str(path), "--out", str(out_dir),
                              "--cache-dir", str(work / "cache")],
                             capture_output=True, text=True, timeout=120, cwd=work)
        check_rejected(res.returncode, res.stdout, res.stderr, case, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_message_with_a_line_break_stays_on_one_line(tmp_path):
    """A file name (quoted in the message) may hold a line break; the error is still one
    line (`evals.cli.main.one_line`)."""
    path = tmp_path / "odd\nname.toml"
    path.write_text("# no name\n")
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["run", str(path), "--out", str(tmp_path / "runs")])
    lines = err.getvalue().splitlines()
    assert rc == 2 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith("mor-bench: error: ") and "odd name.toml" in lines[0]
    assert "'name'" in lines[0] and not (tmp_path / "runs").exists()

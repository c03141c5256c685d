"""Few-shot multiple-choice tasks from held-out seeds of the synthetic corpus, run by lm-eval.

The smoke suite trains tiny byte-level models on :mod:`evals.data.synthetic`, whose hard tokens come
in three families: arithmetic answers, key-value recall answers and variable-tracking answers.
The paper's benchmarks (HellaSwag, ARC, ...) are far beyond such models, so their accuracies
sit at chance and cannot separate the models of a suite. This module writes one 4-way
multiple-choice task per difficulty family, in the corpus's own text format, as ordinary
lm-evaluation-harness task YAMLs over local JSONL files::

    out = write_synthetic_tasks(Path("runs/synthetic-tasks"))       # the include_path
    # evaluated by evals.lmeval.adapter.evaluate_synthetic (or run_tasks):
    scores = evaluate_synthetic(MorBenchLM(checkpoint=RUN_DIR), out, num_fewshot=3)
    scores["mor_synth_arithmetic"]   # {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}

=====================  ==============================================  ==================
task                   context (``doc_to_text``)                        choices
=====================  ==============================================  ==================
mor_synth_arithmetic   ``Compute: 4821 + 379 =``                        `` 5200.`` + 3 more
mor_synth_recall       ``Table: k7=42, k13=5. <prose> Now answer. k7?``  `` 42.`` + 3 more
mor_synth_tracking     ``Program: a=3. b=a+2. c=b. c?``                 `` 5.`` + 3 more
=====================  ==============================================  ==================

Items are cut from segments made by the corpus generator's own segment functions (so the
format can never drift from what the models were trained on) at the first answer: the context
is everything before it, the gold choice is ``" " + answer + "."``. The terminating period is
part of every choice on purpose: without it a choice that extends another (`` 42`` vs `` 4``)
could never win on summed log-likelihood, whatever the model knows. The task YAMLs set
``target_delimiter: ""`` because the choices carry their own leading space; few-shot examples
are joined by lm-eval's default ``"\\n\\n"`` (no context contains a newline). Distractors are
the mistakes a model that half-learnt the task would make:

* arithmetic: the answer without carries (or with the smaller digit always subtracted from
  the larger, for ``-``), a carry dropped or added in one column (``answer +- 10**k``) and
  single-digit changes, all with the answer's number of digits;
* recall: the values of the *other* keys of the same table (a model that copies "some value"
  stays at chance), then digit changes of the answer;
* tracking: other values the program assigned (stale values of the queried variable, values
  of other variables), then the answer +- 1..2.

The gold's position among the four choices is drawn uniformly, so chance is :data:`CHANCE`.

**Why the items are held out.** The training corpus draws document ``i`` of seed ``s`` from
``random.Random("mor-bench-synthetic/{s}/{i}")``; every item here draws from its own
``random.Random("mor-bench-fewshot/{task}/{split}/{seed}/{i}")``. Python hashes string seeds
with SHA-512, so these streams are independent of every training document's stream for every
training seed (including the default seed 0): no item is a replay of training text. Exact
repeats of a short problem (``23 + 45 =``) can still occur by chance, as in any finite
problem space, but are not systematic. The few-shot examples come from a separate ``train``
split (its own streams, and any item whose context also occurs in the test split is skipped),
so a shot never shows the test item's answer.

Generation is deterministic: the same ``(n_items, seed)`` writes byte-identical files, and
item ``i`` does not depend on ``n_items``. This module only writes files: it imports neither
lm-eval nor ``datasets`` nor any other module of evals.lmeval (the bottom of the package's
imports), and touches no environment variable.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from evals.data.synthetic import (
    _ADJECTIVES,
    _ADVERBS,
    _INTRANSITIVE,
    _NAMES,
    _NOUNS,
    _TRANSITIVE,
    ARITHMETIC,
    RECALL,
    TRACKING,
    Piece,
    _arithmetic,
    _recall,
    _sentence,
    _tracking,
)
from mor.errors import DataError

SYNTHETIC_TASKS: tuple[str, ...] = ("mor_synth_filler", "mor_synth_arithmetic",
                                    "mor_synth_recall", "mor_synth_tracking")
"""The task names, one per difficulty family of the synthetic corpus: the easy filler prose
(pick the word of the right grammatical category, which tiny models learn within the smoke
budget) and the three hard families (which they do not)."""

SYNTHETIC_GROUP = "mor_synthetic"
"""The lm-eval group that holds :data:`SYNTHETIC_TASKS`."""

CHANCE = 0.25
"""Accuracy of a random guess: every item has 4 choices and a uniformly placed gold."""

N_CHOICES = 4
N_FEWSHOT_ITEMS = 32
"""Items of each task's ``train`` split, the pool lm-eval draws few-shot examples from."""

METRICS = ("acc", "acc_norm")
_VERSION = 2  # bump when the item format or the distractor rules change

# segment maker and answer class of each task
_FAMILIES: dict[str, tuple[Callable[[random.Random], list[Piece]], int]] = {
    "mor_synth_arithmetic": (_arithmetic, ARITHMETIC),
    "mor_synth_recall": (_recall, RECALL),
    "mor_synth_tracking": (_tracking, TRACKING),
}

_ARITH_RE = re.compile(r"(\d+) ([-+*]) (\d+) =$")
_TABLE_RE = re.compile(r"k(\d+)=(\d+)")
_ASSIGN_RE = re.compile(r"([a-z])=(?:(\d+)|([a-z])(?:([-+])(\d+))?)\.")


# --- items ---------------------------------------------------------------------------------------
def _cut_at_answer(pieces: list[Piece], answer_class: int) -> tuple[str, int]:
    """(context, answer) for the first piece of ``answer_class``; the context loses the one
    trailing space that separates it from the answer (the space goes into the choices)."""
    for i, (text, cls) in enumerate(pieces):
        if cls == answer_class:
            context = "".join(t for t, _ in pieces[:i])
            if not context.endswith(" "):
                raise AssertionError(f"answer not preceded by a space in {context!r}")
            return context[:-1], int(text)
    raise AssertionError(f"segment has no answer of class {answer_class}")


def _digit_changes(value: int) -> list[int]:
    """Every number that differs from ``value`` in exactly one digit (no new leading zero)."""
    digits = str(value)
    out = []
    for pos, old in enumerate(digits):
        for new in "0123456789":
            if new != old and not (pos == 0 and new == "0" and len(digits) > 1):
                out.append(int(digits[:pos] + new + digits[pos + 1:]))
    return out


def _columnwise(a: int, b: int, op: str) -> int:
    """``a op b`` done column by column without carries/borrows (the classic carry error)."""
    result, place = 0, 1
    while a or b:
        da, db = a % 10, b % 10
        result += ((da + db) % 10 if op == "+" else abs(da - db)) * place
        a, b, place = a // 10, b // 10, place * 10
    return result


def _arithmetic_distractors(context: str, gold: int) -> list[list[int]]:
    match = _ARITH_RE.search(context)
    if match is None:
        raise AssertionError(f"no arithmetic problem at the end of {context!r}")
    a, op, b = int(match[1]), match[2], int(match[3])
    primary = [] if op == "*" else [_columnwise(a, b, op)]
    if op == "*":  # forgetting a partial product's carry, or an off-by-one operand
        primary += [gold + a, gold - a, gold + b, gold - b]
    secondary = [gold + s * 10**k for k in range(len(str(gold))) for s in (1, -1)]
    width = len(str(gold))
    same_width = lambda xs: [x for x in xs if len(str(x)) == width]
    return [same_width(primary), same_width(secondary), same_width(_digit_changes(gold)),
            secondary + _digit_changes(gold)]


def _recall_distractors(context: str, gold: int) -> list[list[int]]:
    return [[int(v) for _, v in _TABLE_RE.findall(context)], _digit_changes(gold),
            [gold + d for d in range(1, 11)]]


def _tracking_distractors(context: str, gold: int) -> list[list[int]]:
    assigned = [int(v) for v in _replay(context).history]
    return [assigned, [gold + d for d in (1, -1, 2, -2)], _digit_changes(gold),
            [gold + d for d in range(3, 13)]]


class _Replay:
    def __init__(self) -> None:
        self.env: dict[str, int] = {}
        self.history: list[int] = []


def _replay(context: str) -> _Replay:
    """Run the assignments of a tracking context (``a=3. b=a+2. c=b.``)."""
    state = _Replay()
    for var, const, src, sign, delta in _ASSIGN_RE.findall(context):
        if const:
            value = int(const)
        else:
            value = state.env[src] + (int(delta) if sign == "+" else -int(delta) if sign else 0)
        state.env[var] = value
        state.history.append(value)
    return state


_DISTRACTORS: dict[str, Callable[[str, int], list[list[int]]]] = {
    "mor_synth_arithmetic": _arithmetic_distractors,
    "mor_synth_recall": _recall_distractors,
    "mor_synth_tracking": _tracking_distractors,
}


def _pick_distractors(rng: random.Random, gold: int, tiers: list[list[int]]) -> list[int]:
    """The first ``N_CHOICES - 1`` distinct non-negative candidates != gold, taking the tiers
    in order and each tier in a random order."""
    picked: list[int] = []
    for tier in tiers:
        candidates = sorted(set(tier))
        rng.shuffle(candidates)
        for c in candidates:
            if c >= 0 and c != gold and c not in picked:
                picked.append(c)
                if len(picked) == N_CHOICES - 1:
                    return picked
    raise AssertionError(f"not enough distractors for {gold}")  # unreachable: digit changes


def _choice(value: int) -> str:
    return f" {value}."


def _filler_item(rng: random.Random) -> tuple[str, str, list[str]]:
    """Filler prose cut before the object noun of "The ADJ NOUN VERBED the NOUN." -- the
    corpus's own template. Distractors come from categories that never follow "the" in the
    corpus (an adverb, an intransitive verb, a name), so the task measures whether a model
    learned the easy text's grammar."""
    lead = " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
    c = rng.choice
    context = f"{lead} The {c(_ADJECTIVES)} {c(_NOUNS)} {c(_TRANSITIVE)} the"
    return context, f" {c(_NOUNS)}.", [f" {c(_ADVERBS)}.", f" {c(_INTRANSITIVE)}.",
                                       f" {c(_NAMES)}."]


def make_item(task: str, split: str, seed: int, index: int) -> dict[str, Any]:
    """Item ``index`` of ``task``'s ``split`` for ``seed``: {id, context, choices, gold}."""
    if task not in _FAMILIES and task != "mor_synth_filler":
        raise DataError(f"unknown synthetic task '{task}'; expected one of {SYNTHETIC_TASKS}")
    rng = random.Random(f"mor-bench-fewshot/{task}/{split}/{seed}/{index}")
    if task == "mor_synth_filler":
        context, answer_text, choices = _filler_item(rng)
    else:
        maker, answer_class = _FAMILIES[task]
        context, answer = _cut_at_answer(maker(rng), answer_class)
        answer_text = _choice(answer)
        choices = [_choice(d) for d in
                   _pick_distractors(rng, answer, _DISTRACTORS[task](context, answer))]
    gold = rng.randrange(N_CHOICES)
    choices.insert(gold, answer_text)
    return {"id": f"{task}-s{seed}-{split}-{index:05d}", "context": context,
            "choices": choices, "gold": gold}


def make_items(task: str, *, n_items: int = 200, seed: int = 12345
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(test items, few-shot train items) of ``task``; no train context equals a test one."""
    if n_items < 1:
        raise DataError(f"n_items must be >= 1, got {n_items}")
    test = [make_item(task, "test", seed, i) for i in range(n_items)]
    seen = {item["context"] for item in test}
    train: list[dict[str, Any]] = []
    index = 0
    while len(train) < N_FEWSHOT_ITEMS:
        item = make_item(task, "train", seed, index)
        index += 1
        if item["context"] not in seen:
            seen.add(item["context"])
            train.append(item)
    return test, train


# --- files ---------------------------------------------------------------------------------------
def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless the file already holds exactly it (keeps mtimes, and so the
    datasets cache, stable across idempotent rewrites)."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _jsonl(items: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(item, ensure_ascii=True) + "\n" for item in items)


def _task_yaml(task: str, test_file: Path, train_file: Path, cache_dir: Path, *,
               n_items: int, seed: int) -> dict[str, Any]:
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {"train": str(train_file), "test": str(test_file)},
            # a datasets cache inside out_dir: nothing written to the user's cache
            "cache_dir": str(cache_dir),
        },
        "output_type": "multiple_choice",
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",  # the choices carry their own leading space
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in METRICS],
        "metadata": {"version": _VERSION, "seed": seed, "n_items": n_items},
    }


def _dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)


def write_synthetic_tasks(out_dir: Path, *, n_items: int = 200, seed: int = 12345) -> Path:
    """Write the synthetic tasks under ``out_dir`` and return it (lm-eval's include_path).

    Files: ``data/<task>.jsonl`` (``n_items`` test items), ``data/<task>_train.jsonl``
    (:data:`N_FEWSHOT_ITEMS` few-shot items), ``<task>.yaml`` per task and the group YAML
    ``mor_synthetic.yaml``. Data paths inside the YAMLs are absolute, so the YAMLs work from
    any working directory; rewriting the same arguments to the same directory leaves every
    file byte-identical.
    """
    out_dir = Path(out_dir).resolve()
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for task in SYNTHETIC_TASKS:
        test, train = make_items(task, n_items=n_items, seed=seed)
        test_file, train_file = data_dir / f"{task}.jsonl", data_dir / f"{task}_train.jsonl"
        _write_if_changed(test_file, _jsonl(test))
        _write_if_changed(train_file, _jsonl(train))
        config = _task_yaml(task, test_file, train_file, out_dir / ".hf_cache",
                            n_items=n_items, seed=seed)
        _write_if_changed(out_dir / f"{task}.yaml", _dump(config))
    group = {
        "group": SYNTHETIC_GROUP,
        "task": list(SYNTHETIC_TASKS),
        "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                  for m in METRICS],
        # four difficulty families reported one by one: `--limit N` means N items of each
        # (evals.lmeval.adapter.limit_samples), unlike MMLU's subjects
        "metadata": {"version": _VERSION, "limit_per_subtask": True},
    }
    _write_if_changed(out_dir / f"{SYNTHETIC_GROUP}.yaml", _dump(group))
    return out_dir


# --- checks ------------------------------------------------------------------------------------
def check_written(out_dir: Path, tasks: Sequence[str] = SYNTHETIC_TASKS) -> None:
    """Raise DataError unless every task of ``tasks`` has its YAML in ``out_dir``."""
    missing = [t for t in tasks if not (Path(out_dir) / f"{t}.yaml").is_file()]
    if missing:
        raise DataError(f"synthetic task YAML(s) {missing} not found in '{out_dir}'; write them "
                        "with evals.lmeval.synthetic_tasks.write_synthetic_tasks(out_dir)")

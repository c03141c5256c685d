"""Synthetic few-shot multiple-choice tasks (evals/lmeval/synthetic_tasks.py): items, files,
lm-eval wiring.

Gold answers are recomputed here independently of the module: arithmetic by Python, recall
by a dict lookup, tracking by executing the assignments as Python statements.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM

import mor
from evals.data import synthetic
from evals.data.tokenizer import ByteTokenizer
from evals.lmeval.adapter import MorBenchLM, evaluate_synthetic
from evals.lmeval.synthetic_tasks import (
    CHANCE,
    N_FEWSHOT_ITEMS,
    SYNTHETIC_GROUP,
    SYNTHETIC_TASKS,
    make_items,
    write_synthetic_tasks,
)
from mor.errors import DataError

N_ITEMS = 200
CHOICE_RE = re.compile(r"^ (\d+)\.$")


def solve(context: str) -> int:
    """The correct answer to the last question of ``context`` (few-shot examples before it
    are separated by a blank line)."""
    last = context.split("\n\n")[-1]
    if m := re.search(r"(\d+) ([-+*]) (\d+) =$", last):
        a, op, b = int(m[1]), m[2], int(m[3])
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    if m := re.search(r"\bk(\d+)\?$", last):
        table = dict(re.findall(r"\bk(\d+)=(\d+)", last))
        return int(table[m[1]])
    if m := re.search(r"\b([a-z])\?$", last):
        env: dict[str, int] = {}
        for stmt in re.findall(r"\b[a-z]=[a-z0-9+\-]+(?=\.)", last):
            exec(stmt, {}, env)  # "b=a+2" is valid Python
        return env[m[1]]
    raise AssertionError(f"no question at the end of {last!r}")


def is_gold(context: str, choice: str) -> bool:
    """Filler items (cut after "... the") are answered by the one noun among the choices;
    the other families by the solved value."""
    if context.split("\n\n")[-1].endswith(" the"):
        return choice.strip(" .") in synthetic._NOUNS
    return choice == f" {solve(context)}."


def no_carry_sum(a: int, b: int) -> int:
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    return int("".join(str((int(x) + int(y)) % 10) for x, y in zip(da, db)))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".hf_cache" not in p.parts}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_synthetic_tasks(tmp_path_factory.mktemp("synthetic-tasks"), n_items=N_ITEMS)


def test_files_deterministic_idempotent_and_seeded(tmp_path, tasks_dir):
    expected = {f"{t}.yaml" for t in SYNTHETIC_TASKS} | {f"{SYNTHETIC_GROUP}.yaml"}
    expected |= {f"data/{t}{s}.jsonl" for t in SYNTHETIC_TASKS for s in ("", "_train")}
    before = snapshot(tasks_dir)
    assert set(before) == expected
    assert write_synthetic_tasks(tasks_dir, n_items=N_ITEMS) == tasks_dir.resolve()
    assert snapshot(tasks_dir) == before  # byte-identical rewrite

    other = snapshot(write_synthetic_tasks(tmp_path / "same", n_items=N_ITEMS))
    different = snapshot(write_synthetic_tasks(tmp_path / "seed7", n_items=N_ITEMS, seed=7))
    for task in SYNTHETIC_TASKS:
        name = f"data/{task}.jsonl"
        assert other[name] == before[name]  # same seed elsewhere: same items
        ours = [json.loads(x)["context"] for x in before[name].decode().splitlines()]
        theirs = [json.loads(x)["context"] for x in different[name].decode().splitlines()]
        assert sum(a != b for a, b in zip(ours, theirs)) > 0.9 * N_ITEMS
        yaml_text = before[f"{task}.yaml"].decode()
        assert str((tasks_dir / name).resolve()) in yaml_text  # absolute data paths
        assert "output_type: multiple_choice" in yaml_text
    # item i does not depend on how many items are written
    assert make_items(SYNTHETIC_TASKS[0], n_items=10)[0] == \
        make_items(SYNTHETIC_TASKS[0], n_items=N_ITEMS)[0][:10]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_items_have_correct_gold_and_plausible_distractors(tasks_dir, task):
    test = read_jsonl(tasks_dir / "data" / f"{task}.jsonl")
    train = read_jsonl(tasks_dir / "data" / f"{task}_train.jsonl")
    assert len(test) == N_ITEMS and len(train) == N_FEWSHOT_ITEMS
    assert not {d["context"] for d in test} & {d["context"] for d in train}
    assert len({d["id"] for d in test + train}) == N_ITEMS + N_FEWSHOT_ITEMS
    for item in test + train:
        context, choices, gold = item["context"], item["choices"], item["gold"]
        assert "\n" not in context and not context.endswith(" ")
        assert len(choices) == 4 and len(set(choices)) == 4
        assert [i for i, c in enumerate(choices) if is_gold(context, c)] == [gold], item
        if task == "mor_synth_filler":
            assert context.endswith(" the")
            assert all(re.fullmatch(r" [A-Za-z]+\.", c) for c in choices), choices
            continue
        assert all(CHOICE_RE.match(c) for c in choices), choices
        values = [int(CHOICE_RE.match(c)[1]) for c in choices]
        answer = values[gold]
        others = [v for i, v in enumerate(values) if i != gold]
        if task == "mor_synth_arithmetic":
            assert context.endswith("=")
            # distractors keep the answer's number of digits
            assert {len(str(v)) for v in values} == {len(str(answer))}, item
            a, op, b = re.search(r"(\d+) ([-+*]) (\d+) =$", context).groups()
            wrong = no_carry_sum(int(a), int(b))
            if op == "+" and wrong != answer and len(str(wrong)) == len(str(answer)):
                assert wrong in others, item  # the carry error is always offered
        elif task == "mor_synth_recall":
            assert re.search(r"k\d+\?$", context)
            table_values = {int(v) for v in re.findall(r"k\d+=(\d+)", context)} - {answer}
            # other keys' values come first: copying "some value" does not beat chance
            assert sum(v in table_values for v in others) == min(3, len(table_values)), item
        else:
            assert re.search(r"\b[a-z]\?$", context)
    # the gold position is randomised, not a constant or near-constant index
    positions = Counter(item["gold"] for item in test)
    assert set(positions) == {0, 1, 2, 3}
    assert max(positions.values()) < 0.4 * N_ITEMS


def test_tasks_load_through_lm_eval_offline(tasks_dir, monkeypatch):
    from lm_eval.tasks import TaskManager

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    assert set(SYNTHETIC_TASKS) | {SYNTHETIC_GROUP} <= set(manager.all_tasks)
    loaded = manager.load([SYNTHETIC_GROUP])
    assert set(loaded["tasks"]) == set(SYNTHETIC_TASKS)
    for name in SYNTHETIC_TASKS:
        task = loaded["tasks"][name]
        docs = list(task.test_docs())
        assert len(docs) == N_ITEMS
        assert len(list(task.fewshot_docs())) == N_FEWSHOT_ITEMS
        first = read_jsonl(tasks_dir / "data" / f"{name}.jsonl")[0]
        assert task.doc_to_text(docs[0]) == first["context"]
        assert task.doc_to_choice(docs[0]) == first["choices"]
        assert task.doc_to_target(docs[0]) == first["gold"]
        assert task.config.target_delimiter == ""
        # the request lm-eval scores for the gold choice is context + " ANSWER."
        assert is_gold(first["context"], task.doc_to_choice(docs[0])[first["gold"]])


def test_evaluate_untrained_micro_model(tasks_dir):
    torch.manual_seed(0)
    cfg = mor.ModelConfig.from_preset("micro", family="mor", num_recursions=2)
    lm = MorBenchLM(model=mor.build_model(cfg), tokenizer=ByteTokenizer(), batch_size=8)
    scores = evaluate_synthetic(lm, tasks_dir, limit=20)
    assert set(scores) == set(SYNTHETIC_TASKS)
    for row in scores.values():
        assert set(row) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
        assert row["n"] == 20
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= row[metric] <= 1.0
            assert math.isfinite(row[f"{metric}_stderr"]) and row[f"{metric}_stderr"] >= 0
            # stderr is the binomial standard error of a mean of 20 zero/one scores
            p = row[metric]
            assert row[f"{metric}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 19))


class OracleLM(LM):
    """Knows every answer: the gold continuation scores 0, every other one below -5."""

    def __init__(self, pick_gold: bool = True) -> None:
        super().__init__()
        self.pick_gold = pick_gold
        self.requests: list[tuple[str, str]] = []

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            context, continuation = req.args
            self.requests.append((context, continuation))
            right = is_gold(context, continuation) == self.pick_gold
            out.append((0.0, True) if right else (-5.0 - len(continuation), False))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def test_oracle_lm_scores_perfectly_with_fewshot_from_train_split(tasks_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    oracle = OracleLM()
    scores = evaluate_synthetic(oracle, tasks_dir, limit=40, num_fewshot=3)
    # offline only while evaluating: the environment is restored afterwards
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    for row in scores.values():
        assert row["acc"] == row["acc_norm"] == 1.0 and row["n"] == 40
    assert len(oracle.requests) == len(SYNTHETIC_TASKS) * 40 * 4
    train_shots = {d["context"] + d["choices"][d["gold"]]
                   for t in SYNTHETIC_TASKS
                   for d in read_jsonl(tasks_dir / "data" / f"{t}_train.jsonl")}
    for context, _ in oracle.requests:
        *shots, question = context.split("\n\n")
        assert len(shots) == 3 and set(shots) <= train_shots and question not in shots

    # a model that always prefers a wrong choice scores 0: the target is really the gold
    anti = evaluate_synthetic(OracleLM(pick_gold=False), tasks_dir, limit=40)
    assert all(row["acc"] == 0.0 < CHANCE for row in anti.values())


def test_evaluate_needs_written_tasks(tmp_path):
    with pytest.raises(DataError, match="write_synthetic_tasks"):
        evaluate_synthetic(OracleLM(), tmp_path, limit=1)
    with pytest.raises(DataError, match="unknown synthetic task"):
        make_items("mor_synth_poetry", n_items=1)

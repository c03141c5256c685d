"""The bottom of evals.lmeval (evals/lmeval/tasks.py): the one offline switch, the one
TaskManager builder, and the package's import direction."""

from __future__ import annotations

import os

import pytest

from evals.lmeval import tasks as lt
from evals.lmeval.synthetic_tasks import SYNTHETIC_GROUP, SYNTHETIC_TASKS, write_synthetic_tasks
from tests import import_graph as ig

KEYS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> str:
    return str(write_synthetic_tasks(tmp_path_factory.mktemp("synthetic"), n_items=4))


@pytest.fixture
def online(monkeypatch):
    """No offline variable set; datasets' flags False (both restored after the test)."""
    import datasets.config as ds_config

    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
        monkeypatch.setattr(ds_config, k, False)
    return ds_config


def test_offline_hf_switches_env_and_datasets_flags_and_restores_them(online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with lt.offline_hf():
        assert all(os.environ[k] == "1" for k in KEYS)
        assert online.HF_HUB_OFFLINE is True and online.HF_DATASETS_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "HF_DATASETS_OFFLINE" not in os.environ
    assert online.HF_HUB_OFFLINE is False and online.HF_DATASETS_OFFLINE is False
    with pytest.raises(RuntimeError), lt.offline_hf():  # restored on error too
        raise RuntimeError
    assert "HF_DATASETS_OFFLINE" not in os.environ and online.HF_HUB_OFFLINE is False


def test_use_offline_if_local_switches_only_for_all_local_data(online, synthetic_dir):
    assert lt.use_offline_if_local(["mor_synth_recall", "hellaswag"], [synthetic_dir]) is False
    assert not any(k in os.environ for k in KEYS) and online.HF_HUB_OFFLINE is False
    assert lt.use_offline_if_local([], [synthetic_dir]) is False
    assert lt.use_offline_if_local([SYNTHETIC_GROUP, "mor_synth_recall"], [synthetic_dir])
    assert all(os.environ[k] == "1" for k in KEYS) and online.HF_HUB_OFFLINE is True


def test_task_manager_sees_only_the_include_paths_unless_a_task_needs_more(synthetic_dir):
    only = lt.task_manager([synthetic_dir])
    assert set(SYNTHETIC_TASKS) | {SYNTHETIC_GROUP} <= set(only.all_tasks)
    assert "hellaswag" not in only.all_tasks and "mor_paper" not in only.all_tasks
    # local data only: still no built-in index, and the package's tasks are not added
    local = lt.task_manager([synthetic_dir], ["mor_synth_recall"])
    assert set(local.all_tasks) == set(only.all_tasks)


def test_check_tasks_names_the_fetch_command(tmp_path):
    from mor.errors import ConfigError

    lt.check_tasks(["mor_synthetic", "mor_synth_recall", "mor_paper", "hellaswag"], tmp_path)
    with pytest.raises(ConfigError, match="mor-bench data benchmarks"):
        lt.check_tasks(["hellaswag_local"], tmp_path)


def test_imports_inside_the_package_go_one_way():
    """synthetic_tasks (files) <- tasks (names, offline switch, TaskManager) <- offline_data
    and adapter; nothing in it reaches the runner, the perf package or the CLI."""
    g = {m: {t for t in ts if t.startswith("evals.")} for m, ts in ig.graph().items()
         if m.startswith("evals.lmeval")}
    assert [c for c in ig.cycles(g) if any(m.startswith("evals.lmeval") for m in c)] == []
    inside = {m: {t for t in ts if t.startswith("evals.lmeval")} for m, ts in g.items()}
    assert inside["evals.lmeval.synthetic_tasks"] == set()
    assert inside["evals.lmeval.tasks"] == {"evals.lmeval.synthetic_tasks"}
    assert inside["evals.lmeval.offline_data"] == {"evals.lmeval.tasks"}
    assert inside["evals.lmeval.adapter"] == {"evals.lmeval.tasks",
                                              "evals.lmeval.synthetic_tasks"}
    allowed_suite = {"evals.suite.spec", "evals.suite.record"}
    for mod, targets in g.items():
        for t in targets:
            assert not t.startswith(("evals.perf", "evals.cli")), (mod, t)
            assert not t.startswith("evals.suite") or t in allowed_suite, (mod, t)

"""The bottom of evals.lmeval: which tasks are local, the offline switch, the TaskManager.

Nothing here imports lm-eval or `datasets` at import time. `datasets` reads
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when it is imported, so the decision "every task is
local, never touch the Hub" must be taken before lm-eval (which imports `datasets`) is:
callers run `use_offline_if_local` first, then import the adapter.

The package's modules import in one direction: `synthetic_tasks` (generates task files,
imports nothing of evals.lmeval) <- `tasks` (this module) <- `offline_data` and `adapter`
(the lm-eval model, `run_tasks`, `evaluate_synthetic`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGE_TASKS = Path(__file__).resolve().parent / "task_files"
"""Task YAMLs shipped with mor-bench (the online paper group `mor_paper`)."""

_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


# --- the offline switch ----------------------------------------------------------------------
def set_hf_offline() -> Callable[[], None]:
    """The one offline switch: HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 in the environment,
    and the same flags of `datasets.config` (which `datasets` reads once, at import, so an
    already-imported `datasets` is switched too). Returns a function that restores the
    previous state; callers that want the switch for the rest of the process drop it,
    scoped callers use `offline_hf`."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    os.environ.update(dict.fromkeys(_OFFLINE_VARS, "1"))
    import datasets.config as ds_config  # after the environment: a first import reads it

    saved_flags = {k: getattr(ds_config, k) for k in _OFFLINE_VARS if hasattr(ds_config, k)}
    for k in saved_flags:
        setattr(ds_config, k, True)

    def restore() -> None:
        for k, v in saved_flags.items():
            setattr(ds_config, k, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return restore


@contextmanager
def offline_hf() -> Iterator[None]:
    """`set_hf_offline` while inside; the previous state is restored afterwards."""
    restore = set_hf_offline()
    try:
        yield
    finally:
        restore()


def use_offline_if_local(tasks, include_paths) -> bool:
    """Switch the process offline (`set_hf_offline`, not restored) when every task's data is
    local; returns whether it did. Call before `datasets` or `lm_eval` is imported."""
    if all_data_local(tasks, include_paths):
        set_hf_offline()
        return True
    return False


# --- task names ------------------------------------------------------------------------------
@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # lm-eval YAMLs use tags like `!function module.attr`; only names are read here, so
    # any tag loads as None.
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return Loader


def local_task_names(include_paths) -> set[str]:
    """Task and group names declared by the YAML files under `include_paths` (cheap: no
    lm-eval indexing, which costs seconds for the built-in tasks)."""
    import yaml

    names: set[str] = set()
    for root in include_paths or []:
        for f in sorted(Path(root).rglob("*.yaml")):
            try:
                doc = yaml.load(f.read_text(), Loader=_yaml_loader())
            except yaml.YAMLError:
                continue
            if isinstance(doc, dict):
                names.update(doc[k] for k in ("task", "group") if isinstance(doc.get(k), str))
    return names


def data_local_task_names(include_paths) -> set[str]:
    """Tasks whose DATA is local: those of `include_paths` except the package's own groups,
    which name lm-eval's built-in (Hub) tasks."""
    return local_task_names([p for p in include_paths or []
                             if Path(p).resolve() != PACKAGE_TASKS])


def all_data_local(tasks, include_paths) -> bool:
    """True when `tasks` is not empty and every task's data is under `include_paths`."""
    local = data_local_task_names(include_paths)
    return bool(tasks) and all(t in local for t in tasks)


def include_paths_for(tasks, paths) -> list[str]:
    """`paths` plus the package's own task directory when a task needs it."""
    out = [str(p) for p in paths]
    if any(t in local_task_names([PACKAGE_TASKS]) for t in tasks):
        out.append(str(PACKAGE_TASKS))
    return out


def _is_synthetic(task: str) -> bool:
    # the names `synthetic_tasks` writes (SYNTHETIC_GROUP, SYNTHETIC_TASKS), matched without
    # importing it: that import costs seconds (torch) and `check_tasks` must stay cheap
    return task == "mor_synthetic" or task.startswith("mor_synth_")


def _benchmark_tasks_dir(cache_dir) -> Path:
    """Where `mor-bench data benchmarks` writes the offline task YAMLs (see offline_data)."""
    return Path(cache_dir) / "benchmarks" / "tasks"


def check_tasks(tasks, cache_dir, where: str = "") -> None:
    """Every task name must resolve: the synthetic ones (generated on demand), those shipped
    with the package, the offline benchmark copies under `cache_dir`, or lm-eval's own
    task index (built-in names, known offline). Raises ConfigError naming the fetch command
    for a missing local-looking task ("*_local", "mor_*"), and naming the unknown tasks with
    close names otherwise. Cheap when every name is local (YAML names only, so suites call
    it before any data or training); lm-eval's index (seconds) is read only for the rest."""
    from mor.errors import ConfigError

    bench_tasks = _benchmark_tasks_dir(cache_dir)
    local = local_task_names([PACKAGE_TASKS] + ([bench_tasks] if bench_tasks.is_dir() else []))
    missing = [t for t in tasks if (t.endswith("_local") or t.startswith("mor_"))
               and t not in local and not _is_synthetic(t)]
    import difflib

    # a typo of a name that IS here (e.g. "mor_synthtic") is not a missing download; an
    # offline copy ("*_local") is compared with the copies only ("mor_paper_local" is not
    # a typo of the package's online "mor_paper")
    present = sorted(local | {"mor_synthetic"})
    typos = {t: difflib.get_close_matches(
        t, [n for n in present if n.endswith("_local") == t.endswith("_local")], n=3)
        for t in missing}
    typos = {t: close for t, close in typos.items() if close}
    if typos:
        hints = sorted({m for close in typos.values() for m in close})
        raise ConfigError(f"{where}unknown task(s) {', '.join(typos)}; did you mean "
                          f"{', '.join(hints)}?")
    if missing:
        raise ConfigError(f"{where}tasks {', '.join(missing)} are not available under "
                          f"'{cache_dir}'; run `mor-bench data benchmarks` first (offline "
                          "copies of the paper's benchmarks)")
    rest = [t for t in tasks if t not in local and not _is_synthetic(t)]
    if not rest:
        return
    known = set(_builtin_task_names())
    unknown = [t for t in rest if t not in known]
    if unknown:
        names = sorted(known | local)
        hints = sorted({m for t in unknown for m in difflib.get_close_matches(t, names, n=3)})
        hint = (f"; did you mean {', '.join(hints)}?" if hints
                else "; `lm-eval list tasks` lists lm-eval's names")
        raise ConfigError(f"{where}unknown task(s) {', '.join(unknown)}: not an lm-eval "
                          f"task or group, nor mor_synthetic or a *_local task{hint}")


@functools.cache
def _builtin_task_names() -> frozenset[str]:
    """Task, group and tag names of lm-eval's built-in index (read once per process)."""
    manager = task_manager([], ["-"])  # a non-local name: the built-in index, nothing else
    names: set[str] = set()
    for attr in ("all_tasks", "all_groups", "all_tags", "all_subtasks"):
        names.update(getattr(manager, attr, None) or [])
    return frozenset(names)


def task_include_paths(tasks, *, cache_dir, synthetic_dir) -> list[str]:
    """Check `tasks` (see `check_tasks`), write the synthetic task files into
    `synthetic_dir` when a synthetic task is asked for, and return the include paths lm-eval
    needs: the synthetic tasks and the offline benchmark copies."""
    check_tasks(tasks, cache_dir)
    paths = []
    if any(_is_synthetic(t) for t in tasks):
        from evals.lmeval.synthetic_tasks import write_synthetic_tasks

        paths.append(str(write_synthetic_tasks(synthetic_dir)))
    bench_tasks = _benchmark_tasks_dir(cache_dir)
    if bench_tasks.is_dir():
        paths.append(str(bench_tasks))
    return paths


# --- the TaskManager -------------------------------------------------------------------------
def task_manager(include_paths, tasks=None):
    """The one builder of lm-eval's `TaskManager`. Without `tasks`: the task YAMLs under
    `include_paths` only. With `tasks`: also the package's own task directory when a task
    is declared there, and lm-eval's built-in index only when some task's data is not local
    (indexing the built-in tasks costs seconds)."""
    from lm_eval.tasks import TaskManager

    if tasks is None:
        paths, defaults = [str(p) for p in include_paths or []], False
    else:
        paths = include_paths_for(tasks, include_paths or [])
        defaults = any(t not in data_local_task_names(paths) for t in tasks)
    return TaskManager(include_path=paths or None, include_defaults=defaults)

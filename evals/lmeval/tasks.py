"""Which lm-eval tasks are local, and the offline switch -- without importing lm-eval.

`datasets` reads HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when it is imported, so the decision
"every task is local, never touch the Hub" must be taken before lm-eval (which imports
`datasets`) is: callers run `use_offline_if_local` first, then import the adapter.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # lm-eval YAMLs use tags like `!function module.attr`; only names are read here, so
    # any tag loads as None.
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return Loader


PACKAGE_TASKS = Path(__file__).resolve().parent / "task_files"
"""Task YAMLs shipped with mor-bench (the online paper group `mor_paper`)."""


def include_paths_for(tasks, paths) -> list[str]:
    """`paths` plus the package's own task directory when a task needs it."""
    out = [str(p) for p in paths]
    if any(t in local_task_names([PACKAGE_TASKS]) for t in tasks):
        out.append(str(PACKAGE_TASKS))
    return out


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


def use_offline_if_local(tasks, include_paths) -> bool:
    """Set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 when every task's data is local
    (returns whether it did). Call before `datasets` or `lm_eval` is imported."""
    local = data_local_task_names(include_paths)
    if tasks and all(t in local for t in tasks):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return True
    return False


def _is_synthetic(task: str) -> bool:
    return task == "mor_synthetic" or task.startswith("mor_synth_")


def check_tasks(tasks, cache_dir, where: str = "") -> None:
    """Every local-looking task ("*_local", "mor_*") must be generated on demand (the
    synthetic ones), shipped with the package, or present in the offline benchmark copies
    under `cache_dir`; raises ConfigError naming the fetch command otherwise. Cheap: reads
    YAML names only, so suites call it before any data or training."""
    from mor.errors import ConfigError

    bench_tasks = Path(cache_dir) / "benchmarks" / "tasks"
    local = local_task_names([PACKAGE_TASKS] + ([bench_tasks] if bench_tasks.is_dir() else []))
    missing = [t for t in tasks if (t.endswith("_local") or t.startswith("mor_"))
               and t not in local and not _is_synthetic(t)]
    if missing:
        raise ConfigError(f"{where}tasks {', '.join(missing)} are not available under "
                          f"'{cache_dir}'; run `mor-bench data benchmarks` first (offline "
                          "copies of the paper's benchmarks)")


def task_include_paths(tasks, *, cache_dir, synthetic_dir) -> list[str]:
    """Check `tasks` (see `check_tasks`), write the synthetic task files into
    `synthetic_dir` when a synthetic task is asked for, and return the include paths lm-eval
    needs: the synthetic tasks and the offline benchmark copies."""
    check_tasks(tasks, cache_dir)
    paths = []
    if any(_is_synthetic(t) for t in tasks):
        from evals.lmeval.synthetic_tasks import write_synthetic_tasks

        paths.append(str(write_synthetic_tasks(synthetic_dir)))
    bench_tasks = Path(cache_dir) / "benchmarks" / "tasks"
    if bench_tasks.is_dir():
        paths.append(str(bench_tasks))
    return paths

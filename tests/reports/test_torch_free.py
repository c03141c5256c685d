"""Reports are a pure function of the records: rendering a run directory needs neither
torch nor the model code (docs/records.md).

The child process installs a `sys.meta_path` finder that makes importing torch, mor,
baselines, lm_eval or transformers raise ImportError, then renders report.md of a copy of
the committed fixture run through `reports.html.build_report` -- the entry `mor-bench
report` uses -- and the bytes must equal those rendered in a normal process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from reports.html import build_report

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "records"
BLOCKED = ("torch", "mor", "baselines", "lm_eval", "transformers")

_BLOCKER = textwrap.dedent(f"""
    import importlib.abc
    import sys

    BLOCKED = {BLOCKED!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    for name in list(sys.modules):  # nothing pre-imported may slip through
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())
""")


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_the_blocker_blocks():
    res = _child("""
        for name in ("torch", "mor.flops", "baselines", "lm_eval", "transformers"):
            try:
                __import__(name)
            except ImportError:
                continue
            raise SystemExit(f"{name} imported")
        print("all blocked")
    """)
    assert res.returncode == 0, res.stderr
    assert "all blocked" in res.stdout


def test_report_md_renders_without_torch_and_model_code(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES, run_dir)
    normal = Path(build_report(run_dir)["markdown"]).read_bytes()
    assert b"speed_rel_tokens_per_s" in normal and b"Failed runs" in normal
    for out in [run_dir / "figures", *run_dir.glob("report*"), run_dir / "index.html"]:
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    res = _child(f"""
        import sys
        from reports.html import build_report

        out = build_report({str(run_dir)!r})
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
        assert not loaded, loaded
        print(out["markdown"])
    """)
    assert res.returncode == 0, res.stderr
    md = Path(res.stdout.strip().splitlines()[-1])
    assert md == run_dir / "report.md"
    assert md.read_bytes() == normal


def test_record_schema_module_is_a_leaf():
    res = _child("""
        import sys
        import evals.suite.record as record

        project = sorted(m for m in sys.modules
                         if m.split(".")[0] in ("mor", "baselines", "evals", "reports")
                         and m not in ("evals", "evals.suite", "evals.suite.record"))
        assert not project, project
        print(record.SCHEMA)
    """)
    assert res.returncode == 0, res.stderr
    assert "run-record" in res.stdout

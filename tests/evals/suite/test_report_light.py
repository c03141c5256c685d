"""`mor-bench report` reads records only: it must not import torch, the model code or
lm-eval (docs/architecture.md: reports sit above the record schema alone)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "records"
ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import sys
from evals.cli.main import main
rc = main(["report", sys.argv[1]])
heavy = sorted(m for m in ("torch", "mor", "lm_eval", "evals.suite.runner", "evals.training")
               if m in sys.modules)
assert rc == 0, rc
assert not heavy, f"mor-bench report imported {heavy}"
print("LIGHT-OK")
"""


def test_report_imports_no_torch(tmp_path):
    run_dir = tmp_path / "records"
    shutil.copytree(FIXTURE, run_dir)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LIGHT-OK" in res.stdout
    assert (run_dir / "report.md").is_file() and (run_dir / "index.html").is_file()


def test_help_and_bad_run_dir_import_no_torch(tmp_path):
    script = ("import sys\nfrom evals.cli.main import main\n"
              f"rc = main(['report', {str(tmp_path / 'nope')!r}])\n"
              "assert rc == 2, rc\nassert 'torch' not in sys.modules\nprint('LIGHT-OK')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LIGHT-OK" in res.stdout
    assert res.stderr.strip().startswith("mor-bench: error:") and "nope" in res.stderr

"""The GPU device script `benchmarks/gpu/train_135m.py` (docs/gpu.md §5), smoke-tested on
the CPU at the micro preset (four models, finite losses, throughput and MFU) and, where a
GPU is present, compiled on CUDA at the same size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "gpu" / "train_135m.py"


def test_cpu_smoke_run_reports_every_model():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "micro", "--steps", "2",
         "--seq-len", "32", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # --json: stdout is one JSON object, nothing else
    assert [m["model"] for m in out["models"]] == ["vanilla", "recursive-3", "mor-2", "mor-3"]
    for m in out["models"]:
        assert math.isfinite(m["loss"]) and math.isfinite(m["first_loss"]), m
        assert m["tokens_per_s"] > 0 and m["mfu"] > 0, m
        # MFU is the model's training FLOP rate over the peak the run names (on a busy CPU
        # the measured peak is noisy, so no upper bound here).
        rate = 3 * m["flops_per_token_exact"] * m["tokens_per_s"]
        assert m["mfu"] * out["peak_flops"] == pytest.approx(rate)
        assert m["steps"] == 2 and m["peak_mem_bytes"] > 0
    plans = {m["model"]: (m["family"], m["num_recursions"]) for m in out["models"]}
    assert plans == {"vanilla": ("vanilla", 1), "recursive-3": ("recursive", 3),
                     "mor-2": ("mor", 2), "mor-3": ("mor", 3)}
    # The backend dict of configure_backend, and where the MFU denominator came from.
    assert out["backend"]["deterministic"] is False and out["backend"]["tf32_matmul"] is None
    assert out["peak_source"] == "measured" and out["peak_flops"] > 0
    assert out["settings"]["seq_len"] == 32 and out["settings"]["compile"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_compiled_records_the_gpu_path():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--preset", "micro", "--steps", "3",
         "--seq-len", "128", "--compile", "--json", "--models", "vanilla,mor-3"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["backend"]["tf32_matmul"] is True and out["backend"]["cudnn_benchmark"] is True
    assert out["settings"]["autocast"] == "bf16" and out["settings"]["fused_adamw"] is True
    for m in out["models"]:
        assert m["peak_mem_kind"] == "cuda_max_allocated" and m["peak_mem_bytes"] > 0
        assert math.isfinite(m["loss"]) and m["tokens_per_s"] > 0

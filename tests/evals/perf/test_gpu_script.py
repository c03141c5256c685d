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


INFER_SCRIPT = ROOT / "benchmarks" / "gpu" / "infer_throughput.py"


def test_infer_script_cpu_smoke_run_reports_the_paper_layout():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(INFER_SCRIPT), "--device", "cpu", "--preset", "micro",
         "--samples", "6", "--gen-mean", "10", "--gen-std", "2", "--models", "vanilla,mor-3",
         "--calib-windows", "16", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    keys = [(r["model"], r["batch_setting"], r["scheduler"]) for r in out["rows"]]
    assert keys == [("vanilla", "32", "sequence"), ("mor-3", "32", "sequence"),
                    ("mor-3", "32", "depth"), ("vanilla", "max", "sequence"),
                    ("mor-3", "max", "sequence"), ("mor-3", "max", "depth")]
    for r in out["rows"]:
        assert r["tokens"] == out["lengths_total"] and r["tokens_per_s"] > 0
        if r["model"] == "vanilla":
            assert r["speedup"] == 1.0 and r["mean_depth"] is None
        else:
            assert 1.0 < r["mean_depth"] < 3.0  # calibrated routing: mixed depths
    # Routers set to the paper's capacities by calibration, checked on other windows.
    mor = out["models"]["mor-3"]
    assert mor["target_fractions"] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert all(abs(a - b) < 0.08 for a, b in zip(mor["held_out_fractions"],
                                                  mor["target_fractions"]))
    # The max batch is the one the memory budget allows: MoR's smaller model and cache fit
    # more sequences (capped by the sample count here).
    batches = {(r["model"], r["batch_setting"]): r["batch"] for r in out["rows"]}
    assert batches[("mor-3", "max")] >= batches[("vanilla", "max")]
    # The throughput model's projection of every configuration, on this CPU and on the
    # paper's H100, labelled as a model; vanilla is its own 1.0x reference in each.
    proj = out["projection"]
    profiles = {p["profile"] for p in proj}
    assert len(profiles) == 2 and "NVIDIA H100 SXM5 80GB" in profiles
    for profile in {p["profile"] for p in proj}:
        mine = [p for p in proj if p["profile"] == profile]
        assert [(p["model"], p["batch_setting"], p["scheduler"]) for p in mine] == keys
        assert all(p["label"] == "model, not measured" and p["tokens_per_s"] > 0 for p in mine)
        assert all(p["speedup"] == 1.0 for p in mine if p["model"] == "vanilla")
    assert sum(p["device_measured"] for p in proj) == len(keys)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_infer_script_on_cuda_in_bf16():
    proc = subprocess.run(
        [sys.executable, str(INFER_SCRIPT), "--preset", "micro", "--samples", "16",
         "--gen-mean", "32", "--models", "vanilla,mor-4", "--json"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["dtype"] == "torch.bfloat16" and out["device"].startswith("cuda")
    assert all(r["tokens_per_s"] > 0 for r in out["rows"])


def test_infer_script_model_only_projects_without_measuring():
    proc = subprocess.run(
        [sys.executable, str(INFER_SCRIPT), "--model-only", "--preset", "micro", "--samples",
         "40", "--gen-mean", "12", "--gen-std", "2", "--models", "vanilla,mor-4",
         "--project-on", "h100-sxm,a100-80gb", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["rows"] == []  # nothing measured
    proj = out["projection"]
    assert {p["profile"] for p in proj} == {"NVIDIA H100 SXM5 80GB", "NVIDIA A100 80GB SXM"}
    assert len(proj) == 2 * 2 * 3  # profiles x batch settings x (vanilla + MoR-4 x 2)
    for p in proj:
        assert p["label"] == "model, not measured" and p["tokens_per_s"] > 0
        if p["model"] == "mor-4":
            assert p["mean_depth"] == pytest.approx(2.5, abs=0.3)  # capacities 1, .75, .5, .25
            assert p["paper_speedup"] == (2.06 if p["batch_setting"] == "max" else None)

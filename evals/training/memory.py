"""A training run's peak memory, estimated before any compute (the dry run shows it; the
planner refuses a run that cannot fit the machine, naming what to change).

The estimate is deliberately simple and errs high (the README's "Running suites" section):

* weights, gradients and AdamW's two moments in fp32: 16 bytes per unique parameter;
* activations kept for the backward pass, per micro-batch token and per APPLIED layer (a
  shared layer counts once per recursion; MoR counted as if every token took every step,
  an upper bound): the inputs of the two norms, q/k/v/attention output/o-projection and
  the residual (~8 d_model values) and the MLP's gate, up, activation and product
  (~4 d_ff values), fp32; attention scores are not stored (SDPA's fused kernels);
* the head: logits, their log-softmax and its gradient, 3 x vocab fp32 values per token;
* the process itself (Python, torch, the data): `PROCESS_BYTES`.

Against the records' `peak_mem_bytes` (process peak RSS on CPU; `mor-bench run uptrain-cpu`,
2-vCPU AMD EPYC VM, torch 2.13.0+cpu): the 8-layer `small` vanilla model at batch 16 x 256
tokens peaked at 1.23 GiB, estimated 1.42 GiB; its recursive N_r = 2 version 1.21 GiB,
estimated 1.39 GiB."""

from __future__ import annotations

import os

from mor import flops
from mor.config import ModelConfig

PROCESS_BYTES = 350 * 2**20
"""Python, torch's runtime and the run's data and buffers, independent of the model."""

FP32 = 4


def train_memory(cfg: ModelConfig, seq_len: int, batch_size: int) -> dict[str, int]:
    """Estimated peak bytes of one training process with micro-batch `batch_size` x
    `seq_len`: {"states", "activations", "head", "process", "total"}."""
    tokens = batch_size * seq_len
    states = 16 * flops.param_counts(cfg)["unique"]
    per_layer = (8 * cfg.d_model + 4 * cfg.d_ff) * FP32
    activations = tokens * cfg.unrolled_depth * per_layer
    head = tokens * 3 * cfg.vocab_size * FP32
    total = states + activations + head + PROCESS_BYTES
    return {"states": states, "activations": activations, "head": head,
            "process": PROCESS_BYTES, "total": total}


def machine_memory(device: str = "auto") -> tuple[int | None, str]:
    """(bytes, what) a training process can at most use: the GPU's memory when training
    runs on CUDA, else the machine's physical memory; (None, what) when unknown."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
        return None, "GPU memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory"
    except (ValueError, OSError, AttributeError):
        return None, "memory"

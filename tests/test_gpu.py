"""CUDA-only checks (skipped without a GPU): bf16 autocast training and peak-memory
accounting through `max_memory_allocated`."""

from __future__ import annotations

import pytest
import torch

from evals.budget import Budget, plan_training
from evals.train import TrainConfig, train
from mor import ModelConfig, build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family,nr", [("vanilla", 1), ("mor", 3)])
def test_bf16_training_on_cuda(family, nr):
    cfg = ModelConfig.from_preset("micro", family=family, num_recursions=nr)
    torch.manual_seed(0)
    model = build_model(cfg)
    plan = plan_training(cfg, Budget(tokens=4 * 32 * 6), seq_len=32, batch_size=4)
    data = torch.randint(0, cfg.vocab_size, (4, 33))
    batches = iter(lambda: (data[:, :-1], data[:, 1:]), None)
    res = train(model, batches, plan, TrainConfig(batch_size=4, device="cuda", log_every=1),
                warmup_steps=1, device=torch.device("cuda"))
    assert res.peak_mem_kind == "cuda_max_allocated" and res.peak_mem_bytes > 0
    losses = [p["loss"] for p in res.loss_curve]
    assert losses[-1] < losses[0]  # memorising one batch must reduce its loss

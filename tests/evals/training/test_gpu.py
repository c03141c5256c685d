"""CUDA-only checks (skipped without a GPU): bf16 autocast training and peak-memory
accounting through `max_memory_allocated`."""

from __future__ import annotations

import pytest
import torch

from evals.training.budget import Budget, plan_training
from evals.training.loop import TrainConfig, train
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


@pytest.mark.parametrize("variant", [dict(family="vanilla"),
                                     dict(family="mor", num_recursions=3),
                                     dict(family="mor", num_recursions=3, kv="share")])
def test_decoding_on_cuda_matches_the_full_forward(variant):
    from mor.decode import Engine, Request

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("micro", **variant)).cuda().eval()
    engine = Engine(model, max_batch=4, max_len=40, kv_capacity="full", keep_logits=True)
    for sched in (["sequence", "depth"] if variant["family"] == "mor" else ["sequence"]):
        outs = engine.generate([Request([3, 1, 4][: i + 1], 20, id=i) for i in range(3)], sched)
        for o in outs:
            with torch.no_grad():
                full = model(torch.tensor([o.prompt + o.tokens], device="cuda"),
                             routing="causal")
            ref = full.logits[0, len(o.prompt) - 1: -1]
            torch.testing.assert_close(torch.stack(o.logits), ref, atol=1e-3, rtol=1e-3)

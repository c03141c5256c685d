"""pytest-benchmark microbenchmarks: one decode step of each family (micro-seconds matter
here: decoding small models is dominated by per-call overhead on CPU).

    pytest benchmarks/test_decode_step.py --benchmark-enable      # timed
    pytest benchmarks/test_decode_step.py                         # run once, as a smoke test

Every step decodes one token for each of `BATCH` slots whose caches hold `CONTEXT` tokens,
with the `tiny` preset (8 layers, d=128), fp32 on CPU. Compare the families in ONE run:
absolute times move with the machine's load.
"""

from __future__ import annotations

import pytest
import torch

from mor import ModelConfig, build_model
from mor.decode import Engine, Request

BATCH, CONTEXT = 16, 64
FAMILIES = {
    "vanilla": dict(family="vanilla"),
    "recursive-3": dict(family="recursive", num_recursions=3),
    "mor-3-expert": dict(family="mor", num_recursions=3),
    "mor-3-share": dict(family="mor", num_recursions=3, kv="share"),
    "mor-3-token": dict(family="mor", num_recursions=3, router="token"),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_decode_step(benchmark, name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", **FAMILIES[name])).eval()
    engine = Engine(model, max_batch=BATCH, max_len=CONTEXT + 64, kv_capacity="full")
    for slot in range(BATCH):  # fill every slot's cache with a CONTEXT-token prompt
        engine.prefill(slot, [(7 * slot + i) % 250 + 1 for i in range(CONTEXT)])
    slots = torch.arange(BATCH)
    tokens = torch.full((BATCH,), 5)
    start = engine.cache.lengths.clone()

    def step():
        engine.cache.lengths.copy_(start)  # every round decodes position CONTEXT again
        return engine.step(slots, tokens, torch.full((BATCH,), CONTEXT), all_slots=True)

    logits, depths = benchmark(step)
    assert logits.shape == (BATCH, model.cfg.vocab_size)
    assert bool(torch.isfinite(logits).all())
    if model.cfg.family == "mor":
        assert depths is not None and int(depths.min()) >= 1
    # The step left exactly one more token per slot in every entry it writes.
    assert int((engine.cache.lengths - start).max()) == 1
    # Generation through the same engine still works after the benchmark.
    assert len(engine.generate([Request([1], 3)])[0].tokens) == 3

"""CUDA-only checks of the decode engine (skipped without a GPU): the sequence-wise step of
vanilla and recursive models replayed from CUDA graphs (`Engine(cuda_graphs=True)`) decodes
what the eager step decodes -- tokens and logits -- with continuous batching (idle slots are
padding rows of the captured step), across width buckets, and never recaptures a bucket.
tests/mor/test_decode.py runs the same static step eagerly on CPU."""

from __future__ import annotations

import random

import pytest
import torch

from mor import ModelConfig, build_model
from mor.decode import Engine, Request

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

VARIANTS = {"vanilla": dict(family="vanilla"),
            "recursive-3": dict(family="recursive", num_recursions=3)}


def _model(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset("micro", **VARIANTS[variant])).cuda().eval()


def _requests(n: int, seed: int = 0, max_prompt: int = 12, max_new: int = 80) -> list[Request]:
    rng = random.Random(seed)
    return [Request(prompt=[rng.randrange(1, 250) for _ in range(rng.randint(1, max_prompt))],
                    max_new_tokens=rng.randint(10, max_new), id=i) for i in range(n)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_graph_decode_equals_eager_decode(variant: str) -> None:
    """Same tokens, logits within fp32 kernel differences, same slots; max_len 100 gives
    buckets 64 and 100, and 7 requests on 3 slots leave slots idle at the end."""
    model = _model(variant)
    requests = _requests(7)
    outs = {}
    for graphs in (False, True):
        engine = Engine(model, max_batch=3, max_len=100, keep_logits=True, cuda_graphs=graphs)
        outs[graphs] = (engine, engine.generate(requests))
    (eager, a), (graphed, b) = outs[False], outs[True]
    assert sorted(graphed._static.graphs) == [64, 100]
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.slots == y.slots
        torch.testing.assert_close(torch.stack(y.logits), torch.stack(x.logits),
                                   atol=1e-4, rtol=1e-4)
    assert torch.equal(graphed.cache.lengths, eager.cache.lengths)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_graph_decode_equals_the_full_forward(variant: str) -> None:
    """Replayed graphs reproduce the full forward's next-token logits (what the eager
    engine is tested against on CPU), and a second generate reuses the captured graphs."""
    model = _model(variant, seed=1)
    engine = Engine(model, max_batch=4, max_len=48, keep_logits=True, cuda_graphs=True)
    requests = _requests(6, seed=2, max_prompt=6, max_new=30)
    captured: list[dict] = []
    for _ in range(2):
        outs = engine.generate(requests)
        captured.append({k: id(v) for k, v in engine._static.graphs.items()})
        for o in outs:
            with torch.no_grad():
                full = model(torch.tensor([o.prompt + o.tokens], device="cuda"))
            ref = full.logits[0, len(o.prompt) - 1: -1]
            torch.testing.assert_close(torch.stack(o.logits), ref, atol=1e-3, rtol=1e-3)
    assert captured[0] and captured[1] == captured[0]


def test_graph_step_on_a_subset_of_slots_leaves_the_others_alone() -> None:
    """A direct `step` on some slots: the other slots' cache lengths (and stored keys) stay
    as they were, the stepped slots' lengths advance by one."""
    model = _model("vanilla", seed=3)
    engine = Engine(model, max_batch=4, max_len=40, cuda_graphs=True)
    for s in range(4):
        engine.prefill(s, [1 + s, 2, 3, 4, 5][: 2 + s])
    before_len = engine.cache.lengths.clone()
    before_k = [k.clone() for k in engine.cache.k]
    slots = torch.tensor([1, 3], device="cuda")
    pos = before_len[0, slots]
    logits, _ = engine.step(slots, torch.tensor([7, 8], device="cuda"), pos)
    assert logits.shape == (2, model.cfg.vocab_size)
    after = engine.cache.lengths
    assert torch.equal(after[:, [0, 2]], before_len[:, [0, 2]])
    assert torch.equal(after[:, [1, 3]], before_len[:, [1, 3]] + 1)
    for e, k in enumerate(engine.cache.k):
        for s in (0, 2):
            n = int(before_len[e, s])
            assert torch.equal(k[s, :, :n], before_k[e][s, :, :n])

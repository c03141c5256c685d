"""`torch.compile` of the training forward: the graph breaks of every family are the ones
docs/gpu.md §3 names (a new break fails here until it is removed or documented), capacity
warm-up recompiles a bounded number of times, and a compiled micro MoR trains like the eager
one (docs/gpu.md)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from evals.training.device import compile_model
from evals.training.loop import TrainConfig, TrainStep, make_optimizer
from mor import ModelConfig, build_model

DOC = Path(__file__).resolve().parents[3] / "docs" / "gpu.md"
CPU = torch.device("cpu")

# name -> (ModelConfig overrides of the micro preset, training forward?, step passed)
VARIANTS: dict[str, tuple[dict, bool, int | None]] = {
    "vanilla": (dict(family="vanilla"), True, 4),
    "recursive": (dict(family="recursive", num_recursions=3, sharing="middle_cycle"), True, 4),
    "mor-expert": (dict(family="mor", num_recursions=3), True, 4),
    "mor-expert-warmup": (dict(family="mor", num_recursions=3, capacity_warmup_steps=10),
                          True, 4),
    "mor-expert-auxrouter": (dict(family="mor", num_recursions=3, expert_aux="router"),
                             True, 4),
    "mor-kv-share": (dict(family="mor", num_recursions=3, kv="share"), True, 4),
    "mor-token": (dict(family="mor", num_recursions=3, router="token"), True, 4),
    "mor-expert-eval-topk": (dict(family="mor", num_recursions=3), False, None),
    "mor-expert-eval-causal": (dict(family="mor", num_recursions=3, eval_routing="causal"),
                               False, None),
}


def documented_breaks() -> dict[str, tuple[int, set[str]]]:
    """The graph-break table of docs/gpu.md: variant -> (count, functions named)."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `([\w-]+)` \| (training|evaluation) \| (\d+) \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = (int(m.group(3)), set(re.findall(r"`(\w+)`", m.group(4))))
    return rows


def _micro(overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("micro", **overrides)
    return cfg, build_model(cfg)


def test_the_doc_table_covers_exactly_the_measured_variants():
    assert set(documented_breaks()) == set(VARIANTS)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_graph_breaks_are_the_documented_ones(name, one_thread):
    overrides, training, step = VARIANTS[name]
    cfg, model = _micro(overrides)
    model.train(training)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    y = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    dynamo.reset()
    try:
        explained = dynamo.explain(model)(x, y, step=step)  # the call TrainStep makes
    finally:
        dynamo.reset()
    count, where = documented_breaks()[name]
    found = [(fs.filename.rsplit("/", 2)[-2:], fs.lineno, fs.name, br.reason.splitlines()[0])
             for br in explained.break_reasons for fs in br.user_stack[-1:]]
    assert explained.graph_break_count == count, (
        f"{name}: {explained.graph_break_count} graph breaks, docs/gpu.md says {count}; "
        f"remove the new ones or document them. Innermost frames: {found}")
    assert {f[2] for f in found} <= where, f"{name}: breaks outside {where}: {found}"


def test_capacity_warmup_recompiles_a_bounded_number_of_times(one_thread):
    """The step drives the capacities: Dynamo specialises on step 0, then traces the step
    symbolically; after one more recompile no step of the warm-up or after it compiles
    again (docs/gpu.md §3). The compiled forward routes and scores as eager at every step."""
    _, model = _micro(dict(family="mor", num_recursions=3, capacity_warmup_steps=6))
    eager = copy.deepcopy(model)
    dynamo.reset()
    counters.clear()
    model.compile(backend="eager")  # Dynamo's capture only: no code generation
    g = torch.Generator().manual_seed(2)
    graphs = []
    try:
        for step in range(10):  # through the warm-up and past its end
            x = torch.randint(0, 257, (2, 32), generator=g)
            out = model(x, x, step=step)
            out.loss.backward()
            ref = eager(x, x, step=step)
            # Same routing, same loss (to fp32 round-off: a layer may take a different but
            # equivalent formula while compiling).
            torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
            assert out.stats["selected_frac/r3"] == ref.stats["selected_frac/r3"]
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        dynamo.reset()
    assert graphs[2] <= 3 and graphs[-1] == graphs[2], graphs
    # The warm-up really changed the routing: step 0 keeps everyone, the end c_3 = 1/3.
    assert eager(x, x, step=0).stats["selected_frac/r3"] == 1.0
    assert float(eager(x, x, step=9).stats["selected_frac/r3"]) == pytest.approx(10 / 32)


@pytest.mark.slow
def test_compiled_training_matches_eager():
    """Two `TrainStep` steps of a micro MoR model (expert-choice, N_r = 2) compiled with
    inductor (C++ kernels on CPU) against eager: the losses agree within 1e-4."""
    cfg, model = _micro(dict(family="mor", num_recursions=2))
    compiled = compile_model(copy.deepcopy(model), CPU)
    tcfg = TrainConfig(batch_size=2, device="cpu")
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, cfg.vocab_size, (2, 33), generator=g) for _ in range(2)]
    losses = {}
    dynamo.reset()
    try:
        for name, m in (("eager", model), ("compiled", compiled)):
            step = TrainStep(m, make_optimizer(m, tcfg, CPU), tcfg, total_steps=2,
                             warmup_steps=1, device=CPU)
            losses[name] = [float(step(s, [(w[:, :-1], w[:, 1:])]).loss)
                            for s, w in enumerate(data)]
    finally:
        dynamo.reset()
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
    # The second loss comes after an optimizer step: the compiled backward moved the
    # weights as the eager one did.
    assert losses["eager"][0] != losses["eager"][1]

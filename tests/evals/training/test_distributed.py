"""Data-parallel training on 2 CPU processes (gloo) equals one process with the same
global batch: losses, weights, shared-block gradients; FSDP2 checkpoints load into one
process (docs/distributed.md)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from evals.data.corpus import Batches
from evals.training.budget import Budget, plan_training
from evals.training.loop import TrainConfig, train
from mor import ModelConfig, build_model

SEQ = 16
PER_RANK = 2
WORLD = 2
ACCUM = 2
STEPS = 4

CONFIGS = {
    "vanilla": dict(family="vanilla"),
    "recursive": dict(family="recursive", num_recursions=2),
    "mor-expert-aux": dict(family="mor", num_recursions=2, router="expert",
                           expert_aux="loss"),
    "mor-token-lossfree": dict(family="mor", num_recursions=3, router="token",
                               balancing="loss_free", bias_update_rate=0.05),
}


def _cfg(name: str) -> ModelConfig:
    return ModelConfig.from_preset("micro", max_seq_len=SEQ, **CONFIGS[name])


def _windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 257, (64, SEQ + 1), generator=g)


def _run(name: str, batch_size: int, world_size: int, rank: int, parallel: str = "ddp",
         checkpoint_dir: Path | None = None, info=None):
    from evals.training.distributed import SINGLE

    torch.manual_seed(0)
    model = build_model(_cfg(name))
    tcfg = TrainConfig(batch_size=batch_size, grad_accum=ACCUM, lr=3e-3, log_every=1,
                       warmup_frac=0.0, parallel=parallel, checkpoint_every=STEPS - 1)
    plan = plan_training(model.cfg, Budget(tokens=STEPS * PER_RANK * WORLD * ACCUM * SEQ),
                         SEQ, batch_size, ACCUM, world_size)
    assert plan.steps == STEPS
    batches = Batches(_windows(), batch_size, seed=1, rank=rank, world_size=world_size)
    losses: list[float] = []
    res = train(model, batches, plan, tcfg, warmup_steps=1, device=torch.device("cpu"),
                on_step=lambda s, loss, lr: _record(model, losses, loss),
                info=info or SINGLE, checkpoint_dir=checkpoint_dir)
    return model, losses, res


def _record(model, losses: list, loss: float) -> None:
    losses.append(loss)
    if hasattr(model, "router_bias"):  # loss-free balancing: the bias after each step
        model.bias_history = [*getattr(model, "bias_history", []), model.router_bias.clone()]


# Statistics of a micro-batch that are not means over its tokens (a max, an entropy, a
# fraction of positions no row selects): averaged over ranks they differ from the same
# statistic of the global batch, by definition (docs/distributed.md).
BATCH_LEVEL_STATS = {"dead_token_ratio", "maxvio", "load_entropy"}


def _shared_grads(name: str, module, x, y) -> dict[str, torch.Tensor]:
    """Gradients of the layers the schedule visits more than once, after one backward."""
    from evals.training.distributed import shared_layer_indices, unwrap

    model = unwrap(module)
    out = module(x, y, step=0)
    out.loss.backward()
    shared = shared_layer_indices(model)
    assert shared or name == "vanilla"
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if any(n.startswith(f"layers.{i}.") for i in shared)}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from evals.training.distributed import full_state_dict, init_from_env, shutdown, wrap_model

    info = init_from_env("cpu")
    results = {}
    try:
        for name in CONFIGS:
            model, losses, res = _run(name, PER_RANK, WORLD, rank, info=info)
            results[name] = {"losses": losses, "routing": res.routing,
                             "weights": full_state_dict(model),
                             "bias_history": getattr(model, "bias_history", None)}
        # Shared-block gradients of one backward, DDP over the rank's half of a batch.
        w = _windows()[: PER_RANK * WORLD]
        mine = w[rank * PER_RANK:(rank + 1) * PER_RANK]
        for name in ("recursive", "mor-expert-aux"):
            torch.manual_seed(0)
            module = wrap_model(build_model(_cfg(name)), "ddp", info, torch.device("cpu"))
            results[f"grads:{name}"] = _shared_grads(name, module, mine[:, :-1], mine[:, 1:])
        # FSDP2: train, checkpoint (DCP, sharded), and the gathered weights for comparison.
        ckpt = Path(out).with_suffix(".fsdp")
        model, losses, _ = _run("mor-expert-aux", PER_RANK, WORLD, rank, parallel="fsdp",
                                checkpoint_dir=ckpt, info=info)
        results["fsdp"] = {"losses": losses, "weights": full_state_dict(model)}
        if rank == 0:
            torch.save(results, out)
    finally:
        shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD,
                       start_method="spawn")
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_equals_one_process_with_the_global_batch(two_process, name, one_thread):
    _, losses, res = _run(name, PER_RANK * WORLD, 1, 0)
    got = two_process[name]
    assert len(got["losses"]) == len(losses) == STEPS
    for a, b in zip(got["losses"], losses):
        assert abs(a - b) <= 1e-6, (name, got["losses"], losses)
    model_weights = got["weights"]
    torch.manual_seed(0)
    ref_model, _, _ = _run(name, PER_RANK * WORLD, 1, 0)
    # Weights: AdamW divides by sqrt(v), so the last-bit differences of a differently
    # ordered gradient sum move elements with near-zero gradients by up to ~1e-5 over
    # these steps; the losses above and the gradients below are the tight checks.
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(model_weights[k], v, atol=1e-4, rtol=0, msg=k)
    assert set(got["routing"]) == set(res.routing)
    for k, v in res.routing.items():  # per-token statistics: averaged over ranks = global
        if k not in BATCH_LEVEL_STATS:
            assert got["routing"][k] == pytest.approx(v, abs=1e-6), k


@pytest.mark.parametrize("name", ["recursive", "mor-expert-aux"])
def test_shared_block_gradients_equal_one_process(two_process, name, one_thread):
    torch.manual_seed(0)
    model = build_model(_cfg(name))
    w = _windows()[: PER_RANK * WORLD]
    ref = _shared_grads(name, model, w[:, :-1], w[:, 1:])
    got = two_process[f"grads:{name}"]
    assert ref and set(got) == set(ref)
    for k in ref:  # reduced once per step: a double reduction would double them
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)


def test_token_choice_bias_moved_identically(two_process):
    """Loss-free balancing moves its bias on loads all-reduced over ranks, so the bias
    after training equals the single-process one (and is not zero)."""
    got = two_process["mor-token-lossfree"]["bias_history"]
    ref_model, _, _ = _run("mor-token-lossfree", PER_RANK * WORLD, 1, 0)
    ref = ref_model.bias_history
    assert len(got) == len(ref) == STEPS
    assert any(b.abs().sum() > 0 for b in ref)  # the bias did move
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fsdp_checkpoint_loads_into_one_process(two_process, tmp_path_factory):
    """FSDP2 on 2 processes wrote a sharded DCP checkpoint at step STEPS-1; one process
    loads it, and one more step there equals the 2-process run's last step."""
    from evals.training import checkpointing as ckpt
    from evals.training.distributed import SINGLE
    from evals.training.loop import make_optimizer

    fsdp = two_process["fsdp"]
    ref_losses = two_process["mor-expert-aux"]["losses"]
    for a, b in zip(fsdp["losses"], ref_losses):  # FSDP2 trains like DDP
        assert abs(a - b) <= 1e-6
    root = next(tmp_path_factory.getbasetemp().glob("ddp*/results.fsdp"))
    dirs = ckpt.list_checkpoints(root)
    assert [d.name for d in dirs] == [f"step-{STEPS - 1:08d}"]
    model = build_model(_cfg("mor-expert-aux"))
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    state = ckpt.load_latest(root, module=model, optimizer=opt, info=SINGLE,
                             warn=pytest.fail)
    assert state["step"] == STEPS - 1 and state["plan"]["world_size"] == WORLD
    # Resume the last step in ONE process over the 2-process run's shards, concatenated.
    tcfg = TrainConfig(batch_size=PER_RANK * WORLD, grad_accum=ACCUM, lr=3e-3,
                       log_every=1, warmup_frac=0.0)
    plan = plan_training(model.cfg, Budget(tokens=STEPS * PER_RANK * WORLD * ACCUM * SEQ),
                         SEQ, PER_RANK, ACCUM, WORLD)  # the saved plan: 2 processes
    losses: list[float] = []
    single = Batches(_windows(), PER_RANK * WORLD, seed=1)
    torch.manual_seed(0)
    fresh = build_model(_cfg("mor-expert-aux"))
    train(fresh, single, plan, tcfg, warmup_steps=1, device=torch.device("cpu"),
          on_step=lambda s, loss, lr: losses.append(loss), checkpoint_dir=root)
    assert len(losses) == 1
    assert abs(losses[0] - fsdp["losses"][-1]) <= 1e-6
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, fsdp["weights"][k], atol=1e-6, rtol=0, msg=k)

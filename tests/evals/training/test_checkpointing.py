"""Resumable checkpoints in one process: a stopped-and-resumed training equals an
uninterrupted one bitwise; damaged checkpoints are detected and the previous one is used;
a NaN loss stops with diagnostics; an unwritable directory names the path."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from evals.data.corpus import Batches
from evals.training import checkpointing as ckpt
from evals.training.budget import Budget, plan_training
from evals.training.loop import (
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    make_optimizer,
    train,
)
from mor import ModelConfig, build_model

SEQ = 16
STEPS = 7

FAMILIES = {
    "vanilla": dict(family="vanilla"),
    # Capacity warm-up on: the step drives the capacities, so a resume must restore it.
    "mor-expert-warmup": dict(family="mor", num_recursions=3, capacity_warmup_steps=5),
    "mor-token-lossfree": dict(family="mor", num_recursions=3, router="token",
                               balancing="loss_free", bias_update_rate=0.02),
}


def _setup(name: str, **train_fields):
    cfg = ModelConfig.from_preset("micro", max_seq_len=SEQ, **FAMILIES[name])
    torch.manual_seed(0)
    model = build_model(cfg)
    tcfg = TrainConfig(batch_size=4, grad_accum=2, log_every=2, warmup_frac=0.0,
                       **train_fields)
    plan = plan_training(cfg, Budget(tokens=STEPS * 8 * SEQ), SEQ, 4, 2)
    windows = torch.randint(0, 257, (40, SEQ + 1), generator=torch.Generator().manual_seed(3))
    return model, tcfg, plan, Batches(windows, 4, seed=2)


def _train(model, tcfg, plan, batches, **kw):
    return train(model, batches, plan, tcfg, warmup_steps=2, device=torch.device("cpu"), **kw)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stop_and_resume_equals_uninterrupted_bitwise(name, tmp_path, one_thread):
    model, tcfg, plan, batches = _setup(name, checkpoint_every=3)
    ref = _train(model, tcfg, plan, batches)
    ref_weights = {k: v.clone() for k, v in model.state_dict().items()}

    # Stop after step 5 (a checkpoint at 3 exists; the stop saves step 5), in a process
    # whose random generators then move on, then resume in a fresh model.
    model, tcfg, plan, batches = _setup(name, checkpoint_every=3)
    calls = iter(range(100))
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(model, tcfg, plan, batches, checkpoint_dir=tmp_path,
               should_stop=lambda: next(calls) == 4)
    assert stopped.value.step == 5
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000005",
                                                                   "step-00000003"]
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    fresh, tcfg, plan, batches = _setup(name, checkpoint_every=3)
    got = _train(fresh, tcfg, plan, batches, checkpoint_dir=tmp_path)
    assert got.final_train_loss == ref.final_train_loss
    assert [(p["step"], p["loss"], p["grad_norm"]) for p in got.loss_curve] == [
        (p["step"], p["loss"], p["grad_norm"]) for p in ref.loss_curve]
    assert got.routing == ref.routing
    assert got.tokens == ref.tokens and got.steps == ref.steps
    assert got.resumed == [{"from_step": 5, "checkpoint": "step-00000005"}]
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref_weights[k]), k


def test_rng_state_round_trips():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    ckpt.set_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def _two_checkpoints(tmp_path):
    model, tcfg, plan, batches = _setup("vanilla", checkpoint_every=2, keep_checkpoints=2)
    calls = iter(range(100))
    with pytest.raises(TrainingInterrupted):
        _train(model, tcfg, plan, batches, checkpoint_dir=tmp_path,
               should_stop=lambda: next(calls) == 4)  # saves at 2, 4 and the stop at 5
    dirs = ckpt.list_checkpoints(tmp_path)
    assert [d.name for d in dirs] == ["step-00000005", "step-00000004"]  # keep = 2
    return dirs


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no-manifest"])
def test_damaged_checkpoint_falls_back_to_the_previous(damage, tmp_path, one_thread):
    newest, previous = _two_checkpoints(tmp_path)
    victim = sorted(newest.glob("*.distcp"))[0]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "delete":
        victim.unlink()
    else:
        victim = newest / ckpt.MANIFEST
        victim.unlink()
    model, tcfg, plan, _ = _setup("vanilla")
    warnings: list[str] = []
    state = ckpt.load_latest(tmp_path, module=model, info=_single(),
                             optimizer=make_optimizer(model, tcfg, torch.device("cpu")),
                             warn=warnings.append)
    assert state["step"] == 4
    assert len(warnings) == 1 and str(victim) in warnings[0] and newest.name in warnings[0]


def test_interrupted_save_is_never_loaded(tmp_path, one_thread):
    newest, previous = _two_checkpoints(tmp_path)
    newest.rename(newest.with_name(newest.name + ".tmp"))  # as if killed before the rename
    assert ckpt.list_checkpoints(tmp_path) == [previous]


def _single():
    from evals.training.distributed import SINGLE

    return SINGLE


def test_nan_loss_stops_with_diagnostics(one_thread):
    """A huge learning rate: the loss becomes NaN; the error carries the last finite step,
    the LR and the gradient-norm history."""
    model, tcfg, plan, batches = _setup("mor-expert-warmup", lr=1e4, weight_decay=0.0,
                                        grad_clip=1e9)
    with pytest.raises(TrainingDiverged, match="lower the learning rate") as err:
        _train(model, tcfg, plan, batches)
    d = err.value.diagnostics
    assert d["last_finite_step"] == d["step"] - 1 >= 1
    assert d["lr"] > 0 and d["peak_lr"] == 1e4
    assert [g["step"] for g in d["grad_norms"]] == list(range(1, d["step"] + 1))
    assert d["routing"]  # the diverged step's routing statistics


def test_unwritable_checkpoint_dir_names_the_path(tmp_path, one_thread):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model, tcfg, plan, batches = _setup("vanilla", checkpoint_every=1)
    with pytest.raises(ckpt.CheckpointError, match=str(blocker)):
        _train(model, tcfg, plan, batches, checkpoint_dir=blocker / "checkpoints")


def test_out_of_memory_names_the_batch_and_suggests_grad_accum(monkeypatch, one_thread):
    """An allocator failure in a step (raised here: a CPU cannot be made to run out of GPU
    memory on demand) becomes one message with the batch size and the fix."""
    from evals.training import loop

    def oom(self, step, micro):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop.TrainStep, "__call__", oom)
    model, tcfg, plan, batches = _setup("vanilla")
    with pytest.raises(loop.TrainingOutOfMemory,
                       match=r"batch_size=4 .*batch_size = 2, grad_accum = 4"):
        _train(model, tcfg, plan, batches)

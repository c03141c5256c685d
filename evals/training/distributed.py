"""Data-parallel training on PyTorch's own engine: torchrun + DDP or FSDP2.

`mor-bench run SUITE` started by `torchrun --nproc-per-node N` finds the process group's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) and every process trains each run
of the suite on its own shard of every global batch (`evals.data.corpus.iterate_batches`).
Backend: NCCL on CUDA, gloo on CPU (how the tests run it on 2 CPU processes).

Wrapping (`wrap_model`):
- "ddp": `DistributedDataParallel`. A parameter that several recursions use is ONE leaf
  of the autograd graph, so its gradient is the sum over its uses before DDP's hook reduces
  it -- once per step, however many recursions used it.
- "fsdp": FSDP2 `fully_shard`. Every layer the schedule visits ONCE (vanilla layers, MoR's
  unique first/last layers) is its own unit; layers visited several times (the shared
  recursion block) stay in the root unit with the embedding, norm and routers, so a
  shared block is gathered once per forward and its gradient reduce-scattered once per
  step (docs/distributed.md).

Only rank 0 writes records, checkpoints' metadata and reports; every rank computes.
"""

from __future__ import annotations

import datetime
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mor.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group of more than one process is up."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


SINGLE = DistInfo()


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={raw!r} is not an integer; "
                          "launch with torchrun or unset it") from None


DEFAULT_TIMEOUT_S = 7200.0
"""How long a collective waits before failing (env MOR_BENCH_DIST_TIMEOUT_S): other ranks
wait in one while rank 0 prepares the suite's data and evaluates each run."""


def init_from_env(device_kind: str = "cpu", timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun describes (idempotent); one process: `SINGLE`."""
    if timeout_s is None:
        raw = os.environ.get("MOR_BENCH_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ConfigError(f"environment variable MOR_BENCH_DIST_TIMEOUT_S={raw!r} is not "
                              "a number of seconds") from None
    world = env_world_size()
    if world <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """CUDA: each process its own GPU (cuda:LOCAL_RANK)."""
    if device.type == "cuda" and info.world_size > 1:
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean_(info: DistInfo, t: Tensor) -> Tensor:
    """In place: the mean over ranks (equal-size shards make it the global mean)."""
    if info.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_reduce_max(info: DistInfo, value: float, device: torch.device) -> float:
    if not info.active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(info: DistInfo, flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (e.g. a stop request one rank saw)."""
    if not info.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shared_layer_indices(model: nn.Module) -> set[int]:
    """Indices into `model.layers` that the schedule visits more than once."""
    visits = Counter(model.cfg.schedule())
    return {i for i, n in visits.items() if n > 1}


def wrap_model(model: nn.Module, parallel: str, info: DistInfo,
               device: torch.device) -> nn.Module:
    """The module the training step calls: the model itself in one process, else DDP or
    FSDP2 around it (the model is moved to `device` first). `unwrap` gives the model."""
    model.to(device)
    if not info.active:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        shared = shared_layer_indices(model)
        for i, layer in enumerate(model.layers):
            if i not in shared:
                fully_shard(layer)
        fully_shard(model)
        return model
    raise ConfigError(f"train field 'parallel': must be \"ddp\" or \"fsdp\", got {parallel!r}")


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the module is the model)."""
    return getattr(module, "module", module)


def no_sync(module: nn.Module, enabled: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step (FSDP2:
    `set_requires_gradient_sync`). A null context otherwise."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def fsdp_no_sync():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on CPU on every rank (FSDP2 shards gathered) -- what the
    safetensors checkpoint of a run holds."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = unwrap(module)
    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    return {k: v.contiguous() for k, v in sd.items()}

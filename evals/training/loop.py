"""The training loop and the measurements taken while training.

AdamW (beta 0.9, 0.95), gradient clipping at 1.0, warmup-stable-decay LR, fp32 on CPU and
bf16 autocast on CUDA. Weight decay rule: decay every weight MATRIX of a linear layer
(attention, MLP, routers); never decay the embedding (also the tied head), RMSNorm weights
or biases -- decaying the shared embedding shrinks both ends of the model, and norms are
scales, not features.

Measured: wall time of optimizer steps only (validation is excluded), tokens/s, peak
memory (CUDA: `max_memory_allocated`; CPU: the process's max RSS, which is this run's own
peak because the runner starts one process per run), the loss curve and the routing
statistics averaged over every micro-batch of every step.

One optimizer step is `TrainStep`; the training-speed benchmarks (`evals.perf.train_speed`)
time that same step.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evals.data.corpus import data_position
from evals.training.budget import TrainPlan, wsd_lr
from evals.training.distributed import (
    SINGLE,
    DistInfo,
    all_reduce_max,
    all_reduce_mean_,
    any_rank,
    no_sync,
    wrap_model,
)
from mor.errors import ConfigError
from mor.model import CausalLM


@dataclass(frozen=True)
class TrainConfig:
    """How to train (independent of the model and of the budget)."""

    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process)."""
    global_batch: int | None = None
    """Sequences per optimizer step over ALL processes. When set, grad_accum is derived:
    global_batch / (batch_size x world_size), which must be a whole number -- so the same
    suite keeps the paper's batch on 1, 8 or 64 GPUs (`for_world`)."""
    lr: float = 3e-3
    """Peak learning rate (the paper's 3e-3)."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup_frac: float = 0.05
    """Warmup as a fraction of the steps of the smallest budget in the suite."""
    decay_frac: float = 0.2
    """Linear decay to 0 over this last fraction of the steps."""
    log_every: int = 10
    """Loss-curve resolution in optimizer steps."""
    val_batch_size: int = 32
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu" or "cuda"."""
    threads: int | None = None
    """torch intra-op threads on CPU (None: torch's default)."""
    parallel: str = "ddp"
    """Under torchrun: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 `fully_shard`,
    per unique block; shared blocks are one unit with the root). Ignored in one process."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many optimizer steps (0: only on SIGTERM /
    SIGINT)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept per run (the newest K)."""
    compile: bool = False
    """`torch.compile` the model for training."""
    deterministic: bool = False
    """`torch.use_deterministic_algorithms(True)` (slower on CUDA; recorded)."""
    step_rule: str = "floor"
    """How a budget becomes a step count (`evals.training.budget.STEP_RULES`)."""
    tensorboard: bool = True
    """Stream metrics to TensorBoard event files under the run directory."""
    wandb_project: str | None = None
    """Also log to Weights & Biases under this project (needs `wandb` installed)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every", "val_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"train field '{name}': must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < math.inf):
            raise ConfigError(f"train field 'lr': must be a positive number, got {self.lr!r}")
        for name in ("warmup_frac", "decay_frac"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"train field '{name}': must be in [0, 1), got {v}")
        if not (isinstance(self.weight_decay, int | float) and 0 <= self.weight_decay < math.inf):
            raise ConfigError(f"train field 'weight_decay': must be a number >= 0, got "
                              f"{self.weight_decay!r}")
        if not (isinstance(self.grad_clip, int | float) and 0 < self.grad_clip <= math.inf):
            raise ConfigError(f"train field 'grad_clip': must be a positive number (inf: no "
                              f"clipping), got {self.grad_clip!r}")
        betas = tuple(self.betas) if isinstance(self.betas, list | tuple) else ()
        if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1
                                      for b in betas):
            raise ConfigError(f"train field 'betas': must be two numbers in [0, 1), e.g. "
                              f"[0.9, 0.95], got {self.betas!r}")
        if self.threads is not None and (not isinstance(self.threads, int)
                                         or isinstance(self.threads, bool) or self.threads < 1):
            raise ConfigError(f"train field 'threads': must be a positive integer, got "
                              f"{self.threads!r}")
        if self.global_batch is not None and (
                not isinstance(self.global_batch, int) or isinstance(self.global_batch, bool)
                or self.global_batch < self.batch_size
                or self.global_batch % self.batch_size):
            raise ConfigError(f"train field 'global_batch': must be a multiple of batch_size="
                              f"{self.batch_size}, got {self.global_batch!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"train field 'checkpoint_every': must be an integer >= 0, got "
                              f"{self.checkpoint_every!r}")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            raise ConfigError(f"train field 'keep_checkpoints': must be an integer >= 1, got "
                              f"{self.keep_checkpoints!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train field 'parallel': must be \"ddp\" or \"fsdp\", got "
                              f"{self.parallel!r}")
        from evals.training.budget import STEP_RULES

        if self.step_rule not in STEP_RULES:
            raise ConfigError(f"train field 'step_rule': must be one of "
                              f"{', '.join(STEP_RULES)}, got {self.step_rule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train field 'device': must be auto, cpu or cuda, got "
                              f"{self.device!r}")
        object.__setattr__(self, "betas", tuple(self.betas))


def for_world(tcfg: TrainConfig, world_size: int) -> TrainConfig:
    """The config one of `world_size` data-parallel processes trains with: with
    `global_batch` set, grad_accum = global_batch / (batch_size x world_size)."""
    if tcfg.global_batch is None:
        return tcfg
    per_step = tcfg.batch_size * world_size
    if tcfg.global_batch % per_step:
        raise ConfigError(
            f"train field 'global_batch' = {tcfg.global_batch} is not a multiple of batch_size "
            f"x processes = {tcfg.batch_size} x {world_size}; choose a batch_size or a "
            "number of processes that divides it")
    return dataclasses.replace(tcfg, grad_accum=tcfg.global_batch // per_step)


def param_groups(model: CausalLM, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim >= 2 and name != "embed.weight":
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_time_s: float
    tokens_per_s: float
    peak_mem_bytes: int
    peak_mem_kind: str
    final_train_loss: float
    loss_curve: list[dict] = field(default_factory=list)
    routing: dict[str, float] = field(default_factory=dict)
    resumed: list[dict] = field(default_factory=list)
    """One entry per resume: the step it continued from and the checkpoint used. Timing
    figures exclude the work lost between that checkpoint and the kill."""
    load: dict[str, Any] | None = None
    """The machine load the training ran under (`evals.suite.status.LoadMeter`), set by the
    suite runner around `train`; None when not measured. A resumed run's figure covers the
    last process's part of the training only."""


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured). CPU: the process's resident-set high-water mark from
    /proc/self/status (VmHWM), which a freshly exec'd run process starts anew; ru_maxrss
    is NOT used on Linux because a spawned child inherits its parent's value."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process_peak_rss"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes, own process
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"


def make_optimizer(model: CausalLM, tcfg: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """The loop's AdamW over `param_groups` (fused on CUDA)."""
    return torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.lr,
                             betas=tcfg.betas, fused=device.type == "cuda")


@dataclass
class StepResult:
    """What one optimizer step produced. Tensors stay on the device (no host sync)."""

    step: int
    lr: float
    loss: Tensor
    """Mean LM loss over the step's micro-batches -- and over all ranks (0-dim, detached)."""
    stats_sum: dict[str, Tensor]
    """Routing statistics summed over the micro-batches that reported them (averaged over
    ranks: a rank's sum over its micro-batches, mean over ranks)."""
    stats_count: dict[str, int]
    """How many micro-batches reported each statistic."""
    grad_norm: Tensor | None = None
    """The gradient's global L2 norm before clipping (0-dim)."""

    @property
    def stats(self) -> dict[str, Tensor]:
        """The step's statistics: per-key means over its (equal-size) micro-batches, so a
        load fraction here is the load fraction of the whole step's tokens."""
        return {k: v / self.stats_count[k] for k, v in self.stats_sum.items()}


class TrainStep:
    """One optimizer step exactly as suites train: `grad_accum` micro-batches, each loss
    (LM + router aux) divided by `grad_accum`, the warmup-stable-decay LR of
    docs/protocol.md §5, gradient clipping, AdamW, then ONE `model.after_optimizer_step`
    with the statistics of the whole step (all micro-batches of all ranks; e.g. loss-free
    balancing's bias moves on the step's loads, identically on every rank). `train` uses
    it; `mor-bench bench-train` and `evals.perf.train_speed.interleaved_train_speed` time it.

    Data-parallel (`info` of a process group, `module` the DDP/FSDP2 wrapper of `model`):
    gradients are reduced on the last micro-batch only, and the step's loss and routing
    statistics are averaged over ranks in one all-reduce.

    Calling it runs step `step` (0-based) on `micro`, a list of (x, y) tensors (moved to the
    device inside, so the copy counts as part of the step); `timed` also returns the wall
    time, synchronising CUDA before and after."""

    def __init__(self, model: CausalLM, optimizer: torch.optim.Optimizer, tcfg: TrainConfig,
                 *, total_steps: int, warmup_steps: int, device: torch.device,
                 module: torch.nn.Module | None = None, info: DistInfo = SINGLE) -> None:
        self.model = model
        self.module = module if module is not None else model
        self.optimizer = optimizer
        self.tcfg = tcfg
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.device = device
        self.info = info

    def lr(self, step: int) -> float:
        return wsd_lr(step, peak_lr=self.tcfg.lr, total_steps=self.total_steps,
                      warmup_steps=self.warmup_steps, decay_frac=self.tcfg.decay_frac)

    def __call__(self, step: int, micro: list[tuple[Tensor, Tensor]]) -> StepResult:
        tcfg, module, device = self.tcfg, self.module, self.device
        if len(micro) != tcfg.grad_accum:
            raise ValueError(f"a step takes grad_accum={tcfg.grad_accum} micro-batches, got "
                             f"{len(micro)}")
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        use_autocast = device.type == "cuda"
        loss_sum = torch.zeros((), device=device)
        stats_sum: dict[str, Tensor] = {}
        stats_count: dict[str, int] = {}
        for i, (x, y) in enumerate(micro):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = i == len(micro) - 1
            with no_sync(module, self.info.active and not last):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    out = module(x, y, step=step)  # the step drives MoR capacity warm-up
                # Dividing the whole loss (LM + router aux) by grad_accum keeps the aux
                # weight independent of the accumulation count.
                (out.loss / tcfg.grad_accum).backward()
            loss_sum += out.lm_loss.detach()
            for k, v in out.stats.items():
                v = torch.as_tensor(v).detach().float().to(device)
                stats_sum[k] = stats_sum[k] + v if k in stats_sum else v
                stats_count[k] = stats_count.get(k, 0) + 1
        if self.info.active:  # one all-reduce: the loss and every statistic, mean of ranks
            keys = sorted(stats_sum)
            packed = torch.stack([loss_sum, *(stats_sum[k] for k in keys)])
            all_reduce_mean_(self.info, packed)
            loss_sum = packed[0]
            stats_sum = {k: packed[j + 1] for j, k in enumerate(keys)}
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), tcfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        res = StepResult(step=step, lr=lr, loss=loss_sum / tcfg.grad_accum,
                         stats_sum=stats_sum, stats_count=stats_count,
                         grad_norm=grad_norm.detach())
        self.model.after_optimizer_step(res.stats)  # e.g. loss-free balancing's bias update
        return res

    def timed(self, step: int, micro: list[tuple[Tensor, Tensor]]) -> tuple[StepResult, float]:
        """(the step's result, its wall time in seconds)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        res = self(step, micro)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return res, time.perf_counter() - t0


class TrainingDiverged(FloatingPointError):
    """The loss became NaN/inf. `diagnostics`: the last finite step and loss, the LR, the
    gradient-norm history and the step's routing statistics (the run's failure record
    keeps them)."""

    def __init__(self, message: str, diagnostics: dict[str, Any]) -> None:
        super().__init__(message)
        self.diagnostics = diagnostics


class TrainingInterrupted(RuntimeError):
    """A stop was requested (SIGTERM / SIGINT); the state of `step` was checkpointed."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class TrainingOutOfMemory(RuntimeError):
    """Out of memory in a training step; the message names the batch and the fix."""


GRAD_NORM_HISTORY = 100


def train(model: CausalLM, batches, plan: TrainPlan, tcfg: TrainConfig, *,
          warmup_steps: int, device: torch.device,
          on_step: Callable[[int, float, float], None] | None = None,
          info: DistInfo = SINGLE, checkpoint_dir: Path | None = None,
          should_stop: Callable[[], bool] | None = None,
          make_tracker: Callable[[int], Any] | None = None,
          on_warning: Callable[[str], None] | None = None) -> TrainResult:
    """Run `plan.steps` optimizer steps (`TrainStep`) over `batches`: an iterator of (x, y)
    CPU tensors, or a function `start -> iterator` that starts after `start` global
    micro-batches (needed to resume).

    `on_step(step, loss, lr)` is called after every step (progress display).
    `TrainResult.routing` is the mean of every routing statistic over ALL micro-batches of
    all steps (each micro-batch weighted alike; they are equal-size).

    Under a process group (`info`) the model is wrapped (`[train] parallel`). With a
    `checkpoint_dir` the run resumes from its newest valid checkpoint there, saves one every
    `checkpoint_every` steps, and -- when `should_stop()` turns true on any rank -- saves and
    raises `TrainingInterrupted`. A NaN/inf loss raises `TrainingDiverged`; out of memory
    raises `TrainingOutOfMemory`. `make_tracker(first_step)` (called once the start is known,
    so a resumed run's tracker drops what the killed process logged after its checkpoint)
    gives an `evals.training.tracking.Tracker`; it receives the logged points and is closed
    when training ends."""
    from evals.training import checkpointing as ckpt

    module = wrap_model(model, tcfg.parallel, info, device)
    model.train()
    if tcfg.compile:
        from evals.training.device import compile_model

        module = compile_model(module, device)
    opt = make_optimizer(model, tcfg, device)
    trainer = TrainStep(model, opt, tcfg, total_steps=plan.steps, warmup_steps=warmup_steps,
                        device=device, module=module, info=info)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    curve: list[dict] = []
    routing_sums: dict[str, Tensor] = {}
    routing_n: dict[str, int] = {}
    grad_norms: deque[tuple[int, Tensor]] = deque(maxlen=GRAD_NORM_HISTORY)
    train_time = 0.0
    loss_val = math.nan
    tokens = 0
    start = 0
    resumed: list[dict] = []
    last_finite = {"step": None, "loss": None}
    state = None
    if checkpoint_dir is not None:
        state = ckpt.load_latest(checkpoint_dir, module=module, optimizer=opt, info=info,
                                 warn=on_warning or (lambda msg: None))
    if state is not None:
        if (state["plan"]["steps"], state["plan"]["world_size"]) != (plan.steps,
                                                                      plan.world_size):
            raise ConfigError(f"checkpoint {state['checkpoint_dir']} was saved by a run of "
                              f"{state['plan']['steps']} steps on {state['plan']['world_size']}"
                              f" process(es); this run plans {plan.steps} on "
                              f"{plan.world_size}: relaunch with the original world size")
        start, tokens, train_time = state["step"], state["tokens"], state["train_time_s"]
        curve = state["loss_curve"]
        routing_sums = {k: torch.tensor(v, dtype=torch.float32, device=device)
                        for k, v in state["routing_sums"].items()}
        routing_n = dict(state["routing_n"])
        grad_norms.extend((s, torch.tensor(v)) for s, v in state["grad_norms"])
        last_finite = state["last_finite"]
        loss_val = state["loss"]
        resumed = [*state["resumed"], {"from_step": start,
                                       "checkpoint": Path(state["checkpoint_dir"]).name}]
    micro_per_step = tcfg.grad_accum
    it = batches(start * micro_per_step) if callable(batches) else batches
    if not callable(batches) and start:
        raise ValueError("resuming needs `batches` as a function of the start position")
    tracker = make_tracker(start + 1) if make_tracker is not None else None

    def snapshot(next_step: int) -> dict[str, Any]:
        n_windows = getattr(batches, "n_windows", None)
        return {
            "step": next_step, "tokens": tokens, "train_time_s": train_time,
            "loss": loss_val, "loss_curve": curve, "last_finite": last_finite,
            "routing_sums": {k: float(v) for k, v in routing_sums.items()},
            "routing_n": routing_n,
            "grad_norms": [(s, float(v)) for s, v in grad_norms],
            "resumed": resumed,
            "plan": {"steps": plan.steps, "world_size": plan.world_size,
                     "tokens_per_step": plan.tokens_per_step},
            "data": ({"global_micro_batches": next_step * micro_per_step}
                     if n_windows is None else data_position(
                         n_windows, tcfg.batch_size, plan.world_size,
                         next_step * micro_per_step)),
        }

    def save(next_step: int) -> Path:
        return ckpt.save(checkpoint_dir, next_step, module=module, optimizer=opt,
                         state=snapshot(next_step), info=info, keep=tcfg.keep_checkpoints)

    try:
        for step in range(start, plan.steps):
            micro = [next(it) for _ in range(tcfg.grad_accum)]  # data loading is not timed
            try:
                res, dt = trainer.timed(step, micro)
            except torch.OutOfMemoryError as e:
                raise TrainingOutOfMemory(
                    f"out of memory at step {step} with batch_size={tcfg.batch_size} "
                    f"sequences per process on {device}: lower [train] batch_size and raise "
                    f"grad_accum to keep the global batch (e.g. batch_size = "
                    f"{max(1, tcfg.batch_size // 2)}, grad_accum = {tcfg.grad_accum * 2})"
                ) from e
            train_time += dt
            tokens += plan.tokens_per_step
            grad_norms.append((step + 1, res.grad_norm))
            for k, v in res.stats_sum.items():  # on the device: no sync per step
                routing_sums[k] = routing_sums[k] + v if k in routing_sums else v
                routing_n[k] = routing_n.get(k, 0) + res.stats_count[k]
            # One sync per step for the loss and the gradient norm: a NaN/inf is caught where
            # it appears. A non-finite gradient norm diverges too, even while the loss is
            # still finite: clipping then zeroes (inf) or poisons (NaN) the update.
            loss_val, gn_val = torch.stack([res.loss.detach().float(),
                                            res.grad_norm.float()]).tolist()
            if not (math.isfinite(loss_val) and math.isfinite(gn_val)):
                what = (f"training loss became {loss_val}" if not math.isfinite(loss_val)
                        else f"gradient norm became {gn_val} (loss {loss_val:.4f})")
                raise TrainingDiverged(
                    f"{what} at step {step + 1}; the last finite loss "
                    f"was at step {last_finite['step']}: lower the learning rate (lr = "
                    f"{tcfg.lr}) or raise warmup_frac",
                    {"step": step + 1, "loss": str(loss_val), "last_finite_step":
                     last_finite["step"], "last_finite_loss": last_finite["loss"],
                     "lr": res.lr, "peak_lr": tcfg.lr,
                     "grad_norms": [{"step": s, "grad_norm": float(v)} for s, v in grad_norms],
                     "routing": {k: float(v) for k, v in res.stats.items()}})
            last_finite = {"step": step + 1, "loss": loss_val}
            is_log = step % tcfg.log_every == 0 or step == plan.steps - 1
            if is_log:
                gn = float(res.grad_norm)
                curve.append({"step": step + 1, "tokens": tokens, "loss": loss_val, "lr": res.lr,
                              "time_s": train_time, "grad_norm": gn})
                if tracker is not None:
                    tracker.log(step + 1, {"train/loss": loss_val, "train/lr": res.lr,
                                           "train/grad_norm": gn, "train/tokens": tokens,
                                           **{f"routing/{k}": float(v)
                                              for k, v in res.stats.items()}})
            if on_step is not None:
                on_step(step, loss_val, res.lr)
            done = step + 1 == plan.steps
            stop = should_stop is not None and any_rank(info, should_stop(), device)
            if checkpoint_dir is not None and not done and (
                    stop or (tcfg.checkpoint_every and (step + 1) % tcfg.checkpoint_every == 0)):
                path = save(step + 1)
                if stop:
                    raise TrainingInterrupted(step + 1, path)
            elif stop and not done:
                raise TrainingInterrupted(step + 1, None)
        peak, kind = peak_memory(device)
        peak = int(all_reduce_max(info, peak, device))  # the largest over ranks
    finally:
        if tracker is not None:
            tracker.close()
    return TrainResult(
        steps=plan.steps, tokens=tokens, train_time_s=train_time,
        tokens_per_s=tokens / train_time if train_time > 0 else math.nan,
        peak_mem_bytes=peak, peak_mem_kind=kind, final_train_loss=loss_val, loss_curve=curve,
        routing={k: float(v / routing_n[k]) for k, v in routing_sums.items()},
        resumed=resumed,
    )


@torch.no_grad()
def evaluate_nll(model: CausalLM, windows: Tensor, *, batch_size: int,
                 device: torch.device) -> dict[str, float]:
    """Mean next-token NLL (nats/token) over held-out windows [N, T+1], in eval mode (MoR
    routes with its `eval_routing`)."""
    was_training = model.training
    model.to(device).eval()
    total, count = 0.0, 0
    stats_sum: dict[str, float] = {}
    n_batches = 0
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(w[:, :-1], w[:, 1:])
        n = w[:, 1:].numel()
        total += out.lm_loss.item() * n
        count += n
        for k, v in out.stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
        n_batches += 1
    model.train(was_training)
    return {"val_nll": total / count, "val_tokens": count,
            **{f"val_{k}": v / n_batches for k, v in stats_sum.items()}}

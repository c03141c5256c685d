"""From a compute budget to a training length, via each model's own FLOPs accounting.

The paper's isoFLOP protocol (docs/protocol.md §5): fix a forward-FLOPs budget C (paper
convention) and train each model on C / FLOPs-per-token tokens, so a MoR model, cheaper per
token, sees more tokens. A "fixed-token" budget instead holds the tokens and reports the
FLOPs used. Steps are rounded DOWN so a run never exceeds its budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mor import flops
from mor.config import ModelConfig
from mor.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """Exactly one of `flops` (forward FLOPs, paper convention) or `tokens`."""

    flops: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.flops is None) == (self.tokens is None):
            raise ConfigError("budget: give exactly one of 'flops' (forward FLOPs, paper "
                              "convention) or 'tokens'")
        value = self.flops if self.flops is not None else self.tokens
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"budget: must be a positive number, got {value!r}")

    @property
    def kind(self) -> str:
        return "flops" if self.flops is not None else "tokens"

    @property
    def value(self) -> float:
        return float(self.flops if self.flops is not None else self.tokens)

    @property
    def tag(self) -> str:
        """Label for run ids and tables, e.g. '2e13F' or '1.2e06T' (6 significant digits,
        so distinct budgets of a suite get distinct labels)."""
        return f"{self.value:.6g}".replace("+", "") + ("F" if self.kind == "flops" else "T")


STEP_RULES = ("floor",)
"""How a budget becomes a step count (`plan_training`): "floor" (mor-bench's rule: whole
steps, rounded down so a run never exceeds its budget)."""


@dataclass(frozen=True)
class TrainPlan:
    steps: int
    tokens_per_step: int
    """GLOBAL tokens per optimizer step: batch_size x grad_accum x world_size x seq_len."""
    tokens: int
    flops_per_token: float         # forward, paper convention
    flops_per_token_exact: float   # forward, exact convention
    flops_used: float              # tokens * flops_per_token (the budget the run spends)
    world_size: int = 1            # data-parallel processes the global batch is split over
    step_rule: str = "floor"       # STEP_RULES: how the budget became `steps`

    def to_dict(self) -> dict:
        return asdict(self)


def plan_training(cfg: ModelConfig, budget: Budget, seq_len: int, batch_size: int,
                  grad_accum: int = 1, world_size: int = 1, rule: str = "floor") -> TrainPlan:
    """The run's length. `batch_size` is per process and micro-batch; the step count comes
    from the GLOBAL batch (batch_size x grad_accum x world_size sequences)."""
    if rule not in STEP_RULES:
        raise ConfigError(f"step_rule: must be one of {', '.join(STEP_RULES)}, got {rule!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size: must be a positive integer, got {world_size!r}")
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_seq_len="
                          f"{cfg.max_seq_len}; lower seq_len or override max_seq_len")
    tokens_per_step = batch_size * seq_len * grad_accum * world_size
    fpt = flops.flops_per_token(cfg, seq_len, "paper")
    if budget.flops is not None:
        target_tokens = budget.flops / fpt
    else:
        target_tokens = float(budget.tokens)
    steps = math.floor(target_tokens / tokens_per_step)
    if steps < 1:
        need = tokens_per_step * (fpt if budget.kind == "flops" else 1)
        raise ConfigError(f"budget {budget.kind}={budget.value:.3g} is too small for one "
                          f"step of {tokens_per_step} tokens; need at least {need:.3g}")
    tokens = steps * tokens_per_step
    return TrainPlan(
        steps=steps, tokens_per_step=tokens_per_step, tokens=tokens, flops_per_token=fpt,
        flops_per_token_exact=flops.flops_per_token(cfg, seq_len, "exact"),
        flops_used=tokens * fpt, world_size=world_size, step_rule=rule,
    )


def wsd_lr(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int,
           decay_frac: float = 0.2) -> float:
    """Warmup-stable-decay (docs/protocol.md §5): linear warmup over `warmup_steps`, constant
    peak, then linear decay towards 0 over the last `decay_frac` of the steps. `step` counts
    from 0; the value is the LR used for that optimizer step. With d decay steps the decay
    runs peak*d/(d+1) ... peak/(d+1): every decay step is below the peak (even when d = 1)
    and none is wasted at LR 0."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_frac * total_steps)) if decay_frac > 0 else 0
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return peak_lr
    return peak_lr * (total_steps - step) / (decay_steps + 1)

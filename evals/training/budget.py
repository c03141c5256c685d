"""From a compute budget to a training length, via each model's own FLOPs accounting.

The paper's isoFLOP protocol (docs/protocol.md §5): fix a forward-FLOPs budget C (paper
convention) and train each model on C / FLOPs-per-token tokens, so a MoR model, cheaper per
token, sees more tokens. A "fixed-token" budget instead holds the tokens and reports the
FLOPs used. Two step rules (docs/protocol.md §5, "Step rules"):

* "floor" (the default): the paper convention of `mor.flops`, whole steps rounded DOWN,
  so a run never spends more than its budget in that convention.
* "reference": the step counts of the paper's released training configs, reproduced
  exactly for every 360M model of Table 3 (`reference_flops_per_token`).
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
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
                0 < value < math.inf):
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


STEP_RULES = ("floor", "reference")
"""How a budget becomes a step count (`plan_training`): "floor" (mor-bench's rule: whole
steps under the paper FLOPs convention, rounded down so a run never exceeds its budget) or
"reference" (the rule that reproduces the step counts of the paper's released configs:
`reference_flops_per_token`, rounded down; docs/protocol.md §5)."""


def reference_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token as the paper's released configs count them (the "reference"
    step rule; docs/protocol.md §5). The paper convention of `mor.flops` with two changes,
    reconstructed from the configs' step counts (the released code holds only the results):

    * attention counts the ordered pairs of DISTINCT tokens a causal layer relates: a layer
      over k tokens costs 4 d * k(k-1)/2 FLOPs (QK^T and AV) per sequence, i.e.
      2 d k(k-1) / T per token of the sequence (the paper convention: 2 d k^2 / T);
    * a MoR step r runs on k_r = round(c_r T) whole tokens (the paper convention uses the
      fraction c_r itself), for its linear layers and its attention alike.

    Under recursive KV sharing a step r > 1 has no K/V projections and its k_r queries read
    the first recursion's keys of all T positions: 2 d k_r per token, as in the paper
    convention. Token-choice MoR is counted under perfect balance (the capacities)."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
    d, t = cfg.d_model, seq_len
    mlp = 3 * d * cfg.d_ff
    linear = 2 * (4 * d * d + mlp)          # GQA ignored, as in the paper convention
    linear_no_kv = 2 * (2 * d * d + mlp)    # q and o projections + MLP

    def attention(k: int) -> float:
        return 2 * d * k * (k - 1) / t

    edge_layers = cfg.num_unique_first + cfg.num_unique_last
    total = edge_layers * (linear + attention(t))
    if cfg.family != "mor":
        return float(total + cfg.num_shared * cfg.num_recursions * (linear + attention(t)))
    for r, c in enumerate(cfg.step_capacities, 1):
        k = max(1, math.floor(c * t + 0.5))  # whole tokens, rounded half up
        if cfg.kv == "share" and r > 1:
            step = linear_no_kv * k / t + 2 * d * k
        else:
            step = linear * k / t + attention(k)
        total += cfg.num_shared * step
    return float(total)


@dataclass(frozen=True)
class TrainPlan:
    steps: int
    tokens_per_step: int
    """GLOBAL tokens per optimizer step: batch_size x grad_accum x world_size x seq_len."""
    tokens: int
    flops_per_token: float         # forward, paper convention
    flops_per_token_exact: float   # forward, exact convention
    flops_used: float              # tokens * flops_per_token (the budget the run spends; the
                                   # "reference" rule may pass C by a hair, docs/protocol.md §5)
    world_size: int = 1            # data-parallel processes the global batch is split over
    step_rule: str = "floor"       # STEP_RULES: how the budget became `steps`

    def to_dict(self) -> dict:
        return asdict(self)


def plan_training(cfg: ModelConfig, budget: Budget, seq_len: int, batch_size: int,
                  grad_accum: int = 1, world_size: int = 1, rule: str = "floor") -> TrainPlan:
    """The run's length. `batch_size` is per process and micro-batch; the step count comes
    from the GLOBAL batch (batch_size x grad_accum x world_size sequences). `rule` (one of
    STEP_RULES) says how a FLOPs budget is counted; both rules round down, and both treat a
    token budget alike (whole steps, rounded down). The plan's FLOPs figures are always the
    paper convention and the exact count, whatever the rule."""
    if rule not in STEP_RULES:
        raise ConfigError(f"step_rule: must be one of {', '.join(STEP_RULES)}, got {rule!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size: must be a positive integer, got {world_size!r}")
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_seq_len="
                          f"{cfg.max_seq_len}; lower seq_len or override max_seq_len")
    tokens_per_step = batch_size * seq_len * grad_accum * world_size
    fpt = flops.flops_per_token(cfg, seq_len, "paper")
    # FLOPs a token costs under the rule (1: a token budget counts tokens).
    per_token = 1.0
    if budget.flops is not None:
        per_token = fpt if rule == "floor" else reference_flops_per_token(cfg, seq_len)
    steps = math.floor(budget.value / per_token / tokens_per_step)
    if steps < 1:
        need = tokens_per_step * per_token
        raise ConfigError(f"budget {budget.kind}={budget.value:.3g} is too small for one "
                          f"step of {tokens_per_step:,} tokens (batch_size {batch_size} x "
                          f"seq_len {seq_len} x grad_accum {grad_accum} x {world_size} "
                          f"process(es)); need at least {need:.3g}: raise the budget or "
                          "lower seq_len / batch_size")
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

"""`ModelConfig`: what a model IS (shape, family, recursion scheme), validated up front.

How long a model is trained lives elsewhere (`evals/training/budget.py`, suite files): a config
says nothing about tokens or steps. Presets are the paper's backbones (docs/method.md
§1; arXiv 2507.10524 Table 6) plus small shapes that train on a CPU.

    cfg = ModelConfig.from_preset("360m", family="mor", num_recursions=3)
    cfg.layer_plan      # "1+10+1": one unique first layer, 10 shared layers x 3, one last
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mor.errors import ConfigError

FAMILIES = ("vanilla", "recursive", "mor")
SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTERS = ("expert", "token")
KV_MODES = ("cache", "share")
ROUTER_ARCHS = ("linear", "mlp")
ROUTER_FUNCS = {"expert": ("sigmoid", "tanh"), "token": ("softmax", "sigmoid")}
EXPERT_AUX = ("loss", "router")
BALANCING = ("loss", "loss_free")
EVAL_ROUTING = ("topk", "causal")
# Defaults that depend on the router (docs/method.md §3).
_ROUTER_DEFAULTS = {
    "expert": {"router_func": "sigmoid", "router_alpha": 0.1, "router_z_coef": 0.0,
               "eval_routing": "topk"},
    "token": {"router_func": "softmax", "router_alpha": 1.0, "router_z_coef": 1e-5,
              "eval_routing": "causal"},
}
MAX_RECURSIONS = 4  # the paper's range (N_r in 1..4); more is untested territory


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (True is an int to Python, not to a config file)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A finite int or float, not a bool: NaN and infinity pass every `<`/`>` test the wrong
    way, so they are rejected before any range check."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))

# Backbone shapes. Paper presets: docs/method.md §1 (head_dim 64 everywhere, vocab of the
# SmolLM tokenizer). CPU presets keep the same architecture at sizes that train on 2 cores;
# their vocab is the byte tokenizer's (256 bytes + EOS) and is replaced by the suite's
# tokenizer when it differs.
PRESETS: dict[str, dict[str, int]] = {
    "micro": dict(n_layers=6, d_model=64, n_heads=4, n_kv_heads=2, d_ff=176, vocab_size=257,
                  max_seq_len=256),
    "tiny": dict(n_layers=8, d_model=128, n_heads=4, n_kv_heads=2, d_ff=352, vocab_size=257,
                 max_seq_len=512),
    "small": dict(n_layers=6, d_model=256, n_heads=4, n_kv_heads=2, d_ff=688, vocab_size=8192,
                  max_seq_len=1024),
    "135m": dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_ff=1536,
                 vocab_size=49152, max_seq_len=2048),
    "360m": dict(n_layers=32, d_model=960, n_heads=15, n_kv_heads=5, d_ff=2560,
                 vocab_size=49152, max_seq_len=2048),
    "730m": dict(n_layers=26, d_model=1536, n_heads=24, n_kv_heads=8, d_ff=4096,
                 vocab_size=49152, max_seq_len=2048),
    "1.7b": dict(n_layers=24, d_model=2048, n_heads=32, n_kv_heads=32, d_ff=8192,
                 vocab_size=49152, max_seq_len=2048),
}


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only model of one of three families sharing one Llama-style backbone."""

    # --- backbone -------------------------------------------------------------------
    vocab_size: int = 257
    """Rows of the (tied) embedding / output matrix."""
    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 8
    """Depth L of the *vanilla* model this config is derived from; recursive and MoR
    models re-arrange it into unique + shared layers (see `layer_plan`)."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads."""
    d_ff: int = 352
    """Hidden width of the SwiGLU MLP."""
    head_dim: int | None = None
    """Width of one attention head; defaults to d_model // n_heads."""
    max_seq_len: int = 512
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Llama default)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix (norm weights start at 1)."""
    tie_embeddings: bool = True
    """Output head reuses the input embedding (the paper's models all do)."""

    # --- family and recursion -------------------------------------------------------------
    family: str = "vanilla"
    """"vanilla" (L unique layers), "recursive" (shared layers applied N_r times) or
    "mor" (Mixture-of-Recursions: routers choose which tokens take each recursion)."""
    num_recursions: int = 1
    """N_r, how often the shared block is applied (1 for vanilla)."""
    sharing: str = "middle_cycle"
    """Parameter-sharing strategy: cycle | sequence | middle_cycle | middle_sequence
    (docs/method.md §2). MoR uses middle_cycle, as every MoR row of the paper."""

    # --- MoR routing (ignored by, and rejected for, the other families) ----------------------
    router: str = "expert"
    """"expert": expert-choice, each recursion step keeps the top-k tokens of the sequence;
    "token": token-choice, one router picks each token's total depth up front."""
    kv: str = "cache"
    """"cache": recursion-wise caching, step r attends only among the tokens routed to r;
    "share": recursive KV sharing, steps r > 1 reuse the first recursion's keys/values of
    the whole sequence and compute no K/V projections."""
    capacities: tuple[float, ...] | None = None
    """Expert-choice: fraction of the sequence each step keeps; default (N_r - r + 1)/N_r."""
    router_arch: str = "linear"
    """"linear" (Linear(d, out)) or "mlp" (Linear(d, d), GELU, Linear(d, out))."""
    router_func: str | None = None
    """Gate function: expert-choice sigmoid | tanh (default sigmoid); token-choice
    softmax | sigmoid (default softmax)."""
    router_alpha: float | None = None
    """Gate scale: g = alpha * func(logit); default 0.1 (expert), 1.0 (token)."""
    aux_loss_coef: float = 0.001
    """Expert-choice: weight of the auxiliary BCE loss teaching each router its top-k
    membership (the "aux loss" design)."""
    expert_aux: str = "loss"
    """Expert-choice: "loss" (auxiliary BCE on the router itself) or "router" (a separate
    predictor per step, trained by BCE on DETACHED hidden states; the causal rule uses it)."""
    router_z_coef: float | None = None
    """Router z-loss weight (mean squared log-sum-exp of the router logits); default 1e-5
    for token-choice, 0 for expert-choice."""
    capacity_warmup_steps: int = 0
    """Expert-choice: capacities start at 1.0 and follow a cosine to their targets over this
    many training steps (the step is passed to forward explicitly); 0 = off."""
    balancing: str = "loss"
    """Token-choice: "loss" (sum_i P_i f_i, weight balance_coef) or "loss_free" (a
    selection-only bias updated by the training loop after each optimizer step)."""
    balance_coef: float = 0.1
    """Token-choice: weight of the balancing loss."""
    bias_update_rate: float = 1e-3
    """Token-choice loss-free balancing: u in b_i += u * sign(mean_load - load_i)."""
    eval_routing: str | None = None
    """How MoR routes at evaluation. Expert-choice: "topk" over the whole sequence (the
    paper's numbers; NOT causal: later tokens influence earlier tokens' depth; default) or
    "causal" (a token takes step r iff it took r-1 and the router -- or the aux predictor --
    says logit > 0, the target the auxiliary BCE trains). Token-choice is always "causal"."""

    # --- derived (filled in __post_init__) ---------------------------------------------------
    num_unique_first: int = field(init=False)
    num_shared: int = field(init=False)
    num_unique_last: int = field(init=False)

    def __post_init__(self) -> None:
        self._validate()
        if self.family == "mor":
            for name, value in _ROUTER_DEFAULTS[self.router].items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        hd = self.head_dim if self.head_dim is not None else self.d_model // self.n_heads
        object.__setattr__(self, "head_dim", hd)
        if self.capacities is not None:
            object.__setattr__(self, "capacities", tuple(float(c) for c in self.capacities))
        middle = self.family == "mor" or (
            self.family == "recursive" and self.sharing.startswith("middle_"))
        edge = 1 if middle else 0
        if self.family == "vanilla":
            first, shared, last = 0, self.n_layers, 0
        else:
            # The paper's rule: B = ceil((L - 2) / N_r) shared layers; when L - 2 is not a
            # multiple of N_r layers are ADDED (360M at N_r=4 becomes 1+8+1 = 34 layers).
            first, last = edge, edge
            shared = math.ceil((self.n_layers - 2 * edge) / self.num_recursions)
        object.__setattr__(self, "num_unique_first", first)
        object.__setattr__(self, "num_shared", shared)
        object.__setattr__(self, "num_unique_last", last)

    def _validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"model config field '{name}': {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not _is_real(value):
                fail(name, f"must be a finite number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            fail("tie_embeddings", f"must be true or false, got {self.tie_embeddings!r}")
        if self.family not in FAMILIES:
            fail("family", f"unknown family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.sharing not in SHARING:
            fail("sharing", f"unknown strategy {self.sharing!r}; choose one of "
                 f"{', '.join(SHARING)}")
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"{self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.head_dim is not None and (not _is_int(self.head_dim) or self.head_dim < 1):
            fail("head_dim", f"must be a positive integer, got {self.head_dim!r}")
        hd = self.head_dim if self.head_dim is not None else self.d_model // self.n_heads
        if self.head_dim is None and self.d_model % self.n_heads:
            fail("n_heads", f"{self.n_heads} does not divide d_model={self.d_model}; "
                 "set head_dim explicitly")
        if hd % 2:
            fail("head_dim", f"RoPE needs an even head_dim, got {hd}")
        if not self.rope_theta > 0:
            fail("rope_theta", f"must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            fail("norm_eps", f"must be > 0, got {self.norm_eps}")
        if not 0 < self.init_std < 1:
            fail("init_std", f"must be in (0, 1), got {self.init_std}")
        if not self.tie_embeddings:
            fail("tie_embeddings", "only tied embeddings are supported (as in the paper)")
        nr = self.num_recursions
        if not _is_int(nr) or not 1 <= nr <= MAX_RECURSIONS:
            fail("num_recursions", f"must be an integer in 1..{MAX_RECURSIONS}, got {nr!r}")
        if self.family == "vanilla" and nr != 1:
            fail("num_recursions", "a vanilla model has no recursions; use family='recursive' "
                 "or 'mor', or num_recursions=1")
        if self.family == "mor" and self.sharing != "middle_cycle":
            fail("sharing", f"MoR is defined with middle_cycle sharing (got {self.sharing!r}); "
                 "drop the override")
        self._validate_routing(fail)
        if self.family != "vanilla":
            middle = self.family == "mor" or self.sharing.startswith("middle_")
            avail = self.n_layers - (2 if middle else 0)
            if avail < nr:
                what = "n_layers - 2" if middle else "n_layers"
                fail("num_recursions", f"N_r={nr} does not fit n_layers={self.n_layers} with "
                     f"{self.sharing}: need {what} >= num_recursions; lower num_recursions "
                     "or add layers")

    def _validate_routing(self, fail) -> None:
        """Routing fields: valid values, and no combination the model cannot run."""
        fields = {f.name: f.default for f in dataclasses.fields(self)}
        routing = ("router", "kv", "capacities", "router_arch", "router_func", "router_alpha",
                   "aux_loss_coef", "expert_aux", "router_z_coef", "capacity_warmup_steps",
                   "balancing", "balance_coef", "bias_update_rate", "eval_routing")
        if not _is_int(self.capacity_warmup_steps):  # False == 0.0 == 0, the default
            fail("capacity_warmup_steps", f"must be an integer >= 0, got "
                 f"{self.capacity_warmup_steps!r}")
        if self.family != "mor":
            for name in routing:
                if getattr(self, name) != fields[name]:
                    fail(name, f"only MoR models route tokens (family={self.family!r}); "
                         "drop this field")
            return
        choices = {"router": ROUTERS, "kv": KV_MODES, "router_arch": ROUTER_ARCHS,
                   "expert_aux": EXPERT_AUX, "balancing": BALANCING}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("router_alpha", "router_z_coef"):  # None: the router's default
            value = getattr(self, name)
            if value is not None and not _is_real(value):
                fail(name, f"must be a finite number, got {value!r}")
        for name in ("aux_loss_coef", "balance_coef", "bias_update_rate"):
            if not _is_real(getattr(self, name)):
                fail(name, f"must be a finite number, got {getattr(self, name)!r}")
        if self.capacities is not None:
            self._validate_capacities(fail)
        funcs = ROUTER_FUNCS[self.router]
        if self.router_func is not None and self.router_func not in funcs:
            fail("router_func", f"{self.router}-choice routers score with "
                 f"{' or '.join(funcs)}, got {self.router_func!r}"
                 + ("; softmax needs several outputs, an expert-choice router has one"
                    if self.router_func == "softmax" else ""))
        if self.eval_routing is not None and self.eval_routing not in EVAL_ROUTING:
            fail("eval_routing", f"must be one of {', '.join(EVAL_ROUTING)}, got "
                 f"{self.eval_routing!r}")
        if self.router_alpha is not None and not 0 < self.router_alpha <= 10:
            fail("router_alpha", f"must be in (0, 10], got {self.router_alpha}")
        for name in ("aux_loss_coef", "balance_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        if self.router_z_coef is not None and self.router_z_coef < 0:
            fail("router_z_coef", f"must be >= 0, got {self.router_z_coef}")
        if not _is_int(self.capacity_warmup_steps) or self.capacity_warmup_steps < 0:
            fail("capacity_warmup_steps", f"must be an integer >= 0, got "
                 f"{self.capacity_warmup_steps!r}")
        if self.router == "token":
            expert_only = {"capacities": None, "expert_aux": "loss",
                           "capacity_warmup_steps": 0}
            for name, default in expert_only.items():
                if getattr(self, name) != default:
                    fail(name, "applies to expert-choice routing only; token-choice loads "
                         "follow the router (drop this field or set router = \"expert\")")
            if self.eval_routing == "topk":
                fail("eval_routing", "token-choice routing is causal by construction; "
                     "'topk' applies to expert-choice only")
        else:
            token_only = {"balancing": "loss", "balance_coef": 0.1, "bias_update_rate": 1e-3}
            for name, default in token_only.items():
                if getattr(self, name) != default:
                    fail(name, "applies to token-choice routing only (router = \"token\")")
        if (self.kv == "share" and self.capacities is not None
                and self.capacities[0] < 1.0):
            fail("kv", "recursive KV sharing reuses the FIRST recursion's keys/values for the "
                 "whole sequence, so capacities[0] must be 1.0")

    def _validate_capacities(self, fail) -> None:
        """Expert-choice capacities: one finite fraction in (0, 1] per step, non-increasing."""
        nr, caps = self.num_recursions, self.capacities
        if (not isinstance(caps, list | tuple)
                or not all(isinstance(c, int | float) and not isinstance(c, bool) for c in caps)):
            fail("capacities", f"must be a list of {nr} numbers in (0, 1], one per recursion "
                 f"step, got {caps!r}")
        if len(caps) != nr:
            fail("capacities", f"needs one value per recursion step ({nr}), got {len(caps)}")
        if any(not 0 < c <= 1 for c in caps):  # NaN fails this test too
            fail("capacities", f"each capacity must be in (0, 1], got {list(caps)}")
        if any(b > a for a, b in zip(caps, caps[1:])):
            fail("capacities", f"must be non-increasing (hierarchical filtering), got "
                 f"{list(caps)}")

    # --- derived views ---------------------------------------------------------------------
    @property
    def step_capacities(self) -> tuple[float, ...]:
        """Target fraction of tokens that take each recursion step: expert-choice
        capacities; token-choice under perfect balance (the paper's FLOPs assumption) gives
        the same (N_r - r + 1)/N_r; 1.0 everywhere for other families."""
        nr = self.num_recursions
        if self.family != "mor":
            return (1.0,) * nr
        if self.capacities is not None:
            return self.capacities
        return tuple((nr - r + 1) / nr for r in range(1, nr + 1))

    @property
    def num_unique_layers(self) -> int:
        return self.num_unique_first + self.num_shared + self.num_unique_last

    @property
    def unrolled_depth(self) -> int:
        """Layers a token that takes every recursion passes through."""
        return self.num_unique_first + self.num_shared * self.num_recursions + self.num_unique_last

    @property
    def layer_plan(self) -> str:
        """The paper's notation: "32" for vanilla, "1+10+1" for Middle-Cycle."""
        if self.family == "vanilla":
            return str(self.n_layers)
        if self.num_unique_first:
            return f"{self.num_unique_first}+{self.num_shared}+{self.num_unique_last}"
        return f"{self.num_shared}x{self.num_recursions}"

    def schedule(self) -> list[int]:
        """Indices into the unique layers, in the order a token that takes every
        recursion visits them (the unrolled stack)."""
        f, b, nr = self.num_unique_first, self.num_shared, self.num_recursions
        shared = list(range(f, f + b))
        if self.family == "vanilla":
            middle = shared
        elif self.sharing in ("sequence", "middle_sequence") and self.family == "recursive":
            middle = [i for i in shared for _ in range(nr)]
        else:
            middle = shared * nr
        return list(range(f)) + middle + list(range(f + b, f + b + self.num_unique_last))

    # --- construction / serialisation ----------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if not isinstance(name, str):
            raise ConfigError(f"preset must be a preset name (a string), got {name!r}; "
                              f"available presets: {', '.join(PRESETS)}")
        key = name.lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available presets: "
                              f"{', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a table of fields, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names, key=repr)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {', '.join(map(repr, unknown))}; "
                              f"valid fields: {', '.join(sorted(names))}")
        data = dict(data)
        if isinstance(data.get("capacities"), list):
            data["capacities"] = tuple(data["capacities"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if out["capacities"] is not None:
            out["capacities"] = list(out["capacities"])
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        data = self.to_dict()
        if self.family == "mor" and changes.get("router", self.router) != self.router:
            # Defaults that followed the old router follow the new one.
            for name, value in _ROUTER_DEFAULTS[self.router].items():
                if name not in changes and data[name] == value:
                    data[name] = None
        return ModelConfig.from_dict({**data, **changes})

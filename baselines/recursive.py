"""Recursive (parameter-shared) Transformers: a block of B shared layers applied N_r times.

Strategies (docs/method.md §2), as unrolled schedules of unique-layer indices for
B = 3, N_r = 3:
  cycle            [0,1,2][0,1,2][0,1,2]
  sequence         [0,0,0][1,1,1][2,2,2]
  middle_cycle     0 [1,2,3][1,2,3][1,2,3] 4     (the paper's choice, "1+3+1")
  middle_sequence  0 [1,1,1][2,2,2][3,3,3] 4
The schedule itself lives in `ModelConfig.schedule()`; sharing is by identity (the same
`Block` object, hence the same Parameters, is visited several times), so parameter counts
and optimizer state cover unique weights only.
"""

from __future__ import annotations

from mor.config import ModelConfig
from mor.errors import ConfigError
from mor.model import CausalLM


class RecursiveLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.family != "recursive":
            raise ConfigError(f"RecursiveLM needs family='recursive', got {cfg.family!r}")
        super().__init__(cfg)

    def shared_positions(self) -> dict[int, list[int]]:
        """Unique layer index -> positions in the unrolled stack where it is applied."""
        out: dict[int, list[int]] = {}
        for pos, i in enumerate(self.schedule):
            out.setdefault(i, []).append(pos)
        return out

"""`build_model(cfg)`: the one constructor for every family.

The model library imports nothing above it (docs/architecture.md), so it cannot import
`baselines/`. Families are found by name instead: `mor` is built in, and other packages
declare theirs as entry points of the group `mor_bench.families` (this project's
`pyproject.toml` declares `vanilla` and `recursive` from `baselines/`), or call
`register_family` at import time -- the plug-in pattern lm-eval uses for its models.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from mor.config import ModelConfig
from mor.errors import ConfigError
from mor.model import CausalLM

FAMILY_GROUP = "mor_bench.families"
_FAMILIES: dict[str, type[CausalLM]] = {}


def register_family(name: str, cls: type[CausalLM]) -> type[CausalLM]:
    """Make `build_model` build `cls` for configs with `family == name`."""
    if not (isinstance(cls, type) and issubclass(cls, CausalLM)):
        raise TypeError(f"family {name!r}: {cls!r} is not a CausalLM subclass")
    _FAMILIES[name] = cls
    return cls


def family_class(name: str) -> type[CausalLM]:
    """The model class of a family: registered, built in (`mor`), or an entry point."""
    if name not in _FAMILIES:
        if name == "mor":
            from mor.mixture import MoRLM

            register_family("mor", MoRLM)
        else:
            found = [ep for ep in entry_points(group=FAMILY_GROUP) if ep.name == name]
            if not found:
                raise ConfigError(
                    f"model family {name!r} is not registered: no entry point {name!r} in "
                    f"group {FAMILY_GROUP!r} (is mor-bench installed? `pip install -e .`)")
            register_family(name, found[0].load())
    return _FAMILIES[name]


def build_model(cfg: ModelConfig) -> CausalLM:
    return family_class(cfg.family)(cfg)

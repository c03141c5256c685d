"""Checkpoints: weights as safetensors plus the config as JSON -- never pickle.

A checkpoint directory holds `model.safetensors` and `config.json` ({"model": ModelConfig
fields, "extra": anything the writer adds, e.g. the tokenizer}). `load_checkpoint` accepts
the directory or the .safetensors path inside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mor.config import ModelConfig
from mor.errors import ConfigError
from mor.model import CausalLM

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_checkpoint(model: CausalLM, directory: str | Path,
                    extra: dict[str, Any] | None = None,
                    state_dict: dict[str, Any] | None = None) -> Path:
    """Write `model`'s weights (or `state_dict`, e.g. the gathered weights of a sharded
    model) and config."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().cpu().contiguous() for k, v in source.items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "family": model.cfg.family})
    os.replace(tmp, directory / WEIGHTS)
    meta = {"model": model.cfg.to_dict(), "extra": extra or {}}
    tmp_cfg = directory / (CONFIG + ".tmp")
    tmp_cfg.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_cfg, directory / CONFIG)
    return directory


def read_checkpoint_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path)
    directory = path.parent if path.suffix == ".safetensors" else path
    cfg_file = directory / CONFIG
    if not (directory / WEIGHTS).is_file() or not cfg_file.is_file():
        raise ConfigError(f"'{path}' is not a mor-bench checkpoint: expected {WEIGHTS} and "
                          f"{CONFIG} in '{directory}' (each run directory has them)")
    return directory, json.loads(cfg_file.read_text())


def load_checkpoint(path: str | Path, map_location: str = "cpu",
                    **config_overrides: Any) -> CausalLM:
    """Rebuild the model from `config.json` and load its safetensors weights.

    `config_overrides` change evaluation-time fields, e.g. eval_routing="causal".
    """
    from safetensors.torch import load_file

    from mor.registry import build_model

    directory, meta = read_checkpoint_meta(path)
    cfg = ModelConfig.from_dict({**meta["model"], **config_overrides})
    model = build_model(cfg)
    state = load_file(str(directory / WEIGHTS), device=map_location)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()

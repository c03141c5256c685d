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
from mor.errors import ConfigError, DataError
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
    mode = _file_mode()
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "family": model.cfg.family})
    os.chmod(tmp, mode)
    os.replace(tmp, directory / WEIGHTS)
    meta = {"model": model.cfg.to_dict(), "extra": extra or {}}
    tmp_cfg = directory / (CONFIG + ".tmp")
    tmp_cfg.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.chmod(tmp_cfg, mode)
    os.replace(tmp_cfg, directory / CONFIG)
    return directory


def _file_mode() -> int:
    """0o666 less the process umask: the mode a plain `open(..., "w")` gives, which the
    temporary files written here (then renamed) must end with too."""
    status = Path("/proc/self/status")  # Linux: read it without changing it
    lines = status.read_text().splitlines() if status.is_file() else []
    found = [line.split()[1] for line in lines if line.startswith("Umask:")]
    if found:
        return 0o666 & ~int(found[0], 8)
    mask = os.umask(0o022)  # elsewhere: os.umask sets and returns; put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def read_checkpoint_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path)
    directory = path.parent if path.suffix == ".safetensors" else path
    cfg_file = directory / CONFIG
    if not (directory / WEIGHTS).is_file() or not cfg_file.is_file():
        raise ConfigError(f"'{path}' is not a mor-bench checkpoint: expected {WEIGHTS} and "
                          f"{CONFIG} in '{directory}' (each run directory has them)")
    fix = "restore it from the run (or re-save the checkpoint with mor.save_checkpoint)"
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"'{cfg_file}' is not valid JSON ({e}); {fix}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ConfigError(f"'{cfg_file}' has no \"model\" table of ModelConfig fields; {fix}")
    return directory, meta


def load_checkpoint(path: str | Path, map_location: str = "cpu",
                    **config_overrides: Any) -> CausalLM:
    """Rebuild the model from `config.json` and load its safetensors weights.

    `config_overrides` change evaluation-time fields, e.g. eval_routing="causal".
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mor.registry import build_model

    directory, meta = read_checkpoint_meta(path)
    cfg_file, weights = directory / CONFIG, directory / WEIGHTS
    try:
        cfg = ModelConfig.from_dict({**meta["model"], **config_overrides})
    except TypeError as e:  # a field of the wrong type that __post_init__ does not name
        raise ConfigError(f"'{cfg_file}': {e}; restore it from the run") from None
    except ConfigError as e:
        raise ConfigError(f"'{cfg_file}': {e}") from None
    model = build_model(cfg)
    try:
        state = load_file(str(weights), device=map_location)
    except SafetensorError as e:
        raise DataError(f"'{weights}' cannot be read as safetensors ({e}): it is truncated "
                        "or damaged; copy the checkpoint again (or re-save it)") from None
    _check_state(model.state_dict(), state, cfg_file, weights)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def _check_state(expected: dict[str, Any], state: dict[str, Any], cfg_file: Path,
                 weights: Path) -> None:
    """The weights must be exactly the tensors the config builds (names and shapes): a
    ConfigError naming the first difference, instead of load_state_dict's RuntimeError."""
    fix = (f"'{cfg_file}' does not describe the weights in '{weights}'; restore the "
           "config.json that was saved with them")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = (f"missing tensor(s) {', '.join(missing[:3])}" if missing
                else f"unexpected tensor(s) {', '.join(unexpected[:3])}")
        raise ConfigError(f"{what}: {fix}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ConfigError(f"size mismatch for tensor {name}: the weights hold "
                              f"{list(state[name].shape)}, the config builds "
                              f"{list(tensor.shape)}: {fix}")

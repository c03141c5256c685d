"""Resumable training checkpoints: PyTorch Distributed Checkpoint (DCP) plus a JSON state.

A run directory keeps its resumable checkpoints in `checkpoints/step-NNNNNNNN/`:

    __0_0.distcp ... .metadata   model + optimizer state, written by DCP (every rank its
                                  shards; loads on any world size, FSDP2 included)
    train_state.json             step, data position, loss curve, routing sums, timings
                                  (rank 0)
    rng-<rank>.json              every random generator of that rank: torch CPU (and
                                  CUDA), numpy, python
    manifest.json                sha256 and size of every file above (written last)

Atomic: everything is written to `step-NNNNNNNN.tmp/`, fsynced, then renamed; a directory
without a valid manifest is never loaded. `load_latest` verifies the checksums of the newest
checkpoint and falls back to the previous one (with a warning naming the bad file) when a
file is missing, truncated or altered. The newest `keep` checkpoints are kept.

The model's buffers (e.g. loss-free balancing's router bias) are part of its state dict; MoR's
capacity warm-up is a function of the step, which the state holds. docs/distributed.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evals.training.distributed import DistInfo, barrier, broadcast_object

CHECKPOINTS = "checkpoints"
STATE = "train_state.json"
MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the path and the cause are in the message)."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete (renamed) checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


# --------------------------------------------------------------------------------------------
# random generators


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
    }
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode()
                         for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    random.setstate(_tupled(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([
            torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())
            for s in state["cuda"]])


def _jsonable(obj):
    return [_jsonable(o) for o in obj] if isinstance(obj, tuple | list) else obj


def _tupled(obj):
    return tuple(_tupled(o) for o in obj) if isinstance(obj, list) else obj


# --------------------------------------------------------------------------------------------
# files


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True))


def verify(directory: Path) -> str | None:
    """None if every file of the manifest is present with its size and sha256; else the
    problem, naming the file."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (an interrupted save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
        if _sha256(path) != meta["sha256"]:
            return f"{path} does not match its sha256 in {MANIFEST}"
    return None


# --------------------------------------------------------------------------------------------
# save / load


def _dcp_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from evals.training.distributed import unwrap

    model_sd, optim_sd = get_state_dict(unwrap(module), optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(root: Path, step: int, *, module: nn.Module, optimizer: torch.optim.Optimizer,
         state: dict[str, Any], info: DistInfo, keep: int) -> Path:
    """Write the checkpoint of `step` (every rank calls this), atomically; returns its
    directory. `state` (rank 0's) is the loop's JSON-able state."""
    import torch.distributed.checkpoint as dcp

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        if info.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier(info)
        with warnings.catch_warnings():  # one process: DCP says it saves without a group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(_dcp_state(module, optimizer), checkpoint_id=str(tmp),
                     no_dist=not info.active)
        _write_json(tmp / f"rng-{info.rank}.json", rng_state())
        barrier(info)
        if info.is_main:
            _write_json(tmp / STATE, state)
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            _fsync_tree(tmp)
            _write_json(tmp / MANIFEST, {"step": step, "files": files})
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (a SIGTERM right after a save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            for old in list_checkpoints(root)[keep:]:
                shutil.rmtree(old)
        barrier(info)
    except OSError as e:
        raise CheckpointError(f"could not write the checkpoint of step {step} to {tmp}: "
                              f"{e.strerror or e} (free space there, or lower "
                              "[train] keep_checkpoints)") from e
    return final


def load_latest(root: Path, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                info: DistInfo, warn: Callable[[str], None]) -> dict[str, Any] | None:
    """Load the newest valid checkpoint under `root` into `module` and `optimizer` and this
    rank's random generators; returns its JSON state (None if there is none). Invalid
    checkpoints are skipped with `warn(message naming the file)`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from evals.training.distributed import unwrap

    chosen: str | None = None
    if info.is_main:
        for directory in list_checkpoints(root):
            problem = verify(directory)
            if problem is None:
                chosen = str(directory)
                break
            warn(f"checkpoint {directory.name} is unusable: {problem}; trying the previous "
                 "one")
    chosen = broadcast_object(info, chosen)
    if chosen is None:
        return None
    directory = Path(chosen)
    target = _dcp_state(module, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=str(directory), no_dist=not info.active)
    set_state_dict(unwrap(module), optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optim"])
    rng_file = directory / f"rng-{info.rank}.json"
    if not rng_file.is_file():  # resumed on more ranks than saved: rank 0's generators
        rng_file = directory / "rng-0.json"
    set_rng_state(json.loads(rng_file.read_text()))
    state = json.loads((directory / STATE).read_text())
    state["checkpoint_dir"] = str(directory)
    return state

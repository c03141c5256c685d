"""Uptraining: recursive and MoR models initialised from a pretrained Llama-architecture stack
(docs/uptraining.md).

    src = load_pretrained("hf:/path/to/llama")          # or a mor-bench vanilla checkpoint
    info = init_from_pretrained(model, src, "stepwise")  # copies weights into `model`

Relaxed Recursive Transformers (Bae et al. 2024, arXiv 2410.20672) initialise the shared
layers of a recursive model from a pretrained stack of L layers; MoR (arXiv 2507.10524)
inherits the shared block and its Middle-Cycle layout. Here, for a target with f unique
first layers, a shared block of K layers applied N_r times and l unique last layers (the
layout `ModelConfig.schedule()` spells out, for every sharing strategy):

* unique first layers take pretrained layers 0..f-1, unique last layers L-l..L-1 (f = l = 0
  for cycle / sequence sharing; 1 each for Middle-Cycle / Middle-Sequence);
* the K shared layers take, from the M = L - f - l middle pretrained layers:
  - "stepwise": evenly spaced layers, shared layer j <- f + floor(j * M / K) (the first of
    each group of M / K consecutive layers);
  - "lower":    the lowest K middle layers, j <- f + j;
  - "average":  the mean of the layers it stands for in the unrolled stack: the unrolled
    middle position q (0 .. K*N_r - 1, in `schedule()` order) corresponds to pretrained layer
    f + floor(q * M / (K * N_r)), and shared layer j averages those of the positions that
    apply it (with M = K * N_r, the unrolled model's depth equals the pretrained one's and
    each position has its own pretrained layer).
* embeddings and the final norm are copied; MoR routers keep their fresh zero-mean init.

The gate. MoR adds g * f(H) to the residual stream H (f(H) includes H itself: mor/mixture.py),
so no gate value reproduces the pretrained update f(H) - H exactly. `gate_scale` picks the
value that makes the first recursion's output closest to the pretrained layers' in least
squares, g* = sum <f(H), f(H) - H> / sum ||f(H)||^2 over the shared block's tokens of a few
windows run through the pretrained stack, and sets `router_alpha` so that a router logit of
0 (what the fresh routers give) yields g*: alpha = g* / func(0) (sigmoid: 1/2; softmax over
N_r depths: 1/N_r).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from baselines.vanilla import from_hf_state_dict
from mor.config import ModelConfig
from mor.errors import ConfigError

METHODS = ("stepwise", "average", "lower")

# (our field, Hugging Face LlamaConfig field) that must agree between source and target
_SHAPE_FIELDS = (("d_model", "hidden_size"), ("n_heads", "num_attention_heads"),
                 ("n_kv_heads", "num_key_value_heads"), ("d_ff", "intermediate_size"),
                 ("vocab_size", "vocab_size"))


@dataclass
class Pretrained:
    """A pretrained Llama-architecture stack in mor-bench's parameter names."""

    source: str
    n_layers: int
    shapes: dict[str, int]
    """d_model, n_heads, n_kv_heads, d_ff, vocab_size (our names)."""
    sha256: str
    """Of the weight file(s), in file-name order."""
    state: dict[str, Tensor] | None = field(default=None, repr=False)
    """None until `load_weights`."""
    files: list[Path] = field(default_factory=list, repr=False)
    kind: str = "hf"
    """"hf" (a LlamaForCausalLM directory) or "mor-bench" (a vanilla checkpoint)."""
    tokenizer: dict[str, Any] | None = None
    """The mor-bench tokenizer spec to tokenize the uptraining data with."""
    config: ModelConfig | None = None
    """The source as a mor-bench vanilla config."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what}: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must hold a JSON object")
    return data


def _hf_dir(name_or_path: str) -> Path:
    """A local directory, or a Hub snapshot of the config, weights and tokenizer."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(f"init 'hf:{name_or_path}': no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*",
            "special_tokens_map.json"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ConfigError(f"init 'hf:{name_or_path}': cannot download it from the Hugging "
                          f"Face Hub ({type(e).__name__}); pass a local directory written "
                          "by save_pretrained instead") from None


def _weight_files(d: Path, what: str) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index, what).get("weight_map", {}).values()))
        files = [d / n for n in names]
    else:
        files = [d / "model.safetensors"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{what}: weight file {missing[0]} is missing (only safetensors "
                          "weights are read)")
    return files


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def describe_pretrained(init: str) -> Pretrained:
    """Read a source's configuration (no weights): "hf:NAME_OR_PATH" (a LlamaForCausalLM
    directory or Hub name) or the path of a mor-bench vanilla checkpoint."""
    if init.startswith("hf:"):
        d = _hf_dir(init[3:])
        what = f"init {init!r}"
        cfg = _read_json(d / "config.json", what)
        arch = cfg.get("architectures") or []
        if "LlamaForCausalLM" not in arch:
            raise ConfigError(f"{what}: architectures {arch} is not LlamaForCausalLM; only "
                              "Llama-architecture checkpoints can initialise mor-bench models")
        missing = [hf for _, hf in _SHAPE_FIELDS if not isinstance(cfg.get(hf), int)]
        if missing or not isinstance(cfg.get("num_hidden_layers"), int):
            raise ConfigError(f"{what}: config.json lacks {missing or ['num_hidden_layers']}")
        shapes = {ours: cfg[hf] for ours, hf in _SHAPE_FIELDS}
        if cfg.get("tie_word_embeddings") is False:
            raise ConfigError(f"{what}: tie_word_embeddings is false; mor-bench models tie "
                              "the input and output embeddings")
        try:
            vcfg = ModelConfig(family="vanilla", n_layers=cfg["num_hidden_layers"],
                               max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                               rope_theta=float(cfg.get("rope_theta", 10000.0)),
                               norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                               head_dim=cfg.get("head_dim"), **shapes)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{what}: config.json describes no mor-bench model ({e})"
                              ) from None
        files = _weight_files(d, what)
        return Pretrained(init, cfg["num_hidden_layers"], shapes, _sha256(files), files=files,
                          kind="hf", tokenizer={"kind": "hf", "name": str(d)}, config=vcfg)
    d = Path(init).expanduser()
    what = f"init {init!r}"
    if not d.is_dir():
        raise ConfigError(f"{what}: no such checkpoint directory (or write hf:NAME_OR_PATH "
                          "for a Hugging Face Llama checkpoint)")
    meta = _read_json(d / "config.json", what)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError, KeyError) as e:
        raise ConfigError(f"{what}: config.json is not a mor-bench checkpoint config ({e})"
                          ) from None
    if cfg.family != "vanilla":
        raise ConfigError(f"{what}: a {cfg.family} checkpoint; only vanilla checkpoints "
                          "initialise other models")
    files = _weight_files(d, what)
    shapes = {ours: getattr(cfg, ours) for ours, _ in _SHAPE_FIELDS}
    tok = (meta.get("extra") or {}).get("tokenizer")
    return Pretrained(init, cfg.n_layers, shapes, _sha256(files), files=files,
                      kind="mor-bench", tokenizer=tok, config=cfg)


def load_weights(src: Pretrained) -> Pretrained:
    """Fill `src.state` (mor-bench parameter names, fp32)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for f in src.files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"init {src.source!r}: cannot read {f} ({e}); is it truncated?"
                              ) from None
    if src.kind == "hf":
        if "lm_head.weight" not in state:  # tied: saved once
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        state = from_hf_state_dict(state)
    src.state = {k: v.float() for k, v in state.items()}
    return src


def check_compatible(cfg: ModelConfig, src: Pretrained, method: str | None) -> None:
    """Refuse, naming the field, a target the source cannot initialise (before compute)."""
    for name, value in src.shapes.items():
        mine = getattr(cfg, name)
        if mine != value:
            raise ConfigError(f"{name} = {mine} but the pretrained model {src.source!r} has "
                              f"{value}; set {name} = {value}")
    if cfg.family == "vanilla":
        if cfg.n_layers != src.n_layers:
            raise ConfigError(f"n_layers = {cfg.n_layers} but the pretrained model "
                              f"{src.source!r} has {src.n_layers}; set n_layers = "
                              f"{src.n_layers} (vanilla continues the pretrained model)")
        return
    if method not in METHODS:
        raise ConfigError(f"init_method must be one of {METHODS} for a {cfg.family} model, "
                          f"got {method!r}")
    f, k, last = cfg.num_unique_first, cfg.num_shared, cfg.num_unique_last
    if src.n_layers - f - last < k:
        raise ConfigError(f"the pretrained model {src.source!r} has {src.n_layers} layers, "
                          f"too few for {f} unique first + {k} shared + {last} unique last "
                          "layers; lower n_layers or use a deeper source")


def layer_sources(cfg: ModelConfig, n_pretrained: int, method: str) -> list[list[int]]:
    """For every unique layer of `cfg` (index into its `layers`), the pretrained layers whose
    mean initialises it (one layer except for "average")."""
    f, k, last = cfg.num_unique_first, cfg.num_shared, cfg.num_unique_last
    if cfg.family == "vanilla":
        return [[i] for i in range(cfg.n_layers)]
    m = n_pretrained - f - last
    out: list[list[int]] = [[i] for i in range(f)]
    if method == "stepwise":
        out += [[f + (j * m) // k] for j in range(k)]
    elif method == "lower":
        out += [[f + j] for j in range(k)]
    elif method == "average":
        middle = cfg.schedule()[f: len(cfg.schedule()) - last]
        n = len(middle)
        groups: dict[int, list[int]] = {u: [] for u in range(f, f + k)}
        for q, u in enumerate(middle):
            layer = f + (q * m) // n
            if layer not in groups[u]:
                groups[u].append(layer)
        out += [groups[u] for u in range(f, f + k)]
    else:
        raise ConfigError(f"init_method must be one of {METHODS}, got {method!r}")
    out += [[n_pretrained - last + i] for i in range(last)]
    return out


def gate_scale(src: Pretrained, cfg: ModelConfig, windows: Tensor) -> float:
    """g* (module docstring): the least-squares gate against the pretrained layers the gated
    computation replaces -- expert-choice: the first recursion (the shared block once);
    token-choice: every middle layer (its gate scales the whole recursion) -- from
    `windows` [B, T] run through the pretrained stack (weights loaded)."""
    from mor import build_model

    if src.state is None:
        load_weights(src)
    ref = build_model(src.config)
    ref.load_state_dict(src.state)
    ref.eval()
    lo = cfg.num_unique_first
    hi = lo + cfg.num_shared if cfg.router == "expert" else src.n_layers - cfg.num_unique_last
    states: list[Tensor] = []

    def first(_m, args):
        states.append(args[0].detach())

    def last(_m, _args, result):
        states.append((result[0] if isinstance(result, tuple) else result).detach())

    hooks = [ref.layers[lo].register_forward_pre_hook(first),
             ref.layers[hi - 1].register_forward_hook(last)]
    try:
        with torch.no_grad():
            ref(windows)
    finally:
        for h in hooks:
            h.remove()
    h_in, h_out = states[0].float(), states[-1].float()
    den = h_out.pow(2).sum().item()
    return (h_out * (h_out - h_in)).sum().item() / den if den else 0.0


def func_at_zero(cfg: ModelConfig) -> float:
    """The router's gate function at logit 0 (fresh routers): sigmoid 1/2, tanh 0, softmax
    over N_r depths 1/N_r."""
    func = cfg.router_func
    if func == "sigmoid":
        return 0.5
    if func == "softmax":
        return 1.0 / cfg.num_recursions
    return 0.0


def alpha_for_gate(cfg: ModelConfig, g: float) -> float | None:
    """router_alpha giving gate g at router logit 0, clipped to the config's (0, 10]; None
    when the function is 0 there (tanh: no alpha helps)."""
    at_zero = func_at_zero(cfg)
    if at_zero == 0.0:
        return None
    return float(min(10.0, max(1e-3, g / at_zero)))


def init_from_pretrained(model: torch.nn.Module, src: Pretrained, method: str | None
                         ) -> dict[str, Any]:
    """Copy `src` (weights loaded) into `model` per `layer_sources`; returns what was done
    (for the run record). Routers keep their init; `router_alpha` is a config field, so the
    gate scale is chosen before the model is built (`gate_scale`, `alpha_for_gate`)."""
    cfg: ModelConfig = model.cfg
    check_compatible(cfg, src, method)
    if src.state is None:
        load_weights(src)
    state = src.state
    sources = layer_sources(cfg, src.n_layers, method or "stepwise")
    target = model.state_dict()
    new: dict[str, Tensor] = {}
    for name in ("embed.weight", "norm.weight"):
        new[name] = state[name]
    for u, layers in enumerate(sources):
        prefix = f"layers.{u}."
        for name in target:
            if not name.startswith(prefix):
                continue
            suffix = name[len(prefix):]
            parts = [state[f"layers.{p}.{suffix}"] for p in layers]
            new[name] = torch.stack(parts).mean(0) if len(parts) > 1 else parts[0]
    for name, t in new.items():
        if target[name].shape != t.shape:
            raise ConfigError(f"parameter {name}: shape {tuple(t.shape)} in {src.source!r}, "
                              f"{tuple(target[name].shape)} in the model")
    with torch.no_grad():
        for name, t in new.items():
            target[name].copy_(t.to(target[name].dtype))
    fresh = sorted(n for n in target if n not in new)
    return {"source": src.source, "kind": src.kind, "sha256": src.sha256,
            "method": None if cfg.family == "vanilla" else method,
            "pretrained_layers": src.n_layers,
            "layer_sources": {str(u): ls for u, ls in enumerate(sources)},
            "fresh_parameters": fresh,
            "router_alpha": cfg.router_alpha if cfg.family == "mor" else None}

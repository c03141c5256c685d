"""Write a mor-bench checkpoint as a Hugging Face `transformers` model directory.

    info = export_hf(CHECKPOINT, OUT)        # OUT: config.json, model.safetensors, tokenizer
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
    AutoTokenizer.from_pretrained(OUT)

* vanilla: a plain `LlamaForCausalLM` directory (`baselines.vanilla` maps the weights 1:1);
  it loads without remote code and without mor-bench installed.
* recursive and MoR: `configuration_mor_bench.py` and `modeling_mor_bench.py` (the modules
  of `evals/hf/remote/`, copied) are written beside the weights and named in the config's
  `auto_map`; they import the installed mor-bench package, so loading needs
  `trust_remote_code=True` and mor-bench (same version) importable. Expert-choice MoR routes
  with the causal rule there (the export's config says so), token-choice is causal by
  construction. `generate` re-runs the whole prefix per token (no key/value cache).
* tokenizer: 'bytes' and 'bpe' specs become a `tokenizer.json` + `tokenizer_config.json`
  (`PreTrainedTokenizerFast`) encoding exactly as mor-bench did, EOS (`<|endoftext|>`) also
  as BOS and padding token (mor-bench starts generation from EOS, its document separator);
  an 'hf:NAME' spec is that tokenizer, saved. `generation_config.json` holds the same ids.

Bad input -- no checkpoint, an unreadable config, an OUT that is not empty (without
`force`), a tokenizer that cannot be expressed -- raises `ConfigError` / `DataError`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from evals.data.tokenizer import EOS_TOKEN
from mor.checkpoint import CONFIG, WEIGHTS
from mor.config import ModelConfig
from mor.errors import ConfigError, DataError

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
CONFIG_FILE, MODELING_FILE = "configuration_mor_bench.py", "modeling_mor_bench.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
GENERATION_FILE = "generation_config.json"
# Everything an export may write: what `force` clears (nothing else in OUT is touched).
EXPORT_FILES = (CONFIG, WEIGHTS, GENERATION_FILE, CONFIG_FILE, MODELING_FILE,
                *TOKENIZER_FILES)


def read_checkpoint(path: str | Path) -> tuple[Path, ModelConfig, dict[str, Any]]:
    """(directory, model config, extra metadata) of a mor-bench checkpoint; one clear error
    for a missing directory, missing files or an unreadable config."""
    path = Path(path)
    directory = path.parent if path.suffix == ".safetensors" else path
    if not directory.is_dir():
        raise ConfigError(f"checkpoint '{path}' does not exist (expected a run directory "
                          f"holding {WEIGHTS} and {CONFIG}, e.g. RUN_DIR/RUN_ID)")
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise ConfigError(f"'{directory}' is not a mor-bench checkpoint: {name} is missing")
    try:
        meta = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read '{directory / CONFIG}': {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ConfigError(f"'{directory / CONFIG}' is not a mor-bench checkpoint config "
                          "(no \"model\" table)")
    cfg = ModelConfig.from_dict(meta["model"])
    extra = meta.get("extra") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"'{directory / CONFIG}': \"extra\" must be a table")
    return directory, cfg, extra


def _load_weights(directory: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(directory / WEIGHTS), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"cannot read '{directory / WEIGHTS}': {exc}") from exc


def _check_weights(cfg: ModelConfig, state: dict[str, Any], directory: Path) -> None:
    """The weights must be exactly the model's (a mismatched config/weights pair would only
    show up at load time on the Hugging Face side)."""
    import torch

    from mor.registry import build_model

    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        expected = build_model(cfg).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
                if unexpected else f"wrong shape {wrong[:3]}")
        raise ConfigError(f"'{directory / WEIGHTS}' does not match its {CONFIG}: {what}")


def _prepare_out(out: Path, source: Path, force: bool) -> None:
    if out.resolve() == source.resolve():
        raise ConfigError(f"output '{out}' is the checkpoint itself; choose another directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"output directory '{out}' is not empty; choose a new one or "
                              "pass --force to overwrite an earlier export there")
        for name in EXPORT_FILES:  # only what an export writes; nothing else is deleted
            if (out / name).is_file():
                (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


# --- tokenizer ---------------------------------------------------------------------------------
def _byte_tokenizer_core():
    """A `tokenizers` tokenizer equal to mor-bench's `ByteTokenizer`: byte b -> id b, EOS 256
    (byte-level symbols without merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    vocab[EOS_TOKEN] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return core


def _eos_check(spec: dict[str, Any], eos_id: int, kind: str) -> None:
    recorded = spec.get("eos_id")
    if recorded is not None and int(recorded) != eos_id:
        raise DataError(f"tokenizer spec records eos_id={recorded} but the {kind} tokenizer's "
                        f"EOS is {eos_id}; the checkpoint metadata is inconsistent")


def build_tokenizer(spec: dict[str, Any], vocab_size: int, max_len: int
                    ) -> tuple[Any, dict[str, Any]]:
    """The Hugging Face tokenizer of `spec` (a checkpoint's `extra["tokenizer"]`) and
    {"kind", "eos_id", "class"}; `tok.save_pretrained(OUT)` writes it for `AutoTokenizer`."""
    from transformers import PreTrainedTokenizerFast

    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "hf" and isinstance(spec.get("name"), str):
        from transformers import AutoTokenizer

        name = spec["name"]
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"cannot load the checkpoint's tokenizer 'hf:{name}' to export it "
                            f"({first})") from exc
        if tok.eos_token_id is None:
            raise DataError(f"tokenizer 'hf:{name}' has no EOS token; cannot export it")
        _eos_check(spec, int(tok.eos_token_id), f"hf:{name}")
        return tok, {"kind": "hf", "eos_id": int(tok.eos_token_id), "class": type(tok).__name__}
    if kind == "bytes":
        core = _byte_tokenizer_core()
    elif kind == "bpe" and isinstance(spec.get("json"), str):
        from evals.data.tokenizer import BPETokenizer

        # mor-bench's own loader: validates the JSON and the EOS token (DataError, one line)
        core = BPETokenizer.from_json(spec["json"]).core
    else:
        raise DataError(f"cannot export tokenizer kind {kind!r} to Hugging Face (supported: "
                        "'bytes', 'bpe', 'hf'); pass --no-tokenizer to export the model alone")
    eos_id = int(core.token_to_id(EOS_TOKEN))
    _eos_check(spec, eos_id, str(kind))
    size = core.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise DataError(f"the {kind} tokenizer has {size} tokens, more than the model's "
                        f"vocab_size={vocab_size}")
    # Bytes: the text "<|endoftext|>" is 13 byte tokens to mor-bench, as here
    # (split_special_tokens); a BPE tokenizer matches it as EOS, in mor-bench as here.
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN,
                                  bos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                  model_max_length=max_len, clean_up_tokenization_spaces=False,
                                  split_special_tokens=kind == "bytes")
    return tok, {"kind": kind, "eos_id": eos_id, "class": type(tok).__name__}


# --- model -------------------------------------------------------------------------------------
def _write_llama(cfg: ModelConfig, state: dict[str, Any], out: Path,
                 ids: dict[str, int | None]) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from baselines.vanilla import hf_llama_config_kwargs, to_hf_state_dict

    hf_cfg = LlamaConfig(**hf_llama_config_kwargs(cfg), **ids,
                         architectures=["LlamaForCausalLM"], dtype="float32")
    hf_cfg.save_pretrained(str(out))
    weights = {k: v.contiguous() for k, v in to_hf_state_dict(state).items()
               if k != "lm_head.weight"}  # tied to the embedding: Hugging Face re-ties it
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})


def _write_remote(cfg: ModelConfig, state: dict[str, Any], out: Path,
                  ids: dict[str, int | None], source: dict[str, Any]) -> str | None:
    from safetensors.torch import save_file

    routing = None
    mor_config = cfg.to_dict()
    if cfg.family == "mor":
        routing = "token" if cfg.router == "token" else "causal"
        if cfg.router == "expert":
            mor_config["eval_routing"] = "causal"
    meta = {
        "model_type": "mor_bench",
        "architectures": ["MorBenchForCausalLM"],
        "auto_map": {"AutoConfig": f"{CONFIG_FILE[:-3]}.MorBenchConfig",
                     "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.MorBenchForCausalLM"},
        "mor_config": mor_config,
        "routing": routing,
        "mor_bench_source": source,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": True,
        "use_cache": False, "dtype": "float32", **ids,
    }
    (out / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for name in (CONFIG_FILE, MODELING_FILE):
        shutil.copyfile(REMOTE_DIR / name, out / name)
    save_file({f"mor.{k}": v.contiguous() for k, v in state.items()}, str(out / WEIGHTS),
              metadata={"format": "pt"})
    return routing


def _write_generation_config(out: Path, ids: dict[str, int | None], use_cache: bool) -> None:
    gen = {k: v for k, v in ids.items() if v is not None}
    gen.update(use_cache=use_cache, do_sample=False)
    (out / GENERATION_FILE).write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def export_hf(checkpoint: str | Path, out: str | Path, *, force: bool = False,
              tokenizer: bool = True) -> dict[str, Any]:
    """Export `checkpoint` to the Hugging Face directory `out` (module docstring); returns what
    was written: {"checkpoint", "out", "family", "architecture", "remote_code", "routing",
    "generation", "tokenizer", "eos_id", "files"}. `force`: write into a non-empty `out`,
    replacing the files of an earlier export. `tokenizer=False`: the model only."""
    directory, cfg, extra = read_checkpoint(checkpoint)
    out = Path(out)
    spec = extra.get("tokenizer")
    if tokenizer and spec is None:
        raise ConfigError(f"checkpoint '{directory}' records no tokenizer; pass --no-tokenizer "
                          "to export the model alone")
    state = _load_weights(directory)
    _check_weights(cfg, state, directory)
    tok, tok_info = (build_tokenizer(spec, cfg.vocab_size, cfg.max_seq_len) if tokenizer
                     else (None, None))
    _prepare_out(out, directory, force)  # everything is checked: now write
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    if tok is not None:
        tok.save_pretrained(str(out))
    eos = tok_info["eos_id"] if tok_info else (
        int(spec["eos_id"]) if isinstance(spec, dict) and spec.get("eos_id") is not None
        else None)
    ids = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    source = {"checkpoint": str(directory), "family": cfg.family,
              "eval_routing": cfg.eval_routing, "mor_bench_version": _version()}
    if cfg.family == "vanilla":
        _write_llama(cfg, state, out, ids)
        arch, remote, routing = "LlamaForCausalLM", False, None
    else:
        routing = _write_remote(cfg, state, out, ids, source)
        arch, remote = "MorBenchForCausalLM", True
    _write_generation_config(out, ids, use_cache=not remote)
    return {
        "checkpoint": str(directory), "out": str(out), "family": cfg.family,
        "architecture": arch, "remote_code": remote, "routing": routing,
        "source_eval_routing": cfg.eval_routing,
        "generation": ("Llama key/value cache" if not remote else
                       "no cache: every step re-runs the whole prefix"),
        "tokenizer": tok_info["kind"] if tok_info else None,
        "tokenizer_class": tok_info["class"] if tok_info else None,
        "eos_id": eos,
        "files": sorted(p.name for p in out.iterdir() if p.is_file()  # written now
                        and before.get(p.name) != p.stat().st_mtime_ns),
        "mor_bench_version": _version(),
    }


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mor-bench")
    except PackageNotFoundError:
        return None


__all__ = ["EXPORT_FILES", "build_tokenizer", "export_hf", "read_checkpoint"]

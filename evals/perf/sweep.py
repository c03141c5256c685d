"""The efficiency knob of a trained MoR checkpoint, swept: accuracy against throughput.

    mor-bench sweep runs/infer-cpu-latest/mor-3-1.2e12F-s0 --knob threshold --calibrate \
        --values 1.25,1.5,2,2.5,3

Each knob value is one evaluation-time setting of the SAME weights (`mor.routing.RoutingKnob`,
docs/routing.md "The efficiency knob"); for each point this module measures, on the suite's
held-out windows and the decode engine:

  val_nll            next-token NLL on the second half of the held-out windows (the first half
                     calibrates), under the routing the knob drives (threshold: the causal
                     rule, capacity: top-k, depth-bias: token-choice)
  fewshot            lm-eval scores (default the synthetic few-shot task)
  val_mean_depth     mean recursion depth of the held-out tokens (and per-step fractions)
  decode_mean_depth  mean depth of the tokens the engine generated
  kv_bytes_per_token keys/values stored per generated token (from the decode depths)
  tokens_per_s       generation throughput of the paper's workload (samples from no prompt,
                     lengths ~ Normal(gen_mean, gen_std)), every point and reference model
                     timed in interleaved rounds in one process (A B C A B C), medians

Reference models (the suite's vanilla and recursive runs) are measured the same way without a
knob. The result is one JSON document (`sweep.json`) that reports read; nothing here prints.

What each knob's values mean (a value is a number or a per-step list "a:b:c"):
  threshold              the causal rule's threshold on every routed step's logit (a list:
                         per step); larger = shallower; +inf / -inf = minimum / full depth
  threshold --calibrate  a target mean depth (a list: per-step target fractions); thresholds
                         are picked on the calibration windows (`mor.calibrate`); no values =
                         one point at the trained capacities
  capacity               a target mean depth (a list: per-step capacities) for top-k
                         evaluation; decoding uses thresholds calibrated to the same fractions
  depth-bias             b adds b * i to the score of depth i+1 when choosing a depth (a list:
                         per depth); larger = deeper
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evals.suite.spec import SweepSettings
from mor import flops
from mor.calibrate import calibrate_thresholds, fractions_for_depth
from mor.errors import ConfigError
from mor.routing import RoutingKnob, use_knob, use_routing

SWEEP_KIND = "mor-bench.sweep"
SWEEP_VERSION = 1
Log = Callable[[str], None]


@dataclasses.dataclass
class SweepModel:
    """A loaded checkpoint with what the sweep needs to evaluate it."""

    name: str
    model: Any
    tokenizer: Any
    bos_id: int
    source: str


def parse_value(raw: str | float | int) -> float | tuple[float, ...]:
    """A knob value: a number ("0.5", "inf", "-inf") or a per-step list "a:b:c"."""
    text = str(raw).strip()
    try:
        if ":" in text:
            return tuple(float(x) for x in text.split(":"))
        return float(text)
    except ValueError:
        raise ConfigError(f"knob value {text!r}: a number (inf and -inf allowed) or a per-step "
                          "list like 1:0.5:0.25") from None


def _per_step(value: float | tuple[float, ...], nr: int, what: str) -> tuple[float, ...]:
    if isinstance(value, tuple):
        if len(value) != nr:
            raise ConfigError(f"{what}: a per-step list needs N_r = {nr} values, got "
                              f"{len(value)}: {':'.join(f'{v:g}' for v in value)}")
        return value
    return (value,) * nr


def _fractions(cfg, value: float | tuple[float, ...]) -> tuple[float, ...]:
    """Target per-step fractions: a mean depth (number) or the fractions themselves."""
    if isinstance(value, tuple):
        return _per_step(value, cfg.num_recursions, "target fractions")
    if not math.isfinite(value):
        raise ConfigError(f"target depth must be finite, got {value}")
    return fractions_for_depth(cfg, value)


def knob_for(model, knob: str, raw: str, *, calibrate: bool, cal_windows: torch.Tensor,
             batch_size: int = 16) -> tuple[RoutingKnob, str, dict[str, Any]]:
    """(the RoutingKnob of one sweep point, the routing mode its NLL is measured under,
    what was asked: target fractions / depth)."""
    cfg = model.cfg
    if cfg.family != "mor":
        raise ConfigError(f"the knob sweep needs a MoR checkpoint, got a {cfg.family} model")
    router = "token" if knob == "depth-bias" else "expert"
    if cfg.router != router:
        raise ConfigError(f"knob {knob!r} applies to {router}-choice MoR; this checkpoint is "
                          f"{cfg.router}-choice (use "
                          f"{'--knob depth-bias' if cfg.router == 'token' else '--knob threshold'}"
                          ")")
    nr = cfg.num_recursions
    value = parse_value(raw) if raw != "" else None
    asked: dict[str, Any] = {}
    if knob == "threshold" and not calibrate:
        k = RoutingKnob(thresholds=_per_step(value, nr, "thresholds"))
        mode = "causal"
    elif knob == "threshold":
        targets = cfg.step_capacities if value is None else _fractions(cfg, value)
        asked = {"target_fractions": list(targets), "target_depth": sum(targets)}
        k = calibrate_thresholds(model, cal_windows, targets, batch_size=batch_size)
        mode = "causal"
    elif knob == "capacity":
        caps = _fractions(cfg, value)
        if any(c <= 0 for c in caps):
            raise ConfigError(f"capacity value {raw!r} leaves a step with capacity 0 "
                              f"({list(caps)}); ask for a deeper target")
        asked = {"target_fractions": list(caps), "target_depth": sum(caps)}
        thr = calibrate_thresholds(model, cal_windows, caps, batch_size=batch_size)
        k = RoutingKnob(thresholds=thr.thresholds, capacities=tuple(caps))
        mode = "topk"
    else:  # depth-bias
        bias = (value if isinstance(value, tuple)
                else tuple(value * i for i in range(nr)))
        k = RoutingKnob(depth_bias=_per_step(bias, nr, "depth bias"))
        mode = "token"
    return k.validate(cfg), mode, asked


# --- measurements ----------------------------------------------------------------------------
@torch.no_grad()
def _val(model, windows: torch.Tensor, mode: str | None, batch_size: int) -> dict[str, Any]:
    """NLL and depth statistics of `windows` [N, T+1] under routing `mode`."""
    from evals.training.loop import evaluate_nll

    device = next(model.parameters()).device
    with use_routing(model, mode if mode in ("topk", "causal") else None):
        out = evaluate_nll(model, windows, batch_size=batch_size, device=device)
        res: dict[str, Any] = {"val_nll": out["val_nll"], "val_tokens": out["val_tokens"]}
        if model.cfg.family != "mor":
            return res
        model.eval()
        hist = torch.zeros(model.cfg.num_recursions + 1, dtype=torch.long)
        for i in range(0, windows.shape[0], batch_size):
            d = model(windows[i: i + batch_size, :-1].to(device)).depths
            hist += torch.bincount(d.flatten().cpu(), minlength=hist.numel())[: hist.numel()]
    n = int(hist.sum())
    res["val_mean_depth"] = float((hist * torch.arange(hist.numel())).sum()) / n
    res["val_fractions"] = [float(hist[r:].sum()) / n for r in range(1, hist.numel())]
    return res


def _fewshot(m: SweepModel, mode: str | None, settings: SweepSettings, paths, batch_size: int
             ) -> dict[str, Any]:
    from evals.lmeval.adapter import MorBenchLM, run_tasks

    lm = MorBenchLM(model=m.model, tokenizer=m.tokenizer,
                    routing=mode if mode in ("topk", "causal") else None,
                    batch_size=batch_size)
    res = run_tasks(lm, list(settings.tasks), include_paths=paths,
                    num_fewshot=settings.num_fewshot, limit=settings.limit)
    return res["tasks"]


def kv_bytes_per_token(cfg, fractions: list[float] | None, elem: int) -> float:
    """Keys/values stored per token: every layer application that stores one (MoR: the
    routed steps' fractions of tokens; KV sharing: the first step's only)."""
    steps = fractions if cfg.family == "mor" and fractions is not None else None
    return float(flops.kv_cache_bytes(cfg, 1, 1, elem, steps))


def draw_workload(settings: SweepSettings, cap: int) -> list[int]:
    g = torch.Generator().manual_seed(settings.seed)
    raw = torch.normal(settings.gen_mean, settings.gen_std, (settings.samples,), generator=g)
    return [int(min(cap, max(1, round(x)))) for x in raw.tolist()]


def _decode_rounds(entries: list[tuple[str, Any, RoutingKnob | None, int]],
                   lengths: list[int], settings: SweepSettings, log: Log | None
                   ) -> dict[str, dict[str, Any]]:
    """Generate the workload with every (key, model, knob, bos) entry, interleaved rounds;
    returns per key: tokens/s (median), times, decode mean depth, per-step fractions."""
    from mor.decode import Engine, Request

    max_len = max(lengths) + 1
    engines, requests = {}, {}
    for key, model, knob, bos in entries:
        with use_knob(model, knob):
            # kv "full": a knob that deepens the model past its trained capacities must not
            # be capped by a cache sized for them; the stored bytes are reported separately.
            engines[key] = Engine(model, max_batch=min(settings.batch_size, len(lengths)),
                                  max_len=max_len, kv_capacity="full",
                                  temperature=settings.temperature)
        requests[key] = [Request(prompt=[bos], max_new_tokens=n, id=i,
                                 seed=settings.seed * 1_000_003 + i)
                         for i, n in enumerate(lengths)]
    times: dict[str, list[float]] = {k: [] for k, *_ in entries}
    depth: dict[str, list[int]] = {}
    warm = max(1, len(lengths) // 8)
    for key, model, knob, _ in entries:
        with use_knob(model, knob):
            engines[key].generate(requests[key][:warm])
    for rep in range(settings.repeats):
        for key, model, knob, _ in entries:
            with use_knob(model, knob):
                t0 = time.perf_counter()
                outs = engines[key].generate(requests[key])
                dt = time.perf_counter() - t0
            times[key].append(dt)
            depth[key] = [d for o in outs for d in o.depths]
            if log:
                log(f"  round {rep + 1}/{settings.repeats} {key}: "
                    f"{sum(lengths) / dt:,.0f} tokens/s")
    out = {}
    for key, model, _, _ in entries:
        d = depth[key]
        med = statistics.median(times[key])
        row: dict[str, Any] = {"tokens_per_s": sum(lengths) / med, "time_s": med,
                               "times_s": times[key]}
        if d:
            nr = model.cfg.num_recursions
            row["decode_mean_depth"] = sum(d) / len(d)
            row["decode_fractions"] = [sum(x >= r for x in d) / len(d) for r in range(1, nr + 1)]
        out[key] = row
    return out


def run_sweep(target: SweepModel, references: list[SweepModel], windows: torch.Tensor,
              settings: SweepSettings, *, cache_dir: Path | None = None,
              log: Log | None = None) -> dict[str, Any]:
    """Sweep `settings.knob` over `settings.values` on `target`, with `references` measured
    alike; `windows` [N, T+1] are held-out token windows (first half calibrates, second
    half measures). Returns the sweep document (see the module docstring)."""
    from evals.training.device import hardware_info

    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.val_windows is not None:
        windows = windows[: settings.val_windows]
    if windows.shape[0] < 2:
        raise ConfigError(f"the sweep needs at least 2 held-out windows (half calibrate, half "
                          f"measure), got {windows.shape[0]}")
    for m in (target, *references):
        if int(windows.max()) >= m.model.cfg.vocab_size or int(windows.min()) < 0:
            raise ConfigError(f"held-out windows hold token ids in [{int(windows.min())}, "
                              f"{int(windows.max())}], outside model {m.name!r}'s vocabulary "
                              f"of {m.model.cfg.vocab_size}: were they made with its "
                              "tokenizer?")
    half = windows.shape[0] // 2
    cal, held = windows[:half, :-1], windows[half:]
    val_bs = 16
    paths = None
    if settings.tasks:
        from evals.data.cache import DEFAULT_CACHE
        from evals.lmeval.tasks import task_include_paths, use_offline_if_local

        cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        paths = task_include_paths(list(settings.tasks), cache_dir=cache,
                                   synthetic_dir=cache / "fewshot")
        use_offline_if_local(list(settings.tasks), paths)
    target.model.eval()
    for r in references:
        r.model.eval()
    values = settings.values or ("",)
    points: list[dict[str, Any]] = []
    for raw in values:
        knob, mode, asked = knob_for(target.model, settings.knob, raw,
                                     calibrate=settings.calibrate, cal_windows=cal,
                                     batch_size=val_bs)
        with use_knob(target.model, knob):
            point = {"value": raw if raw != "" else "trained", "knob_name": settings.knob,
                     "knob": knob.to_dict(), "routing": mode, **asked,
                     **_val(target.model, held, mode, val_bs)}
            if settings.tasks:
                point["fewshot"] = _fewshot(target, mode, settings, paths, val_bs)
        points.append(point)
        if log:
            log(f"  {settings.knob} {point['value']}: val NLL {point['val_nll']:.4f}, depth "
                f"{point['val_mean_depth']:.2f}")
    refs = []
    for r in references:
        row = {"model": r.name, "family": r.model.cfg.family, "source": r.source,
               **_val(r.model, held, None, val_bs)}
        if settings.tasks:
            row["fewshot"] = _fewshot(r, None, settings, paths, val_bs)
        refs.append(row)
    cap = min(m.model.cfg.max_seq_len for m in [target, *references]) - 1
    lengths = draw_workload(settings, cap)
    entries = [(f"point {i}", target.model, RoutingKnob.from_dict(p["knob"]), target.bos_id)
               for i, p in enumerate(points)]
    entries += [(f"ref {r.name}", r.model, None, r.bos_id) for r in references]
    if log:
        log(f"  decoding {len(lengths)} samples x ~{settings.gen_mean:g} tokens, batch "
            f"{settings.batch_size}, {settings.repeats} interleaved round(s)")
    speed = _decode_rounds(entries, lengths, settings, log)
    elem = next(target.model.parameters()).element_size()
    for i, p in enumerate(points):
        p.update(speed[f"point {i}"])
        p["kv_bytes_per_token"] = kv_bytes_per_token(target.model.cfg,
                                                     p.get("decode_fractions"), elem)
    for r, row in zip(references, refs):
        row.update(speed[f"ref {r.name}"])
        row["kv_bytes_per_token"] = kv_bytes_per_token(r.model.cfg, None, elem)
    cfg = target.model.cfg
    return {"kind": SWEEP_KIND, "version": SWEEP_VERSION, "model": target.name,
            "source": target.source, "family": cfg.family, "router": cfg.router,
            "kv": cfg.kv, "num_recursions": cfg.num_recursions,
            "trained_capacities": list(cfg.step_capacities), "knob": settings.knob,
            "calibrate": settings.calibrate, "settings": dataclasses.asdict(settings),
            "calibration_windows": int(cal.shape[0]), "measure_windows": int(held.shape[0]),
            "workload_tokens": sum(lengths), "points": points, "references": refs,
            "hardware": hardware_info(), "torch_threads": torch.get_num_threads()}


# --- loading --------------------------------------------------------------------------------
def load_sweep_model(path: str | Path, name: str | None = None) -> SweepModel:
    from evals.data.tokenizer import tokenizer_from_spec
    from mor.checkpoint import load_checkpoint, read_checkpoint_meta

    directory, meta = read_checkpoint_meta(path)
    spec = (meta.get("extra") or {}).get("tokenizer")
    if not spec:
        raise ConfigError(f"checkpoint '{directory}' records no tokenizer; the sweep needs it "
                          "for few-shot scoring and the decode start token")
    tok = tokenizer_from_spec(spec)
    model = load_checkpoint(directory)
    return SweepModel(name or Path(directory).name, model, tok, int(tok.eos_id),
                      str(directory))


def suite_references(checkpoint: str | Path) -> list[Path]:
    """The vanilla and recursive runs beside a checkpoint in its suite run directory (same
    seed first), successful ones with weights; [] outside a suite run."""
    import json

    ckpt = Path(checkpoint).resolve()
    run_dir = ckpt.parent
    if not (run_dir / "plan.json").is_file():
        return []
    own = run_dir / ckpt.name / "record.json"
    seed = json.loads(own.read_text()).get("seed") if own.is_file() else None
    found: dict[str, tuple[int, Path]] = {}
    for rec_file in sorted(run_dir.glob("*/record.json")):
        rec = json.loads(rec_file.read_text())
        fam = rec.get("family")
        if (fam in ("vanilla", "recursive") and rec.get("status") == "ok"
                and (rec_file.parent / "model.safetensors").is_file()):
            rank = 0 if rec.get("seed") == seed else 1
            key = rec.get("model_name", rec_file.parent.name)
            if key not in found or rank < found[key][0]:
                found[key] = (rank, rec_file.parent)
    return [p for _, p in sorted(found.values(), key=lambda t: str(t[1]))]


def held_out_windows(checkpoint: str | Path, windows: str | Path | None = None
                     ) -> torch.Tensor:
    """Token windows [N, T+1]: `windows` (a .npy file) or the suite run's
    RUN_DIR/data/val.npy beside the checkpoint."""
    import numpy as np

    if windows is None:
        cand = Path(checkpoint).resolve().parent / "data" / "val.npy"
        if not cand.is_file():
            raise ConfigError(f"no held-out windows for '{checkpoint}': it is not inside a "
                              "suite run directory (RUN_DIR/data/val.npy); pass --windows "
                              "FILE.npy (token ids, shape [N, T+1])")
        windows = cand
    p = Path(windows)
    if not p.is_file():
        raise ConfigError(f"--windows {p}: no such file")
    try:
        arr = np.load(p)
    except ValueError as e:
        raise ConfigError(f"--windows {p}: not a .npy array of token ids ({e})") from None
    if arr.ndim != 2 or arr.shape[1] < 2 or arr.dtype.kind not in "iu":
        raise ConfigError(f"--windows {p}: needs integer token ids of shape [N, T+1], got "
                          f"{arr.dtype} {list(arr.shape)}")
    return torch.from_numpy(arr.astype(np.int64))

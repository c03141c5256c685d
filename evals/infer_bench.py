"""Inference-throughput benchmark: the paper's generation workload, scaled by settings.

    mor-bench bench-infer runs/smoke-latest            # every checkpoint of a suite run
    mor-bench bench-infer CKPT_A CKPT_B --batch-size max --json

The workload (MOR_SPEC section 6): `samples` sequences generated from no prompt (each starts
from the tokenizer's EOS id, the document separator the models were trained with), their
lengths drawn from Normal(gen_mean, gen_std) (paper: 1000 samples, mean 256), sampled at
`temperature` from each request's own random stream. Vanilla and recursive models decode
with continuous sequence-wise batching, MoR with continuous depth-wise batching
(`mor.decode`); `scheduler = "both"` also times MoR sequence-wise.

Batch: a fixed `batch_size`, or "max": the largest batch whose parameter bytes plus
KV-cache bytes fit `memory_budget_mb` -- by default the memory the reference (vanilla)
model needs at batch `reference_batch` (the paper's fixed batch 32), so every model gets the
same memory and MoR's smaller parameters and KV cache turn into a larger batch.

Timing: one untimed warm-up per model, then `repeats` rounds in which every model decodes
the SAME requests, interleaved (A B C A B C ...) so machine noise hits all alike; medians.
Headline: tokens/s relative to the vanilla model of the same unrolled depth (same n_layers
and d_model) in the same process.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mor import flops
from mor.errors import ConfigError

BATCH_MODES = ("max",)
SCHEDULER_CHOICES = ("auto", "sequence", "depth", "both")


@dataclass(frozen=True)
class InferSettings:
    """The benchmark's settings; a suite's [infer] table holds any of these fields."""

    samples: int = 64
    """Sequences generated per model and round (paper: 1000)."""
    gen_mean: float = 128.0
    """Mean generation length in tokens (paper: 256)."""
    gen_std: float = 32.0
    """Standard deviation of the generation length; lengths are clipped to [1, max_len - 1]."""
    max_len: int | None = None
    """Cache length per sequence (default: the longest drawn length + 1, at most each
    model's max_seq_len)."""
    batch_size: int | str = 32
    """Sequence slots decoded together: an integer, or "max" (see `memory_budget_mb`)."""
    memory_budget_mb: float | None = None
    """For batch_size = "max": parameter + KV-cache bytes allowed per model (MiB). Default:
    what the reference model needs at `reference_batch`."""
    reference_batch: int = 32
    """The reference (vanilla) model's batch that defines the default memory budget."""
    repeats: int = 3
    """Timed rounds per model (interleaved); medians are reported."""
    seed: int = 0
    """Seeds the generation lengths and every request's sampling stream."""
    temperature: float = 1.0
    """0 = greedy."""
    kv_capacity: str = "routed"
    """MoR cache per recursion step: "routed" (k_r = c_r * max_len tokens, the paper's
    memory) or "full" (every step can hold every token)."""
    scheduler: str = "auto"
    """MoR: "auto"/"depth" (depth-wise batching), "sequence", or "both"."""
    threads: int | None = None
    """torch threads (None: torch's default)."""
    device: str = "cpu"
    """"cpu", "cuda" or "auto" (CUDA when available). Models decode in their stored dtype."""

    def __post_init__(self) -> None:
        def fail(field: str, msg: str) -> None:
            raise ConfigError(f"infer setting '{field}': {msg}")

        if not isinstance(self.samples, int) or self.samples < 1:
            fail("samples", f"must be a positive integer, got {self.samples!r}")
        if not self.gen_mean >= 1:
            fail("gen_mean", f"must be >= 1, got {self.gen_mean!r}")
        if not self.gen_std >= 0:
            fail("gen_std", f"must be >= 0, got {self.gen_std!r}")
        if isinstance(self.batch_size, str):
            if self.batch_size not in BATCH_MODES:
                fail("batch_size", f"an integer >= 1 or \"max\", got {self.batch_size!r}")
        elif not isinstance(self.batch_size, int) or self.batch_size < 1:
            fail("batch_size", f"an integer >= 1 or \"max\", got {self.batch_size!r}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            fail("memory_budget_mb", f"must be > 0, got {self.memory_budget_mb!r}")
        if self.reference_batch < 1:
            fail("reference_batch", f"must be >= 1, got {self.reference_batch!r}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            fail("repeats", f"must be a positive integer, got {self.repeats!r}")
        if self.temperature < 0:
            fail("temperature", f"must be >= 0, got {self.temperature!r}")
        if self.kv_capacity not in ("routed", "full"):
            fail("kv_capacity", f"\"routed\" or \"full\", got {self.kv_capacity!r}")
        if self.scheduler not in SCHEDULER_CHOICES:
            fail("scheduler", f"one of {SCHEDULER_CHOICES}, got {self.scheduler!r}")
        if self.max_len is not None and self.max_len < 2:
            fail("max_len", f"must be >= 2, got {self.max_len!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            fail("device", f"\"cpu\", \"cuda\" or \"auto\", got {self.device!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> InferSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}unknown infer setting(s) {unknown}; known: "
                              f"{', '.join(sorted(known))}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None


@dataclass
class BenchModel:
    name: str
    model: Any
    bos_id: int
    source: str


def load_models(paths: list[str | Path]) -> list[BenchModel]:
    """Checkpoints (directories or .safetensors), or suite run directories (their ok runs)."""
    import json

    from mor.checkpoint import load_checkpoint, read_checkpoint_meta

    ckpts: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if (p / "plan.json").is_file():  # a suite run directory
            found = []
            for rec_file in sorted(p.glob("*/record.json")):
                rec = json.loads(rec_file.read_text())
                if rec.get("status") == "ok" and (rec_file.parent / "config.json").is_file():
                    found.append((rec.get("run_id", rec_file.parent.name), rec_file.parent))
            if not found:
                raise ConfigError(f"suite run directory '{p}' holds no successful run with a "
                                  "checkpoint")
            ckpts += found
        else:
            directory, _ = read_checkpoint_meta(p)  # raises a clear error if not one
            ckpts.append((directory.name, directory))
    names = [n for n, _ in ckpts]
    if len(set(names)) != len(names):  # same run ids from two suite runs
        ckpts = [(f"{d.parent.name}/{n}", d) for n, d in ckpts]
    out = []
    for name, directory in ckpts:
        _, meta = read_checkpoint_meta(directory)
        tok = (meta.get("extra") or {}).get("tokenizer") or {}
        model = load_checkpoint(directory)
        bos = tok.get("eos_id")
        if bos is None:
            from evals.tokenizer import tokenizer_from_spec

            bos = tokenizer_from_spec(tok).eos_id if tok else model.cfg.vocab_size - 1
        out.append(BenchModel(name, model, int(bos), str(directory)))
    return out


def draw_lengths(settings: InferSettings, cap: int) -> list[int]:
    """Generation lengths ~ Normal(mean, std), rounded, clipped to [1, cap]."""
    g = torch.Generator().manual_seed(settings.seed)
    raw = torch.normal(settings.gen_mean, settings.gen_std, (settings.samples,), generator=g)
    return [int(min(cap, max(1, round(x)))) for x in raw.tolist()]


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _kv_bytes_per_seq(cfg, max_len: int, kv_capacity: str, elem: int) -> int:
    steps = ([max_len] * cfg.num_recursions
             if cfg.family == "mor" and kv_capacity == "full" else None)
    return flops.kv_cache_bytes(cfg, max_len, 1, elem, steps)


def memory_plan(models: list[BenchModel], settings: InferSettings, max_len: int
                ) -> tuple[list[int], float | None]:
    """Batch per model and the memory budget (bytes; None for a fixed batch)."""
    if settings.batch_size != "max":
        return [int(settings.batch_size)] * len(models), None
    elem = 4

    def need(m: BenchModel, batch: int) -> int:
        return (_param_bytes(m.model)
                + batch * _kv_bytes_per_seq(m.model.cfg, max_len, settings.kv_capacity, elem))

    if settings.memory_budget_mb is not None:
        budget = settings.memory_budget_mb * 2**20
    else:
        ref = next((m for m in models if m.model.cfg.family == "vanilla"), models[0])
        budget = need(ref, settings.reference_batch)
    batches = []
    for m in models:
        per_seq = _kv_bytes_per_seq(m.model.cfg, max_len, settings.kv_capacity, elem)
        b = math.floor((budget - _param_bytes(m.model)) / per_seq)
        if b < 1:
            raise ConfigError(f"memory budget of {budget / 2**20:.1f} MiB does not hold model "
                              f"'{m.name}' ({_param_bytes(m.model) / 2**20:.1f} MiB of "
                              f"parameters) and one sequence's KV cache; raise "
                              "memory_budget_mb")
        batches.append(b)
    return batches, budget


def _reference_of(i: int, models: list[BenchModel]) -> int | None:
    """The vanilla model with the same unrolled depth and width as model i."""
    cfg = models[i].model.cfg
    for j, m in enumerate(models):
        c = m.model.cfg
        if c.family == "vanilla" and c.n_layers == cfg.n_layers and c.d_model == cfg.d_model:
            return j
    return None


def bench_models(models: list[BenchModel], settings: InferSettings, *, log=None,
                 profile: bool = False) -> dict[str, Any]:
    """Decode the workload with every model, interleaved; returns {"settings", "rows",
    "budget_bytes", "max_len", "lengths", ...}. `profile`: also time each engine stage."""
    from mor.decode import Engine, Request

    if not models:
        raise ConfigError("bench-infer needs at least one checkpoint")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    from evals.train import resolve_device

    device = resolve_device(settings.device)
    for m in models:
        m.model.to(device)
    cap = min(m.model.cfg.max_seq_len for m in models) - 1
    if settings.max_len is not None:
        cap = min(cap, settings.max_len - 1)
    lengths = draw_lengths(settings, cap)
    max_len = max(lengths) + 1
    batches, budget = memory_plan(models, settings, max_len)
    runs = []  # (model index, scheduler)
    for i, m in enumerate(models):
        if m.model.cfg.family != "mor" or settings.scheduler in ("sequence",):
            runs.append((i, "sequence"))
        elif settings.scheduler == "both":
            runs += [(i, "depth"), (i, "sequence")]
        else:
            runs.append((i, "depth"))
    engines = {}
    for i, _ in runs:
        m = models[i]
        if i not in engines:
            engines[i] = Engine(m.model, max_batch=min(batches[i], settings.samples),
                                max_len=max_len, kv_capacity=settings.kv_capacity,
                                temperature=settings.temperature)
    requests = {i: [Request(prompt=[m.bos_id], max_new_tokens=n, id=k,
                            seed=settings.seed * 1_000_003 + k)
                    for k, n in enumerate(lengths)] for i, m in enumerate(models)}
    warm = max(1, settings.samples // 8)
    for i, sched in runs:  # untimed warm-up
        engines[i].generate(requests[i][:warm], sched)
    times: dict[tuple[int, str], list[float]] = {r: [] for r in runs}
    stats: dict[tuple[int, str], dict] = {}
    stage: dict[tuple[int, str], dict] = {}
    for rep in range(settings.repeats):
        for i, sched in runs:
            eng = engines[i]
            eng.profile = profile
            t0 = time.perf_counter()
            outs = eng.generate(requests[i], sched)
            dt = time.perf_counter() - t0
            times[(i, sched)].append(dt)
            stats[(i, sched)] = dict(eng.stats)
            if profile:
                stage[(i, sched)] = dict(eng.stage_times)
            n_tok = sum(len(o.tokens) for o in outs)
            if n_tok != sum(lengths):
                raise RuntimeError(f"{models[i].name}: generated {n_tok} tokens, the workload "
                                   f"asked for {sum(lengths)}")
            if log:
                log(f"  round {rep + 1}/{settings.repeats} {models[i].name} ({sched}): "
                    f"{n_tok / dt:,.0f} tokens/s")
    total = sum(lengths)
    rows = []
    for i, sched in runs:
        m, eng = models[i], engines[i]
        cfg, st = m.model.cfg, stats[(i, sched)]
        med = statistics.median(times[(i, sched)])
        row = {
            "model": m.name, "family": cfg.family, "layers": cfg.layer_plan,
            "N_r": cfg.num_recursions if cfg.family != "vanilla" else None,
            "router": cfg.router if cfg.family == "mor" else None,
            "kv": cfg.kv if cfg.family == "mor" else None,
            "scheduler": sched, "batch_size": eng.max_batch,
            "tokens": total, "time_s": med, "times_s": times[(i, sched)],
            "tokens_per_s": total / med, "ms_per_token": 1000 * med / total,
            "ms_per_iteration": 1000 * med / max(1, st["iterations"]),
            "iterations": st["iterations"],
            "kv_cache_bytes": eng.cache.nbytes(), "param_bytes": _param_bytes(m.model),
            "mean_depth": (st["depth_sum"] / st["passes"]
                           if cfg.family == "mor" and st["passes"] else None),
            "shared_batch_fill": (st["shared_items"] / (st["shared_calls"] * eng.max_batch)
                                  if st["shared_calls"] else None),
            "capped_frac": st["capped"] / st["passes"] if st["passes"] else 0.0,
            "routing": ("causal" if cfg.family == "mor" and cfg.router == "expert"
                        else ("token" if cfg.family == "mor" else None)),
            "source": m.source, "device": str(device),
        }
        if profile:
            row["stage_s"] = stage[(i, sched)]
        rows.append(row)
    for row, (i, _) in zip(rows, runs):
        j = _reference_of(i, models)
        ref = (next((r for r, (k, _) in zip(rows, runs) if k == j), None)
               if j is not None else None)
        row["reference"] = ref["model"] if ref else None
        row["rel_tokens_per_s"] = row["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    return {"settings": dataclasses.asdict(settings), "rows": rows, "lengths": lengths,
            "max_len": max_len, "budget_bytes": budget,
            "hardware": _hardware(), "torch_threads": torch.get_num_threads()}


def _hardware() -> dict[str, Any]:
    try:
        from evals.provenance import hardware

        return hardware()
    except Exception as e:  # never lose a benchmark to provenance
        return {"error": str(e)}


# --- command line ------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """The `mor-bench bench-infer` options (defaults: `InferSettings`)."""
    d = InferSettings()
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint directories, or suite run directories (all their runs)")
    p.add_argument("--samples", type=int, default=d.samples,
                   help=f"sequences per model and round (default {d.samples}; paper 1000)")
    p.add_argument("--gen-mean", type=float, default=d.gen_mean,
                   help=f"mean generation length (default {d.gen_mean:g}; paper 256)")
    p.add_argument("--gen-std", type=float, default=d.gen_std,
                   help=f"std of the generation length (default {d.gen_std:g})")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache length per sequence (default: longest drawn length + 1)")
    p.add_argument("--batch-size", default=str(d.batch_size),
                   help="sequence slots: an integer, or 'max' = the largest batch whose "
                        "parameter + KV-cache bytes fit --memory-budget-mb (default 32)")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="memory per model for --batch-size max (default: what the vanilla "
                        "model needs at --reference-batch)")
    p.add_argument("--reference-batch", type=int, default=d.reference_batch,
                   help="the vanilla batch that defines the default budget (default 32)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="timed rounds per model, interleaved; medians (default 3)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature, 0 = greedy (default 1)")
    p.add_argument("--kv-capacity", choices=("routed", "full"), default=d.kv_capacity,
                   help="MoR cache per recursion step: routed = c_r * max_len tokens (the "
                        "paper's memory), full = max_len (default routed)")
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=d.scheduler,
                   help="MoR: depth-wise batching (auto/depth), sequence-wise, or both")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=d.device,
                   help="where to decode (default cpu)")
    p.add_argument("--profile", action="store_true",
                   help="also report the seconds each decoding stage took")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def settings_from_args(args) -> InferSettings:
    batch: int | str = args.batch_size
    if batch != "max":
        try:
            batch = int(batch)
        except ValueError:
            raise ConfigError(f"--batch-size {args.batch_size!r}: an integer or 'max'") from None
    return InferSettings(samples=args.samples, gen_mean=args.gen_mean, gen_std=args.gen_std,
                         max_len=args.max_len, batch_size=batch,
                         memory_budget_mb=args.memory_budget_mb,
                         reference_batch=args.reference_batch, repeats=args.repeats,
                         seed=args.seed, temperature=args.temperature,
                         kv_capacity=args.kv_capacity, scheduler=args.scheduler,
                         threads=args.threads, device=args.device)


def table_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """Display rows of a `bench_models` result."""
    rows = []
    for r in res["rows"]:
        rows.append({
            "model": r["model"], "layers": r["layers"], "scheduler": r["scheduler"],
            "batch": str(r["batch_size"]), "tokens/s": f"{r['tokens_per_s']:,.0f}",
            "vs vanilla": (f"{r['rel_tokens_per_s']:.2f}x" if r["rel_tokens_per_s"]
                           else "-"),
            "ms/token": f"{r['ms_per_token']:.3f}",
            "ms/iter": f"{r['ms_per_iteration']:.2f}",
            "KV MiB": f"{r['kv_cache_bytes'] / 2**20:.2f}",
            "params MiB": f"{r['param_bytes'] / 2**20:.2f}",
            "mean depth": f"{r['mean_depth']:.2f}" if r["mean_depth"] is not None else "-",
            "fill": (f"{100 * r['shared_batch_fill']:.0f}%"
                     if r["shared_batch_fill"] is not None else "-"),
            "capped": f"{100 * r['capped_frac']:.1f}%" if r["family"] == "mor" else "-",
        })
    return rows


def cmd_bench_infer(args) -> int:
    """Generation throughput of checkpoints side by side: the paper's workload (samples from
    no prompt, lengths ~ Normal(mean, std)), vanilla/recursive under continuous
    sequence-wise batching, MoR under continuous depth-wise batching; rounds interleaved
    (A B A B), medians. The headline is tokens/s relative to the vanilla model of the same
    depth in the same process -- quote ratios, not absolute times, on shared machines.

      mor-bench bench-infer runs/smoke-latest
      mor-bench bench-infer runs/smoke-latest --batch-size max --scheduler both --profile"""
    import json
    import sys

    from evals.cli import _rich_table

    settings = settings_from_args(args)
    models = load_models(args.checkpoints)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"bench-infer: {len(models)} model(s), {settings.samples} samples x "
        f"~{settings.gen_mean:g} tokens, {settings.repeats} interleaved round(s)")
    res = bench_models(models, settings, log=log, profile=args.profile)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    budget = (f", memory budget {res['budget_bytes'] / 2**20:.1f} MiB"
              if res["budget_bytes"] else "")
    print(f"{sum(res['lengths']):,} tokens per model and round, cache max_len "
          f"{res['max_len']}{budget}, {res['torch_threads']} torch threads")
    rows = table_rows(res)
    _rich_table("generation throughput (medians)", rows, list(rows[0]))
    if args.profile:
        for r in res["rows"]:
            st = r.get("stage_s") or {}
            rest = r["times_s"][-1] - sum(st.values())
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in st.items())
            print(f"  {r['model']} ({r['scheduler']}), last round: {parts}, "
                  f"scheduling/other {rest:.2f}s")
    return 0


# --- the suite phase ---------------------------------------------------------------------------
INFER_FILE = "infer.json"


def suite_phase(run_dir: str | Path, settings: InferSettings, log=print) -> dict[str, Any]:
    """Benchmark every successful run of a suite run directory side by side, write
    RUN_DIR/infer.json and each record's metrics["infer"] (for MoR the depth-wise row;
    with scheduler "both" the sequence-wise one is kept as metrics["infer"]["sequence"])."""
    import json

    from evals.records import write_json_atomic

    run_dir = Path(run_dir)
    models = load_models([run_dir])
    res = bench_models(models, settings, log=log)
    write_json_atomic(run_dir / INFER_FILE, res)
    by_model: dict[str, dict[str, Any]] = {}
    for row in res["rows"]:
        by_model.setdefault(row["model"], {})[row["scheduler"]] = row
    keep = ("tokens_per_s", "ms_per_token", "ms_per_iteration", "batch_size", "kv_cache_bytes",
            "param_bytes", "mean_depth", "shared_batch_fill", "capped_frac",
            "rel_tokens_per_s", "reference", "scheduler", "routing", "tokens", "time_s")
    for name, rows in by_model.items():
        rec_file = run_dir / name / "record.json"
        if not rec_file.is_file():
            continue
        primary = rows.get("depth") or rows["sequence"]
        entry = {k: primary.get(k) for k in keep}
        if "depth" in rows and "sequence" in rows:
            entry["sequence"] = {k: rows["sequence"].get(k) for k in keep}
        entry["settings"] = res["settings"]
        entry["max_len"] = res["max_len"]
        rec = json.loads(rec_file.read_text())
        rec.setdefault("metrics", {})["infer"] = entry
        write_json_atomic(rec_file, rec)
    return res


def _phase_child(run_dir: str, settings: dict[str, Any]) -> None:
    import sys
    import traceback

    try:
        suite_phase(run_dir, InferSettings(**settings),
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    except BaseException as e:  # the training results stay; the error is kept
        Path(run_dir, "infer_error.txt").write_text(traceback.format_exc())
        print(f"inference phase failed: {type(e).__name__}: {e} (see {run_dir}/"
              "infer_error.txt)", file=sys.stderr, flush=True)
        sys.exit(1)


def run_suite_phase(run_dir: str | Path, settings: InferSettings) -> bool:
    """`suite_phase` in its own process (a clean heap and thread pool, like each training
    run). Returns False if it failed; the error is in RUN_DIR/infer_error.txt."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_phase_child, args=(str(run_dir), dataclasses.asdict(settings)),
                       name="mor-bench-infer")
    proc.start()
    try:
        proc.join()
    finally:
        if proc.is_alive():  # interrupted: no orphan process
            proc.terminate()
            proc.join(10)
    if proc.exitcode != 0:
        err = Path(run_dir, "infer_error.txt")
        if not err.is_file():  # killed before it could say why
            err.write_text(f"inference phase exited with code {proc.exitcode}\n")
        return False
    return True

"""Few-shot log-likelihood throughput: shared-prefix vs plain scoring in mor-bench's lm-eval
adapter, and lm-eval's own HFLM on the same weights.

    python benchmarks/fewshot_shared_prefix.py [--limit 300] [--num-fewshot 0] [--rounds 3]
        [--threads 1] [--checkpoint RUN_DIR/vanilla-...] [--synthetic] [--profile]

Tasks: PIQA, ARC-Easy and HellaSwag from the offline copies (`mor-bench data benchmarks`),
else -- said in the output as "task_source" -- the synthetic multiple-choice tasks. lm-eval
builds the requests once (prompts, few-shot examples, `--limit` items a task); every model
then scores the same request list through `loglikelihood` (tokenization included, task
loading not), in interleaved rounds (A B C A B C ...), and the median wall time of each gives
requests/s. Models: a vanilla model (the `--checkpoint`, a vanilla run with a BPE tokenizer,
or a random-init `--preset` with a BPE tokenizer trained on the first `--bpe-docs` documents of
`--corpus`) scored shared-prefix, plain and by HFLM on the same weights exported to Llama;
MoR-3 of the same preset under causal expert-choice and under token-choice routing (random
init), shared-prefix and plain. Prints one JSON object: per model the median seconds,
requests/s, forward seconds (inside the model's forward), tokens run (rows x padded width) and
the adapter's scoring counts; the ratios; and the largest log-likelihood difference from the
plain path (and from HFLM) with each path's accuracy, which must agree. `--profile` adds the
top operators of one shared and one plain pass of the vanilla model (torch.profiler).
Needs `pip install -e '.[test]'` (transformers, accelerate) for the HFLM column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PAPER = ["piqa_local", "arc_easy_local", "hellaswag_local"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=os.environ.get(
        "MOR_BENCH_CACHE", str(Path.home() / ".cache" / "mor-bench")))
    ap.add_argument("--checkpoint", help="a vanilla run directory with a BPE tokenizer "
                    "(default: random-init --preset models)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[1].parent
                                            / "shared" / "data" / "corpus"
                                            / "prose_en.jsonl.gz"),
                    help="documents to train the BPE tokenizer on (or 'synthetic')")
    ap.add_argument("--bpe-docs", type=int, default=3000)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--models", default="vanilla,mor3-causal,mor3-token",
                    help="comma-separated subset of vanilla, mor3-causal, mor3-token")
    ap.add_argument("--no-hflm", action="store_true")
    ap.add_argument("--synthetic", action="store_true", help="the synthetic tasks even when "
                    "the offline copies exist")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    from evals.lmeval.tasks import set_hf_offline

    set_hf_offline()  # local tasks only; before lm-eval (and datasets) is imported
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from evals.lmeval.adapter import MorBenchLM

    tasks, paths, source = _task_source(args)
    tokenizer, tok_json, vanilla, weights = _tokenizer_and_vanilla(args)
    instances, task_objs, per_task = _build_requests(tasks, paths, args.limit,
                                                     args.num_fewshot)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    lms: list[tuple[str, str, object]] = []  # (model, path, lm)
    models = {}
    if "vanilla" in wanted:
        models["vanilla"] = vanilla
    for name, kw in (("mor3-causal", {"eval_routing": "causal"}),
                     ("mor3-token", {"router": "token"})):
        if name in wanted:
            models[name] = _mor(args.preset, vanilla.cfg.vocab_size, kw)
    for name, model in models.items():
        for path, flag in (("shared_prefix", True), ("plain", False)):
            lms.append((name, path, MorBenchLM(model=model, tokenizer=tokenizer, device="cpu",
                                               batch_size=args.batch_size,
                                               shared_prefix=flag)))
        if name == "vanilla" and not args.no_hflm:
            lms.append((name, "hflm", _hflm(vanilla, tok_json, tokenizer, args.batch_size)))

    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    fwd: dict[tuple[str, str], list[float]] = defaultdict(list)
    scores: dict[tuple[str, str], list] = {}
    for _ in range(args.rounds):  # interleaved: every model and path once per round
        for name, path, lm in lms:
            timer = _ForwardTimer(lm.model)
            t0 = time.perf_counter()
            scores[name, path] = lm.loglikelihood(instances, disable_tqdm=True)
            times[name, path].append(time.perf_counter() - t0)
            fwd[name, path].append(timer.stop())
    n = len(instances)
    out: dict = {"task_source": source, "tasks": per_task, "requests": n,
                 "num_fewshot": args.num_fewshot, "limit": args.limit, "rounds": args.rounds,
                 "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                 "weights": weights,
                 "vocab_size": vanilla.cfg.vocab_size, "results": {}}
    for (name, path), ts in times.items():
        lm = next(lm for m, p, lm in lms if (m, p) == (name, path))
        med = statistics.median(ts)
        entry = {"median_s": med, "all_s": ts, "requests_per_s": n / med,
                 "forward_median_s": statistics.median(fwd[name, path]),
                 "accuracy": _accuracy(instances, task_objs, scores[name, path])}
        if path != "hflm":
            entry["scoring"] = lm.scoring
            entry["counts_per_round"] = {k: v // args.rounds
                                         for k, v in sorted(lm.scoring_counts.items())}
        if path != "plain" and (name, "plain") in scores:
            ref = scores[name, "plain"]
            entry["max_abs_diff_vs_plain"] = max(abs(a - b) for (a, _), (b, _) in
                                                 zip(scores[name, path], ref))
            entry["greedy_mismatches_vs_plain"] = sum(ga != gb for (_, ga), (_, gb) in
                                                      zip(scores[name, path], ref))
        out["results"][f"{name}/{path}"] = entry
    rps = {k: v["requests_per_s"] for k, v in out["results"].items()}
    ratios = {}
    for name in models:
        if f"{name}/plain" in rps:
            ratios[f"{name}: shared_prefix / plain"] = (rps[f"{name}/shared_prefix"]
                                                        / rps[f"{name}/plain"])
    if "vanilla/hflm" in rps:
        ratios["vanilla: shared_prefix / hflm"] = rps["vanilla/shared_prefix"] / rps[
            "vanilla/hflm"]
        ratios["vanilla: plain / hflm"] = rps["vanilla/plain"] / rps["vanilla/hflm"]
    out["ratios"] = ratios
    if args.profile and "vanilla" in models:
        out["profile"] = {path: _profile(lm, instances) for name, path, lm in lms
                          if name == "vanilla" and path in ("shared_prefix", "plain")}
    print(json.dumps(out, indent=1))


# --- pieces ------------------------------------------------------------------------------------
def _task_source(args) -> tuple[list[str], list[str], str]:
    """The offline paper tasks when prepared (and not --synthetic), else the synthetic ones."""
    from evals.lmeval.offline_data import local_tasks_available, tasks_dir
    from evals.lmeval.synthetic_tasks import SYNTHETIC_TASKS, write_synthetic_tasks

    cache = Path(args.cache_dir)
    if not args.synthetic and local_tasks_available(cache):
        return PAPER, [str(tasks_dir(cache))], "offline copies (mor-bench data benchmarks)"
    out = Path(tempfile.mkdtemp(prefix="fewshot-bench-"))
    path = write_synthetic_tasks(out, n_items=args.limit)
    why = "--synthetic" if args.synthetic else "offline copies not prepared"
    return list(SYNTHETIC_TASKS), [str(path)], f"synthetic tasks ({why})"


def _build_requests(tasks: list[str], paths: list[str], limit: int, num_fewshot: int):
    """lm-eval's log-likelihood Instances of `tasks` (few-shot prompts included)."""
    from lm_eval.tasks import get_task_dict

    from evals.lmeval.tasks import task_manager

    task_dict = get_task_dict(tasks, task_manager(paths, tasks))
    instances, task_objs, per_task = [], {}, {}
    for _, task in _leaves(task_dict):
        task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        reqs = [inst for inst in task.instances if inst.request_type == "loglikelihood"]
        name = reqs[0].task_name
        task_objs[name] = task
        per_task[name] = {"items": len({inst.doc_id for inst in reqs}), "requests": len(reqs)}
        instances += reqs
    return instances, task_objs, per_task


def _leaves(task_dict):
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield (key if isinstance(key, str) else getattr(key, "group_name", str(key))), value


def _accuracy(instances, task_objs, results) -> dict[str, dict[str, float]]:
    """acc (argmax log-likelihood) and acc_norm (per character) per task, as lm-eval's
    multiple-choice metrics compute them."""
    docs: dict[tuple[str, int], list] = defaultdict(list)
    for inst, (ll, _) in zip(instances, results):
        docs[inst.task_name, inst.doc_id].append((inst.idx, ll, len(inst.args[1]), inst))
    acc: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for (task, _), choices in docs.items():
        choices.sort(key=lambda c: c[0])
        inst = choices[0][3]
        gold = task_objs[task].doc_to_target(inst.doc)
        if isinstance(gold, str):
            gold = task_objs[task].doc_to_choice(inst.doc).index(gold)
        raw = max(range(len(choices)), key=lambda i: choices[i][1])
        norm = max(range(len(choices)), key=lambda i: choices[i][1] / max(1, choices[i][2]))
        acc[task].append((int(raw == gold), int(norm == gold)))
    return {task: {"acc": sum(a for a, _ in v) / len(v), "acc_norm": sum(b for _, b in v) / len(v)}
            for task, v in acc.items()}


def _tokenizer_and_vanilla(args):
    """(mor-bench tokenizer, its JSON, the vanilla model, what the weights are): from
    --checkpoint, or a BPE trained on the corpus and a random-init vanilla model of
    --preset."""
    from evals.data.tokenizer import BPETokenizer, tokenizer_from_spec
    from mor import ModelConfig, build_model
    from mor.checkpoint import load_checkpoint, read_checkpoint_meta

    if args.checkpoint:
        _, meta = read_checkpoint_meta(args.checkpoint)
        spec = meta["extra"]["tokenizer"]
        if spec.get("kind") != "bpe":
            raise SystemExit("this benchmark needs a checkpoint trained with a bpe: tokenizer")
        model = load_checkpoint(args.checkpoint).eval()
        if model.cfg.family != "vanilla":
            raise SystemExit("--checkpoint must be a vanilla model (exported to HF Llama)")
        return tokenizer_from_spec(spec), spec["json"], model, args.checkpoint
    from evals.data.corpus import load_documents

    corpus = args.corpus if args.corpus == "synthetic" or Path(args.corpus).exists() \
        else "synthetic"
    docs = load_documents(corpus, max_docs=args.bpe_docs)
    tok = BPETokenizer.train(docs, args.vocab)
    cfg = ModelConfig.from_preset(args.preset, family="vanilla", vocab_size=tok.vocab_size)
    return (tok, tok.to_json(), build_model(cfg).eval(),
            f"random init, preset {args.preset}; BPE-{tok.vocab_size} trained on the first "
            f"{len(docs)} documents of {corpus}")


def _mor(preset: str, vocab: int, kw: dict):
    from mor import ModelConfig, build_model

    cfg = ModelConfig.from_preset(preset, family="mor", num_recursions=3, vocab_size=vocab, **kw)
    return build_model(cfg).eval()


def _hflm(vanilla, tok_json: str, tokenizer, batch_size: int):
    """lm-eval's HFLM over the vanilla weights exported to `LlamaForCausalLM`, its tokenizer
    the same BPE wrapped as a `PreTrainedTokenizerFast` (as benchmarks/lm_eval_throughput.py
    does; checked to encode alike)."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from baselines.vanilla import hf_llama_config_kwargs, to_hf_state_dict

    special = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_json),
                                  eos_token=special, bos_token=special, pad_token=special,
                                  unk_token=special)
    probe = "Question: The cat sat on the mat?\nAnswer: yes."
    if tok(probe)["input_ids"] != tokenizer.encode(probe):
        raise SystemExit("the wrapped tokenizer does not encode like mor-bench's")
    hf = LlamaForCausalLM(LlamaConfig(**hf_llama_config_kwargs(vanilla.cfg))).eval()
    hf.load_state_dict(to_hf_state_dict(vanilla.state_dict()), strict=False)
    return HFLM(pretrained=hf, tokenizer=tok, batch_size=batch_size, device="cpu")


class _ForwardTimer:
    """Seconds spent inside `module`'s forward (hooks on the top module only: the layers'
    fused paths stay on)."""

    def __init__(self, module) -> None:
        self.total = 0.0
        self._t0 = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre),
                         module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._t0

    def stop(self) -> float:
        for h in self._handles:
            h.remove()
        return self.total


def _profile(lm, instances, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lm.loglikelihood(instances, disable_tqdm=True)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total, "calls": e.count} for e in rows]


if __name__ == "__main__":
    sys.exit(main())

"""Log-likelihood requests/s of mor-bench's lm-eval adapter vs lm-eval's own HFLM.

    python benchmarks/lm_eval_throughput.py RUN_DIR/vanilla-1e13F-s0 [--cache-dir DIR]

The checkpoint must be a vanilla model with a BPE tokenizer (it is exported to Hugging Face
`LlamaForCausalLM`, its tokenizer wrapped as a `PreTrainedTokenizerFast`). Both models run
PIQA and ARC-Easy from the offline copies (`mor-bench data benchmarks`) at --limit items,
interleaved A B A B, --repeats times; the best wall time of each gives requests/s (task
loading included, equally for both). Prints one JSON object: times, requests/s, their
ratio and both models' accuracies (which must agree). Needs `pip install -e '.[test]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--cache-dir", default=os.environ.get(
        "MOR_BENCH_CACHE", str(Path.home() / ".cache" / "mor-bench")))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    from evals.lmeval.tasks import set_hf_offline

    set_hf_offline()  # local tasks only; before lm-eval (and datasets) is imported
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from baselines.vanilla import hf_llama_config_kwargs, to_hf_state_dict
    from evals.lmeval.adapter import MorBenchLM, run_tasks
    from evals.lmeval.offline_data import require_local_tasks, tasks_dir
    from mor.checkpoint import read_checkpoint_meta

    cache = Path(args.cache_dir)
    require_local_tasks(cache)
    ours = MorBenchLM(args.checkpoint, batch_size=args.batch_size, device="cpu")
    _, meta = read_checkpoint_meta(args.checkpoint)
    spec = meta["extra"]["tokenizer"]
    if spec.get("kind") != "bpe":
        raise SystemExit("this benchmark needs a checkpoint trained with a bpe: tokenizer")
    special = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec["json"]),
                                  eos_token=special, bos_token=special, pad_token=special,
                                  unk_token=special)
    probe = "The cat sat on the mat."
    if tok(probe)["input_ids"] != ours.tok.encode(probe):
        raise SystemExit("the wrapped tokenizer does not encode like the checkpoint's")
    hf = LlamaForCausalLM(LlamaConfig(**hf_llama_config_kwargs(ours.model.cfg))).eval()
    hf.load_state_dict(to_hf_state_dict(ours.model.state_dict()), strict=False)
    ref = HFLM(pretrained=hf, tokenizer=tok, batch_size=args.batch_size, device="cpu")

    tasks, paths = ["piqa_local", "arc_easy_local"], [str(tasks_dir(cache))]
    times: dict[str, list[float]] = {"mor-bench": [], "hflm": []}
    results = {}
    for _ in range(args.repeats):
        for name, lm in (("mor-bench", ours), ("hflm", ref)):  # interleaved: A B A B
            t0 = time.perf_counter()
            results[name] = run_tasks(lm, tasks, include_paths=paths, limit=args.limit)
            times[name].append(time.perf_counter() - t0)
    requests = _count_requests(cache, args.limit)
    out = {name: {"wall_s": t, "requests": requests, "requests_per_s": requests / min(t)}
           for name, t in times.items()}
    out["ratio_mor_bench_over_hflm"] = (out["mor-bench"]["requests_per_s"]
                                        / out["hflm"]["requests_per_s"])
    out["accuracy"] = {name: {t: r["tasks"][t]["metrics"] for t in tasks}
                       for name, r in results.items()}
    print(json.dumps(out, indent=1))


def _count_requests(cache: Path, limit: int) -> int:
    """One log-likelihood request per choice of every evaluated item."""
    total = 0
    for task, field in (("piqa", None), ("arc_easy", "choices")):
        split = "validation" if task == "piqa" else "test"
        path = cache / "benchmarks" / "data" / task / f"{split}.jsonl"
        for line in path.read_text().splitlines()[:limit]:
            row = json.loads(line)
            total += 2 if field is None else len(row[field]["text"])
    return total


if __name__ == "__main__":
    main()

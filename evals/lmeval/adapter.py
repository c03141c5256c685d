"""mor-bench models inside EleutherAI's lm-evaluation-harness, without forking it.

    import evals.lmeval.adapter  # registers the model name "mor-bench"
    lm_eval.simple_evaluate(model="mor-bench",
                            model_args="checkpoint=RUN_DIR/mor-3-1.2e12F-s0,routing=causal",
                            tasks=["hellaswag"])
    # or with an instance: simple_evaluate(model=MorBenchLM(model=m, tokenizer=tok), ...)

Scores are batch-invariant: requests are length-sorted and right-padded, and every forward
passes each row's real length, so MoR top-k routing computes capacities over real tokens
only and padding never competes for them (the reference code let padding tokens take
capacity, so a request's score depended on its batch: docs/protocol.md §7). `routing`
selects MoR's evaluation routing ("topk", the paper's protocol and not causal, or "causal";
docs/protocol.md §6); the adapter reports it so every lm-eval result can say which mode
produced it. A model passed in keeps its own routing: the adapter switches it only around
its own forwards (`mor.routing.use_routing`) and restores it afterwards.

Shared-prefix scoring (`shared_prefix=True`, the default): multiple-choice tasks send one
request per answer, all with the same context. For causal models (vanilla, recursive, MoR
under causal or token-choice routing) the requests are grouped by their context tokens --
after the same truncation as the plain path -- and each group is scored in ONE packed row
[context, answer 1, answer 2, ...]: every answer's RoPE positions restart after the context
and an attention mask (`mor.model.prefix_tree_mask`) lets it see the context and itself
only, so the context runs once and the logits are computed only where an answer is scored.
The log-likelihoods equal the plain path's (one row per request) to float round-off
(tests/evals/lmeval/test_shared_prefix.py). Packed rows are length-sorted and batched under a
token budget (`token_budget`, rows x padded width). MoR top-k routing is not causal -- packing
would change its decisions -- so it always takes the plain path (slower on multiple choice).
`scoring` says which path the adapter uses ("shared_prefix" or "plain"), `run_tasks` records
it, and `scoring_counts` counts requests, forwards and tokens per path.

`run_tasks` evaluates a task list through lm-eval (the one TaskManager comes from
`evals.lmeval.tasks.task_manager`); `evaluate_synthetic` is its view for the synthetic tasks.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from evals.lmeval.synthetic_tasks import METRICS, SYNTHETIC_TASKS, check_written
from evals.lmeval.tasks import all_data_local, offline_hf, task_manager
from mor.checkpoint import load_checkpoint, read_checkpoint_meta
from mor.errors import ConfigError, DataError
from mor.model import CausalLM, prefix_tree_mask
from mor.routing import use_routing


def _as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"lm-eval model arg {name}={value!r} must be an integer") from None


def _as_bool(value: Any, name: str) -> bool:
    """A bool, or lm-eval's model_args string form ("True", "false", "1", ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"lm-eval model arg {name}={value!r} must be true or false")


MODEL_ARGS = ("checkpoint", "routing", "batch_size", "device", "max_length", "shared_prefix",
              "token_budget", "max_batch_size")
"""The arguments `--model mor-bench --model_args ...` accepts (others are refused)."""

SCORING_PATHS = ("shared_prefix", "plain")
"""How `_loglikelihood_tokens` scores: packed rows with shared contexts, or one row each."""


@register_model("mor-bench")
class MorBenchLM(TemplateLM):
    """A `TemplateLM` over the mor-bench model interface (any family)."""

    def __init__(self, checkpoint: str | None = None, *, model: CausalLM | None = None,
                 tokenizer=None, routing: str | None = None, batch_size: Any = 16,
                 device: str | None = None, max_length: Any = None,
                 shared_prefix: Any = True, token_budget: Any = None,
                 max_batch_size: Any = None, **unknown: Any) -> None:
        """`shared_prefix`: score requests that share a context in one packed row (causal
        models; see the module docstring); False: one row per request, as top-k MoR always
        does. `token_budget`: rows x padded width of one packed forward (default
        256 x batch_size); `batch_size` is the number of rows of a plain forward.
        `max_batch_size` (lm-eval's --max_batch_size, a bound for batch_size=auto) is
        accepted and unused: "auto" means 16 rows. Any other argument is refused (a typo such
        as `routng=causal` must not run silently with the default routing)."""
        super().__init__()
        from evals.data.tokenizer import tokenizer_from_spec

        if unknown:
            raise ConfigError(
                f"unknown mor-bench model argument(s) {', '.join(sorted(unknown))}; known: "
                f"{', '.join(MODEL_ARGS)}")

        if (checkpoint is None) == (model is None):
            raise ConfigError("MorBenchLM needs exactly one of checkpoint=PATH or model=...")
        if checkpoint is not None:
            _, meta = read_checkpoint_meta(checkpoint)
            spec = meta.get("extra", {}).get("tokenizer")
            if tokenizer is None and spec is None:
                raise ConfigError(f"checkpoint '{checkpoint}' records no tokenizer; pass "
                                  "tokenizer=...")
            # the adapter's own model: loaded in the asked routing mode
            model = load_checkpoint(checkpoint, **({"eval_routing": routing} if routing else {}))
            tokenizer = tokenizer or tokenizer_from_spec(spec)
        elif routing:
            if model.cfg.family != "mor":
                raise ConfigError("routing= applies to MoR models only")
            model.cfg.replace(eval_routing=routing)  # validates the mode; the model is unchanged
        if tokenizer is None:
            raise ConfigError("MorBenchLM(model=...) also needs tokenizer=...")
        cfg = model.cfg
        # The caller's model keeps its routing: every forward runs inside `_routed()`, which
        # switches to `routing` and restores the caller's mode afterwards.
        self._eval_routing = routing if cfg.family == "mor" and cfg.router == "expert" else None
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(dev).eval()
        self.tok = tokenizer
        self.device_ = dev
        bs = "auto" if str(batch_size).startswith("auto") else batch_size
        self.batch_size_ = 16 if bs == "auto" else max(1, _as_int(bs, "batch_size"))
        self.max_length_ = (_as_int(max_length, "max_length") if max_length
                            else cfg.max_seq_len)
        self.routing = (None if cfg.family != "mor"
                        else "token" if cfg.router == "token"
                        else self._eval_routing or cfg.eval_routing)
        self.token_budget = (max(1, _as_int(token_budget, "token_budget"))
                             if token_budget not in (None, "") else 256 * self.batch_size_)
        # Top-k MoR is not causal: its requests never take the shared-prefix path.
        self.scoring = ("shared_prefix" if _as_bool(shared_prefix, "shared_prefix")
                        and self.routing != "topk" else "plain")
        self.scoring_counts: Counter[str] = Counter()
        """Requests, forwards and tokens (rows x padded width) per path since construction:
        keys "<path>_requests", "<path>_forwards", "<path>_tokens", "<path>_real_tokens"
        (without padding) and "shared_prefix_grouped_requests" (those that shared their row
        with another)."""
        self.on_progress = None
        """Optional `on_progress(done, total)`: called after every scored batch of a
        `loglikelihood` / `loglikelihood_rolling` / `generate_until` call with the requests
        done so far and that call's total (`run_tasks` sets it; the library never prints)."""
        self._progress = [0, 0]  # done, total of the current call

    def _routed(self):
        """A context in which the model routes as this adapter evaluates (`routing`)."""
        return use_routing(self.model, self._eval_routing)

    # --- the TemplateLM contract ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.max_length_

    @property
    def batch_size(self) -> int:
        return self.batch_size_

    @property
    def device(self):
        return self.device_

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        return self.tok.encode(string)  # no BOS: the models were trained without one

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _score_batch(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-probabilities [B, T, V] of right-padded rows, each routed as if alone."""
        lengths = torch.tensor([len(r) for r in rows])
        width = int(lengths.max())
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        with self._routed():
            out = self.model(ids.to(self.device_), lengths=lengths.to(self.device_))
        return F.log_softmax(out.logits.float(), dim=-1).cpu()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """(cache key, context ids, continuation ids) -> (sum log p(continuation), greedy?).

        The input is context + continuation minus its last token, truncated on the left to
        max_length. Plain path: requests are scored longest first in batches of
        `batch_size`, one row each. Shared-prefix path (`scoring`): see `_score_shared`."""
        items = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ConfigError("lm-eval sent an empty continuation; nothing to score")
            # A continuation longer than the window: its first tokens cannot be predicted
            # inside it, so only the last max_length are scored.
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            target = list(cont)[-self.max_length:]
            if len(whole) <= len(target):
                raise ConfigError("lm-eval sent an empty context; the first continuation "
                                  "token has nothing to be predicted from")
            items.append((i, whole[:-1], target))
        if not self._rolling:
            self._progress = [0, len(items)]
        results: list[tuple[float, bool] | None] = [None] * len(items)
        if self.scoring == "shared_prefix":
            self._score_shared(items, results)
        else:
            self._score_plain(items, results)
        for i, res in enumerate(results):
            self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        return results  # type: ignore[return-value]

    def _score_plain(self, items, results) -> None:
        """One right-padded row per request, longest first, `batch_size` rows a forward."""
        order = sorted(range(len(items)), key=lambda j: -len(items[j][1]))
        for start in range(0, len(order), self.batch_size):
            chunk = [items[j] for j in order[start:start + self.batch_size]]
            logp = self._score_batch([inp for _, inp, _ in chunk])
            self._count("plain", len(chunk), logp.shape[0] * logp.shape[1],
                        sum(len(inp) for _, inp, _ in chunk))
            for row, (i, inp, cont) in enumerate(chunk):
                n = len(cont)
                span = logp[row, len(inp) - n: len(inp)]  # predictions of the continuation
                target = torch.tensor(cont)
                # summed in float64: a long continuation's float32 sum would carry
                # round-off of the order of its last bit (6e-5 at -750 nats)
                total = span.gather(1, target.unsqueeze(1)).double().sum().item()
                greedy = bool((span.argmax(-1) == target).all())
                results[i] = (total, greedy)

    def _count(self, path: str, requests: int, tokens: int, real: int) -> None:
        self.scoring_counts[f"{path}_requests"] += requests
        self.scoring_counts[f"{path}_forwards"] += 1
        self.scoring_counts[f"{path}_tokens"] += tokens
        self.scoring_counts[f"{path}_real_tokens"] += real
        if not self._rolling:
            self._advance(requests)

    _rolling = False  # inside loglikelihood_rolling: progress counts documents, not windows

    def _advance(self, requests: int) -> None:
        self._progress[0] += requests
        if self.on_progress is not None:
            self.on_progress(*self._progress)

    def _score_shared(self, items, results) -> None:
        """Requests grouped by their (truncated) context C -- the input minus the
        continuation's tokens, whose last token predicts the continuation's first -- and
        each group packed into rows [C, X_1, ..., X_k], X_i = continuation i minus its last
        token (no row longer than max(token_budget, max_length); a larger group is split over
        several rows). Rows are sorted longest first and batched while rows x the first
        row's width stays within `token_budget` and no row is more than an eighth shorter
        than the first (padding costs as much as real tokens; a forward's fixed cost is
        small next to it). A request alone in its row (WinoGrande, LAMBADA) is exactly its
        plain-path row."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int], list[int]]]] = {}
        for i, inp, cont in items:
            c = len(inp) - len(cont) + 1
            groups.setdefault(tuple(inp[:c]), []).append((i, inp[c:], cont))
        cap = max(self.token_budget, self.max_length)
        rows: list[tuple[tuple[int, ...], list[tuple[int, list[int], list[int]]], int]] = []
        for prefix, branches in groups.items():
            cur: list[tuple[int, list[int], list[int]]] = []
            size = len(prefix)
            for branch in branches:
                if cur and size + len(branch[1]) > cap:
                    rows.append((prefix, cur, size))
                    cur, size = [], len(prefix)
                cur.append(branch)
                size += len(branch[1])
            rows.append((prefix, cur, size))
        rows.sort(key=lambda row: -row[2])
        start = 0
        while start < len(rows):
            width = rows[start][2]
            end = start + 1
            while (end < len(rows) and (end - start + 1) * width <= self.token_budget
                   and 8 * rows[end][2] >= 7 * width):
                end += 1
            self._score_packed(rows[start:end], results)
            start = end

    @torch.no_grad()
    def _score_packed(self, rows, results) -> None:
        """One forward over packed rows (right-padded, longest first): the logits only at
        the positions that predict continuation tokens, then per request the sum of its
        tokens' log-probabilities and whether each was the argmax."""
        width = rows[0][2]
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        where: list[int] = []  # flat [B * width] positions whose logits are needed
        targets: list[int] = []
        spans: list[tuple[int, int]] = []  # (request, number of scored tokens)
        tree = False
        for b, (prefix, branches, _) in enumerate(rows):
            c = len(prefix)
            ids[b, :c] = torch.tensor(prefix)
            positions[b, :c] = torch.arange(c)
            segments[b, :c] = 0
            at = c
            tree = tree or len(branches) > 1
            for s, (i, tokens, cont) in enumerate(branches, 1):
                m = len(tokens)
                ids[b, at:at + m] = torch.tensor(tokens, dtype=torch.long)
                positions[b, at:at + m] = torch.arange(c, c + m)
                segments[b, at:at + m] = s
                # The first token is predicted at the context's last position, the others
                # at the branch's own positions.
                where.append(b * width + c - 1)
                where.extend(range(b * width + at, b * width + at + m))
                targets.extend(cont)
                spans.append((i, m + 1))
                at += m
        dev = self.device_
        lengths = torch.tensor([size for _, _, size in rows], device=dev)
        # Rows that each hold one request need no mask: plain causal rows.
        extra = ({"positions": positions.to(dev),
                  "attn_mask": prefix_tree_mask(segments.to(dev))} if tree else {})
        with self._routed():
            out = self.model(ids.to(dev), lengths=lengths,
                             logits_index=torch.tensor(where, device=dev), **extra)
        logp = F.log_softmax(out.logits.float(), dim=-1)
        target = torch.tensor(targets, device=dev)
        token_lp = logp.gather(1, target.unsqueeze(1)).squeeze(1).double().cpu()
        hit = (logp.argmax(-1) == target).cpu()
        self._count("shared_prefix", len(spans), len(rows) * width,
                    sum(size for _, _, size in rows))
        self.scoring_counts["shared_prefix_grouped_requests"] += sum(
            len(branches) for _, branches, _ in rows if len(branches) > 1)
        offset = 0
        for i, n in spans:
            results[i] = (token_lp[offset:offset + n].sum().item(),
                          bool(hit[offset:offset + n].all()))
            offset += n

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of max_length (perplexity)."""
        out = []
        self._progress = [0, len(requests)]
        self._rolling = True
        try:
            for req in requests:
                (string,) = req.args
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                scored = self._loglikelihood_tokens([(None, ctx, cont)
                                                     for ctx, cont in windows])
                total = sum(s for s, _ in scored)
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
                self._advance(1)
        finally:
            self._rolling = False
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string, the end-of-text token or `max_gen_toks`
        tokens. Causal models (vanilla, recursive, MoR under causal or token-choice routing)
        decode incrementally with a KV cache, all requests through `mor.decode.Engine`;
        MoR under top-k routing re-runs the whole sequence at each step (top-k is not causal:
        earlier tokens' depths can change as text is appended)."""
        if self.routing != "topk":
            return self._generate_cached(requests)
        return self._generate_rerun(requests)

    @torch.no_grad()
    def _generate_rerun(self, requests) -> list[str]:
        """Greedy decoding that re-runs the whole (windowed) sequence at every step."""
        out = []
        self._progress = [0, len(requests)]
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _as_int(kwargs.get("max_gen_toks", 256), "max_gen_toks")
            ids = self.tok_encode(context) or [self.eot_token_id]
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                window = (ids + new)[-self.max_length:]
                with self._routed():
                    logits = self.model(torch.tensor([window], device=self.device_)).logits
                nxt = int(logits[0, -1].argmax())
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(s and s in text for s in until):
                    break
            for s in until:
                if s and s in text:
                    text = text[: text.index(s)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            self._advance(1)
        return out

    @torch.no_grad()
    def _generate_cached(self, requests) -> list[str]:
        """`generate_until` through the continuous-batching decoder. The context keeps its
        last (window - max_gen_toks) tokens so the whole generation fits the window."""
        from mor.decode import Engine, Request

        window = min(self.max_length, self.model.cfg.max_seq_len)
        jobs, untils = [], []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(_as_int(kwargs.get("max_gen_toks", 256), "max_gen_toks"),
                          window - 1)
            ids = (self.tok_encode(context) or [self.eot_token_id])[-(window - max_new + 1):]
            untils.append(until)

            def stop(toks, until=until) -> bool:
                if toks[-1] == self.eot_token_id:
                    return True
                text = self.tok_decode(toks)
                return any(s and s in text for s in until)

            jobs.append(Request(prompt=ids, max_new_tokens=max_new, id=i, stop=stop))
        if not jobs:
            return []
        # causal by construction: the engine routes expert-choice MoR with the causal rule
        # and never switches the model (only reached when `routing` is not "topk")
        engine = Engine(self.model, max_batch=min(self.batch_size, len(jobs)),
                        max_len=window, kv_capacity="full")
        out = []
        self._progress = [0, len(requests)]
        for req, done, until in zip(requests, engine.generate(jobs), untils):
            self._advance(1)
            toks = done.tokens
            if self.eot_token_id in toks:
                toks = toks[: toks.index(self.eot_token_id)]
            text = self.tok_decode(toks)
            for s in until:
                if s and s in text:
                    text = text[: text.index(s)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {"family": cfg.family, "layers": cfg.layer_plan, "routing": self.routing,
                "num_recursions": cfg.num_recursions, "scoring": self.scoring}


# --- running task lists ----------------------------------------------------------------------
ITEM_METRICS = ("acc", "acc_norm")


def sample_items(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compact per-item correctness from lm-eval's logged samples of one task:
    [{"doc_id": int, "acc": 0/1, "acc_norm": 0/1 (when the task has it)}], sorted by doc_id,
    one entry per document (a document logged under several filters keeps its first)."""
    items: dict[int, dict[str, Any]] = {}
    for sample in samples:
        doc_id = int(sample["doc_id"])
        if doc_id in items:
            continue
        item: dict[str, Any] = {"doc_id": doc_id}
        for metric in ITEM_METRICS:
            value = sample.get(metric)
            if isinstance(value, (bool, int, float)):
                item[metric] = int(value) if value in (0, 1) else float(value)
        items[doc_id] = item
    return [items[k] for k in sorted(items)]


def run_tasks(lm, tasks: list[str], *, include_paths: list | None = None,
              num_fewshot: int | None = 0, limit: int | float | None = None,
              log_samples: bool = False,
              on_progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate `lm` on lm-eval tasks; local task YAMLs come from `include_paths`, anything
    else from lm-eval's own task index (which needs the Hub for its datasets).

    `limit`: an integer N scores the first N items of each task -- and of a benchmark that
    lm-eval runs as a group reporting one score (MMLU's 57 subjects), N items in all, spread
    over its subtasks (`limit_samples`); a fraction < 1 is lm-eval's (that share of every
    subtask). lm-eval's and datasets' own tqdm bars are off while it runs
    (`quiet_lm_eval`): progress comes from `on_progress(task, done, total)`, called
    with the requests scored so far by each of the model's calls (`MorBenchLM.on_progress`).

    Returns {"tasks": {name: {"metrics": {metric: value}, "stderr": {metric: value},
    "n": docs, and for each task named in `tasks`: "wall_s", "requests" (log-likelihood
    requests the adapter scored; None for other models), "requests_per_s"}}, "num_fewshot",
    "limit", "routing", "scoring" (the adapter's log-likelihood path, `MorBenchLM.scoring`;
    None for other models), "lm_eval_version"}; with `log_samples` also "items": {task:
    `sample_items`} (per-item correctness for paired tests; lm-eval's full samples, prompts
    included, are not returned)."""
    from importlib import metadata

    import lm_eval

    manager = task_manager(include_paths or [], tasks)
    # Tasks whose data is all local run with the Hub switched off (restored afterwards).
    local = all_data_local(tasks, include_paths)
    # One lm-eval call per named task (or group), so each gets its own wall time and
    # request rate; contexts never span tasks, so shared-prefix packing loses nothing.
    res: dict[str, Any] = {"results": {}, "n-samples": {}, "group_subtasks": {}, "samples": {}}
    timing: dict[str, dict[str, Any]] = {}
    counts = getattr(lm, "scoring_counts", None)
    for task in tasks:
        before = _requests(counts)
        t0 = time.perf_counter()
        if hasattr(lm, "on_progress"):
            lm.on_progress = (None if on_progress is None
                              else lambda done, total, task=task: on_progress(task, done, total))
        # lm-eval prints progress notes on stdout; keep stdout for results (`--json`).
        offline = offline_hf() if local else contextlib.nullcontext()
        try:
            with offline, contextlib.redirect_stdout(sys.stderr), quiet_lm_eval():
                samples = (limit_samples(task, manager, limit)
                           if isinstance(limit, int) and task in manager.all_groups else None)
                one = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=manager, num_fewshot=num_fewshot,
                    limit=None if samples else limit, samples=samples,
                    log_samples=log_samples, bootstrap_iters=1000)
        finally:
            if hasattr(lm, "on_progress"):
                lm.on_progress = None
        wall = time.perf_counter() - t0
        for key in res:
            res[key].update(one.get(key) or {})
        n_req = None if counts is None else _requests(counts) - before
        timing[task] = {"wall_s": wall, "requests": n_req,
                        "requests_per_s": n_req / wall if n_req and wall > 0 else None}
    out: dict[str, Any] = {}
    n_samples = res.get("n-samples", {})
    for name, metrics in res["results"].items():
        vals, errs = {}, {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _, _filter = key.partition(",")
            if metric.endswith("_stderr"):
                errs[metric.removesuffix("_stderr")] = float(value)
            else:
                vals[metric] = float(value)
        n = n_samples.get(name, {}).get("effective")
        subtasks = res.get("group_subtasks", {}).get(name) or []
        out[name] = {"metrics": vals, "stderr": errs, "n": n, "subtasks": list(subtasks)}
    def items(name: str, seen=()) -> int | None:  # a group's n: its members' items
        entry = out.get(name)
        if entry is None or name in seen:
            return None
        if entry["n"] is not None or not entry["subtasks"]:
            return entry["n"]
        counts = [items(sub, (*seen, name)) for sub in entry["subtasks"]]
        return sum(c for c in counts if c) or None

    for name in out:
        out[name]["n"] = items(name)
        out[name].update(timing.get(name, {}))
    result = {"tasks": out, "num_fewshot": num_fewshot, "limit": limit,
              "routing": getattr(lm, "routing", None),
              "scoring": getattr(lm, "scoring", None),
              "lm_eval_version": metadata.version("lm_eval")}
    if log_samples:
        result["items"] = {task: sample_items(samples)
                           for task, samples in (res.get("samples") or {}).items()}
    return result


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval without its terminal noise while it runs, each change restored on exit:
    - no tqdm bar from lm-eval or datasets ("Building contexts", "Generating test split",
      ...): every tqdm is created disabled (both libraries subclass `tqdm.std.tqdm`); a
      suite log or `mor-bench eval` shows one progress line/bar per task instead;
    - no "Overwriting default num_fewshot of <task>" warning per subtask (57 lines for
      MMLU): `run_tasks` always passes num_fewshot and records it;
    - no "fatal: not a git repository" from lm-eval's `git describe` probe when run outside
      a repository: the probe's stderr goes to /dev/null (its result is kept);
    - no "bootstrapping for stddev: perplexity" line per perplexity metric, which lm-eval's
      `lm_eval.api.metrics` writes with a bare print(): that module's `print` is shadowed
      by one that drops exactly this message (anything else it prints still prints)."""
    import builtins
    import logging
    import subprocess
    from unittest import mock

    import lm_eval.api.metrics as metrics
    import lm_eval.evaluator as evaluator
    from tqdm import std

    original_init = std.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original_init(self, *args, **kwargs)

    def quiet_git():
        try:
            return subprocess.check_output(["git", "describe", "--always"],  # noqa: S607
                                           stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None

    def drop_note(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Overwriting default num_fewshot")

    def quiet_print(*args, **kwargs):
        if not (args and str(args[0]).startswith("bootstrapping for stddev")):
            builtins.print(*args, **kwargs)

    logger = logging.getLogger(evaluator.__name__)
    # mock.patch.object puts back exactly what was there (tqdm's __init__ descriptor) and
    # removes what was not (the module-level `print` that shadows the builtin).
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(std.tqdm, "__init__", quiet_init))
        stack.enter_context(mock.patch.object(evaluator, "get_git_commit_hash", quiet_git))
        stack.enter_context(mock.patch.object(metrics, "print", quiet_print, create=True))
        logger.addFilter(drop_note)
        stack.callback(logger.removeFilter, drop_note)
        yield


def limit_samples(task: str, manager, limit: int) -> dict[str, list[int]] | None:
    """lm-eval's `samples` (subtask -> item indices) that make an integer `limit` mean items
    of a benchmark rather than items of each of its subtasks: a group that reports one
    aggregate score (MMLU and its categories) gets `limit` items in all, the first ones of
    each subtask in proportion to its size (largest remainder; at least one each, as lm-eval
    reads an empty list as "all"); a group that only collects benchmarks (mor_paper_local),
    or whose metadata says `limit_per_subtask: true` (mor_synthetic: four families reported
    one by one), passes `limit` to each member; a plain task gets its first `limit` items.
    None when no aggregating group is involved (lm-eval's own `limit` then does the same)."""
    loaded = manager.load([task])
    leaves, groups, members = loaded["tasks"], loaded["groups"], loaded["group_map"]
    out: dict[str, list[int]] = {}
    spread = False

    def sizes(name: str) -> dict[str, int]:
        if name in leaves:
            return {name: len(leaves[name].eval_docs)}
        return {k: n for child in members[name] for k, n in sizes(child).items()}

    def visit(name: str) -> None:
        nonlocal spread
        if name in leaves:
            out[name] = list(range(min(limit, len(leaves[name].eval_docs))))
        elif groups[name].has_aggregation and not (groups[name].metadata or {}).get(
                "limit_per_subtask"):
            spread = True
            out.update({k: list(range(n)) for k, n in _spread(limit, sizes(name)).items()})
        else:
            for child in members[name]:
                visit(child)

    visit(task)
    return out if spread else None


def _spread(limit: int, sizes: dict[str, int]) -> dict[str, int]:
    """`limit` items over subtasks of the given sizes: proportional shares (largest
    remainder), at least 1 and at most the subtask's size each."""
    total = sum(sizes.values())
    if limit >= total:
        return dict(sizes)
    exact = {name: limit * n / total for name, n in sizes.items()}
    share = {name: max(1, min(sizes[name], int(x))) for name, x in exact.items()}
    left = limit - sum(share.values())
    for name in sorted(exact, key=lambda k: exact[k] - int(exact[k]), reverse=True):
        if left <= 0:
            break
        if share[name] < sizes[name]:
            share[name] += 1
            left -= 1
    return share


def _requests(counts: Counter[str] | None) -> int:
    """Log-likelihood requests scored so far (both paths) from `MorBenchLM.scoring_counts`."""
    if counts is None:
        return 0
    return counts["plain_requests"] + counts["shared_prefix_requests"]


def _number(value: Any) -> float:
    """lm-eval reports a stderr it cannot compute (n == 1) as the string "N/A"."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def evaluate_synthetic(lm, out_dir: Path, *, limit: int | float | None = None,
                       num_fewshot: int = 0, tasks: Sequence[str] = SYNTHETIC_TASKS
                       ) -> dict[str, dict[str, float | int]]:
    """Evaluate `lm` (an `lm_eval.api.model.LM`, e.g. `MorBenchLM`) on the synthetic tasks
    that `evals.lmeval.synthetic_tasks.write_synthetic_tasks` wrote to `out_dir`; returns
    {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}} (stderr NaN where
    lm-eval cannot compute one). A thin view of `run_tasks`, the path suites use; offline
    while it runs, as every all-local task list is."""
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown:
        raise DataError(f"unknown synthetic task(s) {unknown}; expected {SYNTHETIC_TASKS}")
    check_written(out_dir, SYNTHETIC_TASKS)
    res = run_tasks(lm, list(tasks), include_paths=[Path(out_dir).resolve()],
                    num_fewshot=num_fewshot, limit=limit)
    out: dict[str, dict[str, float | int]] = {}
    for task in tasks:
        r = res["tasks"][task]
        row: dict[str, float | int] = {}
        for m in METRICS:
            row[m] = _number(r["metrics"].get(m))
            row[f"{m}_stderr"] = _number(r["stderr"].get(m))
        row["n"] = int(r["n"])
        out[task] = row
    return out

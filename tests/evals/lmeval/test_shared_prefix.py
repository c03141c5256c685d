"""Shared-prefix scoring in the lm-eval adapter: requests with one context scored in one packed
row [context, answer 1, answer 2, ...] give the plain path's log-likelihoods and greedy flags
(fp32, 1e-4) for every causal family and routing, independently of batch size and token
budget; the packed row's mask is causal and keeps answers apart; MoR top-k never packs."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from evals.data.tokenizer import ByteTokenizer  # noqa: E402
from evals.lmeval.adapter import MorBenchLM  # noqa: E402
from evals.lmeval.synthetic_tasks import SYNTHETIC_TASKS, make_items  # noqa: E402
from mor import ConfigError, ModelConfig, build_model  # noqa: E402
from mor.model import prefix_tree_mask  # noqa: E402
from mor.routing import RoutingKnob  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "benchmarks" / "wheel_rows.json"

# Every causal family and routing variant: (family, config overrides).
CAUSAL = [
    ("vanilla", {}),
    ("recursive", {}),
    ("recursive", {"sharing": "middle_sequence"}),
    ("mor", {"eval_routing": "causal"}),  # expert-choice, recursion-wise KV caching
    ("mor", {"eval_routing": "causal", "kv": "share"}),
    ("mor", {"eval_routing": "causal", "expert_aux": "router"}),  # aux router decides
    ("mor", {"eval_routing": "causal", "router_arch": "mlp", "router_func": "tanh"}),
    ("mor", {"router": "token"}),
    ("mor", {"router": "token", "kv": "share"}),
    ("mor", {"router": "token", "balancing": "loss_free"}),
]
IDS = [f"{f}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for f, kw in CAUSAL]


def _model(family="mor", **kw):
    torch.manual_seed(0)
    extra = {"num_recursions": 3} if family != "vanilla" else {}
    # a window the few-shot prompts fit in (a truncated context depends on its continuation's
    # length, so requests only share a row when nothing is cut: see the truncation test)
    cfg = ModelConfig.from_preset("micro", family=family, max_seq_len=1024, **extra, **kw)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # large router weights: routing decisions differ between tokens
        for name, p in model.named_parameters():
            if name.startswith(("routers.", "router.", "predictors.")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _lm(model, **kw):
    return MorBenchLM(model=model, tokenizer=ByteTokenizer(), **kw)


def _requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _depths(model) -> set[int]:
    """The depths MoR assigns to the tokens of some text (to check routing varies)."""
    ids = torch.tensor([ByteTokenizer().encode("Question: which object conducts heat best?")])
    with torch.no_grad():
        return set(model(ids).depths.flatten().tolist())


# --- request sets ------------------------------------------------------------------------------
def _synthetic_pairs(shots: int, n_items: int = 6) -> list[tuple[str, str]]:
    """Every choice of the synthetic tasks' first items, with `shots` examples from the train
    split before the context (joined as lm-eval joins them: "\\n\\n", no target delimiter)."""
    pairs = []
    for task in SYNTHETIC_TASKS:
        test, train = make_items(task, n_items=n_items)
        prefix = "".join(f"{ex['context']}{ex['choices'][ex['gold']]}\n\n"
                         for ex in train[:shots])
        for item in test:
            pairs += [(prefix + item["context"], choice) for choice in item["choices"]]
    return pairs


def _benchmark_pairs(shots: int) -> list[tuple[str, str]]:
    """Multiple-choice requests shaped like lm-eval's prompts of the paper's benchmarks, from
    the invented fixture rows of the offline-data tests: HellaSwag, PIQA, ARC (one context,
    several answers), WinoGrande (several contexts, one answer) and LAMBADA."""
    rows = json.loads(FIXTURE.read_text())
    items: list[tuple[str, list[str]]] = []  # (context, answers), lm-eval's formats
    for r in rows["hellaswag/validation"]:
        items.append((f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}",
                      [" " + e for e in r["endings"]]))
    for r in rows["piqa/validation"]:
        items.append((f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]]))
    for key in ("arc_easy/validation", "arc_challenge/validation"):
        for r in rows[key]:
            items.append((f"Question: {r['question']}\nAnswer:",
                          [" " + t for t in r["choices"]["text"]]))
    pairs = []
    for n, (ctx, answers) in enumerate(items):
        shots_text = "".join(f"{c}{a[0]}\n\n" for c, a in (items[:n] + items[n + 1:])[:shots])
        pairs += [(shots_text + ctx, a) for a in answers]
    for r in rows["winogrande/validation"]:  # partial scoring: contexts differ, one answer
        head, tail = r["sentence"].split("_")
        pairs += [(head + r["option1"], " " + tail.strip()), (head + r["option2"],
                                                              " " + tail.strip())]
    pairs += [("I knocked twice, then I was going to open the", " door"),
              ("", " a continuation with an empty context")]
    return pairs


def _assert_same(got, want, tol=1e-4):
    assert len(got) == len(want)
    for n, ((a, ga), (b, gb)) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, abs=tol), n
        assert ga == gb, n


# --- equality with the plain path --------------------------------------------------------------
@pytest.mark.parametrize("family,kw", CAUSAL, ids=IDS)
def test_shared_prefix_equals_plain_for_every_causal_model(family, kw):
    model = _model(family, **kw)
    if family == "mor":
        assert len(_depths(model)) > 1  # routing really differs between tokens
    pairs = (_synthetic_pairs(shots=2, n_items=4) + _benchmark_pairs(shots=0)
             + _benchmark_pairs(shots=1))
    plain = _lm(model, batch_size=8, shared_prefix=False)
    shared = _lm(model, batch_size=8)
    assert (plain.scoring, shared.scoring) == ("plain", "shared_prefix")
    want = plain.loglikelihood(_requests(pairs), disable_tqdm=True)
    got = shared.loglikelihood(_requests(pairs), disable_tqdm=True)
    _assert_same(got, want)
    counts = shared.scoring_counts
    assert counts["shared_prefix_requests"] == len(pairs) and counts["plain_requests"] == 0
    # most requests shared their row; the contexts ran once per group
    assert counts["shared_prefix_grouped_requests"] > 0.8 * len(pairs)
    assert counts["shared_prefix_tokens"] < 0.6 * plain.scoring_counts["plain_tokens"]
    assert plain.scoring_counts["shared_prefix_requests"] == 0


@pytest.mark.parametrize("family,kw", [CAUSAL[0], CAUSAL[4], CAUSAL[5], CAUSAL[8]],
                         ids=[IDS[0], IDS[4], IDS[5], IDS[8]])
def test_scores_do_not_depend_on_batch_size_or_token_budget(family, kw):
    model = _model(family, **kw)
    pairs = _synthetic_pairs(shots=1, n_items=2) + _benchmark_pairs(shots=1)
    ref = _lm(model, batch_size=1, shared_prefix=False).loglikelihood(_requests(pairs),
                                                                      disable_tqdm=True)
    for batch_size, budget in ((1, 1), (4, 300), (16, None), (2, 100_000)):
        lm = _lm(model, batch_size=batch_size, token_budget=budget)
        _assert_same(lm.loglikelihood(_requests(pairs), disable_tqdm=True), ref)
    # one request alone: the same as in any batch
    alone = [_lm(model).loglikelihood(_requests([p]), disable_tqdm=True)[0] for p in pairs[:6]]
    _assert_same(alone, ref[:6])


@pytest.mark.parametrize("family,kw", [CAUSAL[0], CAUSAL[4], CAUSAL[7]],
                         ids=[IDS[0], IDS[4], IDS[7]])
def test_truncated_contexts_and_long_continuations(family, kw):
    """A window shorter than the requests: each request's context is cut differently (by its
    continuation's length), so requests group by the context they are really scored with;
    continuations longer than the window score their last max_length tokens."""
    model = _model(family, **kw)
    ctx = "A long shared context that will not fit in the window at all. " * 2
    pairs = [(ctx, " a"), (ctx, " bb"), (ctx, " a longer answer"), (ctx, " bb"),
             (ctx, " an answer longer than the whole window of the model"), ("x", " y")]
    for max_length in (24, 40):
        plain = _lm(model, max_length=max_length, shared_prefix=False)
        shared = _lm(model, max_length=max_length, token_budget=64)
        _assert_same(shared.loglikelihood(_requests(pairs), disable_tqdm=True),
                     plain.loglikelihood(_requests(pairs), disable_tqdm=True))


@pytest.mark.parametrize("family,kw", [CAUSAL[0], CAUSAL[3], CAUSAL[7]],
                         ids=[IDS[0], IDS[3], IDS[7]])
def test_lm_eval_accuracies_and_items_are_identical(family, kw, tmp_path):
    """End to end through lm-eval (2-shot synthetic tasks): the same log-likelihood for every
    request lm-eval sends, the same accuracies and per-item correctness; the path is
    recorded."""
    from evals.lmeval.adapter import run_tasks
    from evals.lmeval.synthetic_tasks import write_synthetic_tasks

    class Recording(MorBenchLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            out = super()._loglikelihood_tokens(requests, disable_tqdm, **kwargs)
            self.seen.update({(tuple(c), tuple(x)): r for (_, c, x), r in zip(requests, out)})
            return out

    model = _model(family, **kw)
    paths = [write_synthetic_tasks(tmp_path, n_items=8)]
    res = {}
    for flag in (False, True):
        lm = Recording(model=model, tokenizer=ByteTokenizer(), batch_size=8, shared_prefix=flag)
        lm.seen = {}
        res[flag] = (run_tasks(lm, list(SYNTHETIC_TASKS), include_paths=paths, num_fewshot=2,
                               limit=8, log_samples=True), lm.seen)
    (plain, plain_seen), (shared, shared_seen) = res[False], res[True]
    assert (plain["scoring"], shared["scoring"]) == ("plain", "shared_prefix")
    assert plain_seen.keys() == shared_seen.keys() and len(plain_seen) == 4 * 8 * 4
    for key, (a, ga) in plain_seen.items():
        b, gb = shared_seen[key]
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    for task in SYNTHETIC_TASKS:
        assert plain["tasks"][task]["metrics"] == shared["tasks"][task]["metrics"]
        assert plain["items"][task] == shared["items"][task]


# --- the packed row is causal and keeps branches apart -----------------------------------------
def _packed(prefix: list[int], branches: list[list[int]]):
    ids = list(prefix)
    pos = list(range(len(prefix)))
    seg = [0] * len(prefix)
    for s, br in enumerate(branches, 1):
        ids += br
        pos += range(len(prefix), len(prefix) + len(br))
        seg += [s] * len(br)
    ids_t, pos_t, seg_t = (torch.tensor([x]) for x in (ids, pos, seg))
    return ids_t, pos_t, prefix_tree_mask(seg_t)


def test_prefix_tree_mask():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0],
                         [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(prefix_tree_mask(seg)[0], want)


@pytest.mark.parametrize("family,kw", CAUSAL, ids=IDS)
def test_packed_row_equals_separate_sequences_and_is_causal(family, kw):
    """Each branch of a packed row gets the logits it gets as its own sequence; changing a
    token of one branch never changes another branch's (or the prefix's) outputs, and
    changing a token never changes an earlier output."""
    model = _model(family, **kw)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (13,), generator=g).tolist()
    branches = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 1, 9, 4)]

    def run(prefix, branches):
        ids, pos, mask = _packed(prefix, branches)
        with torch.no_grad():
            return model(ids, positions=pos, attn_mask=mask).logits[0]

    base = run(prefix, branches)
    with torch.no_grad():
        start = len(prefix)
        for br in branches:
            alone = model(torch.tensor([prefix + br])).logits[0]
            torch.testing.assert_close(base[:len(prefix)], alone[:len(prefix)], atol=1e-5,
                                       rtol=0)
            torch.testing.assert_close(base[start:start + len(br)], alone[len(prefix):],
                                       atol=1e-5, rtol=0)
            start += len(br)
    # change the third branch's tokens: the others and the prefix do not move
    changed = [list(b) for b in branches]
    changed[2] = [(t + 17) % 256 for t in changed[2]]
    other = run(prefix, changed)
    bounds = [len(prefix)]
    for br in branches:
        bounds.append(bounds[-1] + len(br))
    keep = torch.ones(base.shape[0], dtype=torch.bool)
    keep[bounds[2]:bounds[3]] = False
    torch.testing.assert_close(other[keep], base[keep], atol=1e-5, rtol=0)
    assert not torch.allclose(other[~keep], base[~keep], atol=1e-3)
    # change a prefix token: every earlier output stays
    later = list(prefix)
    later[7] = (later[7] + 1) % 256
    torch.testing.assert_close(run(later, branches)[:7], base[:7], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,kw", [CAUSAL[0], CAUSAL[4], CAUSAL[5], CAUSAL[8]],
                         ids=[IDS[0], IDS[4], IDS[5], IDS[8]])
def test_an_answer_never_changes_another_answers_score(family, kw):
    model = _model(family, **kw)
    lm = _lm(model)
    ctx = "Question: Which object is the best conductor of heat?\nAnswer:"
    answers = [" copper pot", " wooden spoon", " plastic cup", " wool mitten"]
    base = lm.loglikelihood(_requests([(ctx, a) for a in answers]), disable_tqdm=True)
    answers[1] = " a much longer and different wooden spoon"
    moved = lm.loglikelihood(_requests([(ctx, a) for a in answers]), disable_tqdm=True)
    for i in (0, 2, 3):
        assert moved[i][0] == pytest.approx(base[i][0], abs=1e-5) and moved[i][1] == base[i][1]
    assert moved[1][0] != pytest.approx(base[1][0], abs=1e-3)
    assert lm.scoring_counts["shared_prefix_grouped_requests"] == 8


def test_knob_thresholds_apply_on_the_packed_path():
    """The causal rule's evaluation-time thresholds (RoutingKnob) route packed rows too."""
    model = _model("mor", eval_routing="causal")
    model.set_knob(RoutingKnob(thresholds=(0.0, -0.5, 1.0)))
    pairs = _synthetic_pairs(shots=1, n_items=2)
    _assert_same(_lm(model).loglikelihood(_requests(pairs), disable_tqdm=True),
                 _lm(model, shared_prefix=False).loglikelihood(_requests(pairs),
                                                               disable_tqdm=True))


# --- top-k MoR never packs ---------------------------------------------------------------------
def test_topk_routing_never_takes_the_shared_prefix_path():
    pairs = _synthetic_pairs(shots=1, n_items=2) + _benchmark_pairs(shots=0)
    topk_model = _model("mor")  # expert-choice, top-k at evaluation
    for lm in (_lm(topk_model), _lm(topk_model, shared_prefix=True),
               _lm(_model("mor", eval_routing="causal"), routing="topk")):
        assert lm.routing == "topk" and lm.scoring == "plain"
        assert lm.get_model_info()["scoring"] == "plain"
        lm.loglikelihood(_requests(pairs), disable_tqdm=True)
        assert lm.scoring_counts["shared_prefix_requests"] == 0
        assert lm.scoring_counts["shared_prefix_forwards"] == 0
        assert lm.scoring_counts["plain_requests"] == len(pairs)
    # ...and a causal model switched to causal by the adapter packs
    assert _lm(topk_model, routing="causal").scoring == "shared_prefix"
    # the model itself refuses packed rows under top-k routing
    ids, pos, mask = _packed([1, 2, 3], [[4, 5], [6]])
    with torch.no_grad(), pytest.raises(ConfigError, match="not causal"):
        topk_model(ids, positions=pos, attn_mask=mask)
    with torch.no_grad(), pytest.raises(ConfigError, match="not causal"):
        _model("mor", eval_routing="causal")(ids, attn_mask=mask, routing="topk")


def test_forward_checks_positions_and_mask():
    model = _model("vanilla")
    ids, pos, mask = _packed([1, 2, 3], [[4, 5], [6]])
    with torch.no_grad():
        with pytest.raises(ConfigError, match="positions"):
            model(ids, positions=pos[:, :-1])
        with pytest.raises(ConfigError, match="positions"):
            model(ids, positions=pos + model.cfg.max_seq_len)
        with pytest.raises(ConfigError, match="attn_mask"):
            model(ids, attn_mask=mask.float())
        with pytest.raises(ConfigError, match="itself"):
            model(ids, attn_mask=mask & ~torch.eye(6, dtype=torch.bool))
        with pytest.raises(ConfigError, match="targets"):
            model(ids, targets=ids, logits_index=torch.tensor([0]))
        # a packed row may be longer than max_seq_len: only its positions must fit
        n = model.cfg.max_seq_len
        long_ids = torch.zeros(1, n + 8, dtype=torch.long)
        long_pos = torch.arange(n + 8).remainder(n).unsqueeze(0)
        seg = (torch.arange(n + 8) >= n).long().unsqueeze(0)
        out = model(long_ids, positions=long_pos, attn_mask=prefix_tree_mask(seg),
                    logits_index=torch.tensor([0, n + 7]))
        assert out.logits.shape == (2, model.cfg.vocab_size)
        with pytest.raises(ConfigError, match="max_seq_len"):
            model(long_ids)


def test_switch_and_model_args():
    model = _model("vanilla")
    assert _lm(model).scoring == "shared_prefix"
    assert _lm(model, shared_prefix="False").scoring == "plain"  # lm-eval model_args form
    assert _lm(model, shared_prefix="true").scoring == "shared_prefix"
    assert _lm(model, batch_size=4).token_budget == 1024
    assert _lm(model, token_budget="500").token_budget == 500
    with pytest.raises(ConfigError, match="shared_prefix"):
        _lm(model, shared_prefix="maybe")
    with pytest.raises(ConfigError, match="empty context"):
        _lm(model)._loglikelihood_tokens([(None, [], [1, 2])])


def test_cli_eval_records_the_scoring_path(tmp_path, capsys):
    from evals.cli.main import build_parser, main
    from mor import save_checkpoint

    argv = ["eval", "CK", "--tasks", "mor_synth_recall"]
    assert build_parser(argv).parse_args(argv).shared_prefix is True
    argv.append("--no-shared-prefix")
    assert build_parser(argv).parse_args(argv).shared_prefix is False
    save_checkpoint(_model("mor", eval_routing="causal"), tmp_path / "ck",
                    extra={"tokenizer": {"kind": "bytes"}})
    got = {}
    for flag in ([], ["--no-shared-prefix"]):
        assert main(["eval", str(tmp_path / "ck"), "--tasks", "mor_synth_recall", "--limit",
                     "4", "--routing", "both", "--json", "--cache-dir", str(tmp_path / "cache"),
                     *flag]) == 0
        out = json.loads(capsys.readouterr().out)["results"]
        got[bool(flag)] = out
        assert out["topk"]["scoring"] == "plain"  # top-k never packs
        assert out["causal"]["scoring"] == ("plain" if flag else "shared_prefix")
    for mode in ("topk", "causal"):
        assert (got[False][mode]["tasks"]["mor_synth_recall"]["metrics"]
                == got[True][mode]["tasks"]["mor_synth_recall"]["metrics"])

"""The lm-evaluation-harness adapter: batch invariance, parity with lm-eval's own HFLM on
the same weights, rolling log-likelihood and generation semantics."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from evals.data.tokenizer import ByteTokenizer  # noqa: E402
from evals.lmeval.adapter import MorBenchLM  # noqa: E402
from mor import ConfigError, ModelConfig, build_model, save_checkpoint  # noqa: E402
from tests.conftest import MICRO_SUITE  # noqa: E402

TEXTS = [("12 + 39 =", " 51"), ("12 + 39 =", " 52"), ("the cat sat on the", " mat"),
         ("k7=42. k3=11. k7?", " 42"), ("a", " b c d e f g"), ("x=3. y=x+2. y?", " 5")]


def _model(family="mor", **kw):
    torch.manual_seed(0)
    extra = {"num_recursions": 3} if family != "vanilla" else {}
    cfg = ModelConfig.from_preset("micro", family=family, **extra, **kw)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # large router weights: routing decisions differ between tokens
        for name, p in model.named_parameters():
            if name.startswith(("routers.", "router.")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@pytest.mark.parametrize("family,kw", [
    ("vanilla", dict()), ("recursive", dict(sharing="middle_sequence")),
    ("mor", dict()), ("mor", dict(kv="share")), ("mor", dict(router_arch="mlp")),
    ("mor", dict(expert_aux="router")), ("mor", dict(router_func="tanh")),
    ("mor", dict(eval_routing="causal")), ("mor", dict(eval_routing="causal", kv="share")),
    ("mor", dict(router="token")), ("mor", dict(router="token", kv="share")),
    ("mor", dict(router="token", balancing="loss_free")),
])
def test_scores_do_not_depend_on_the_batch(family, kw):
    lm1 = MorBenchLM(model=_model(family, **kw), tokenizer=ByteTokenizer(), batch_size=1)
    lm8 = MorBenchLM(model=_model(family, **kw), tokenizer=ByteTokenizer(), batch_size=8)
    alone = lm1.loglikelihood(_requests(TEXTS), disable_tqdm=True)
    batched = lm8.loglikelihood(_requests(TEXTS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(alone, batched):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_padding_would_change_topk_scores_without_real_lengths():
    """Why the adapter passes lengths: with padding competing for top-k capacity, a short
    request's logits change when it shares a batch with a long one."""
    model = _model()
    tok = ByteTokenizer()
    short, long = tok.encode("12 + 39 = 51"), tok.encode("the cat sat on the mat, twice over")
    batch = torch.zeros(2, len(long), dtype=torch.long)
    batch[0, : len(short)] = torch.tensor(short)
    batch[1] = torch.tensor(long)
    with torch.no_grad():
        alone = model(torch.tensor([short])).logits[0]
        naive = model(batch).logits[0, : len(short)]
        fixed = model(batch, lengths=torch.tensor([len(short), len(long)])).logits[0, : len(short)]
    assert not torch.allclose(naive, alone, atol=1e-4)
    torch.testing.assert_close(fixed, alone, atol=1e-5, rtol=0)


def test_routing_argument_is_applied_and_reported(tmp_path):
    model = _model()
    save_checkpoint(model, tmp_path / "ck", extra={"tokenizer": {"kind": "bytes"}})
    topk = MorBenchLM(str(tmp_path / "ck"))
    causal = MorBenchLM(str(tmp_path / "ck"), routing="causal")
    assert (topk.routing, causal.routing) == ("topk", "causal")
    a = topk.loglikelihood(_requests(TEXTS[:2]), disable_tqdm=True)
    b = causal.loglikelihood(_requests(TEXTS[:2]), disable_tqdm=True)
    assert a != b  # the two modes route differently, so they score differently
    with pytest.raises(ConfigError, match="exactly one"):
        MorBenchLM()
    vanilla = _model("vanilla")
    with pytest.raises(ConfigError, match="MoR models only"):
        MorBenchLM(model=vanilla, tokenizer=ByteTokenizer(), routing="causal")


def test_unknown_model_arguments_are_refused(tmp_path):
    """A typo in --model_args (routng=causal) must not run silently with the default
    routing; lm-eval's own extra (max_batch_size) is accepted."""
    from lm_eval.api.registry import get_model

    save_checkpoint(_model(), tmp_path / "ck", extra={"tokenizer": {"kind": "bytes"}})
    cls = get_model("mor-bench")
    with pytest.raises(ConfigError, match="unknown mor-bench model argument.*routng.*known: "
                       "checkpoint, routing"):
        cls.create_from_arg_string(f"checkpoint={tmp_path / 'ck'},routng=causal",
                                   {"batch_size": 4, "max_batch_size": None, "device": "cpu"})
    lm = cls.create_from_arg_string(f"checkpoint={tmp_path / 'ck'},routing=causal",
                                    {"batch_size": 4, "max_batch_size": 64, "device": "cpu"})
    assert lm.routing == "causal" and lm.batch_size == 4


def test_routing_argument_leaves_the_callers_model_as_it_was():
    """routing="causal" on a top-k model: scored and generated under causal routing, and the
    model still routes with top-k afterwards (the adapter switches only around its own
    forwards); the validation of the mode happens at construction."""
    model = _model()  # expert-choice, eval_routing "topk"
    assert model.cfg.eval_routing == "topk"
    lm = MorBenchLM(model=model, tokenizer=ByteTokenizer(), routing="causal", batch_size=4)
    assert lm.routing == "causal" and model.cfg.eval_routing == "topk"
    got = lm.loglikelihood(_requests(TEXTS), disable_tqdm=True)
    assert model.cfg.eval_routing == "topk"
    causal_twin = MorBenchLM(model=_model(eval_routing="causal"), tokenizer=ByteTokenizer(),
                             batch_size=4)
    topk = MorBenchLM(model=_model(), tokenizer=ByteTokenizer(), batch_size=4)
    assert got == causal_twin.loglikelihood(_requests(TEXTS), disable_tqdm=True)
    assert got != topk.loglikelihood(_requests(TEXTS), disable_tqdm=True)
    # generation (through the KV-cached decode engine under causal routing)
    reqs = [Instance("generate_until", {}, ("12 + 39 =", {"until": [], "max_gen_toks": 5}), 0)]
    assert lm.generate_until(reqs) == causal_twin.generate_until(reqs)
    assert model.cfg.eval_routing == "topk"
    # ...and the other way round: routing="topk" on a causal model
    causal_model = _model(eval_routing="causal")
    MorBenchLM(model=causal_model, tokenizer=ByteTokenizer(), routing="topk").loglikelihood(
        _requests(TEXTS[:2]), disable_tqdm=True)
    assert causal_model.cfg.eval_routing == "causal"
    with pytest.raises(ConfigError):  # token-choice routing is causal by construction
        MorBenchLM(model=_model(router="token"), tokenizer=ByteTokenizer(), routing="topk")


def test_run_tasks_leaves_the_model_routing_and_the_environment_as_they_were(tmp_path,
                                                                              monkeypatch):
    from evals.lmeval.adapter import run_tasks
    from evals.lmeval.synthetic_tasks import write_synthetic_tasks

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    model = _model()
    lm = MorBenchLM(model=model, tokenizer=ByteTokenizer(), routing="causal", batch_size=8)
    res = run_tasks(lm, ["mor_synth_recall"], limit=4,
                    include_paths=[write_synthetic_tasks(tmp_path, n_items=4)])
    assert res["routing"] == "causal" and res["tasks"]["mor_synth_recall"]["n"] == 4
    assert model.cfg.eval_routing == "topk"
    # local data only: offline while lm-eval ran, restored afterwards
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ


def test_loglikelihood_rolling_matches_a_direct_forward():
    model = _model("vanilla")
    tok = ByteTokenizer()
    lm = MorBenchLM(model=model, tokenizer=tok, max_length=64)
    short = "the cat sat on the mat."
    long = "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 6  # > 2 windows
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0),
                                    Instance("loglikelihood_rolling", {}, (long,), 1)],
                                   disable_tqdm=True)
    ids = [tok.eos_id] + tok.encode(short)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0], -1)
    expect = logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item()
    assert got[0] == pytest.approx(expect, abs=1e-3)
    # Disjoint windows of 64: the first predicts 64 tokens from EOS + 63, the next ones
    # condition on the preceding tokens only up to the window length.
    toks = tok.encode(long)
    total, pos = 0.0, 0
    while pos < len(toks):
        n = min(64, len(toks) - pos)
        ctx = ([tok.eos_id] + toks)[max(0, pos + n - 64): pos + n]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx])).logits[0], -1)
        total += lp[-n:].gather(1, torch.tensor(toks[pos:pos + n]).unsqueeze(1)).sum().item()
        pos += n
    assert got[1] == pytest.approx(total, abs=1e-2)


def test_generate_until_stops_and_respects_max_tokens():
    model = _model("vanilla")
    lm = MorBenchLM(model=model, tokenizer=ByteTokenizer())
    free = lm.generate_until([Instance("generate_until", {}, ("hello", {"until": [],
                                                                         "max_gen_toks": 7}), 0)],
                             disable_tqdm=True)[0]
    assert 0 < len(free.encode()) <= 7
    stop = free[2] if len(free) > 2 else free[-1]
    cut = lm.generate_until([Instance("generate_until", {}, ("hello", {"until": [stop],
                                                                        "max_gen_toks": 7}), 0)],
                            disable_tqdm=True)[0]
    assert stop not in cut and free.startswith(cut)


@pytest.mark.parametrize("family,kw", [("vanilla", {}), ("recursive", {}),
                                       ("mor", {"eval_routing": "causal"}),
                                       ("mor", {"router": "token"}),
                                       ("mor", {"kv": "share", "eval_routing": "causal"})])
def test_cached_generation_equals_rerunning_the_sequence(family, kw):
    """Causal models generate through the KV-cached continuous-batching decoder; the text
    equals greedy decoding that re-runs the whole sequence at every step."""
    model = _model(family, **kw)
    lm = MorBenchLM(model=model, tokenizer=ByteTokenizer(), batch_size=3)
    assert lm.routing != "topk"
    reqs = [Instance("generate_until", {}, (ctx, {"until": until, "max_gen_toks": n}), i)
            for i, (ctx, until, n) in enumerate([("hello", [], 12), ("12 + 39 =", ["\n"], 9),
                                                 ("a", ["zz", "q"], 20), ("The cat", [], 5),
                                                 ("x", [], 1)])]
    cached = lm._generate_cached(reqs)
    assert cached == lm._generate_rerun(reqs)
    assert lm.generate_until(reqs) == cached
    for text, r in zip(cached, reqs):
        assert len(text) <= r.args[1]["max_gen_toks"]  # one byte token: <= 1 character
    assert any(cached)  # something was generated


def test_topk_routing_generates_by_rerunning():
    model = _model("mor")  # expert-choice, top-k at evaluation: not causal
    lm = MorBenchLM(model=model, tokenizer=ByteTokenizer(), routing="topk")
    req = [Instance("generate_until", {}, ("hi", {"until": [], "max_gen_toks": 4}), 0)]
    assert lm.generate_until(req) == lm._generate_rerun(req)
    assert model.cfg.eval_routing == "topk"  # the cached decoder (causal) was not used


def _byte_hf_tokenizer():
    """A Hugging Face fast tokenizer that encodes exactly like `ByteTokenizer` (byte b -> id
    b, EOS 256) with explicit special tokens, so lm-eval adds none beyond the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab["<|endoftext|>"] = 256
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def test_vanilla_matches_lm_eval_hflm_on_the_same_weights():
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate")
    transformers = pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from baselines.vanilla import hf_llama_config_kwargs, to_hf_state_dict

    model = _model("vanilla")
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_llama_config_kwargs(model.cfg))).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    hf_tok = _byte_hf_tokenizer()
    assert hf_tok("k7=42")["input_ids"] == ByteTokenizer().encode("k7=42")
    ref = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=4, device="cpu")
    ours = MorBenchLM(model=model, tokenizer=ByteTokenizer(), batch_size=4)
    pairs = TEXTS + [("", " hello")]  # an empty context is conditioned on EOS by both
    a = ref.loglikelihood(_requests(pairs), disable_tqdm=True)
    b = ours.loglikelihood(_requests(pairs), disable_tqdm=True)
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-4) and gx == gy
    # ...and the same accuracies on a small local multiple-choice task.
    import tempfile

    from evals.lmeval.adapter import run_tasks
    from evals.lmeval.synthetic_tasks import write_synthetic_tasks

    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_synthetic_tasks(tmp, n_items=24)]
        got = [run_tasks(lm, ["mor_synth_arithmetic", "mor_synth_recall"], include_paths=paths,
                         limit=24)["tasks"] for lm in (ref, ours)]
    for task in ("mor_synth_arithmetic", "mor_synth_recall"):
        assert got[0][task]["n"] == got[1][task]["n"] == 24
        assert got[0][task]["metrics"] == got[1][task]["metrics"]


def test_simple_evaluate_by_registered_name(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evals.lmeval.synthetic_tasks import write_synthetic_tasks

    save_checkpoint(_model(), tmp_path / "ck", extra={"tokenizer": {"kind": "bytes"}})
    tasks_dir = write_synthetic_tasks(tmp_path / "tasks", n_items=8)
    res = lm_eval.simple_evaluate(
        model="mor-bench", model_args=f"checkpoint={tmp_path / 'ck'},routing=causal",
        tasks=["mor_synth_tracking"], limit=8,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    assert res["n-samples"]["mor_synth_tracking"]["effective"] == 8
    assert 0.0 <= res["results"]["mor_synth_tracking"]["acc,none"] <= 1.0
    assert "routing=causal" in str(res["config"]["model_args"])


# The shared two-model micro suite plus few-shot evaluation on the synthetic tasks.
MICRO_EVAL_SUITE = MICRO_SUITE + """
[eval]
tasks = ["mor_synthetic"]
limit = 8
"""


@pytest.mark.slow
def test_suite_records_few_shot_accuracy_and_cli_eval(tmp_path, capsys):
    import json

    from evals.cli.main import main
    from evals.lmeval.synthetic_tasks import SYNTHETIC_TASKS

    suite = tmp_path / "micro.toml"
    suite.write_text(MICRO_EVAL_SUITE)
    assert main(["run", str(suite), "--out", str(tmp_path / "runs"), "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    run_dir = json.loads(capsys.readouterr().out)["run_dir"]
    records = {}
    for name in ("vanilla", "mor-2"):
        rec_file = next((tmp_path / "runs").rglob(f"{name}-*/record.json"))
        records[name] = json.loads(rec_file.read_text())
    for rec in records.values():
        fs = rec["metrics"]["fewshot"]
        assert fs["num_fewshot"] == 0 and fs["limit"] == 8
        for task in SYNTHETIC_TASKS:
            res = fs["tasks"][task]
            assert res["n"] == 8 and 0.0 <= res["metrics"]["acc"] <= 1.0
            assert res["stderr"]["acc"] >= 0.0
    assert set(records["mor-2"]["metrics"]["fewshot"]["by_routing"]) == {"topk", "causal"}
    assert records["mor-2"]["metrics"]["fewshot"]["routing"] == "topk"
    table = (tmp_path / "runs").glob("micro-*/report.csv")
    header = next(table).read_text().splitlines()[0].split(",")
    assert {f"fs:{t}" for t in SYNTHETIC_TASKS} | {"fewshot_avg"} <= set(header)

    # The same checkpoint through `mor-bench eval`, both routing modes.
    mor_dir = next((tmp_path / "runs").rglob("mor-2-*/model.safetensors")).parent
    assert main(["eval", str(mor_dir), "--tasks", "mor_synth_recall", "--limit", "6",
                 "--routing", "both", "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["results"]) == {"topk", "causal"}
    for res in out["results"].values():
        task = res["tasks"]["mor_synth_recall"]
        assert task["n"] == 6
        # per-task wall time and request rate; the requests are the items' answer choices
        assert task["wall_s"] > 0 and task["requests"] >= 6
        assert task["requests_per_s"] == pytest.approx(task["requests"] / task["wall_s"])
    assert out["results"]["topk"]["scoring"] == "plain"
    assert out["results"]["causal"]["scoring"] == "shared_prefix"
    assert main(["eval", str(mor_dir), "--tasks", "mor_synth_recall", "--limit", "6",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    table = capsys.readouterr().out
    assert "requests/s" in table and "wall s" in table and "scoring plain" in table
    assert run_dir


def test_fewshot_columns_follow_the_paper_layout():
    from reports.table import fewshot_scores

    def res(value, n, metric="acc", subtasks=()):
        return {"metrics": {metric: value}, "n": n, "subtasks": list(subtasks)}

    rec = {"metrics": {"fewshot": {"tasks": {
        "mor_paper_local": {"metrics": {}, "n": None, "subtasks": ["hellaswag_local"]},
        "hellaswag_local": res(0.30, 100, "acc_norm"),
        "arc_easy_local": res(0.50, 300, "acc_norm"),
        "arc_challenge_local": res(0.20, 100, "acc_norm"),
        "mmlu_local": res(0.26, 57, subtasks=["mmlu_stem_local"]),
        "mmlu_stem_local": res(0.99, 10, subtasks=["mmlu_anatomy_local"]),
        "mmlu_anatomy_local": res(0.99, 10),
    }}}}
    got = fewshot_scores(rec)
    assert set(got) == {"fs:hellaswag_local", "fs:arc_easy_local", "fs:arc_challenge_local",
                        "fs:mmlu_local", "fs:arc_merged", "fewshot_avg"}
    assert got["fs:arc_merged"] == pytest.approx((0.5 * 300 + 0.2 * 100) / 400)
    # Avg over HellaSwag, merged ARC and MMLU: ARC counts once, MMLU as one benchmark.
    assert got["fewshot_avg"] == pytest.approx((0.30 + got["fs:arc_merged"] + 0.26) / 3)
    assert fewshot_scores({"metrics": {}}) == {}


def test_online_paper_group_names_lm_eval_builtin_tasks():
    """`mor_paper` (shipped) resolves to lm-eval's own seven task names; it is never mistaken
    for local data, so evaluating it would go to the Hub rather than fail offline."""
    from evals.lmeval.tasks import (
        PACKAGE_TASKS,
        data_local_task_names,
        include_paths_for,
        task_manager,
        use_offline_if_local,
    )

    paths = include_paths_for(["mor_paper"], [])
    assert paths == [str(PACKAGE_TASKS)]
    assert "mor_paper" not in data_local_task_names(paths)
    env = {k: os.environ.pop(k, None) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    try:
        assert use_offline_if_local(["mor_paper"], paths) is False
    finally:
        os.environ.update({k: v for k, v in env.items() if v is not None})
    manager = task_manager([], ["mor_paper"])  # the package's tasks and lm-eval's own
    assert "mor_paper" in manager.all_groups
    for task in ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy",
                 "arc_challenge", "mmlu_continuation"):
        assert task in manager.all_subtasks or task in manager.all_groups, task


def test_continuations_longer_than_the_window_score_their_last_tokens():
    model = _model("vanilla")
    tok = ByteTokenizer()
    lm = MorBenchLM(model=model, tokenizer=tok, max_length=16)
    cont = " and then some more words than fit"  # 34 bytes > 16
    (score, _), = lm.loglikelihood(_requests([("start:", cont)]), disable_tqdm=True)
    ids = tok.encode("start:" + cont)[-17:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0], -1)
    expect = logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item()
    assert score == pytest.approx(expect, abs=1e-4)

"""Uptraining in a suite: a model entry's `init` (model:NAME, a checkpoint directory,
hf:PATH) and `init_method`, validated before any compute, resolved per seed, applied by the
runner and recorded (docs/uptraining.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evals.suite.spec import parse_suite, plan_runs
from mor.errors import ConfigError
from tests.conftest import MICRO_SUITE

HEAD = MICRO_SUITE.split("[[models]]")[0].replace("seeds = [0]", "seeds = [0, 1]")
PRE = '[[models]]\nname = "pre"\nfamily = "vanilla"\n'


def _suite(*models: str, head: str = HEAD):
    return parse_suite(head + PRE + "".join(models), source="t.toml")


REC = '[[models]]\nname = "rec"\nfamily = "recursive"\nnum_recursions = 2\ninit = "model:pre"\n' \
      'init_method = "average"\n'
MOR = '[[models]]\nname = "mor"\nfamily = "mor"\nnum_recursions = 2\ninit = "model:pre"\n'


def test_init_resolves_to_the_same_seed_run_of_the_source():
    suite = _suite(REC, MOR)
    inits = {m.name: m.init for m in suite.models}
    assert inits["pre"] is None
    assert inits["rec"]["method"] == "average" and inits["rec"]["fit_gate"] is False
    assert inits["mor"]["method"] == "stepwise" and inits["mor"]["fit_gate"] is True
    runs = {r.run_id: r for r in plan_runs(suite)}
    assert runs["rec-1024T-s1"].init["source"] == "run:pre-1024T-s1"
    assert runs["mor-1024T-s0"].init["source"] == "run:pre-1024T-s0"
    assert runs["mor-1024T-s0"].to_dict()["init_plan"]["method"] == "stepwise"
    # runs are planned in [[models]] order: a source trains before what it initialises
    order = [r.run_id for r in plan_runs(suite)]
    assert order.index("pre-1024T-s1") < order.index("rec-1024T-s1")


def test_one_pretrained_seed_serves_every_seed_of_the_uptrained_models():
    """A model's own `seeds` (here the source's: one pretrained model) override the suite's;
    every seed of a model uptrained from it starts from that one run."""
    suite = parse_suite(HEAD + PRE + "seeds = [0]\n" + REC, source="t.toml")
    runs = {r.run_id: r for r in plan_runs(suite)}
    assert sorted(runs) == ["pre-1024T-s0", "rec-1024T-s0", "rec-1024T-s1"]
    assert {runs[f"rec-1024T-s{s}"].init["source"] for s in (0, 1)} == {"run:pre-1024T-s0"}
    assert runs["rec-1024T-s1"].seed == 1


@pytest.mark.parametrize("own,msg", [
    ("[0, 2]", "runs seeds \\[0, 2\\], which lack seed 1; give 'pre' one seed"),
    ("[]", "'seeds' must be a non-empty list"),
    ("[1, 1]", "lists a seed twice"),
])
def test_model_seeds_are_checked_before_compute(own, msg):
    with pytest.raises(ConfigError, match=f"model 'pre'.*{msg}|{msg}"):
        plan_runs(parse_suite(HEAD + PRE + f"seeds = {own}\n" + REC, source="t.toml"))


@pytest.mark.parametrize("entry,msg", [
    ('[[models]]\nname = "x"\nfamily = "mor"\nnum_recursions = 2\ninit = "model:later"\n',
     "no earlier model named 'later'"),
    ('[[models]]\nname = "x"\nfamily = "vanilla"\ninit = "model:pre"\ninit_method = "lower"\n',
     "init_method applies to recursive and MoR"),
    ('[[models]]\nname = "x"\nfamily = "recursive"\nnum_recursions = 2\ninit = "model:pre"\n'
     'init_method = "middle"\n', "init_method must be one of stepwise, average, lower"),
    ('[[models]]\nname = "x"\nfamily = "mor"\nnum_recursions = 2\nd_model = 32\n'
     'init = "model:pre"\n', r"d_model = 32 .* set d_model = 64"),
    ('[[models]]\nname = "x"\nfamily = "mor"\nnum_recursions = 2\ninit_method = "lower"\n',
     "init_method needs an init"),
    ('[[models]]\nname = "x"\nfamily = "mor"\nnum_recursions = 2\ninit = "/no/such/dir"\n',
     "no such checkpoint directory"),
    ('[[models]]\nname = "x"\nfamily = "mor"\nnum_recursions = 2\ninit = 3\n',
     "init must be"),
])
def test_bad_init_is_refused_before_compute(entry, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        _suite(entry)
    assert "t.toml" in str(err.value) and "model 'x'" in str(err.value)


def test_a_non_vanilla_source_and_a_foreign_tokenizer_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="must be a vanilla model with one budget"):
        _suite(MOR, '[[models]]\nname = "y"\nfamily = "mor"\nnum_recursions = 2\n'
                    'init = "model:mor"\n')
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=6, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    entry = (f'[[models]]\nname = "x"\nfamily = "mor"\nnum_recursions = 2\n'
             f'init = "hf:{tmp_path / "llama"}"\n')
    with pytest.raises(ConfigError, match=r'set \[data\] tokenizer = "hf:'):
        _suite(entry)


def test_the_runner_initialises_and_records_the_source(tmp_path):
    from evals.suite.runner import run_suite

    head = HEAD.replace("seeds = [0, 1]", "seeds = [0]")
    suite = parse_suite(head + PRE + REC + MOR, source="t.toml")
    run_dir, records, failed = run_suite(suite, tmp_path)
    assert failed == []
    by = {r["model_name"]: r for r in records}
    assert by["pre"]["init"] is None
    pre_sha = None
    for name in ("rec", "mor"):
        init = by[name]["init"]
        assert init["run"] == "pre-1024T-s0" and init["kind"] == "mor-bench"
        assert len(init["sha256"]) == 64
        pre_sha = pre_sha or init["sha256"]
        assert init["sha256"] == pre_sha  # both from the same pretrained weights
        assert init["fresh_parameters"] == ([] if name == "rec" else
                                            sorted(init["fresh_parameters"]))
    assert by["rec"]["init"]["method"] == "average"
    assert by["rec"]["init"]["layer_sources"] == {"0": [0], "1": [1, 3], "2": [2, 4],
                                                  "3": [5]}
    gate = by["mor"]["init"]["gate"]
    assert gate["g_star"] == pytest.approx(gate["router_alpha"] / 2)  # sigmoid(0) = 1/2
    # the fitted gate scale is what the saved model decodes with
    saved = json.loads((run_dir / "mor-1024T-s0" / "config.json").read_text())["model"]
    assert saved["router_alpha"] == pytest.approx(gate["router_alpha"])
    # the uptrained model's embedding started from the source's: it is still close to it
    # after a few steps, unlike an independent init
    pre = load_file(str(run_dir / "pre-1024T-s0" / "model.safetensors"))["embed.weight"]
    mor = load_file(str(run_dir / "mor-1024T-s0" / "model.safetensors"))["embed.weight"]
    assert torch.nn.functional.cosine_similarity(pre.flatten(), mor.flatten(), dim=0) > 0.5

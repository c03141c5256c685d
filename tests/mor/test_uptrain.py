"""Uptraining (baselines/uptrain.py): recursive and MoR models initialised from a pretrained
Llama stack saved by `save_pretrained` -- which pretrained tensors land in which layer, for
every method and sharing strategy; vanilla continues the pretrained function exactly."""

from __future__ import annotations

import json

import pytest
import torch

from baselines.uptrain import (
    alpha_for_gate,
    describe_pretrained,
    gate_scale,
    init_from_pretrained,
    layer_sources,
    load_weights,
)
from mor import ModelConfig, build_model
from mor.errors import ConfigError

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random 8-layer LlamaForCausalLM, tied embeddings, saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a wrong copy shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d, safe_serialization=True)
    return d, model


def _layer(hf, i: int, name: str) -> torch.Tensor:
    return dict(hf.model.layers[i].named_parameters())[name].detach()


def _target(**kw) -> ModelConfig:
    return ModelConfig(**SHAPE, n_layers=8, **kw)


CASES = {
    # (config, method) -> expected pretrained layers per unique layer
    ("middle_cycle", 3, "stepwise"): [[0], [1], [4], [7]],   # 1 + 2x3 + 1: M=6, K=2
    ("middle_cycle", 3, "lower"): [[0], [1], [2], [7]],
    ("middle_cycle", 3, "average"): [[0], [1, 3, 5], [2, 4, 6], [7]],
    ("cycle", 2, "stepwise"): [[0], [2], [4], [6]],            # 4 x 2, M = 8, K = 4
    ("cycle", 2, "lower"): [[0], [1], [2], [3]],
    ("cycle", 2, "average"): [[0, 4], [1, 5], [2, 6], [3, 7]],
    ("sequence", 2, "average"): [[0, 1], [2, 3], [4, 5], [6, 7]],
    ("middle_sequence", 3, "average"): [[0], [1, 2, 3], [4, 5, 6], [7]],
}


@pytest.mark.parametrize("sharing,nr,method", list(CASES))
def test_each_method_places_the_expected_pretrained_layers(llama_dir, sharing, nr, method):
    d, hf = llama_dir
    cfg = _target(family="recursive", num_recursions=nr, sharing=sharing)
    assert cfg.unrolled_depth == 8
    assert layer_sources(cfg, 8, method) == CASES[(sharing, nr, method)]
    model = build_model(cfg)
    src = load_weights(describe_pretrained(f"hf:{d}"))
    info = init_from_pretrained(model, src, method)
    for u, layers in enumerate(CASES[(sharing, nr, method)]):
        ours = dict(model.layers[u].named_parameters())
        for hf_name, name in (("self_attn.q_proj.weight", "attn.q_proj.weight"),
                              ("mlp.down_proj.weight", "mlp.down_proj.weight"),
                              ("input_layernorm.weight", "attn_norm.weight")):
            want = torch.stack([_layer(hf, p, hf_name) for p in layers]).mean(0)
            torch.testing.assert_close(ours[name].detach(), want, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.embed.weight.detach(), hf.model.embed_tokens.weight.detach())
    torch.testing.assert_close(model.norm.weight.detach(), hf.model.norm.weight.detach())
    assert info["method"] == method and len(info["sha256"]) == 64
    assert info["fresh_parameters"] == []


def test_mor_routers_stay_fresh_and_the_gate_scale_is_least_squares(llama_dir):
    d, _ = llama_dir
    src = load_weights(describe_pretrained(f"hf:{d}"))
    cfg = _target(family="mor", num_recursions=3)
    windows = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    g = gate_scale(src, cfg, windows)
    assert 0 < g < 2
    alpha = alpha_for_gate(cfg, g)
    assert alpha == pytest.approx(2 * g)  # sigmoid(0) = 1/2
    model = build_model(cfg.replace(router_alpha=alpha))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}
    info = init_from_pretrained(model, src, "stepwise")
    assert before and all(torch.equal(before[n], p) for n, p in model.named_parameters()
                          if n in before)
    assert sorted(info["fresh_parameters"]) == sorted(before)
    token = _target(family="mor", num_recursions=3, router="token")
    assert alpha_for_gate(token, 0.3) == pytest.approx(0.9)  # softmax over 3 depths
    assert alpha_for_gate(_target(family="mor", num_recursions=3, router_func="tanh"),
                          0.3) is None


def test_the_gate_scale_minimises_the_distance_to_the_pretrained_layers(llama_dir):
    """Checked on HF's own hidden states: MoR-3 here is 1 + 2x3 + 1, so its first recursion
    stands for pretrained layers 1..2; H is their input, F their output."""
    d, hf = llama_dir
    src = load_weights(describe_pretrained(f"hf:{d}"))
    cfg = _target(family="mor", num_recursions=3)
    windows = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(3))
    g = gate_scale(src, cfg, windows)
    with torch.no_grad():
        hs = hf(windows, output_hidden_states=True).hidden_states
    h, f = hs[1], hs[3]  # input of layer 1, output of layer 2

    def err(gate: float) -> float:
        return (h + gate * f - f).pow(2).sum().item()

    assert err(g) < err(g - 0.05) and err(g) < err(g + 0.05)


def test_vanilla_init_reproduces_the_hf_logits(llama_dir):
    d, hf = llama_dir
    model = build_model(_target(family="vanilla")).eval()
    init_from_pretrained(model, load_weights(describe_pretrained(f"hf:{d}")), None)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_mismatched_and_missing_sources_name_the_field(llama_dir, tmp_path):
    d, _ = llama_dir
    src = describe_pretrained(f"hf:{d}")
    with pytest.raises(ConfigError, match=r"d_model = 64 .* set d_model = 32"):
        init_from_pretrained(build_model(ModelConfig(**{**SHAPE, "d_model": 64}, n_layers=8)),
                             src, None)
    with pytest.raises(ConfigError, match=r"n_layers = 6 .* set n_layers = 8"):
        init_from_pretrained(build_model(_target(family="vanilla").replace(n_layers=6)),
                             src, None)
    with pytest.raises(ConfigError, match="init_method must be one of"):
        init_from_pretrained(build_model(_target(family="recursive", num_recursions=2)), src,
                             "middle")
    with pytest.raises(ConfigError, match="no such directory"):
        describe_pretrained(f"hf:{tmp_path / 'nope'}")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ConfigError, match="model.safetensors is missing"):
        describe_pretrained(f"hf:{broken}")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="not LlamaForCausalLM"):
        describe_pretrained(f"hf:{gpt2}")
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError, match="truncated"):
        load_weights(describe_pretrained(f"hf:{broken}"))

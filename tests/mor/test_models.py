"""The model contract: reference parity, causality, sharing, accounting, checkpoints."""

from __future__ import annotations

import pytest
import torch

from baselines.vanilla import from_hf_state_dict, hf_llama_config_kwargs, to_hf_state_dict
from mor import ConfigError, ModelConfig, build_model, load_checkpoint, save_checkpoint
from mor.config import PRESETS

FAMILIES = [("vanilla", 1, "middle_cycle"), *[
    ("recursive", nr, s) for s in ("cycle", "sequence", "middle_cycle", "middle_sequence")
    for nr in (1, 2, 3, 4)], ("mor", 2, "middle_cycle"), ("mor", 3, "middle_cycle"),
    ("mor", 4, "middle_cycle")]


def micro(**kw) -> ModelConfig:
    return ModelConfig.from_preset("micro", **kw)


def _ids(cfg: ModelConfig, b: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (b, t), generator=g)


# --- reference parity --------------------------------------------------------------------------
def test_vanilla_matches_hf_llama_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = micro(family="vanilla")
    ours = build_model(cfg).eval()
    # Perturb the norm weights so a swapped/ignored norm would show.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf_cfg = transformers.LlamaConfig(**hf_llama_config_kwargs(cfg))
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = _ids(cfg, t=40)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    # ...and back: HF weights -> ours gives the same model again.
    back = build_model(cfg).eval()
    back.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, atol=1e-5, rtol=0)


def test_hf_conversion_rejects_non_vanilla():
    with pytest.raises(ConfigError, match="only vanilla"):
        hf_llama_config_kwargs(micro(family="recursive", num_recursions=2))
    mor = build_model(micro(family="mor", num_recursions=2))
    with pytest.raises(ConfigError, match="no Hugging Face Llama equivalent"):
        to_hf_state_dict(mor.state_dict())


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle_cycle", "middle_sequence"])
def test_recursive_with_one_recursion_equals_vanilla(sharing):
    torch.manual_seed(0)
    van = build_model(micro(family="vanilla")).eval()
    rec = build_model(micro(family="recursive", num_recursions=1, sharing=sharing)).eval()
    assert rec.cfg.unrolled_depth == van.cfg.n_layers
    rec.load_state_dict(van.state_dict(), strict=True)
    ids = _ids(van.cfg)
    with torch.no_grad():
        torch.testing.assert_close(rec(ids).logits, van(ids).logits, atol=0, rtol=0)


# --- causality ---------------------------------------------------------------------------------
CAUSAL_MODES = [(f, nr, s, "topk") for f, nr, s in FAMILIES if f != "mor"] + [
    ("mor", nr, "middle_cycle", "causal") for nr in (2, 3, 4)]


@pytest.mark.parametrize("family,nr,sharing,routing", CAUSAL_MODES)
def test_causal_modes_never_see_the_future(family, nr, sharing, routing):
    torch.manual_seed(1)
    extra = {"eval_routing": routing} if family == "mor" else {}
    cfg = micro(family=family, num_recursions=nr, sharing=sharing, **extra)
    model = build_model(cfg).eval()
    if family == "mor":
        # Spread router outputs so the causal rule selects some tokens and rejects others.
        with torch.no_grad():
            for r in model.routers:
                r.net.weight.normal_(0, 1.0)
    ids = _ids(cfg, t=32)
    with torch.no_grad():
        base = model(ids)
        for cut in (1, 9, 20, 31):
            changed = ids.clone()
            changed[:, cut:] = (changed[:, cut:] + 7) % cfg.vocab_size
            out = model(changed)
            torch.testing.assert_close(out.logits[:, :cut], base.logits[:, :cut], atol=1e-6,
                                       rtol=0)
            assert not torch.allclose(out.logits[:, cut:], base.logits[:, cut:])
    if family == "mor":
        fracs = [float(base.stats[f"selected_frac/r{r}"]) for r in range(2, nr + 1)]
        assert any(0 < f < 1 for f in fracs), fracs  # the test exercised real routing


def test_mor_topk_routing_is_not_causal():
    """Documented behaviour of the paper's protocol: the top-k choice over a sequence lets
    later tokens change which earlier tokens recurse, hence earlier logits."""
    torch.manual_seed(2)
    cfg = micro(family="mor", num_recursions=3, eval_routing="topk", router_alpha=1.0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for r in model.routers:
            r.net.weight.normal_(0, 1.0)
    ids = _ids(cfg, t=32)
    leaked = False
    with torch.no_grad():
        base = model(ids).logits
        for trial in range(8):
            changed = ids.clone()
            changed[:, 16:] = torch.randint(0, cfg.vocab_size, (ids.shape[0], 16),
                                            generator=torch.Generator().manual_seed(trial))
            leaked |= not torch.allclose(model(changed).logits[:, :16], base[:, :16])
    assert leaked


# --- MoR routing mechanics -------------------------------------------------------------------
def test_mor_topk_capacities_and_stats():
    cfg = micro(family="mor", num_recursions=3)
    model = build_model(cfg).train()
    t = 30
    out = model(_ids(cfg, t=t), _ids(cfg, t=t, seed=1))
    expected = [t // 1, (2 * t) // 3, t // 3]
    for r, k in enumerate(expected, 1):
        assert float(out.stats[f"selected_frac/r{r}"]) == pytest.approx(k / t)
        gate = float(out.stats[f"gate_mean/r{r}"])
        assert 0 < gate < cfg.router_alpha
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + out.aux_loss.item(), rel=1e-6)
    out.loss.backward()
    for router in model.routers:
        assert router.net.weight.grad is not None and router.net.weight.grad.abs().sum() > 0


def test_mor_hierarchical_filtering_and_positions(monkeypatch):
    """Step r only sees tokens selected at r-1; selections stay sorted, keep their original
    positions, and unselected tokens pass through unchanged."""
    cfg = micro(family="mor", num_recursions=3)
    model = build_model(cfg).train()
    seen: list[torch.Tensor] = []
    original = model.rope_for

    def spy(positions):
        seen.append(positions.clone())
        return original(positions)

    monkeypatch.setattr(model, "rope_for", spy)
    model(_ids(cfg, t=30))
    steps = [p for p in seen if p.dim() == 2]  # per-row positions of the recursion steps
    assert [p.shape[1] for p in steps] == [30, 20, 10]
    for prev, cur in zip(steps, steps[1:]):
        for row in range(cur.shape[0]):
            assert torch.all(cur[row][1:] > cur[row][:-1])  # causal order kept
            assert set(cur[row].tolist()) <= set(prev[row].tolist())  # nested selections


def _shared_block(model, x, positions):
    cos, sin = model.rope_for(positions)
    for i in model.shared:
        x, _ = model.layers[i](x, cos, sin)
    return x


def test_mor_update_rule_h_plus_gate_times_block():
    """A token selected at the last step gets H + g * f(H); an unselected one is unchanged."""
    torch.manual_seed(3)
    cfg = micro(family="mor", num_recursions=2)
    model = build_model(cfg).train()
    h = torch.randn(1, 10, cfg.d_model)
    out, _, _, depths = model._expert_topk(h, None, None)
    # Step 1 (capacity 1) updates every token; step 2 keeps 5. Recompute by hand.
    logits1 = model.routers[0](h).squeeze(-1)
    h1 = h + 0.1 * torch.sigmoid(logits1).unsqueeze(-1) * _shared_block(
        model, h, torch.arange(10).expand(1, 10))
    logits2 = model.routers[1](h1).squeeze(-1)
    keep = logits2.topk(5, dim=-1).indices.sort(dim=-1).values[0]
    drop = sorted(set(range(10)) - set(keep.tolist()))
    torch.testing.assert_close(out[0, drop], h1[0, drop], atol=1e-6, rtol=0)
    sub = h1[:, keep]
    expect = sub + 0.1 * torch.sigmoid(logits2[:, keep]).unsqueeze(-1) * _shared_block(
        model, sub, keep.unsqueeze(0))
    torch.testing.assert_close(out[:, keep], expect, atol=1e-5, rtol=0)
    assert depths[0, keep].tolist() == [2] * 5 and depths[0, drop].tolist() == [1] * 5


# --- parameters and sharing ------------------------------------------------------------------
@pytest.mark.parametrize("family,nr,sharing", FAMILIES)
def test_num_params_equals_unique_numel(family, nr, sharing):
    model = build_model(micro(family=family, num_recursions=nr, sharing=sharing))
    counts = model.num_params()
    assert counts["unique"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == counts["unique"] - model.embed.weight.numel()
    if family == "vanilla" or nr == 1:
        assert counts["total"] == counts["unique"]
    else:
        assert counts["total"] > counts["unique"]


@pytest.mark.parametrize("sharing,expected", [
    ("cycle", [0, 1, 2, 0, 1, 2]),
    ("sequence", [0, 0, 1, 1, 2, 2]),
    ("middle_cycle", [0, 1, 2, 1, 2, 3]),
    ("middle_sequence", [0, 1, 1, 2, 2, 3]),
])
def test_sharing_schedules_share_the_same_parameters(sharing, expected):
    cfg = micro(family="recursive", num_recursions=2, sharing=sharing)
    model = build_model(cfg)
    assert model.schedule == expected
    applied = [model.layers[i] for i in model.schedule]
    # Positions visiting the same unique index use the very same Parameter objects.
    for pos_a, i in enumerate(expected):
        for pos_b, j in enumerate(expected):
            same = applied[pos_a].attn.q_proj.weight is applied[pos_b].attn.q_proj.weight
            assert same == (i == j)
    assert len(model.shared_positions()) == cfg.num_unique_layers


def test_middle_cycle_adds_layers_when_not_divisible():
    # The paper's rule (docs/method.md §1): 135M at N_r=3 becomes 1+10+1 = 32 layers.
    cfg = ModelConfig.from_preset("135m", family="mor", num_recursions=3)
    assert cfg.layer_plan == "1+10+1" and cfg.unrolled_depth == 32
    cfg = ModelConfig.from_preset("360m", family="recursive", num_recursions=4)
    assert cfg.layer_plan == "1+8+1" and cfg.unrolled_depth == 34


# --- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_is_valid_for_every_family(preset):
    for family, nr in [("vanilla", 1), ("recursive", 2), ("mor", 3)]:
        cfg = ModelConfig.from_preset(preset, family=family, num_recursions=nr)
        assert cfg.head_dim * cfg.n_heads == cfg.d_model
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs,field", [
    (dict(family="mixture"), "family"),
    (dict(family="recursive", num_recursions=2, sharing="zigzag"), "sharing"),
    (dict(family="vanilla", num_recursions=2), "num_recursions"),
    (dict(family="mor", num_recursions=5), "num_recursions"),
    (dict(family="mor", num_recursions=3, n_layers=4), "num_recursions"),
    (dict(family="mor", num_recursions=2, capacities=(1.0, 1.5)), "capacities"),
    (dict(family="mor", num_recursions=2, capacities=(0.5, 1.0)), "capacities"),
    (dict(family="mor", num_recursions=2, capacities=(1.0,)), "capacities"),
    (dict(family="recursive", num_recursions=2, capacities=(1.0, 0.5)), "capacities"),
    (dict(family="mor", num_recursions=2, sharing="cycle"), "sharing"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(eval_routing="sometimes"), "eval_routing"),
    (dict(d_model=0), "d_model"),
])
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        micro(**kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*micro"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="'n_layer'"):
        ModelConfig.from_preset("micro", n_layer=3)


def test_sequence_longer_than_rope_tables_is_rejected():
    model = build_model(micro())
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(torch.zeros(1, model.cfg.max_seq_len + 1, dtype=torch.long))


# --- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family,nr", [("vanilla", 1), ("recursive", 3), ("mor", 3)])
def test_checkpoint_roundtrip_without_pickle(tmp_path, family, nr):
    torch.manual_seed(4)
    model = build_model(micro(family=family, num_recursions=nr)).eval()
    save_checkpoint(model, tmp_path / "ckpt", extra={"note": "x"})
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes()[:8] != b"\x80\x02\x8a\n"
    loaded = load_checkpoint(tmp_path / "ckpt" / "model.safetensors")
    assert loaded.cfg == model.cfg and not loaded.training
    ids = _ids(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    if family == "mor":
        causal = load_checkpoint(tmp_path / "ckpt", eval_routing="causal")
        assert causal.cfg.eval_routing == "causal"


def test_load_checkpoint_explains_a_wrong_path(tmp_path):
    with pytest.raises(ConfigError, match="not a mor-bench checkpoint"):
        load_checkpoint(tmp_path)

"""Property-based fuzzing of `ModelConfig` (issue 11), both directions.

* Every invalid field or combination, through `ModelConfig.from_dict` / `from_preset`,
  raises `ConfigError` naming the field -- never TypeError, ValueError, ZeroDivisionError,
  IndexError or AttributeError from a comparison that met a value of the wrong type.
* Every valid config (small shapes, every family, sharing strategy and MoR variant) builds a
  model whose forward and backward work: validation is not stricter than the model.

Examples (derandomized): 29 fields x (5 wrong types + 5 out of range) + 70 impossible
combinations + 30 unknown presets / non-tables = 390 invalid; 80 valid configs built and
run; 40 preset x family checks. About 15 s on 2 busy cores.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from mor import ConfigError, ModelConfig, build_model
from mor.config import (
    BALANCING,
    EVAL_ROUTING,
    EXPERT_AUX,
    FAMILIES,
    KV_MODES,
    MAX_RECURSIONS,
    PRESETS,
    ROUTER_ARCHS,
    ROUTER_FUNCS,
    ROUTERS,
    SHARING,
)

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])

INTS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
        "num_recursions", "capacity_warmup_steps", "head_dim")
FLOATS = ("rope_theta", "norm_eps", "init_std", "router_alpha", "aux_loss_coef",
          "router_z_coef", "balance_coef", "bias_update_rate")
CHOICES = {"family": FAMILIES, "sharing": SHARING, "router": ROUTERS, "kv": KV_MODES,
           "router_arch": ROUTER_ARCHS, "expert_aux": EXPERT_AUX, "balancing": BALANCING,
           "eval_routing": EVAL_ROUTING, "router_func": ("sigmoid", "tanh", "softmax")}
OPTIONAL = {"head_dim", "capacities", "router_func", "router_alpha", "router_z_coef",
            "eval_routing"}
FIELDS = [f for f in ModelConfig.__dataclass_fields__.values() if f.init]


def test_the_fuzzing_knows_every_field():
    """A field added to ModelConfig without a fuzzing entry fails here."""
    assert ({f.name for f in FIELDS}
            == set(INTS) | set(FLOATS) | set(CHOICES) | {"capacities", "tie_embeddings"})


# --------------------------------------------------------------------------------------------
# valid configs: small shapes, every family and variant


@st.composite
def valid_configs(draw) -> dict[str, Any]:
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 4))
    d: dict[str, Any] = {
        "vocab_size": draw(st.integers(2, 64)), "n_heads": n_heads, "n_kv_heads": n_kv,
        "d_ff": draw(st.integers(1, 48)), "max_seq_len": draw(st.integers(4, 24)),
        "rope_theta": draw(st.floats(1.0, 1e6)), "norm_eps": draw(st.floats(1e-8, 1e-2)),
        "init_std": draw(st.floats(1e-3, 0.5)),
    }
    if draw(st.booleans()):
        d["d_model"] = n_heads * head_dim
    else:  # an explicit head width need not divide the residual width
        d["d_model"], d["head_dim"] = draw(st.integers(2, 32)), head_dim
    family = draw(st.sampled_from(FAMILIES))
    d["family"] = family
    if family == "vanilla":
        d["n_layers"] = draw(st.integers(1, 4))
        return d
    nr = draw(st.integers(1, MAX_RECURSIONS))
    d["num_recursions"] = nr
    if family == "recursive":
        d["sharing"] = draw(st.sampled_from(SHARING))
        edge = 2 if d["sharing"].startswith("middle_") else 0
        d["n_layers"] = draw(st.integers(nr + edge, nr + edge + 2))
        return d
    d["n_layers"] = draw(st.integers(nr + 2, nr + 3))
    router = d["router"] = draw(st.sampled_from(ROUTERS))
    d["kv"] = draw(st.sampled_from(KV_MODES))
    d["router_arch"] = draw(st.sampled_from(ROUTER_ARCHS))
    d["router_func"] = draw(st.none() | st.sampled_from(ROUTER_FUNCS[router]))
    d["router_alpha"] = draw(st.none() | st.floats(0.01, 10.0))
    d["router_z_coef"] = draw(st.none() | st.floats(0.0, 0.1))
    if router == "expert":
        d["eval_routing"] = draw(st.none() | st.sampled_from(EVAL_ROUTING))
        d["aux_loss_coef"] = draw(st.floats(0.0, 0.1))
        d["expert_aux"] = draw(st.sampled_from(EXPERT_AUX))
        d["capacity_warmup_steps"] = draw(st.integers(0, 10))
        if draw(st.booleans()):
            caps = sorted(draw(st.lists(st.floats(0.05, 1.0), min_size=nr, max_size=nr)),
                          reverse=True)
            if d["kv"] == "share":
                caps[0] = 1.0
            d["capacities"] = caps
    else:
        d["eval_routing"] = draw(st.none() | st.just("causal"))
        d["balancing"] = draw(st.sampled_from(BALANCING))
        d["balance_coef"] = draw(st.floats(0.0, 1.0))
        d["bias_update_rate"] = draw(st.floats(0.0, 0.01))
    return d


@settings(FUZZ, max_examples=80)
@given(fields=valid_configs(), data=st.data())
def test_every_valid_config_builds_and_runs(fields, data):
    note(repr(fields))
    cfg = ModelConfig.from_dict(fields)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # round trip
    torch.manual_seed(0)
    model = build_model(cfg)
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, cfg.max_seq_len))
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    out = model(ids, targets=ids, step=data.draw(st.none() | st.integers(0, 20)))
    assert out.logits.shape == (b, t, cfg.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(ids).logits.shape == (b, t, cfg.vocab_size)


@settings(FUZZ, max_examples=40)
@given(preset=st.sampled_from(sorted(PRESETS)), family=st.sampled_from(FAMILIES),
       nr=st.integers(1, MAX_RECURSIONS))
def test_every_preset_accepts_every_family(preset, family, nr):
    """The presets are deep enough for every N_r of every family (no model is built)."""
    cfg = ModelConfig.from_preset(preset, family=family,
                                  num_recursions=1 if family == "vanilla" else nr)
    assert cfg.unrolled_depth >= cfg.n_layers


# --------------------------------------------------------------------------------------------
# invalid configs: one corruption of a valid one, always a ConfigError naming the field

OTHER_TYPES = st.one_of(st.text(max_size=5), st.lists(st.integers(0, 3), max_size=2),
                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
                        st.tuples(st.integers()), st.binary(max_size=2), st.just(object()))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def wrong_type(field: str) -> st.SearchStrategy:
    """A value of a type the field never takes (None only where None is not the default)."""
    none = st.nothing() if field in OPTIONAL else st.none()
    if field in INTS:
        return st.one_of(none, OTHER_TYPES, st.booleans(), st.floats())
    if field in FLOATS:
        return st.one_of(none, OTHER_TYPES, st.booleans(), NON_FINITE)
    if field == "tie_embeddings":
        return st.one_of(none, OTHER_TYPES, st.integers(), st.floats())
    if field == "capacities":
        return st.one_of(st.text(max_size=3), st.integers(), st.floats(), st.booleans(),
                         st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
                         st.lists(st.text(max_size=2) | st.booleans() | st.none(),
                                  min_size=1, max_size=3))
    return st.one_of(none, st.integers(), st.floats(), st.booleans(),  # a choice
                     st.lists(st.integers(0, 3), max_size=2), st.tuples(st.integers()))


def out_of_range(field: str, nr: int) -> st.SearchStrategy:
    low = {"capacity_warmup_steps": 0}.get(field, 1)
    if field == "num_recursions":
        return st.integers(max_value=0) | st.integers(min_value=MAX_RECURSIONS + 1)
    if field == "head_dim":
        return st.integers(max_value=0) | st.integers(0, 30).map(lambda k: 2 * k + 1)
    if field in INTS:
        return st.integers(max_value=low - 1)
    ok = {"init_std": lambda x: 0 < x < 1, "router_alpha": lambda x: 0 < x <= 10,
          "rope_theta": lambda x: x > 0, "norm_eps": lambda x: x > 0}.get(field,
                                                                           lambda x: x >= 0)
    if field in FLOATS:
        return NON_FINITE | st.floats(allow_nan=False, allow_infinity=False).filter(
            lambda x: not ok(x)) | st.integers(-100, 100).filter(lambda x: not ok(x))
    if field == "tie_embeddings":
        return st.just(False)
    if field == "capacities":
        return st.one_of(
            st.lists(st.floats(0.05, 1.0), max_size=6).filter(lambda c: len(c) != nr),
            st.lists(st.floats(allow_nan=True).filter(lambda x: not 0 < x <= 1),
                     min_size=nr, max_size=nr),
            st.lists(st.floats(0.05, 1.0), min_size=nr, max_size=nr).filter(
                lambda c: any(b > a for a, b in zip(c, c[1:]))))
    allowed = CHOICES[field]
    return st.text(max_size=8).filter(lambda s: s not in allowed)


def assert_names(message: str, field: str) -> None:
    assert re.search(rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])", message), (
        f"{field!r} not named in {message!r}")


def assert_rejected(fields: Any, needle: str) -> None:
    """A ConfigError naming `needle`; any other exception propagates and fails the test."""
    try:
        ModelConfig.from_dict(fields)
    except ConfigError as e:
        assert_names(str(e), needle)
    else:
        pytest.fail(f"accepted, but {needle!r} is invalid: {fields!r}")


NAMES = [f.name for f in FIELDS]


@pytest.mark.parametrize("field", NAMES)
@settings(FUZZ, max_examples=5)
@given(base=valid_configs(), data=st.data())
def test_a_field_of_the_wrong_type_is_a_config_error(field, base, data):
    value = data.draw(wrong_type(field))
    assert_rejected({**base, field: value}, field)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("value", [0.0, False, 0.5, "0"])
def test_a_wrong_type_equal_to_the_default_is_rejected(family, value):
    """capacity_warmup_steps = 0.0 or False equals its default 0, so a non-MoR model's
    "must be the default" check alone let it through (found by the fuzzing)."""
    fields = {"family": family, "num_recursions": 1 if family == "vanilla" else 2}
    assert_rejected({**fields, "capacity_warmup_steps": value}, "capacity_warmup_steps")


@pytest.mark.parametrize("field", NAMES)
@settings(FUZZ, max_examples=5)
@given(base=valid_configs(), data=st.data())
def test_a_field_out_of_range_is_a_config_error(field, base, data):
    nr = base.get("num_recursions", 1)
    value = data.draw(out_of_range(field, nr))
    assert_rejected({**base, field: value}, field)


@st.composite
def inconsistent(draw) -> tuple[dict[str, Any], str]:
    """Fields valid alone, impossible together."""
    base = draw(valid_configs())
    kind = draw(st.sampled_from([
        "d_model % n_heads", "n_heads % n_kv_heads", "recursions > layers",
        "routing on non-MoR", "vanilla recursions", "MoR sharing", "token-only on expert",
        "expert-only on token", "topk on token", "router_func", "kv share", "unknown field"]))
    d = dict(base)
    if kind == "d_model % n_heads":
        h = draw(st.integers(2, 8))
        d.pop("head_dim", None)
        d.update(n_heads=h, n_kv_heads=1, d_model=h * draw(st.integers(1, 8))
                 + draw(st.integers(1, h - 1)))
        return d, "n_heads"
    if kind == "n_heads % n_kv_heads":
        kv = draw(st.integers(2, 8))
        d.update(n_kv_heads=kv, n_heads=kv * draw(st.integers(0, 3))
                 + draw(st.integers(1, kv - 1)))
        return d, "n_kv_heads"
    if kind == "recursions > layers":
        family = draw(st.sampled_from(["recursive", "mor"]))
        nr = draw(st.integers(2, MAX_RECURSIONS))
        sharing = draw(st.sampled_from(SHARING)) if family == "recursive" else "middle_cycle"
        edge = 2 if sharing.startswith("middle_") else 0
        return ({k: v for k, v in d.items() if k in {"vocab_size", "d_model", "n_heads",
                                                   "n_kv_heads", "head_dim"}}
                | {"family": family, "sharing": sharing, "num_recursions": nr,
                   "n_layers": draw(st.integers(1, nr + edge - 1))}), "num_recursions"
    if kind == "routing on non-MoR":
        field, value = draw(st.sampled_from([
            ("router", "token"), ("kv", "share"), ("router_arch", "mlp"),
            ("router_func", "sigmoid"), ("router_alpha", 0.5), ("aux_loss_coef", 0.01),
            ("expert_aux", "router"), ("router_z_coef", 0.0), ("capacity_warmup_steps", 1),
            ("balancing", "loss_free"), ("balance_coef", 0.2), ("bias_update_rate", 0.0),
            ("eval_routing", "topk"), ("capacities", [1.0])]))
        return {"family": draw(st.sampled_from(["vanilla", "recursive"])), field: value}, field
    if kind == "vanilla recursions":
        return {"family": "vanilla", "num_recursions": draw(st.integers(2, 4))}, \
            "num_recursions"
    if kind == "MoR sharing":
        return ({"family": "mor", "num_recursions": 2,
                 "sharing": draw(st.sampled_from(["cycle", "sequence", "middle_sequence"]))},
                "sharing")
    if kind == "token-only on expert":
        field, value = draw(st.sampled_from([("balancing", st.just("loss_free")),
                                             ("balance_coef", st.floats(0, 5)),
                                             ("bias_update_rate", st.floats(0, 5))]))
        v = draw(value.filter(lambda x: x not in (0.1, 1e-3)))
        return {"family": "mor", "num_recursions": 2, field: v}, field
    if kind == "expert-only on token":
        field, value = draw(st.sampled_from([("capacities", [1.0, 0.5]),
                                             ("expert_aux", "router"),
                                             ("capacity_warmup_steps", 3)]))
        return {"family": "mor", "router": "token", "num_recursions": 2, field: value}, field
    if kind == "topk on token":
        return {"family": "mor", "router": "token", "eval_routing": "topk"}, "eval_routing"
    if kind == "router_func":
        router = draw(st.sampled_from(ROUTERS))
        func = "softmax" if router == "expert" else "tanh"
        return {"family": "mor", "router": router, "router_func": func}, "router_func"
    if kind == "kv share":
        c0 = draw(st.floats(0.05, 0.99))
        return ({"family": "mor", "num_recursions": 2, "kv": "share",
                 "capacities": [c0, draw(st.floats(0.05, c0))]}, "kv")
    name = draw(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
        lambda k: k not in ModelConfig.__dataclass_fields__ or k.startswith("num_unique")
        or k == "num_shared"))
    d[name] = 1
    return d, name


@settings(FUZZ, max_examples=70)
@given(case=inconsistent())
def test_an_impossible_combination_is_a_config_error(case):
    fields, needle = case
    assert_rejected(fields, needle)


@settings(FUZZ, max_examples=30)
@given(name=st.one_of(st.text(max_size=8).filter(lambda s: s.lower() not in PRESETS),
                      st.integers(), st.none(), st.floats(), st.booleans(),
                      st.lists(st.text(max_size=2), max_size=2)),
       data=st.data())
def test_an_unknown_preset_or_a_non_table_is_a_config_error(name, data):
    note(repr(name))
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.from_preset(name, family="vanilla")
    not_a_table = data.draw(st.one_of(st.text(max_size=4), st.integers(), st.none(),
                                      st.lists(st.integers(), max_size=3)))
    with pytest.raises(ConfigError, match="model config must be a table"):
        ModelConfig.from_dict(not_a_table)

"""Tests for the report figures (`reports.figures`) and the depth export (`evals.suite.depths`).

tests/fixtures/figures/ is a suite run derived from a real CPU smoke run (vanilla,
recursive-3, mor-2, mor-3, mor-3-share, mor-3-token at 1.2e12 FLOPs; vanilla and mor-3 with
a second seed and at 2.4e12), with inference metrics (`metrics.infer`) on every run but
recursive-3, few-shot results on every run but mor-3-share, and depth_sample.json files
(written by `depth_export` from the trained checkpoints) for mor-3 and mor-3-token only.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection

from evals.data.tokenizer import ByteTokenizer
from evals.suite.depths import (
    DEFAULT_SAMPLE_TEXT,
    depth_export,
    read_depth_export,
    route_text,
    write_depth_export,
)
from evals.suite.record import RecordError, check_depth_export, hardware_summary, load_records
from mor import ConfigError, ModelConfig, build_model, flops
from reports import figures
from reports.figures import FIGURES, FigureSkipped, build_figure, render_figures

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "figures"
SUITE = "figures-fixture"


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return load_records(FIXTURES)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, records) -> tuple[Path, dict]:
    """Every figure rendered once into a copy of the fixture run (default output dir)."""
    run_dir = tmp_path_factory.mktemp("run") / "suite"
    shutil.copytree(FIXTURES, run_dir)
    return run_dir, render_figures(run_dir)


def _records(records, drop=None) -> list[dict]:
    """A deep copy; drop = {run_id: ["metrics", "infer"]} removes a key path."""
    out = copy.deepcopy(records)
    for rec in out:
        path = (drop or {}).get(rec["run_id"])
        if path:
            node = rec
            for key in path[:-1]:
                node = node[key]
            node.pop(path[-1], None)
    return out


def _line_points(fig) -> list[tuple[float, float]]:
    pts = []
    for ax in fig.axes:
        for line in ax.get_lines():
            pts += [tuple(p) for p in np.asarray(line.get_xydata(), dtype=float)]
        for coll in ax.collections:
            if isinstance(coll, PathCollection):  # scatter points, not error-bar segments
                pts += [tuple(p) for p in np.asarray(coll.get_offsets(), dtype=float)]
    return pts


# --- rendering everything ------------------------------------------------------------------
def test_render_figures_writes_every_figure_and_a_manifest(rendered):
    run_dir, manifest = rendered
    assert manifest["skipped"] == {}
    assert list(manifest["figures"]) == list(FIGURES)
    on_disk = json.loads((run_dir / "figures" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))  # JSON-serialisable, same content


def test_manifest_paths_are_relative_to_the_run_dir(rendered, tmp_path):
    run_dir, manifest = rendered
    on_disk = json.loads((run_dir / "figures" / "manifest.json").read_text())
    assert on_disk["dir"] == "figures"
    for name, entry in on_disk["figures"].items():
        for kind in ("png", "svg"):
            assert not Path(entry[kind]).is_absolute(), (name, entry[kind])
            assert entry[kind] == f"figures/{name}.{kind}"
            assert (run_dir / entry[kind]).is_file()
    assert str(run_dir) not in json.dumps(on_disk)
    # The run directory moved elsewhere: the manifest still points at its figures.
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    again = json.loads((moved / "figures" / "manifest.json").read_text())
    assert all((moved / e["png"]).is_file() for e in again["figures"].values())


@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figure_is_a_valid_png_and_svg(rendered, records, name):
    run_dir, manifest = rendered
    entry = manifest["figures"][name]
    png, svg = run_dir / entry["png"], run_dir / entry["svg"]
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert float(image[..., :3].var()) > 1e-3, "the PNG is blank"
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    hw = hardware_summary(records[0]["provenance"]["hardware"])
    caption = entry["caption"]
    assert f"Suite: {SUITE}" in caption and f"Hardware: {hw}" in caption
    assert "Routing:" in caption
    assert any(m in caption for m in ("top-k", "causal", "token-choice"))


def test_figures_use_distinct_colour_blind_safe_styles(records):
    ctx = figures._Ctx(records)
    styles = list(ctx.styles.values())
    assert all(s.color in figures.OKABE_ITO for s in styles)
    assert len({s.color for s in styles}) == len(styles)
    assert len({s.marker for s in styles}) == len(styles)  # grayscale: markers differ too
    assert ctx.models[0] == "vanilla"


# --- 1. isoFLOP -----------------------------------------------------------------------------
def test_isoflop_means_seeds_with_error_bars(records):
    built = build_figure("isoflop", records)
    vanilla = [r for r in records if r["model_name"] == "vanilla"
               and r["budget"]["value"] == 1.2e12]
    nll = [r["metrics"]["val_nll"] for r in vanilla]
    assert len(nll) == 2
    assert built.data["vanilla"]["y"][0] == pytest.approx(np.mean(nll))
    assert built.data["vanilla"]["yerr"][0] == pytest.approx(np.std(nll, ddof=1))
    assert built.data["vanilla"]["yerr"][1] is None  # one seed: no error bar, not a 0 one
    assert built.data["vanilla"]["n"] == [2, 1]
    assert built.data["recursive-3"]["yerr"] is None
    assert built.fig.axes[0].get_xscale() == "log"


def test_isoflop_with_one_budget_is_categorical(records):
    one = [r for r in _records(records) if r["budget"]["value"] == 1.2e12]
    assert len({r["budget"]["value"] for r in one}) == 1
    built = build_figure("isoflop", one)
    ax = built.fig.axes[0]
    assert ax.get_xscale() == "linear"  # not a log-scale FLOPs curve
    models = list(built.data)
    assert set(models) == {r["model_name"] for r in one if r["status"] == "ok"}
    assert [t.get_text() for t in ax.get_xticklabels()] == models
    assert "one budget" in built.caption
    # One point per model, each at its own category.
    pts = [(x, y) for x, y in _line_points(built.fig) if not math.isnan(y)]
    assert sorted({round(x) for x, _ in pts}) == list(range(len(models)))
    # Several budgets: the log-scale FLOPs axis stays.
    assert build_figure("isoflop", records).fig.axes[0].get_xscale() == "log"


def test_isoflop_leaves_out_a_missing_metric_never_zero(records):
    recs = _records(records, {"mor-2-1.2e12F-s0": ["metrics", "val_nll"]})
    built = build_figure("isoflop", recs)
    assert "mor-2" not in built.data
    assert "Not shown (no val_nll/flops_used): mor-2" in built.caption
    ys = [y for _, y in _line_points(built.fig) if not math.isnan(y)]
    assert ys and min(ys) > 0.5  # no point at 0


# --- 2. loss curves -------------------------------------------------------------------------
def test_loss_curves_skip_missing_points_and_runs(records):
    recs = _records(records, {"mor-2-1.2e12F-s0": ["loss_curve"]})
    target = next(r for r in recs if r["run_id"] == "vanilla-1.2e12F-s0")
    target["loss_curve"][1]["loss"] = None
    built = build_figure("loss_curves", recs)
    assert "mor-2-1.2e12F-s0" not in built.data
    assert "mor-2" in built.caption
    assert len(built.data["vanilla-1.2e12F-s0"]["y"]) == len(target["loss_curve"]) - 1
    assert 0.0 not in built.data["vanilla-1.2e12F-s0"]["y"]
    assert len([ax for ax in built.fig.axes if ax.get_visible()]) == 2  # one per budget


def test_no_loss_curve_anywhere_skips_with_reason(records):
    recs = _records(records)
    for r in recs:
        r.pop("loss_curve")
    with pytest.raises(FigureSkipped, match="loss_curve"):
        build_figure("loss_curves", recs)


# --- 3. few-shot vs throughput ---------------------------------------------------------------
def test_pareto_plot_only_models_with_both_metrics(records):
    built = build_figure("fewshot_throughput", records)
    assert not any(k.startswith(("recursive-3", "mor-3-share")) for k in built.data)
    assert "recursive-3" in built.caption and "mor-3-share" in built.caption
    pts = _line_points(built.fig)
    assert pts and all(x > 0 and y > 0 for x, y in pts)
    front = built.data["pareto"]
    assert front and all(k in built.data for k in front)
    # Nothing plotted beats a frontier point on both axes.
    for k in front:
        fx, fy = built.data[k]["x"], built.data[k]["y"]
        assert not any(v["x"] > fx and v["y"] > fy for name, v in built.data.items()
                       if name != "pareto")


def _causal_inference(recs, run_id: str, causal_acc: float | None) -> None:
    """Make `run_id` generate under causal routing; with `causal_acc`, also record its
    few-shot results under causal routing (every task at that accuracy)."""
    rec = next(r for r in recs if r["run_id"] == run_id)
    rec["metrics"]["infer"]["routing"] = "causal"
    fs = rec["metrics"]["fewshot"]
    if causal_acc is None:
        fs.get("by_routing", {}).pop("causal", None)
        return
    causal = copy.deepcopy(fs["tasks"])
    for res in causal.values():
        res["metrics"] = {k: causal_acc for k in res["metrics"]}
    fs.setdefault("by_routing", {})["causal"] = causal


def test_fewshot_throughput_pairs_accuracy_with_the_routing_of_the_speed(records):
    from reports.frame import fewshot_scores

    run_id = "mor-2-1.2e12F-s0"
    label = next(k for k in build_figure("fewshot_throughput", records).data
                 if k.startswith("mor-2"))
    rec = next(r for r in records if r["run_id"] == run_id)
    topk = 100 * fewshot_scores(rec)["fewshot_avg"]
    assert build_figure("fewshot_throughput", records).data[label]["y"] == pytest.approx(topk)
    # Throughput measured under causal routing: the causal accuracies are plotted.
    recs = _records(records)
    _causal_inference(recs, run_id, 0.123)
    built = build_figure("fewshot_throughput", recs)
    assert built.data[label]["y"] == pytest.approx(12.3)
    assert built.data[label]["y"] != pytest.approx(topk)
    assert "DIFFERENT routing" not in built.caption
    # No causal few-shot results: the top-k score, and the caption says they differ.
    recs = _records(records)
    _causal_inference(recs, run_id, None)
    built = build_figure("fewshot_throughput", recs)
    assert built.data[label]["y"] == pytest.approx(topk)
    assert "DIFFERENT routing" in built.caption and label in built.caption


def test_pareto_frontier():
    pts = [(1.0, 5.0), (2.0, 4.0), (1.5, 3.0), (3.0, 1.0), (0.5, 5.0)]
    assert figures._pareto(pts) == [0, 1, 3]


def test_fewshot_throughput_skips_without_inference_benchmark(records, caplog, tmp_path):
    recs = _records(records)
    for r in recs:
        r["metrics"].pop("infer", None)
    with pytest.raises(FigureSkipped, match="metrics.infer"):
        build_figure("fewshot_throughput", recs)
    with caplog.at_level(logging.INFO, logger="reports.figures"):
        assert figures.plot_fewshot_throughput(recs, tmp_path) is None
    assert "metrics.infer" in caplog.text
    assert not list(tmp_path.iterdir())


# --- 4. relative cost ----------------------------------------------------------------------
def test_relative_cost_marks_missing_bars_na(records):
    recs = _records(records, {"mor-2-1.2e12F-s0": ["metrics", "peak_mem_bytes"]})
    built = build_figure("relative_cost", recs)
    mor2 = "mor-2\n1.2e+12 flops"  # two budgets in the run: labels name the budget
    assert built.data["rel_peak_mem"][mor2] is None
    assert built.data["rel_train_time"][mor2] > 0
    heights = [p.get_height() for p in built.fig.axes[0].patches]
    assert all(h > 0 for h in heights)
    n = len(built.data["rel_train_time"])
    assert len(heights) == 2 * n - 1  # the missing bar is not drawn
    texts = [t.get_text() for t in built.fig.axes[0].texts]
    assert "n/a" in texts
    assert not any(k.startswith("vanilla") for k in built.data["rel_train_time"])


def test_relative_cost_training_time_says_how_it_was_timed(records):
    from reports.table import comparison_table

    label = "mor-2\n1.2e+12 flops"
    ok = [r for r in records if r["status"] == "ok"]
    mor = [r for r in ok if r["run_id"] == "mor-2-1.2e12F-s0"][0]
    van = [r for r in ok if r["model_name"] == "vanilla" and r["budget"]["value"] == 1.2e12]
    # Interleaved: tokens / interleaved tokens/s, relative to vanilla's.
    built = build_figure("relative_cost", records)
    assert "interleaved" in built.title and "sequential" not in built.title
    v_speed = sum(r["metrics"]["speed"]["rel_tokens_per_s"] for r in van) / len(van)
    v_tokens = sum(r["metrics"]["tokens"] for r in van) / len(van)
    expected = (mor["metrics"]["tokens"] / v_tokens) / (
        mor["metrics"]["speed"]["rel_tokens_per_s"] / v_speed)
    assert built.data["rel_train_time"][label] == pytest.approx(expected)
    # No [speed] phase: the sequential per-run times, and the title says so.
    recs = _records(records)
    for r in recs:
        r.get("metrics", {}).pop("speed", None)
    built = build_figure("relative_cost", recs)
    assert "sequential" in built.title and "SEQUENTIAL" in built.caption
    table = comparison_table(recs)
    row = table[(table["model"] == "mor-2") & (table["budget"] == "1.2e+12 flops")].iloc[0]
    assert built.data["rel_train_time"][label] == pytest.approx(row["rel_train_time"])


# --- 5. KV cache ----------------------------------------------------------------------------
def test_kv_cache_measured_or_analytic_labelled(records):
    built = build_figure("kv_cache", records)
    assert built.data["vanilla"]["kind"] == "measured"
    rec = next(r for r in records if r["model_name"] == "recursive-3")
    assert built.data["recursive-3"]["kind"] == "analytic"
    expected = flops.kv_cache_bytes(ModelConfig.from_dict(rec["config"]),
                                    rec["data"]["seq_len"])
    assert built.data["recursive-3"]["bytes"] == expected
    infer = next(r for r in records if r["run_id"] == "mor-3-share-1.2e12F-s0")["metrics"][
        "infer"]
    assert built.data["mor-3-share"]["bytes"] == infer["kv_cache_bytes"] / infer["batch_size"]
    assert "Analytic" in built.caption and "Measured" in built.caption
    # The analytic size is the record's kv_cache (reports run no model code): without it
    # the model is left out and named, never drawn as zero.
    recs = _records(records, {"recursive-3-1.2e12F-s0": ["kv_cache"]})
    built = build_figure("kv_cache", recs)
    assert "recursive-3" not in built.data and "recursive-3" in built.caption


# --- 6./7. depth statistics ----------------------------------------------------------------
def test_depth_by_step_states_modes_and_skips_missing(records):
    recs = _records(records)
    for r in recs:
        if r["model_name"] == "mor-2":
            r["metrics"].pop("depth_by_mode")
            r["metrics"].pop("val_routing_by_mode")
    built = build_figure("depth_by_step", recs)
    assert not any(k.startswith("mor-2") for k in built.data["depth_share"])
    assert "mor-2" in built.caption
    labels = list(built.data["depth_share"])
    assert any("top-k" in k for k in labels) and any("causal" in k for k in labels)
    assert any("token-choice" in k for k in built.data["selected_frac"])
    for share in built.data["depth_share"].values():
        assert sum(share.values()) == pytest.approx(1.0, abs=1e-6)


def test_depth_by_class_and_skip_without_classes(records):
    built = build_figure("depth_by_class", records)
    (label, by_class), *_ = built.data.items()
    assert "mor-2" in label and "top-k" in label
    assert list(by_class)[:2] == ["filler", "structure"]
    recs = _records(records)
    for r in recs:
        for d in (r["metrics"].get("depth_by_mode") or {}).values():
            d.pop("by_class", None)
    with pytest.raises(FigureSkipped, match="difficulty class"):
        build_figure("depth_by_class", recs)


def test_no_mor_runs_skips_mor_figures(records):
    recs = [r for r in records if r["family"] != "mor"]
    for name in ("depth_by_step", "depth_by_class", "depth_map"):
        with pytest.raises(FigureSkipped, match="no MoR runs"):
            build_figure(name, recs)


# --- 8. depth export and depth map ------------------------------------------------------------
@pytest.fixture(scope="module")
def mor_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("micro", family="mor", num_recursions=3))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # large random router weights: depths vary between tokens
        for name, p in model.named_parameters():
            if name.startswith(("routers.", "router.")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def test_depth_export(mor_model, tmp_path):
    tok = ByteTokenizer()
    data = depth_export(mor_model, tok, DEFAULT_SAMPLE_TEXT, max_tokens=64)
    assert set(data) >= {"tokens", "depths", "routing", "num_recursions"}
    assert len(data["tokens"]) == len(data["depths"]) == 64
    assert data["routing"] == "topk" and data["num_recursions"] == 3
    assert "".join(data["tokens"]) == DEFAULT_SAMPLE_TEXT[:64]
    assert all(1 <= d <= 3 for d in data["depths"]) and len(set(data["depths"])) > 1
    routed = route_text(mor_model, tok, DEFAULT_SAMPLE_TEXT, max_tokens=64)
    assert data["depths"] == [t["depth"] for t in routed["tokens"]]
    path = write_depth_export(tmp_path / "depth_sample.json", data)
    assert read_depth_export(path) == data
    # Capped by the model's context as well.
    long = depth_export(mor_model, tok, "ab" * 400, max_tokens=10_000)
    assert len(long["depths"]) == mor_model.cfg.max_seq_len


def test_depth_export_routing_modes_and_errors():
    tok = ByteTokenizer()
    token = build_model(ModelConfig.from_preset("micro", family="mor", router="token",
                                                num_recursions=2)).eval()
    assert depth_export(token, tok, "1 + 2 = 3")["routing"] == "token"
    vanilla = build_model(ModelConfig.from_preset("micro")).eval()
    with pytest.raises(ConfigError, match="only MoR"):
        depth_export(vanilla, tok, "hello")
    for bad in ({"tokens": ["a"], "depths": [1, 2], "routing": "topk", "num_recursions": 2},
                {"tokens": ["a"], "depths": [5], "routing": "topk", "num_recursions": 2},
                {"tokens": ["a"], "depths": [1]}):
        with pytest.raises(RecordError):
            check_depth_export(bad)


def test_depth_map_from_written_export(mor_model, records, tmp_path):
    rec = copy.deepcopy(next(r for r in records if r["run_id"] == "mor-2-1.2e12F-s0"))
    rec.pop("checkpoint")
    data = depth_export(mor_model, ByteTokenizer(), "The cat sat.\n12 + 30 = 42.")
    write_depth_export(tmp_path / rec["run_id"] / "depth_sample.json", data)
    built = build_figure("depth_map", [rec], run_dir=tmp_path)
    assert built.data[rec["run_id"]]["depths"] == data["depths"]
    ax = built.fig.axes[0]
    shown = [t.get_text() for t in ax.texts]
    assert [str(d) for d in data["depths"]] == shown[1::2]  # the depth under each token
    assert "top-k" in ax.get_title(loc="left")
    paths = figures.plot_depth_map([rec], tmp_path / "figs", run_dir=tmp_path)
    assert Path(paths["png"]).is_file() and Path(paths["svg"]).is_file()


def test_depth_map_skips_without_samples(records, tmp_path):
    recs = _records(records)
    for r in recs:
        r.pop("checkpoint", None)
    with pytest.raises(FigureSkipped, match="depth_sample.json"):
        build_figure("depth_map", recs, run_dir=tmp_path)


def test_depth_map_found_next_to_records(records):
    built = build_figure("depth_map", records, run_dir=FIXTURES)
    assert set(built.data) == {"mor-3-1.2e12F-s0", "mor-3-token-1.2e12F-s0"}
    assert "mor-2" in built.caption and "mor-3-share" in built.caption

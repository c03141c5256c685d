"""The inference benchmark (evals/perf/generation.py): workload, batch planning, interleaved
timing, the suite's [infer] table and `mor-bench bench-infer`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.perf.generation import (
    bench_models,
    draw_lengths,
    load_models,
    memory_plan,
)
from evals.suite.spec import InferSettings, parse_suite
from mor import ModelConfig, build_model, flops, save_checkpoint
from mor.errors import ConfigError
from tests.conftest import MICRO_SUITE


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Randomly initialised micro checkpoints of the same unrolled depth (6 layers)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, kw in {"vanilla": dict(family="vanilla"),
                     "mor-2": dict(family="mor", num_recursions=2),
                     "mor-2-share": dict(family="mor", num_recursions=2, kv="share")}.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_preset("micro", **kw))
        out[name] = str(save_checkpoint(model, root / name,
                                        extra={"tokenizer": {"kind": "bytes", "eos_id": 256}}))
    return out


FAST = dict(samples=6, gen_mean=10, gen_std=3, repeats=2, batch_size=3, throughput_model="quick")


def test_workload_lengths_are_seeded_and_clipped() -> None:
    s = InferSettings(samples=200, gen_mean=20, gen_std=15, seed=3)
    a, b = draw_lengths(s, cap=30), draw_lengths(s, cap=30)
    assert a == b and len(a) == 200
    assert min(a) >= 1 and max(a) <= 30
    assert 15 < sum(a) / len(a) < 25  # near the mean despite clipping
    assert draw_lengths(InferSettings(samples=200, gen_mean=20, gen_std=15, seed=4), 30) != a


def test_bench_models_reports_every_model_against_vanilla(checkpoints) -> None:
    models = load_models(list(checkpoints.values()))
    assert all(m.bos_id == 256 for m in models)
    res = bench_models(models, InferSettings(**FAST, scheduler="both"))
    rows = {(r["model"], r["scheduler"]): r for r in res["rows"]}
    assert set(rows) == {("vanilla", "sequence"), ("mor-2", "depth"), ("mor-2", "sequence"),
                         ("mor-2-share", "depth"), ("mor-2-share", "sequence")}
    total = sum(res["lengths"])
    for (name, _), r in rows.items():
        assert r["tokens"] == total and len(r["times_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(total / r["time_s"])
        assert r["reference"] == "vanilla"
        assert r["rel_tokens_per_s"] == pytest.approx(
            r["tokens_per_s"] / rows[("vanilla", "sequence")]["tokens_per_s"])
        assert r["batch_size"] == 3
        cfg = next(m for m in models if m.name == name).model.cfg
        assert r["kv_cache_bytes"] == flops.kv_cache_bytes(cfg, res["max_len"], 3, 4)
        if cfg.family == "mor":
            assert 1.0 <= r["mean_depth"] <= cfg.num_recursions
            assert 0 < r["shared_batch_fill"] <= 1
        else:
            assert r["mean_depth"] is None
    # KV sharing stores only the first recursion: less cache than recursion-wise caching.
    assert rows[("mor-2-share", "depth")]["kv_cache_bytes"] < \
        rows[("mor-2", "depth")]["kv_cache_bytes"] < rows[("vanilla", "sequence")]["kv_cache_bytes"]


def test_bench_models_records_the_hardware(checkpoints) -> None:
    models = load_models([checkpoints["vanilla"]])
    hw = bench_models(models, InferSettings(**{**FAST, "samples": 2, "repeats": 1}))["hardware"]
    assert "error" not in hw
    assert hw["cpu"] and hw["cpu_count"] >= 1 and hw["platform"]
    assert hw["torch"] == torch.__version__
    assert hw["torch_threads"] == torch.get_num_threads()
    assert ("cuda" in hw) and (hw["cuda"] is None) == (not torch.cuda.is_available())


def test_max_batch_fills_the_vanilla_memory_budget(checkpoints) -> None:
    models = load_models(list(checkpoints.values()))
    s = InferSettings(**{**FAST, "batch_size": "max"}, reference_batch=4)
    batches, budget = memory_plan(models, s, max_len=32)
    by_name = dict(zip([m.name for m in models], batches))
    assert by_name["vanilla"] == 4  # the reference batch defines the budget
    # Smaller parameters and KV cache turn into a larger batch within the same memory.
    assert by_name["mor-2-share"] > by_name["mor-2"] > by_name["vanilla"]
    for m, b in zip(models, batches):
        params = sum(p.numel() * 4 for p in m.model.parameters())
        per_seq = flops.kv_cache_bytes(m.model.cfg, 32, 1, 4)
        assert params + b * per_seq <= budget < params + (b + 1) * per_seq
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        memory_plan(models, InferSettings(batch_size="max", memory_budget_mb=0.01), 32)


def test_settings_are_validated_with_the_field_named() -> None:
    for bad, field in ((dict(samples=0), "samples"), (dict(batch_size="huge"), "batch_size"),
                       (dict(kv_capacity="half"), "kv_capacity"),
                       (dict(scheduler="fast"), "scheduler"), (dict(repeats=0), "repeats")):
        with pytest.raises(ConfigError, match=f"'{field}'"):
            InferSettings(**bad)
    with pytest.raises(ConfigError, match="unknown infer setting"):
        InferSettings.from_dict({"sample": 3})


def test_suite_infer_table_is_parsed_and_validated() -> None:
    suite = parse_suite(MICRO_SUITE + "\n[infer]\nsamples = 4\nbatch_size = \"max\"\n",
                        source="t.toml")
    assert suite.infer == InferSettings(samples=4, batch_size="max")
    assert parse_suite(MICRO_SUITE, source="t.toml").infer is None
    with pytest.raises(ConfigError, match=r"t.toml: \[infer\] .*'gen_std'"):
        parse_suite(MICRO_SUITE + "\n[infer]\ngen_std = -1\n", source="t.toml")


def test_bench_infer_cli_json(checkpoints, capsys) -> None:
    from evals.cli.main import main

    rc = main(["bench-infer", checkpoints["vanilla"], checkpoints["mor-2"], "--samples", "4",
               "--gen-mean", "6", "--gen-std", "2", "--repeats", "1", "--batch-size", "2",
               "--throughput-model", "quick", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in res["rows"]] == ["vanilla", "mor-2"]
    van, mor = res["rows"]
    assert mor["rel_tokens_per_s"] > 0
    # scheduler auto: the one the throughput model projects faster, recorded with the figures
    choice = mor["scheduler_choice"]
    assert choice["chosen"] == mor["scheduler"] == max(choice["modelled_tokens_per_s"],
                                                       key=choice["modelled_tokens_per_s"].get)
    assert "scheduler_choice" not in van
    # the roofline card beside each measurement, in its own field
    for r in (van, mor):
        card = r["modelled"]
        assert card["measured_tokens_per_s"] == pytest.approx(r["tokens_per_s"])
        assert card["modelled_tokens_per_s"] > 0 and card["weight_bytes_per_iteration"] > 0
        assert card["model_error"] == pytest.approx(
            card["modelled_tokens_per_s"] / r["tokens_per_s"] - 1)
        # the model replays the engine's scheduler on the measured depths: same iterations
        assert card["iterations"] == r["iterations"]
    # mean depth = sum over steps of the fraction of tokens taking the step
    assert sum(mor["selected_fractions"]) == pytest.approx(mor["mean_depth"])
    assert sum(mor["depth_histogram"]) == sum(res["lengths"])
    assert res["throughput_model"]["profile"]["name"]


def test_bench_infer_without_the_model_decodes_depth_wise(checkpoints, capsys) -> None:
    from evals.cli.main import main

    rc = main(["bench-infer", checkpoints["mor-2"], "--samples", "3", "--gen-mean", "5",
               "--repeats", "1", "--batch-size", "2", "--throughput-model", "off", "--json"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["scheduler"] == "depth" and row["modelled"] is None
    assert "no throughput model" in row["scheduler_choice"]["why"]


def test_bench_infer_cli_table_and_bad_input(checkpoints, capsys, tmp_path) -> None:
    from evals.cli.main import main

    rc = main(["bench-infer", checkpoints["mor-2"], "--samples", "3", "--gen-mean", "5",
               "--repeats", "1", "--batch-size", "2", "--profile", "--throughput-model",
               "quick", "--scheduler", "depth"])
    out = capsys.readouterr().out
    assert rc == 0 and "tokens/s" in out and "shared" in out
    assert "roofline card" in out and "model, not measured" in out
    assert main(["bench-infer", str(tmp_path)]) == 2
    assert "not a mor-bench checkpoint" in capsys.readouterr().err
    assert main(["bench-infer", checkpoints["mor-2"], "--batch-size", "lots"]) == 2


def test_a_broken_record_in_a_suite_directory_is_one_line_naming_the_file(tmp_path,
                                                                          capsys) -> None:
    """A truncated record.json (a run killed mid-write by an older version, or edited by
    hand) is named with the fix, not a JSONDecodeError traceback."""
    from evals.cli.main import main

    (tmp_path / "plan.json").write_text("{}")
    run = tmp_path / "vanilla-1e12F-s0"
    run.mkdir()
    (run / "record.json").write_text('{"status": "ok", "run_id": ')
    from evals.suite.record import RecordError

    with pytest.raises(RecordError, match=r"vanilla-1e12F-s0/record.json' is not valid JSON"):
        load_models([tmp_path])
    assert main(["bench-infer", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "record.json' is not valid JSON" in err and "Traceback" not in err


def test_suite_inference_phase_adds_infer_metrics(tmp_path) -> None:
    """A suite with [infer] benchmarks its runs after training: RUN_DIR/infer.json and
    metrics["infer"] in every record, ratios to the suite's vanilla model."""
    from evals.suite.runner import run_suite

    suite = parse_suite(MICRO_SUITE + "\n[infer]\nsamples = 4\ngen_mean = 6\ngen_std = 2\n"
                        "repeats = 1\nbatch_size = 2\nscheduler = \"both\"\n"
                        "throughput_model = \"quick\"\n", source="t.toml")
    run_dir, records, failed = run_suite(suite, tmp_path)
    assert failed == []
    res = json.loads((run_dir / "infer.json").read_text())
    assert {r["model"] for r in res["rows"]} == {r["run_id"] for r in records}
    by_family = {r["family"]: r["metrics"]["infer"] for r in records}
    assert by_family["vanilla"]["rel_tokens_per_s"] == pytest.approx(1.0)
    # the load the interleaved measurement ran under, for the gate (reports/gate.py)
    assert res["load"]["wall_s"] > 0 and isinstance(res["load"]["contended"], bool)
    assert all(m["load"] == res["load"] for m in by_family.values())
    mor = by_family["mor"]
    assert mor["scheduler"] == "depth" and mor["sequence"]["scheduler"] == "sequence"
    assert mor["tokens"] == sum(res["lengths"]) and 1 <= mor["mean_depth"] <= 2
    assert mor["kv_cache_bytes"] < by_family["vanilla"]["kv_cache_bytes"]
    # measured and modelled side by side, never mixed: the card in its own field
    assert mor["modelled"]["measured_tokens_per_s"] == pytest.approx(mor["tokens_per_s"])
    from reports.html import render_html

    html = Path(render_html(run_dir)).read_text()
    assert "model: tokens/s" in html and "model, not measured" in html

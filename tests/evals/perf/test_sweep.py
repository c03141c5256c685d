"""`mor-bench sweep` (evals/perf/sweep.py, evals/cli/sweep.py, reports/sweep.py): the knob swept
on one checkpoint, points that name their knob, monotone depth, reference models, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evals.cli.main import main
from evals.perf.sweep import SweepModel, knob_for, parse_value, run_sweep
from evals.suite.spec import SweepSettings
from mor import ModelConfig, build_model
from mor.checkpoint import save_checkpoint
from mor.errors import ConfigError
from reports.sweep import build_sweep_figure, sweep_rows

FAST = dict(tasks=(), samples=4, gen_mean=6.0, gen_std=2.0, batch_size=2, repeats=1)


def model(family: str = "mor", seed: int = 0, **kw):
    torch.manual_seed(seed)
    extra = {"num_recursions": 3} if family != "vanilla" else {}
    m = build_model(ModelConfig.from_preset("micro", family=family, **extra, **kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("routers", "router.")):
                p.mul_(8.0)
    return m


def held(n: int = 16, t: int = 33) -> torch.Tensor:
    return torch.randint(0, 257, (n, t), generator=torch.Generator().manual_seed(5))


def test_parse_value() -> None:
    assert parse_value("0.5") == 0.5
    assert parse_value("-inf") == -math.inf
    assert parse_value("1:0.5:0.25") == (1.0, 0.5, 0.25)
    with pytest.raises(ConfigError, match="per-step list"):
        parse_value("abc")


@pytest.mark.parametrize("knob,values,calibrate,kw,rising", [
    ("threshold", ("-2", "0", "1", "inf"), False, {}, False),
    ("threshold", ("1.2", "2", "2.8"), True, {}, True),
    ("capacity", ("1.5", "2.5", "1:1:1"), False, {}, True),
    ("depth-bias", ("-1", "0", "1"), False, {"router": "token"}, True),
])
def test_sweep_points_name_their_knob_and_depth_is_monotone(knob, values, calibrate, kw,
                                                             rising) -> None:
    target = SweepModel("mor", model(**kw), None, 0, "mem")
    ref = SweepModel("vanilla", model("vanilla"), None, 0, "mem")
    s = SweepSettings(knob=knob, values=values, calibrate=calibrate, **FAST)
    res = run_sweep(target, [ref], held(), s)
    assert res["kind"] == "mor-bench.sweep" and res["knob"] == knob
    assert [p["value"] for p in res["points"]] == list(values)
    depths = [p["val_mean_depth"] for p in res["points"]]
    assert depths == sorted(depths, reverse=not rising), depths
    assert depths[0] != depths[-1]
    for p in res["points"]:
        assert p["knob_name"] == knob
        assert any(v is not None for v in p["knob"].values())  # the point's knob, recorded
        assert p["tokens_per_s"] > 0 and math.isfinite(p["val_nll"])
        assert 1.0 <= p["decode_mean_depth"] <= 3.0
        assert len(p["val_fractions"]) == 3
    if calibrate:
        for p, v in zip(res["points"], values):
            assert p["target_depth"] == pytest.approx(float(v))
    # The reference model was measured under the same workload, without a knob.
    (r,) = res["references"]
    assert r["family"] == "vanilla" and r["tokens_per_s"] > 0 and "knob" not in r
    # KV bytes per token: more depth stores more (recursion-wise caching).
    kv = [p["kv_bytes_per_token"] for p in res["points"]]
    dd = [p["decode_mean_depth"] for p in res["points"]]
    assert [kv[i] for i in np.argsort(dd)] == sorted(kv)
    rows = sweep_rows(res)
    assert len(rows) == len(values) + 1 and rows[-1]["model"] == "vanilla"
    built = build_sweep_figure(res)
    assert len(built.data["points"]) == len(values) and built.data["front"]


def test_knob_for_rejects_mismatched_models() -> None:
    cal = held()[:, :-1]
    with pytest.raises(ConfigError, match="token-choice"):
        knob_for(model(), "depth-bias", "1", calibrate=False, cal_windows=cal)
    with pytest.raises(ConfigError, match="expert-choice"):
        knob_for(model(router="token"), "threshold", "0", calibrate=False, cal_windows=cal)
    with pytest.raises(ConfigError, match="MoR checkpoint"):
        knob_for(model("vanilla"), "threshold", "0", calibrate=False, cal_windows=cal)
    with pytest.raises(ConfigError, match="N_r = 3"):
        knob_for(model(), "threshold", "0:1", calibrate=False, cal_windows=cal)
    with pytest.raises(ConfigError, match="outside"):
        knob_for(model(), "capacity", "3.5", calibrate=False, cal_windows=cal)


@pytest.mark.parametrize("kw,msg", [
    (dict(knob="speed", values=("1",)), "knob"),
    (dict(knob="threshold"), "values"),
    (dict(knob="capacity", values=("2",), calibrate=True), "calibrate"),
    (dict(knob="threshold", values=("1",), samples=0), "samples"),
    (dict(knob="threshold", values="1,2"), "must be a list"),
])
def test_sweep_settings_validation(kw, msg) -> None:
    with pytest.raises(ConfigError, match=msg):
        SweepSettings(**kw)


def _checkpoints(tmp_path):
    tok = {"tokenizer": {"kind": "bytes"}}
    mor = save_checkpoint(model(), tmp_path / "mor", extra=tok)
    van = save_checkpoint(model("vanilla"), tmp_path / "van", extra=tok)
    np.save(tmp_path / "val.npy", held().numpy().astype(np.uint16))
    return mor, van


def test_cli_writes_sweep_json_and_figure(tmp_path, capsys) -> None:
    mor, van = _checkpoints(tmp_path)
    out = tmp_path / "out"
    rc = main(["sweep", str(mor), "--knob", "threshold", "--values=-1,inf", "--tasks",
               "none", "--windows", str(tmp_path / "val.npy"), "--reference", str(van),
               "--samples", "4", "--gen-mean", "6", "--batch-size", "2", "--repeats", "1",
               "--out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((out / "sweep.json").read_text())
    assert [p["knob"]["thresholds"] for p in doc["points"]] == [[-1.0] * 3, ["inf"] * 3]
    assert doc["points"][1]["val_mean_depth"] == 1.0
    assert (out / "sweep_pareto.png").stat().st_size > 1000


@pytest.mark.parametrize("extra,msg", [
    (["--knob", "threshold", "--values", "x"], "knob value 'x'"),
    (["--knob", "depth-bias", "--values", "1"], "token-choice"),
    (["--knob", "threshold", "--values", "1", "--windows", "missing.npy"], "no such file"),
    (["--knob", "threshold", "--values", "1", "--reference", "MOR"], "a reference is a"),
])
def test_cli_errors_exit_2_naming_the_fix(tmp_path, capsys, extra, msg) -> None:
    mor, _ = _checkpoints(tmp_path)
    extra = [str(mor) if a == "MOR" else a for a in extra]
    if "--windows" not in extra:
        extra += ["--windows", str(tmp_path / "val.npy")]
    rc = main(["sweep", str(mor), "--tasks", "none", "--samples", "2", "--repeats", "1",
               *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_cli_without_windows_outside_a_suite_run_says_how(tmp_path, capsys) -> None:
    mor, _ = _checkpoints(tmp_path)
    assert main(["sweep", str(mor), "--knob", "threshold", "--values", "0"]) == 2
    assert "--windows FILE.npy" in capsys.readouterr().err


# --- the suite's [sweep] table and phase ------------------------------------------------------
def test_sweep_table_parses_and_validates() -> None:
    from evals.suite.spec import parse_suite
    from tests.conftest import MICRO_SUITE

    suite = parse_suite(MICRO_SUITE + '\n[sweep]\nknob = "threshold"\nvalues = [0, "inf"]\n',
                        "t.toml")
    assert suite.sweep.values == ("0", "inf") and suite.sweep.knob == "threshold"
    for table, needle in [
        ('knob = "depth-bias"\nvalues = [1]', "needs a token-choice MoR model"),
        ('knob = "threshold"\nvalues = [1]\nmodels = ["vanilla"]', "model 'vanilla' is a "
         "vanilla model"),
        ('knob = "threshold"\nvalues = [1]\nmodels = ["nope"]', "['nope'] are not models"),
        ('knob = "threshold"\nvalues = [1]\nrepeat = 2', "unknown sweep setting"),
        ('knob = "threshold"', "'values'"),
    ]:
        with pytest.raises(ConfigError, match=None) as e:
            parse_suite(MICRO_SUITE + f"\n[sweep]\n{table}\n", "t.toml")
        assert needle in str(e.value) and "t.toml" in str(e.value), str(e.value)


def test_suite_sweep_phase_writes_documents_records_and_report(tmp_path) -> None:
    from evals.suite.runner import run_suite
    from evals.suite.spec import parse_suite
    from reports.html import build_report
    from tests.conftest import MICRO_SUITE

    suite = parse_suite(MICRO_SUITE + '\n[sweep]\nknob = "threshold"\nvalues = [-1, "inf"]\n'
                        'tasks = []\nsamples = 3\ngen_mean = 5\ngen_std = 1\nrepeats = 1\n'
                        'batch_size = 2\n', source="t.toml")
    run_dir, records, failed = run_suite(suite, tmp_path)
    assert failed == []
    index = json.loads((run_dir / "sweep.json").read_text())
    (run_id, rel), = index["runs"].items()
    assert run_id.startswith("mor-2")
    doc = json.loads((run_dir / rel).read_text())
    assert [p["value"] for p in doc["points"]] == ["-1", "inf"]
    assert [r["family"] for r in doc["references"]] == ["vanilla"]
    assert doc["points"][1]["val_mean_depth"] == 1.0
    mor = next(r for r in records if r["run_id"] == run_id)
    assert mor["metrics"]["sweep"] == {"file": rel, "knob": "threshold", "calibrate": False,
                                       "points": 2}
    build_report(run_dir)
    html = (run_dir / "index.html").read_text()
    assert "Efficiency knob" in html and f"fig-sweep-{run_id}" in html
    assert (run_dir / "figures" / f"sweep_{run_id}.png").is_file()

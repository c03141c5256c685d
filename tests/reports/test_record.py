"""The run-record schema module (`evals.suite.record`, docs/records.md)."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest

from evals.suite import record
from evals.suite.record import (
    SCHEMA,
    RecordError,
    check_depth_export,
    failed_record,
    hardware_summary,
    load_records,
    read_json,
    write_json_atomic,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_file_names():
    assert (record.RECORD, record.FEWSHOT_ITEMS, record.DEPTH_SAMPLE, record.INFER_FILE,
            record.SPEED_FILE, record.PLAN_FILE) == (
        "record.json", "fewshot_items.json", "depth_sample.json", "infer.json", "speed.json",
        "plan.json")


def test_record_error_is_a_value_error():
    assert issubclass(RecordError, ValueError)


def test_write_json_atomic_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(path, {"b": 1, "a": float("nan")})
    assert list(path.parent.iterdir()) == [path]
    assert path.read_text().index('"a"') < path.read_text().index('"b"')  # sorted keys
    with pytest.raises(TypeError):  # not JSON-able: the old file stays, no stray temp file
        write_json_atomic(path, {"a": object()})
    assert list(path.parent.iterdir()) == [path]
    assert read_json(path)["b"] == 1


def test_read_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecordError, match=re.escape(str(bad))):
        read_json(bad)
    with pytest.raises(RecordError, match="does not exist"):
        read_json(tmp_path / "missing.json")


def test_failed_record():
    spec = {"run_id": "mor-2-1e12F-s0", "model_name": "mor-2", "seed": 0}
    rec = failed_record(spec, family="mor", suite={"name": "s", "run_dir": "r"},
                        error="ValueError: boom")
    assert rec["schema"] == SCHEMA and rec["status"] == "failed"
    assert rec["run_id"] == "mor-2-1e12F-s0" and rec["family"] == "mor"
    assert rec["metrics"] == {} and rec["error"] == "ValueError: boom"
    assert "provenance" not in rec
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", rec["finished_at"])
    with_prov = failed_record(spec, family=None, suite={}, error="x", provenance={"git": {}})
    assert with_prov["provenance"] == {"git": {}} and with_prov["family"] is None


def test_failed_record_loads_and_renders_as_failed(tmp_path):
    rec = failed_record({"run_id": "a", "model_name": "a", "seed": 0,
                         "budget": {"kind": "flops", "value": 1e12}},
                        family="vanilla", suite={"run_dir": "r"}, error="E: x")
    write_json_atomic(tmp_path / "a" / record.RECORD, rec)
    assert load_records(tmp_path) == [rec]


def test_hardware_summary():
    assert hardware_summary({"cuda": {"name": "H200", "count": 1}}) == "H200 x1"
    assert hardware_summary({"cpu": "AMD EPYC", "torch_threads": 2}) == "AMD EPYC (2 threads)"


@pytest.mark.parametrize("bad", [
    [],
    {"tokens": ["a"], "depths": [1]},
    {"tokens": ["a"], "depths": [1, 2], "routing": "topk", "num_recursions": 2},
    {"tokens": ["a"], "depths": [3], "routing": "topk", "num_recursions": 2},
    {"tokens": ["a"], "depths": [1], "routing": "topk", "num_recursions": 0},
])
def test_check_depth_export_rejects(bad):
    with pytest.raises(RecordError, match="where.json"):
        check_depth_export(bad, where="where.json")


def test_check_depth_export_accepts_the_fixture_samples():
    samples = sorted(FIXTURES.rglob(record.DEPTH_SAMPLE))
    assert samples
    for path in samples:
        check_depth_export(read_json(path), where=str(path))


def _keys(td: type) -> tuple[set[str], set[str]]:
    return set(td.__required_keys__), set(td.__optional_keys__)


def test_typed_description_covers_the_fixture_records():
    """Every key the fixture records hold is described, and every required key is there."""
    required, optional = _keys(record.Record)
    for path in sorted(FIXTURES.rglob(record.RECORD)):
        rec = read_json(path)
        assert set(rec) <= required | optional, (path, set(rec) - required - optional)
        assert required <= set(rec) | {"data"}, (path, required - set(rec))
        m_req, m_opt = _keys(record.Metrics)
        assert set(rec["metrics"]) <= m_req | m_opt, (path, set(rec["metrics"]) - m_opt)
        if rec["status"] == "ok":
            assert set(rec["kv_cache"]) == set(typing.get_type_hints(record.KvCache))
            assert set(rec["metrics"]["speed"]) == set(
                typing.get_type_hints(record.SpeedMetrics))


def test_fixture_records_carry_the_new_fields():
    for path in sorted(FIXTURES.rglob(record.RECORD)):
        rec = json.loads(path.read_text())
        if rec["status"] != "ok":
            continue
        assert rec["kv_cache"]["bytes_per_seq"] > 0 and rec["kv_cache"]["seq_len"] > 0
        speed = rec["metrics"]["speed"]
        assert speed["reference"] and speed["rel_tokens_per_s"] > 0
        if rec["family"] == "vanilla" and speed["reference"] == rec["run_id"]:
            assert speed["rel_tokens_per_s"] == 1.0
        if (rec.get("data") or {}).get("corpus") == "synthetic":
            assert rec["data"]["difficulty_classes"][:2] == ["filler", "structure"]
        else:
            assert "difficulty_classes" not in (rec.get("data") or {})

"""The runner's progress events: typed (`evals.suite.events`), complete and in order, and
the command line's plain log built from them."""

from __future__ import annotations

import json

import pytest

from evals.cli.display import PlainLog, SuiteProgress
from evals.suite.events import PHASES, RunEvent, SuiteEvent
from evals.suite.runner import EventSender, run_suite
from evals.suite.spec import load_suite, plan_runs
from tests.conftest import MICRO_SUITE

PHASE_ORDER = ["queued", "data", "training", "saving", "validation", "few-shot", "done"]
MICRO_EVAL = """
[eval]
tasks = ["mor_synth_filler"]
limit = 4
batch_size = 8
"""


class ListQueue(list):
    def put(self, item) -> None:
        self.append(item)


def test_event_types_reject_unknown_phases_and_kinds():
    assert [p for p in PHASES if p != "failed"] == PHASE_ORDER
    with pytest.raises(ValueError, match="unknown run phase 'trainig'"):
        RunEvent("a", "trainig", 0.0)
    with pytest.raises(ValueError, match="unknown suite event 'begin'"):
        SuiteEvent("begin", "micro", "/tmp/x")


def test_sender_sends_every_milestone_and_throttles_the_rest():
    q = ListQueue()
    sender = EventSender("run-a", q, min_interval_s=3600.0)  # throttle all but milestones
    sender.phase("training", step=0, total=20)
    on_step = sender.step_callback(20)
    for step in range(20):
        on_step(step, 5.0 - step / 10, 1e-3)
    assert all(isinstance(e, RunEvent) and e.run_id == "run-a" for e in q)
    # Every 10% of the steps (2 steps) and the last, however tight the throttle; at most
    # the first step besides (the throttle's clock starts at 0).
    assert [e.step for e in q[1:] if e.milestone] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert [e.step for e in q[1:] if not e.milestone] in ([], [1])
    assert q[-1].loss == pytest.approx(5.0 - 19 / 10) and q[-1].lr == 1e-3
    assert q[-1].total == 20 and q[-1].train_s >= 0
    with pytest.raises(ValueError, match="unknown phase"):
        sender.phase("resting")


@pytest.mark.slow
def test_events_typed_in_order_plain_log_and_fewshot_items(tmp_path, capsys, write_suite):
    suite = load_suite(str(write_suite(text=MICRO_SUITE + MICRO_EVAL)))
    events: list = []
    run_dir, records, failed = run_suite(suite, tmp_path / "runs",
                                         cache_dir=tmp_path / "cache", on_event=events.append)
    assert failed == []
    assert all(isinstance(e, RunEvent | SuiteEvent) for e in events)
    progress = SuiteProgress(live=False)
    plain = PlainLog()
    for event in events:
        progress(event)
        plain(event)
    progress.print_summary(records)
    out, err = capsys.readouterr()

    run_ids = [r.run_id for r in plan_runs(suite)]
    suite_kinds = [e.kind for e in events if isinstance(e, SuiteEvent)]
    assert suite_kinds == ["start", "data"] + ["run"] * len(run_ids) + ["finished"]
    assert all(e.run_dir == str(run_dir) and e.suite == "micro"
               for e in events if isinstance(e, SuiteEvent))
    times = [e.time for e in events if isinstance(e, RunEvent)]
    assert times == sorted(times)  # relayed in the order they were made
    for run_id in run_ids:
        mine = [e for e in events if isinstance(e, RunEvent) and e.run_id == run_id]
        phases = [p for i, p in enumerate(e.phase for e in mine)
                  if i == 0 or p != mine[i - 1].phase]
        assert phases == PHASE_ORDER, (run_id, phases)
        steps = [e.step for e in mine if e.phase == "training" and e.step is not None]
        total = next(e.total for e in mine if e.phase == "queued")
        assert steps[0] == 0 and steps[-1] == total and steps == sorted(steps)
        done = mine[-1]
        rec = json.loads((run_dir / run_id / "record.json").read_text())
        assert done.val_nll == rec["metrics"]["val_nll"] and done.wall_s > 0
        assert progress.rows[run_id]["phase"] == "done"
        # Each run's progress comes between its "run" event and the next one.
        start = next(i for i, e in enumerate(events) if isinstance(e, SuiteEvent)
                     and e.kind == "run" and e.info["run_id"] == run_id)
        first_data = next(i for i, e in enumerate(events) if isinstance(e, RunEvent)
                          and e.run_id == run_id and e.phase == "data")
        assert start < first_data
    # All runs are queued before the first one starts.
    first_data = next(i for i, e in enumerate(events) if getattr(e, "phase", None) == "data")
    assert sum(getattr(e, "phase", None) == "queued" for e in events[:first_data]) == len(run_ids)

    # The plain log: the lines CI logs showed before (run lines on stdout, steps on stderr).
    assert f"suite micro: {len(run_ids)} runs -> {run_dir}" in out
    assert "data: synthetic / bytes:" in out
    for i, run_id in enumerate(run_ids, 1):
        assert f"[{i}/{len(run_ids)}] {run_id}:" in out
        total = next(e.total for e in events if getattr(e, "run_id", None) == run_id)
        assert f"{run_id}: step {total}/{total}" in err
        # one line per finished few-shot task and routing mode, with its request rate
        modes = ("topk", "causal") if run_id.startswith("mor") else ("default",)
        for mode in modes:
            assert f"{run_id}: few-shot mor_synth_filler ({mode}): " in err
        fewshot = [e for e in events if getattr(e, "run_id", None) == run_id
                   and getattr(e, "phase", None) == "few-shot" and e.milestone]
        assert len(fewshot) == len(modes) and all(e.step == e.total > 0 for e in fewshot)
    assert f"suite micro: {len(run_ids)}/{len(run_ids)} runs ok" in out
    assert "suite summary" in err and "ok" in err
    for run_id in run_ids:
        assert run_id in err.split("suite summary", 1)[1]
    assert "\x1b[" not in out + err  # no terminal control sequences in a log

    # Per-item few-shot scores, by routing mode, next to each record (not inside it).
    for run_id in run_ids:
        items = json.loads((run_dir / run_id / "fewshot_items.json").read_text())
        rec = json.loads((run_dir / run_id / "record.json").read_text())
        modes = {"topk", "causal"} if rec["family"] == "mor" else {"default"}
        assert set(items) == modes
        assert rec["metrics"]["fewshot"]["routing"] == ("topk" if rec["family"] == "mor"
                                                        else "default")
        # which scoring path each routing mode took: top-k is never packed
        want = ({"topk": "plain", "causal": "shared_prefix"} if rec["family"] == "mor"
                else {"default": "shared_prefix"})
        assert rec["metrics"]["fewshot"]["scoring_by_routing"] == want
        for by_task in items.values():
            assert len(by_task["mor_synth_filler"]) == 4
            for item in by_task["mor_synth_filler"]:
                assert {"doc_id", "acc"} <= set(item) and item["acc"] in (0, 1)
        assert "items" not in json.dumps(rec["metrics"]["fewshot"])


def test_plain_log_of_a_failed_run_and_phases(capsys):
    plain = PlainLog()
    plain(SuiteEvent("start", "s", "/runs/s-1", info={"runs": 1}))
    plain(RunEvent("m-s0", "failed", 0.0, error="ValueError: boom", wall_s=1.0))
    plain(SuiteEvent("phase", "s", "/runs/s-1", "speed",
                     {"rounds": 3, "steps_per_round": 3, "warmup_steps": 1}))
    plain(SuiteEvent("phase_log", "s", "/runs/s-1", "speed", {"message": "  a line"}))
    plain(SuiteEvent("phase_failed", "s", "/runs/s-1", "speed",
                     {"error_file": "/runs/s-1/speed_error.txt"}))
    out, err = capsys.readouterr()
    assert "run m-s0 failed: ValueError: boom (see /runs/s-1/m-s0/error.txt)" in err
    assert "  a line" in err
    assert "training speed: 3 interleaved round(s) x 3 steps per model (+1 warm-up)" in out
    assert ("training speed phase failed (see /runs/s-1/speed_error.txt); training results "
            "kept") in out

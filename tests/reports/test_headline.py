"""The headline table report.md and index.html lead with (`reports.table.headline_table`).

Records: the hand-made suite run of tests/fixtures/records/ (see tests/reports/test_table.py),
with variants made here (no interleaved speed phase, an inference phase). Expected values are
computed from the records, not typed in.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

from evals.cli.main import main
from evals.suite.record import load_records
from reports.table import HEADLINE_COLUMNS, comparison_table, headline_table, render_report

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
EXPECTED = ["model", "params", "val NLL ± 95% CI", "few-shot avg",
            "train-time ratio vs vanilla", "throughput ratio vs vanilla", "KV ratio vs vanilla"]


def _first_markdown_table(md: str) -> list[list[str]]:
    lines = []
    for line in md.splitlines():
        if line.startswith("|"):
            lines.append([c.strip() for c in line.strip("|").split("|")])
        elif lines:
            break
    return [lines[0]] + lines[2:]


def _rows(head: list[list[str]]) -> dict[str, dict[str, str]]:
    return {r[0]: dict(zip(head[0], r)) for r in head[1:]}


def _recs(drop_speed: bool = False, infer: dict[str, float] | None = None) -> list[dict]:
    out = []
    for rec in load_records(FIXTURES):
        rec = json.loads(json.dumps(rec))
        if drop_speed:
            (rec.get("metrics") or {}).pop("speed", None)
        if infer and rec["run_id"] in infer:
            rec["metrics"]["infer"] = {"tokens_per_s": infer[rec["run_id"]], "batch_size": 8,
                                       "kv_cache_bytes": 8 * 2**20}
        out.append(rec)
    return out


def _ok(recs, model, budget=1e12):
    return [r for r in recs if r["status"] == "ok" and r["model_name"] == model
            and r["budget"]["value"] == budget]


def _mean(values):
    return sum(values) / len(values)


def test_headline_columns_in_order():
    assert HEADLINE_COLUMNS == EXPECTED
    head = headline_table(comparison_table(load_records(FIXTURES)))
    assert list(head.columns) == EXPECTED


def test_headline_values_interleaved_ratios():
    recs = _recs()
    rows = {r["model"]: r for _, r in headline_table(comparison_table(recs)).iterrows()}
    mor, van = _ok(recs, "mor-2"), _ok(recs, "vanilla")[0]
    key = "mor-2 @ 1e+12 flops"  # two budgets: the budget is named
    nll = [r["metrics"]["val_nll"] for r in mor]
    assert rows[key]["val NLL ± 95% CI"].startswith(f"{_mean(nll):.4f} ± ")
    assert "±" not in rows["vanilla @ 1e+12 flops"]["val NLL ± 95% CI"]  # one seed
    # Training time from the interleaved [speed] phase: tokens / interleaved tokens/s.
    speed = _mean([r["metrics"]["speed"]["rel_tokens_per_s"] for r in mor]) / (
        van["metrics"]["speed"]["rel_tokens_per_s"])
    rel_tokens = _mean([r["metrics"]["tokens"] for r in mor]) / van["metrics"]["tokens"]
    assert rows[key]["train-time ratio vs vanilla"] == f"{rel_tokens / speed:.2f}x"
    # No inference phase: the interleaved training throughput, said to be training.
    assert rows[key]["throughput ratio vs vanilla"] == f"{speed:.2f}x (training)"
    kv = mor[0]["kv_cache"]["bytes_per_seq"] / van["kv_cache"]["bytes_per_seq"]
    assert rows[key]["KV ratio vs vanilla"] == f"{kv:.2f}x"
    # The 2e12 budget is re-based on its own vanilla (the [speed] phase used one reference).
    v2 = rows["vanilla @ 2e+12 flops"]
    assert v2["train-time ratio vs vanilla"] == "1.00x"
    assert v2["throughput ratio vs vanilla"] == "1.00x (training)"
    assert rows["mor-2 @ 1e+12 flops"]["few-shot avg"] != "-"
    assert rows["mor-2 @ 2e+12 flops"]["few-shot avg"] == "-"


def test_headline_marks_sequential_and_uses_generation_throughput():
    recs = _recs(drop_speed=True, infer={"vanilla-1e12F-s0": 1000.0, "mor-2-1e12F-s0": 1500.0,
                                         "mor-2-1e12F-s1": 1700.0})
    rows = {r["model"]: r for _, r in headline_table(comparison_table(recs)).iterrows()}
    mor, van = _ok(recs, "mor-2"), _ok(recs, "vanilla")[0]
    seq = _mean([r["metrics"]["train_time_s"] for r in mor]) / van["metrics"]["train_time_s"]
    assert rows["mor-2 @ 1e+12 flops"]["train-time ratio vs vanilla"] == (
        f"{seq:.2f}x (sequential)")
    assert rows["mor-2 @ 1e+12 flops"]["throughput ratio vs vanilla"] == "1.60x"
    # No generation, no interleaved training: the sequential training ratio, marked.
    rec2 = _ok(recs, "mor-2", 2e12)[0]["metrics"]["tokens_per_s"]
    van2 = _ok(recs, "vanilla", 2e12)[0]["metrics"]["tokens_per_s"]
    assert rows["mor-2 @ 2e+12 flops"]["throughput ratio vs vanilla"] == (
        f"{rec2 / van2:.2f}x (training) (sequential)")


def test_report_md_and_html_lead_with_the_headline(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES, run_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(run_dir), "--json"]) == 0
    md = (run_dir / "report.md").read_text()
    head = _first_markdown_table(md)
    assert head[0] == EXPECTED
    ok = [r for r in load_records(run_dir) if r["status"] == "ok"]
    assert len(head) - 1 == len({(r["model_name"], r["budget"]["value"]) for r in ok})
    assert md.index("## Headline") < md.index("## Detail")
    # The wide table follows as detail.
    assert "| model | budget | family | router |" in md.split("## Detail", 1)[1]
    page = (run_dir / "index.html").read_text()
    first = re.search(r"<table>.*?</table>", page, flags=re.S).group(0)
    assert re.findall(r"<th>(.*?)</th>", first) == EXPECTED
    assert "<th>family</th>" not in first


def test_render_report_headline_matches_function(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES, run_dir)
    out = render_report(run_dir)
    head = headline_table(out["table"])
    md_rows = _rows(_first_markdown_table(Path(out["markdown"]).read_text()))
    for _, r in head.iterrows():
        assert md_rows[r["model"]] == {k: str(v) for k, v in r.items()}


# --------------------------------------------------------------------------------------------
# one p-value format in report.md and index.html


def test_format_p():
    from reports.stats import format_p

    assert format_p(0.0001) == "<0.001" and format_p(0.000999) == "<0.001"
    assert format_p(0.001) == "0.001" and format_p(0.01234) == "0.012"
    assert format_p(0.5) == "0.500" and format_p(float("nan")) == "-"


def test_p_values_formatted_alike_in_markdown_and_html(tmp_path):
    import html as html_mod

    import pandas as pd

    from reports.stats import format_p

    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES, run_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(run_dir), "--json"]) == 0
    tests = pd.read_csv(run_dir / "report_tests.csv")
    expected = [format_p(p) for p in tests["p"]]
    assert "<0.001" in expected  # the fixture's MoR HellaSwag gain: a tiny p
    md = (run_dir / "report.md").read_text().split("## Significance tests vs vanilla", 1)[1]
    md_table = _first_markdown_table(md)
    md_p = [dict(zip(md_table[0], r))["p"] for r in md_table[1:]]
    page = (run_dir / "index.html").read_text()
    section = page.split('id="significance"', 1)[1]
    table = re.search(r"<table.*?</table>", section, flags=re.S).group(0)
    header = re.findall(r"<th>(.*?)</th>", table)
    cells = [re.findall(r"<td>(.*?)</td>", row)
             for row in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)]
    html_p = [html_mod.unescape(c[header.index("p")]) for c in cells if c]
    assert md_p == html_p == expected

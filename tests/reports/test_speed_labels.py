"""Speeds in index.html say how they were timed: sequential (each run timed while it
trained, minutes apart) or interleaved (the [speed] phase).

Records: the hand-made suite run of tests/fixtures/records/ (see tests/reports/test_table.py).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from reports.html import render_html

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"


def _key_table_headers(page: str) -> list[str]:
    section = page.split('id="key-columns"', 1)[1]
    table = re.search(r"<table>.*?</table>", section, flags=re.S).group(0)
    return re.findall(r"<th>(.*?)</th>", table)


def test_key_columns_label_sequential_and_interleaved_speeds(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES, run_dir)
    page = render_html(run_dir).read_text()
    headers = _key_table_headers(page)
    assert "tokens_per_s (sequential)" in headers
    assert "rel_tokens_per_s (sequential)" in headers
    assert "speed_rel_tokens_per_s (interleaved)" in headers
    # No speed column of that table goes unlabelled.
    assert not [h for h in headers if "tokens_per_s" in h and "(" not in h]

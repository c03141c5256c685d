"""Tests for the HTML report (`reports.html`, `mor-bench report`).

The run is a copy of the hand-made records of tests/fixtures/records/ (five models over two
budgets, one failed run) plus a suite file. The browser tests open index.html in headless
Chromium: the screenshot must not be blank and every figure must have loaded.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals.cli.main import main
from reports.html import (
    dump_dom,
    external_references,
    find_browser,
    loaded_images,
    take_screenshot,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
SUITE_TEXT = """# a suite file with characters HTML must escape: <b>&"'
name = "fixture"
seeds = [0, 1]
[budget]
flops = [1e12, 2e12]
"""
BROWSER = find_browser()
needs_browser = pytest.mark.skipif(BROWSER is None,
                                   reason="no chromium/chrome on PATH: apt install chromium")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """`mor-bench report --json` on a copy of the fixture run (figures, tables, page)."""
    run_dir = tmp_path_factory.mktemp("html") / "run"
    shutil.copytree(FIXTURES, run_dir)
    (run_dir / "suite.toml").write_text(SUITE_TEXT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(run_dir), "--json"]) == 0
    return {**json.loads(out.getvalue()), "run_dir": run_dir}


@pytest.fixture(scope="module")
def page(report) -> str:
    return Path(report["html"]).read_text()


def test_report_writes_every_output(report):
    run_dir = report["run_dir"]
    assert Path(report["html"]) == run_dir / "index.html"
    assert Path(report["markdown"]) == run_dir / "report.md"
    assert Path(report["csv"]).is_file()
    statuses = [json.loads(p.read_text())["status"] for p in FIXTURES.rglob("record.json")]
    assert report["n_ok"] == statuses.count("ok") >= 2
    assert report["n_failed"] == statuses.count("failed") == 1
    assert report["figures"], "no figure was rendered from the fixture records"
    for entry in report["figures"].values():
        assert Path(entry["png"]).is_file() and Path(entry["png"]).parent == run_dir / "figures"
    assert (run_dir / "figures" / "manifest.json").is_file()


def test_page_is_self_contained(page):
    assert external_references(page) == []
    assert "<link" not in page  # CSS is inline
    assert page.count("<style>") == 1
    # A reference would be found: the check itself works.
    assert external_references('<img src="https://example.org/x.png">') == [
        "https://example.org/x.png"]
    assert external_references("<style>@import 'x.css';</style>") == ["x.css"]


def test_page_embeds_every_figure_with_its_caption(report, page):
    manifest = json.loads((report["run_dir"] / "figures" / "manifest.json").read_text())
    figs = manifest["figures"]
    assert set(figs) == set(report["figures"])
    assert page.count('<img alt="') == len(figs)
    assert page.count('src="data:image/png;base64,') == len(figs)
    assert f'data-figures="{len(figs)}"' in page
    for entry in figs.values():
        assert html.escape(entry["caption"]) in page


def test_page_holds_tables_and_provenance(report, page):
    recs = [json.loads(p.read_text()) for p in FIXTURES.rglob("record.json")]
    ok = [r for r in recs if r["status"] == "ok"]
    for model in {r["model_name"] for r in ok}:
        assert f"<td>{model}</td>" in page
    assert "As the paper&#x27;s Table 3" in page or "As the paper's Table 3" in page
    assert 'id="paper"' in page
    prov = ok[0]["provenance"]
    assert prov["git"]["commit"] in page
    assert prov["versions"]["torch"] in page
    assert prov["hardware"]["cpu"] in page
    assert "<td>seeds</td><td>0, 1</td>" in page
    # The suite file, verbatim (escaped once), and the failed run with its error.
    assert html.escape(SUITE_TEXT) in page
    failed = next(r for r in recs if r["status"] == "failed")
    assert failed["run_id"] in page and html.escape(failed["error"]) in page


def test_markdown_links_figures_relative_to_the_run_dir(report):
    md = (report["run_dir"] / "report.md").read_text()
    assert "## Figures" in md
    for name, entry in report["figures"].items():
        rel = Path(entry["png"]).relative_to(report["run_dir"]).as_posix()
        assert f"]({rel})" in md, name
        assert (report["run_dir"] / rel).is_file()
    # Rendering again does not duplicate the section.
    assert main(["report", str(report["run_dir"]), "--json"]) == 0
    assert (report["run_dir"] / "report.md").read_text().count("## Figures") == 1


def test_report_when_every_run_failed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "mor-3-1e12F-s0", run_dir / "mor-3-1e12F-s0")
    assert main(["report", str(run_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_ok"] == 0 and out["n_failed"] == 1 and out["figures"] == {}
    page = (run_dir / "index.html").read_text()
    error = json.loads((run_dir / "mor-3-1e12F-s0" / "record.json").read_text())["error"]
    assert "1 failed" in page and html.escape(error) in page
    assert "No figures were rendered" in page and 'data-figures="0"' in page
    assert "suite.toml is missing" in page


# --------------------------------------------------------------------------------------------
# in a browser


def _not_blank(png: Path) -> None:
    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert img.shape[0] >= 1000 and img.shape[1] == 1280, img.shape
    assert img.std() > 20, f"screenshot looks blank (pixel std {img.std():.1f})"
    colours = np.unique(img.reshape(-1, 3)[::37], axis=0)
    assert len(colours) > 50, f"only {len(colours)} distinct colours"


@needs_browser
def test_browser_renders_page_and_loads_every_figure(report, tmp_path):
    n_figures = len(report["figures"])
    assert n_figures >= 1
    loaded, total = loaded_images(dump_dom(report["html"]))
    assert total == n_figures
    assert loaded == n_figures, f"only {loaded} of {n_figures} figures loaded"
    png = take_screenshot(report["html"], tmp_path / "shot.png")
    _not_blank(png)


@needs_browser
def test_a_broken_figure_is_detected(report, tmp_path):
    """The load check fails when an image cannot be decoded (so it can fail at all)."""
    page = Path(report["html"]).read_text()
    broken = tmp_path / "index.html"
    prefix = 'src="data:image/png;base64,'
    broken.write_text(page.replace(prefix, prefix + "AA", 1))  # not a PNG any more
    loaded, total = loaded_images(dump_dom(broken))
    assert total == len(report["figures"]) and loaded == total - 1


@needs_browser
def test_report_screenshot_option(report, capsys):
    run_dir = report["run_dir"]
    assert main(["report", str(run_dir), "--screenshot"]) == 0
    out = capsys.readouterr().out
    assert f"screenshot: {run_dir / 'report.png'}" in out
    _not_blank(run_dir / "report.png")


def test_screenshot_without_a_browser_is_a_clear_error(report, capsys, monkeypatch):
    monkeypatch.setenv("MOR_BENCH_BROWSER", "/nonexistent/chromium")
    rc = main(["report", str(report["run_dir"]), "--screenshot"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mor-bench: error: --screenshot")
    assert "chromium" in err[0] and "apt-get install chromium" in err[0]

"""The whole report of a suite run as ONE self-contained HTML file, and the command that
builds every report output at once.

    mor-bench report RUN_DIR [--screenshot]
        -> RUN_DIR/report.md, report.csv        (reports.table)
           RUN_DIR/figures/*.png|svg, manifest.json   (reports.figures)
           RUN_DIR/index.html                   (here: tables, figures, provenance)
           RUN_DIR/report.png                   (--screenshot: headless Chromium)

index.html loads nothing from anywhere: the CSS is inline, figures are base64 data URIs.
A small inline script marks <body> with how many images loaded once the page has, which
is what the browser test reads back through `--dump-dom`.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from evals.suite.record import hardware_summary, load_records, read_json
from reports import table as table_mod
from reports.figures import render_figures
from reports.frame import ReportError, contended_runs, num
from reports.paper import PAPER_NOTE, SIGNIFICANCE_NOTE, paper_layout, paper_view
from reports.stats import significance_vs_vanilla

INDEX = "index.html"
SCREENSHOT = "report.png"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The columns of the compact detail table after the headline (all columns follow later).
HEADLINE = ("model", "layers", "budget", "seeds", "contended", "tokens", "val_nll",
            "val_nll_causal", "rel_val_nll", "fewshot_avg", "tokens_per_s", "rel_tokens_per_s",
            "speed_rel_tokens_per_s", "peak_mem_mb", "rel_peak_mem")
# Headers of that table saying how a speed was timed: sequential (each run timed while it
# trained, minutes apart) or interleaved (the [speed] phase, alternating rounds).
KEY_LABELS = {"tokens_per_s": "tokens_per_s (sequential)",
              "rel_tokens_per_s": "rel_tokens_per_s (sequential)",
              "speed_rel_tokens_per_s": "speed_rel_tokens_per_s (interleaved)"}
NO_BROWSER = ("no Chromium/Chrome on PATH (looked for " + ", ".join(BROWSERS) + "); install "
              "one, e.g. `apt-get install chromium`")


# --------------------------------------------------------------------------------------------
# the pieces other modules provide


def _tables(run_dir: Path, records: list[dict[str, Any]],
            report: dict[str, Any] | None = None) -> dict[str, str | None]:
    """HTML of the report's tables: a compact summary, the paper's Table 3 layout with
    significance marks, every column, the significance tests and the paper reference view.
    `report`: what `reports.table.render_report` returned (else computed here, nothing
    written)."""
    if report is None:
        table = table_mod.comparison_table(records)
        tests = significance_vs_vanilla(records, run_dir)
        report = {"table": table, "tests": tests, "layout": paper_layout(table, tests),
                  "paper_view": paper_view(table)}
    table = report["table"]
    shown = table_mod.format_table(table[[c for c in table.columns
                                          if not c.endswith("_ci95")]])
    head = [c for c in HEADLINE if c in shown.columns]
    tests = report.get("tests")

    def fragment(frame: pd.DataFrame | None) -> str | None:
        if frame is None or frame.empty:
            return None
        return f'<div class="scroll">{table_mod.render_formats(frame)["html"]}</div>'

    return {"headline": _frame_html(table_mod.headline_table(table)),
            "headline_note": _md_inline(table_mod.headline_note(table)),
            "key": _frame_html(shown[head].rename(columns=KEY_LABELS)),
            "all": _frame_html(shown),
            "layout": fragment(report.get("layout")),
            "tests": fragment(None if tests is None or tests.empty
                              else table_mod.tests_display(tests)),
            "paper": fragment(report.get("paper_view"))}


def _contention_html(records: list[dict[str, Any]]) -> str:
    """The runs timed on a contended machine, with the recorded reason ("" when none)."""
    lines = table_mod.contention_note(records)
    if not lines:
        return ""
    items = "".join(f"<li>{_md_inline(line[2:])}</li>" for line in lines
                    if line.startswith("- "))
    return (f'<h3 id="contention">Contended runs</h3><p class="note">{_md_inline(lines[0])}'
            f'</p><ul class="contended">{items}</ul>')


def _md_inline(text: str) -> str:
    """Escaped text with `code` spans, for the notes the table module writes in Markdown."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _figures(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Render the figures (reports.figures); returns {"figures": {name: {"png", "svg",
    "caption", "title"}} with paths resolved to files that exist, "skipped": {name:
    reason}}."""
    manifest = render_figures(run_dir, records=records) or {}
    fig_dir = run_dir / (manifest.get("dir") or "figures")  # manifest paths: run-relative
    figures = {}
    for name, entry in (manifest.get("figures") or {}).items():
        resolved = dict(entry)
        for kind in ("png", "svg"):
            path = entry.get(kind)
            found = [c for c in ((run_dir / path, fig_dir / path) if path else ())
                     if c.is_file()]
            resolved[kind] = found[0] if found else None
        figures[name] = resolved
    return {"figures": figures, "skipped": dict(manifest.get("skipped") or {})}


# --------------------------------------------------------------------------------------------
# HTML


_CSS = """
:root { --fg: #1d2430; --muted: #5b6576; --line: #d9dee7; --band: #f4f6fa; --accent: #2456a6;
        --ok: #1f7a3a; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans",
       sans-serif; color: var(--fg); background: #fff; }
header { background: #14213d; color: #fff; padding: 22px 32px 18px; }
header h1 { margin: 0 0 4px; font-size: 24px; font-weight: 650; }
header p { margin: 0; color: #c9d3e6; font-size: 14px; }
nav { padding: 8px 32px; background: var(--band); border-bottom: 1px solid var(--line); }
nav a { margin-right: 18px; color: var(--accent); text-decoration: none; font-weight: 550; }
main { padding: 8px 32px 40px; max-width: 1500px; }
h2 { margin: 28px 0 10px; font-size: 19px; border-bottom: 2px solid var(--line);
     padding-bottom: 4px; }
h3 { margin: 18px 0 6px; font-size: 16px; }
.note { color: var(--muted); font-size: 13.5px; max-width: 1100px; }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 9px; border-bottom: 1px solid var(--line); white-space: nowrap;
         text-align: right; }
th { background: var(--band); position: sticky; top: 0; font-weight: 600; }
td:first-child, th:first-child { text-align: left; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfd; }
.kv td { text-align: left; white-space: normal; }
.kv td:first-child { color: var(--muted); font-weight: 500; width: 220px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12.5px;
         font-weight: 600; color: #fff; background: var(--ok); }
.badge.bad { background: var(--bad); }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr));
           gap: 18px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 10px;
         background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
pre { background: var(--band); border: 1px solid var(--line); border-radius: 6px;
      padding: 12px; overflow-x: auto; font-size: 12.5px; line-height: 1.4; }
.failed li { color: var(--bad); }
"""

# Marks <body> once the page has loaded: how many <img> there are and how many decoded
# (complete with a natural width). The browser test reads these attributes back.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images-total", String(imgs.length));
  document.body.setAttribute("data-images-loaded", String(ok.length));
  document.body.setAttribute("data-ready", "1");
});
"""


def _esc(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _frame_html(frame: pd.DataFrame) -> str:
    """A DataFrame of display strings as a plain HTML table."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>' \
           f"</table></div>"


def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _data_uri(path: Path) -> str:
    mime = "image/svg+xml" if path.suffix.lower() == ".svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _figures_html(figs: dict[str, Any]) -> tuple[str, int]:
    parts, n = [], 0
    for name, entry in figs.get("figures", {}).items():
        path = entry.get("png") or entry.get("svg")
        if path is None:
            continue
        caption = entry.get("caption") or ""
        title = entry.get("title") or name
        parts.append(f'<figure id="fig-{_esc(name)}"><img alt="{_esc(title)}" '
                     f'src="{_data_uri(Path(path))}"><figcaption><b>{_esc(title)}.</b> '
                     f"{_esc(caption)}</figcaption></figure>")
        n += 1
    out = ('<div class="figures">' + "".join(parts) + "</div>" if parts
           else '<p class="note">No figures were rendered for this run.</p>')
    skipped = figs.get("skipped") or {}
    if skipped:
        out += ('<p class="note">Not drawn: ' + "; ".join(
            f"<b>{_esc(k)}</b> ({_esc(v)})" for k, v in skipped.items()) + "</p>")
    return out, n


def _infer_html(records: list[dict[str, Any]]) -> str | None:
    """Inference measurements (records' metrics["infer"]), when a suite took them."""
    rows = []
    for r in records:
        inf = (r.get("metrics") or {}).get("infer")
        if r.get("status") != "ok" or not isinstance(inf, dict):
            continue
        card = inf.get("modelled") or {}
        rows.append({"run": r["run_id"], "scheduler": inf.get("scheduler") or "-",
                     "batch": inf.get("batch_size"),
                     "tokens/s": _fmt(inf.get("tokens_per_s"), "{:,.0f}"),
                     "model: tokens/s": _fmt(card.get("modelled_tokens_per_s"), "{:,.0f}"),
                     "model error": _fmt(card.get("model_error"), "{:+.1%}"),
                     "MBU": _fmt(card.get("mbu"), "{:.1%}"),
                     "ms/token": _fmt(inf.get("ms_per_token"), "{:.3f}"),
                     "rel tokens/s": _fmt(inf.get("rel_tokens_per_s"), "{:.2f}x"),
                     "KV cache": _fmt(inf.get("kv_cache_bytes"), lambda v: f"{v / 2**20:.2f} MiB"),
                     "mean depth": _fmt(inf.get("mean_depth"), "{:.2f}"),
                     "routing": inf.get("routing") or "-"})
    if not rows:
        return None
    note = ('<p class="note">tokens/s, ms/token, rel tokens/s: measured. "model" columns: the '
            "throughput model's projection of the same workload on this device (model, not "
            "measured; docs/throughput_model.md), and its error against the measurement; MBU: "
            "the bytes a decode must move per second over the device's memory bandwidth."
            "</p>")
    return _frame_html(pd.DataFrame(rows)) + note


def _sweep_html(run_dir: Path, records: list[dict[str, Any]]) -> str | None:
    """The [sweep] phase's documents (records' metrics["sweep"] name them): a table per
    swept run and its accuracy-vs-throughput figure (drawn into RUN_DIR/figures/)."""
    from reports.sweep import render_sweep, sweep_rows

    parts = []
    for r in records:
        entry = (r.get("metrics") or {}).get("sweep")
        if r.get("status") != "ok" or not isinstance(entry, dict):
            continue
        path = run_dir / entry["file"]
        if not path.is_file():
            parts.append(f'<p class="note">{_esc(entry["file"])} is missing.</p>')
            continue
        doc = read_json(path)
        png, _ = render_sweep(doc, run_dir / "figures", f"sweep_{r['run_id']}")
        parts.append(f"<h4>{_esc(r['run_id'])}: {_esc(doc['knob'])} knob"
                     f"{' (calibrated)' if doc.get('calibrate') else ''}</h4>")
        parts.append(_frame_html(pd.DataFrame(sweep_rows(doc))))
        parts.append(f'<figure id="fig-sweep-{_esc(r["run_id"])}"><img alt="knob sweep" '
                     f'src="{_data_uri(Path(png))}"><figcaption>Each point: one setting of '
                     f"the knob on the same weights; tokens/s measured in interleaved rounds "
                     f"in one process ({_esc(entry['file'])}).</figcaption></figure>")
    return "".join(parts) or None


def _fmt(value: Any, fmt) -> str:
    value = num(value)
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def _distinct(values: list[Any]) -> list[Any]:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _provenance_html(run_dir: Path, records: list[dict[str, Any]]) -> str:
    ok = [r for r in records if r.get("status") == "ok" and r.get("provenance")]
    prov = [r["provenance"] for r in ok]
    suite = records[0].get("suite", {}) if records else {}
    commits = _distinct([(p.get("git") or {}).get("commit") for p in prov])
    dirty = any((p.get("git") or {}).get("dirty") for p in prov)
    versions = prov[0].get("versions", {}) if prov else {}
    hws = _distinct([hardware_summary(p["hardware"]) for p in prov if p.get("hardware")])
    hw = prov[0].get("hardware", {}) if prov else {}
    seeds = sorted({r.get("seed") for r in records if r.get("seed") is not None})
    times = sorted(t for r in records for t in (r.get("started_at"), r.get("finished_at")) if t)
    code = ", ".join(c or "unknown (not a git checkout)" for c in commits) or "unknown"
    pairs = [
        ("mor-bench version", _esc(versions.get("mor-bench"))),
        ("git commit", f"<code>{_esc(code)}</code>"
                       + (' <span class="badge bad">uncommitted changes</span>' if dirty else "")),
        ("suite", f"<code>{_esc(suite.get('source'))}</code> (name {_esc(suite.get('name'))}, "
                  f"sha256 <code>{_esc(suite.get('sha256'))}</code>)"),
        ("seeds", _esc(", ".join(map(str, seeds)) or "-")),
        ("hardware", _esc("; ".join(hws) or "unknown")),
        ("platform", _esc(hw.get("platform"))),
        ("CPU", _esc(f"{hw.get('cpu')} ({hw.get('cpu_count')} cores, torch threads "
                     f"{hw.get('torch_threads')})") if hw else "-"),
        ("memory", _esc(f"{hw['memory_bytes'] / 2**30:.1f} GiB") if hw.get("memory_bytes")
         else "-"),
        ("run period", _esc(f"{times[0]} .. {times[-1]} (UTC)") if times else "-"),
        ("command", f"<code>{_esc(' '.join(prov[0].get('argv') or []))}</code>" if prov else "-"),
    ]
    if hw.get("cuda"):
        c = hw["cuda"]
        pairs.insert(6, ("CUDA", _esc(f"{c.get('name')} x{c.get('count')}, "
                                      f"{(c.get('memory_bytes') or 0) / 2**30:.0f} GiB, "
                                      f"CUDA {c.get('version')}")))
    lib_rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v or 'not installed')}</td></tr>"
                       for k, v in versions.items())
    suite_file = run_dir / "suite.toml"
    suite_text = (f"<pre>{html.escape(suite_file.read_text())}</pre>" if suite_file.is_file()
                  else '<p class="note">RUN_DIR/suite.toml is missing.</p>')
    return ("<h3>Code, hardware, seeds</h3>" + _kv_table(pairs)
            + '<h3>Library versions</h3><table class="kv"><tbody>' + lib_rows + "</tbody></table>"
            + "<h3>Suite file (<code>suite.toml</code>, verbatim)</h3>" + suite_text)


def render_html(run_dir: str | Path, *, records: list[dict[str, Any]] | None = None,
                figures: dict[str, Any] | None = None,
                report: dict[str, Any] | None = None) -> Path:
    """Write RUN_DIR/index.html: tables, figures (embedded), provenance. `figures`: what
    `_figures` returns and `report`: what `reports.table.render_report` returns
    (`build_report` passes both); None computes them here."""
    run_dir = Path(run_dir)
    records = load_records(run_dir) if records is None else records
    if figures is None:
        figures = _figures(run_dir, records)
    tables = _tables(run_dir, records, report)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") == "failed"]
    interrupted = [r for r in records if r.get("status") == "interrupted"]
    suite = records[0].get("suite", {}) if records else {}
    title = f"mor-bench report: {suite.get('name') or run_dir.name}"
    figs_html, n_figs = _figures_html(figures)
    status = (f'<span class="badge">{len(ok)} ok</span> '
              + (f'<span class="badge bad">{len(failed)} failed</span>' if failed else "")
              + (f' <span class="badge bad">{len(interrupted)} interrupted</span>'
                 if interrupted else ""))
    n_contended = len(contended_runs(records))
    if n_contended:
        status += (f' <a class="badge bad" href="#contention">{n_contended} timed on a '
                   f"contended machine</a>")
    sections = [
        '<h2 id="results">Results</h2>',
        f"<p>{status}</p>",
        '<h3 id="headline">Headline</h3>',
        tables["headline"],
        f'<p class="note">{tables["headline_note"]}</p>',
        _contention_html(records),
        '<h3 id="key-columns">Detail: key columns</h3>',
        '<p class="note">One row per model and budget (seeds averaged). Relative columns '
        "compare with the vanilla model of the same budget in this run (NLL as a "
        "difference, the rest as ratios). Tokens/s and time cover optimizer steps only. "
        "<code>tokens_per_s</code> / <code>rel_tokens_per_s</code> are sequential; "
        "<code>speed_rel_tokens_per_s</code> is interleaved. "
        "MoR <code>val_nll</code> under top-k routing is the paper's protocol and is not "
        "causal; <code>val_nll_causal</code> is.</p>",
        tables["key"],
    ]
    if tables["layout"]:
        sections += ['<h3 id="table3">As the paper\'s Table 3</h3>',
                     '<p class="note">Accuracies in %; Time, Mem and Tok/s (training) '
                     "relative to vanilla; Time is each run's own wall time (sequential). "
                     + _md_inline(SIGNIFICANCE_NOTE) + "</p>",
                     tables["layout"]]
    sections += ['<h2 id="figures">Figures</h2>', figs_html, '<h2 id="details">Details</h2>']
    if tables["tests"]:
        sections += ['<h3 id="significance">Significance tests vs vanilla</h3>',
                     tables["tests"]]
    infer = _infer_html(records)
    if infer:
        sections += ['<h3 id="inference">Inference</h3>', infer]
    sweep = _sweep_html(run_dir, records)
    if sweep:
        sections += ['<h3 id="sweep">Efficiency knob</h3>', sweep]
    sections += ['<h3 id="all-columns">All columns</h3>', tables["all"]]
    if tables["paper"]:
        sections += ['<h3 id="paper">Paper reference</h3>',
                     f'<p class="note">{_md_inline(PAPER_NOTE)}</p>', tables["paper"]]
    if failed:
        sections += ['<h3 id="failed">Failed runs</h3><ul class="failed">'
                     + "".join(f"<li><code>{_esc(r.get('run_id'))}</code>: {_esc(r.get('error'))}"
                               "</li>" for r in failed) + "</ul>"]
    sections += ['<h2 id="provenance">Provenance</h2>', _provenance_html(run_dir, records)]
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f'<body data-figures="{n_figs}">'
        f"<header><h1>{_esc(title)}</h1><p>{_esc(run_dir.resolve())} &middot; "
        f"{len(records)} runs &middot; Mixture-of-Recursions (arXiv 2507.10524) vs vanilla "
        "and recursive Transformers at matched compute</p></header>"
        '<nav><a href="#results">Results</a><a href="#table3">Table 3 layout</a>'
        '<a href="#figures">Figures</a><a href="#significance">Significance</a>'
        '<a href="#paper">Paper reference</a><a href="#provenance">Provenance</a></nav>'
        "<main>" + "\n".join(sections) + "</main>"
        f"<script>{_SCRIPT}</script></body></html>\n")
    path = run_dir / INDEX
    tmp = path.with_name(f".{INDEX}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# report.md figure links, and everything at once

_FIG_MARK = "<!-- mor-bench figures -->"


def _link_figures_in_markdown(md_path: Path, run_dir: Path, figs: dict[str, Any]) -> None:
    """Append a Figures section to report.md, image links relative to the run directory."""
    text = md_path.read_text().split(_FIG_MARK, 1)[0].rstrip("\n")
    lines = []
    for name, entry in figs.get("figures", {}).items():
        path = entry.get("png") or entry.get("svg")
        if path is None:
            continue
        rel = Path(os.path.relpath(Path(path).resolve(), run_dir.resolve())).as_posix()
        title = entry.get("title") or name
        lines += [f"### {title}", "", f"![{title}]({rel})", "", entry.get("caption") or "", ""]
    if lines:
        md_path.write_text(text + "\n\n" + _FIG_MARK + "\n## Figures\n\n" + "\n".join(lines))


def build_report(run_dir: str | Path, *, screenshot: bool = False) -> dict[str, Any]:
    """Tables (report.md, report.csv), figures, index.html -- and with `screenshot` a PNG
    of the page (report.png). Failed runs are listed; what succeeded is still shown.
    Returns the paths, the comparison table and the run counts."""
    run_dir = Path(run_dir)
    report = table_mod.render_report(run_dir)
    records = load_records(run_dir)
    figures = _figures(run_dir, records)
    _link_figures_in_markdown(Path(report["markdown"]), run_dir, figures)
    index = render_html(run_dir, records=records, figures=figures, report=report)
    frames = {k: v for k, v in report.items() if isinstance(v, pd.DataFrame)}
    paths = {k: v for k, v in report.items() if k not in frames}
    if "html" in paths:  # the table module's HTML fragment; "html" is the page here
        paths["tables_html"] = paths.pop("html")
    out = {**paths, "table": report["table"], "html": str(index),
           "figures": {name: {k: str(v) for k, v in e.items() if k in ("png", "svg") and v}
                       for name, e in figures["figures"].items()},
           "figures_skipped": figures["skipped"]}
    if screenshot:
        out["screenshot"] = str(take_screenshot(index, run_dir / SCREENSHOT))
    return out


# --------------------------------------------------------------------------------------------
# headless browser


def find_browser() -> str | None:
    """Path of a Chromium/Chrome executable on PATH ($MOR_BENCH_BROWSER overrides)."""
    env = os.environ.get("MOR_BENCH_BROWSER")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser(args: list[str], html_path: Path, timeout: float) -> subprocess.CompletedProcess:
    browser = find_browser()
    if browser is None:
        raise ReportError(NO_BROWSER)
    with tempfile.TemporaryDirectory(prefix="mor-bench-chromium-") as profile:
        cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox",
               "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", *args, Path(html_path).resolve().as_uri()]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                 check=False)
        except subprocess.TimeoutExpired:
            raise ReportError(f"{browser} did not finish within {timeout:.0f}s") from None
    if res.returncode != 0:
        tail = "; ".join(res.stderr.strip().splitlines()[-3:])
        raise ReportError(f"{browser} exited with code {res.returncode}: {tail}")
    return res


def take_screenshot(html_path: str | Path, png_path: str | Path, *,
                    size: tuple[int, int] = (1280, 2000), timeout: float = 90) -> Path:
    """A PNG of the page as headless Chromium renders it at `size` (width, height)."""
    png_path = Path(png_path).resolve()
    png_path.unlink(missing_ok=True)
    _browser([f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}",
              "--virtual-time-budget=5000"], Path(html_path), timeout)
    if not png_path.is_file():
        raise ReportError(f"the browser wrote no screenshot to {png_path}")
    return png_path


def dump_dom(html_path: str | Path, *, timeout: float = 90) -> str:
    """The page's DOM after load (scripts run), as headless Chromium serializes it."""
    return _browser(["--dump-dom", "--virtual-time-budget=5000"], Path(html_path),
                    timeout).stdout


def loaded_images(dom: str) -> tuple[int, int]:
    """(images loaded, images total) as the page's load script marked them on <body>."""
    body = re.search(r"<body[^>]*>", dom)
    if body is None:
        raise ValueError("no <body> in the dumped DOM")
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    if "data-images-loaded" not in attrs:
        raise ValueError("the page's load script did not run (no data-images-loaded)")
    return int(attrs["data-images-loaded"]), int(attrs["data-images-total"])


def external_references(doc: str) -> list[str]:
    """Anything the page would fetch from elsewhere: src/href/url()/@import to http(s) or
    protocol-relative addresses."""
    pattern = (r"""(?:src|href)\s*=\s*["']\s*((?:https?:)?//[^"']*)"""
               r"""|url\(\s*["']?((?:https?:)?//[^)"']*)|@import\s+["']?([^"';]+)""")
    return [next(g for g in m if g) for m in re.findall(pattern, doc, flags=re.I)]


__all__ = ["INDEX", "SCREENSHOT", "build_report", "dump_dom", "external_references",
           "find_browser", "loaded_images", "render_html", "take_screenshot"]


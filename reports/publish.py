"""A finished suite run as a self-describing study in the repository (a pure function of the
run directory's records and small JSON files): `publish(RUN_DIR, OUT)`.

OUT receives the records and the small files the report reads (every run's record.json,
few-shot items, depth sample, init and config JSON; the suite's suite.toml, plan.json, data
description and tokenizer, and the after-training phases' JSON) -- never checkpoints,
optimizer states or TensorBoard events -- then the report rendered from those copies
(report.md, index.html, figures/), and README.md: how the study was produced (the command,
the commit, the hardware, wall time and compute used), the paper's claims tested one by
one (`reports.claims`) and the written discussion, when one is given. Re-publishing the
same OUT replaces what publish wrote there and keeps other files.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from evals.suite.record import load_records
from reports.claims import claims_markdown, evaluate_claims, uptrain_markdown, uptrain_rows
from reports.frame import ReportError

COPIED_SUFFIXES = (".json", ".toml")
"""What is copied from the run directory (besides nothing else): records and descriptions."""
SKIPPED_DIRS = {"checkpoints", "tensorboard", "figures"}
"""Never copied: training states, event logs, and figures (re-rendered from the copies)."""
SKIPPED_FILES = {"train.npy", "val.npy", "val_classes.npy", "model.safetensors", "config.json"}
"""Also never copied: the data arrays, the weights and config.json, the checkpoint's companion
(its config is in the record, and it repeats the tokenizer)."""
MAX_FILE_BYTES = 8 * 2**20
"""A copied file larger than this is refused (a record is kilobytes; the BPE-8k tokenizer
~0.5 MB): the repository must not swallow a stray artefact."""


def published_files(run_dir: Path) -> list[Path]:
    """The files of `run_dir` that a publication copies, relative to it."""
    out = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if (not path.is_file() or path.suffix not in COPIED_SUFFIXES
                or any(part in SKIPPED_DIRS or part.startswith(".") for part in rel.parts)
                or path.name in SKIPPED_FILES):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ReportError(f"{path}: {path.stat().st_size / 2**20:.1f} MiB is too large to "
                              f"publish (limit {MAX_FILE_BYTES / 2**20:.0f} MiB)")
        out.append(rel)
    return out


def _time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def provenance_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Commit(s), hardware, wall time and compute of a study, from its records."""
    commits = sorted({(((r.get("provenance") or {}).get("git") or {}).get("commit") or "?")[:12]
                      + (" (dirty)" if ((r.get("provenance") or {}).get("git") or {}).get("dirty")
                         else "") for r in records})
    hw = ((records[0].get("provenance") or {}).get("hardware") or {}) if records else {}
    starts = [t for t in (_time(r.get("started_at")) for r in records) if t]
    ends = [t for t in (_time(r.get("finished_at")) for r in records) if t]
    metrics = [r.get("metrics") or {} for r in records]
    train_s = sum(m.get("train_time_s") or 0.0 for m in metrics)
    flops = sum(m.get("train_flops_exact") or 0.0 for m in metrics)
    return {
        "commits": commits, "hardware": hw,
        "first_start": min(starts).isoformat() if starts else None,
        "last_end": max(ends).isoformat() if ends else None,
        "runs": len(records), "ok": sum(r.get("status") == "ok" for r in records),
        "train_time_s": train_s, "train_flops": flops,
        "run_wall_s": sum((e - s).total_seconds() for s, e in zip(
            (_time(r.get("started_at")) for r in records),
            (_time(r.get("finished_at")) for r in records)) if s and e),
    }


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def study_readme(title: str, records: list[dict[str, Any]], *, commands: list[str],
                 discussion: str | None) -> str:
    """README.md of a published study."""
    p = provenance_summary(records)
    hw = p["hardware"]
    cpu = hw.get("cpu") or hw.get("machine") or "?"
    mem = hw.get("memory_bytes")
    cuda = hw.get("cuda")
    hw_line = (f"{cpu}, {hw.get('cpu_count', '?')} CPUs, "
               f"{'?' if not mem else f'{mem / 2**30:.0f} GiB'}, torch {hw.get('torch', '?')}"
               + (f", GPU {cuda.get('name')}" if isinstance(cuda, dict) else ", no GPU"))
    rows = evaluate_claims(records)
    lines = [f"# {title}", "",
             "Published with `mor-bench publish`; every number below comes from the records in "
             "this directory (`*/record.json`), and `mor-bench report` on this directory "
             "re-renders `report.md`, `index.html` and `figures/` from them.", "",
             "## How it was produced", "", "```bash", *commands, "```", "",
             f"- commit: {', '.join(p['commits'])}",
             f"- hardware: {hw_line}",
             f"- runs: {p['ok']} ok of {p['runs']}; from {p['first_start']} to {p['last_end']} "
             "(UTC, across sessions when resumed)",
             f"- compute: {_hours(p['train_time_s'])} of training (optimizer steps), "
             f"{_hours(p['run_wall_s'])} of run processes (training and evaluation), "
             f"{p['train_flops']:.3g} training FLOPs (exact count, forward + backward)", ""]
    if any(r["verdict"] != "not run" for r in rows):
        lines += [
            "## The paper's claims, tested", "",
            "Effects are A minus B (ratios A / B for time and memory), paired by seed: the "
            "mean over seeds, its 95% t interval and a paired two-sided t test (on log ratios "
            "for ratios). \"supported\": the interval excludes no effect and lies on the "
            "paper's side; \"contradicted\": it lies on the other side; \"inconclusive\": it "
            "includes no effect. The paper's effect is from its Table 3 (360M parameters, "
            "16.5e18 FLOPs) and its fixed-token efficiency claim.", "",
            claims_markdown(rows)]
    if any(r.get("init") for r in records):
        lines += ["## Uptraining against training from scratch", "",
                  "Each uptrained model (`init`: the pretrained source, the init method) beside "
                  "the same model trained from scratch at the same budget, paired by seed "
                  "(uptrained - scratch: negative = uptraining helps; docs/uptraining.md).", "",
                  uptrain_markdown(uptrain_rows(records))]
    if discussion:
        lines += ["## Discussion", "", discussion.strip(), ""]
    lines += ["## Files", "",
              "- `report.md`, `index.html`, `figures/`: the full report (tables, figures, "
              "statistics, the paper beside us)",
              "- `<run_id>/record.json`: one self-describing record per run; "
              "`<run_id>/fewshot_items.json`: per-item few-shot scores (paired tests)",
              "- `suite.toml`, `plan.json`, `data/`: the suite as run, its plan, the data "
              "description and tokenizer", ""]
    return "\n".join(lines)


def publish(run_dir: str | Path, out_dir: str | Path, *, title: str | None = None,
            commands: list[str] | None = None, discussion: str | None = None,
            render=None) -> dict[str, Any]:
    """Copy `run_dir`'s records into `out_dir`, render its report there and write README.md.
    `render(out_dir)` renders the report (default `reports.html.build_report`). Returns
    {"files": copied relative paths, "readme": path, "report": what render returned}."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    records = load_records(run_dir)  # raises ReportError naming the directory when empty
    if out_dir.resolve() == run_dir.resolve():
        raise ReportError(f"{out_dir}: publish into a directory other than the run's own")
    files = published_files(run_dir)
    for rel in files:
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / rel, out_dir / rel)
    if render is None:
        from reports.html import build_report

        render = build_report
    report = render(out_dir)
    suite = (records[0].get("suite") or {}).get("name", run_dir.name) if records else "study"
    readme = out_dir / "README.md"
    readme.write_text(study_readme(title or f"Study: {suite}", load_records(out_dir),
                                   commands=commands or [f"mor-bench run {suite}"],
                                   discussion=discussion))
    return {"files": [str(f) for f in files], "readme": str(readme), "report": report}

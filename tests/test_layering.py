"""The import rule of docs/architecture.md: no cycles, no import against the layer order,
`reports/` reading only the record schema. Every import counts, also one inside a function."""

from __future__ import annotations

import shutil

from tests import import_graph as ig


def test_no_import_cycles() -> None:
    assert ig.cycles(ig.graph()) == []


def test_no_import_against_the_layer_order() -> None:
    assert ig.violations(ig.graph()) == []


def test_every_module_has_a_layer() -> None:
    for mod in ig.graph():
        ig.layer_of(mod)  # raises ValueError (max of nothing) for a module outside the map


def test_a_planted_upward_import_is_caught(tmp_path) -> None:
    root = tmp_path / "repo"
    for pkg in ig.PACKAGES:
        shutil.copytree(ig.ROOT / pkg, root / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.toml", "*.yaml"))
    assert ig.violations(ig.graph(root)) == []
    # The model library reaching up into the runner, hidden inside a function:
    layers = root / "mor" / "layers.py"
    layers.write_text(layers.read_text() + "\n\ndef _planted():\n"
                      "    from evals.suite.runner import run_suite  # noqa: F401\n")
    bad = ig.violations(ig.graph(root))
    assert [(a, b) for a, b, _ in bad] == [("mor.layers", "evals.suite.runner")]
    assert "upward" in bad[0][2]


def test_a_planted_cycle_and_a_report_importing_torch_code_are_caught(tmp_path) -> None:
    root = tmp_path / "repo"
    for pkg in ig.PACKAGES:
        shutil.copytree(ig.ROOT / pkg, root / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.toml", "*.yaml"))
    flops = root / "mor" / "flops.py"
    flops.write_text(flops.read_text() + "\n\ndef _planted():\n"
                     "    from mor import decode  # noqa: F401\n")
    table = root / "reports" / "table.py"
    table.write_text(table.read_text() + "\n\ndef _planted():\n"
                     "    from mor.flops import kv_cache_bytes  # noqa: F401\n")
    g = ig.graph(root)
    assert any("mor.flops" in c and "mor.decode" in c for c in ig.cycles(g))
    assert ("reports.table", "mor.flops") in [(a, b) for a, b, _ in ig.violations(g)]

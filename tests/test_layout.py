"""The package's dependencies run one way: lower layers never import the layers above them."""

from __future__ import annotations

import ast
from pathlib import Path

import sparsetrace

ROOT = Path(sparsetrace.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every sparsetrace module a file imports, at top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            # `from sparsetrace.train import loop` imports the module sparsetrace.train.loop
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("sparsetrace")}


def test_measurement_code_does_not_import_the_training_loop() -> None:
    """The Sparsing Law measurement, analysis, metrics and claims are used by the training loop;
    none of them may import it back (no cycle)."""
    for package in ("sparsing", "analysis", "metrics", "claims", "tracking"):
        for path in (ROOT / package).rglob("*.py"):
            assert "sparsetrace.train.loop" not in imported_modules(path), path


def test_imported_modules_sees_every_spelling(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    for line in ("from sparsetrace.train import loop", "import sparsetrace.train.loop",
                 "from sparsetrace.train.loop import train",
                 "def f():\n    from sparsetrace.train import loop"):  # fmt: skip
        source.write_text(line + "\n")
        assert "sparsetrace.train.loop" in imported_modules(source), line


def test_claims_do_not_depend_on_reports_or_training() -> None:
    for path in (ROOT / "claims").rglob("*.py"):
        bad = {
            m
            for m in imported_modules(path)
            if m.startswith(("sparsetrace.report", "sparsetrace.train"))
        }
        assert not bad, (path, bad)


def test_the_sparsing_law_measurement_does_not_import_the_report() -> None:
    """The report shows the Sparsing Law; the measurement must not need the report back."""
    for path in (ROOT / "sparsing").rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith("sparsetrace.report")}
        assert not bad, (path, bad)

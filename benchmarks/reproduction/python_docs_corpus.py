"""A second natural-language corpus for the ablation's corpus arm (issue 12, docs/reproduction.md).

Modern English prose, unlike the embedded Shakespeare: the reStructuredText sources of the Python
documentation that Debian's `python3.11-doc` package ships (PSF licence), one document per page,
with the markup a reader does not see removed — directives, code blocks, doctest lines, heading
underlines, and roles (`:func:`print`` becomes `print`). About 4 MB of text remains (451 pages).

    apt-get install python3.11-doc
    python benchmarks/reproduction/python_docs_corpus.py runs/corpus/python-docs.jsonl
    sparsetrace train --preset cpu --data.source runs/corpus/python-docs.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

DEFAULT_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
_ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
_UNDERLINE = re.compile(r"^([=\-~^*#+\"'`])\1{2,}\s*$")


def plain_text(rst: str) -> str:
    """The prose of one page: literal blocks (after '::'), directives with their indented bodies,
    doctest lines and heading underlines dropped; roles and inline literals reduced to text."""
    out: list[str] = []
    skip_indented = False
    for line in rst.splitlines():
        stripped = line.strip()
        if skip_indented:
            if not stripped or line[:1] in " \t":
                continue
            skip_indented = False
        if stripped.startswith(".. ") or stripped == "..":
            skip_indented = True
            continue
        if _UNDERLINE.match(stripped) or stripped.startswith((">>>", "... ")):
            continue
        if stripped.endswith("::"):
            skip_indented = True
            line = line.rstrip()[:-1]  # "example::" reads "example:"
        out.append(_ROLE.sub(r"\1", line).replace("``", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .jsonl to write (one {'text': page} per line)")
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES)
    args = parser.parse_args()
    pages = sorted(args.sources.rglob("*.rst.txt"))
    if not pages:
        raise SystemExit(f"no *.rst.txt under {args.sources} (apt-get install python3.11-doc)")
    docs = [t for p in pages if len(t := plain_text(p.read_text(encoding="utf-8"))) > 200]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    size = sum(len(t.encode()) for t in docs)
    print(f"{len(docs)} pages, {size / 1e6:.1f} MB -> {args.out}")


if __name__ == "__main__":
    main()

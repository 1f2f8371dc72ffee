"""The cleaning functions of scripts/build_prose_corpus.py, on small hand-written inputs.

No network and no apt: each test feeds one kind of markup to its cleaner and compares with the
prose worked out by hand.
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_prose_corpus.py"


def _load():
    spec = importlib.util.spec_from_file_location("build_prose_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


corpus = _load()


def test_rst_keeps_prose_and_drops_markup_code_and_tables():
    rst = """\
.. SPDX-License-Identifier: GPL-2.0

=====
Title
=====

Use :func:`len` to count, see `Python <https://python.org>`_ and ``x``.
This line continues the paragraph.

.. note::
   :class: small

   Notes are kept as *prose* too.

.. code-block:: python

   print("this code is dropped")

The example below shows it::

    code = "dropped as well"

>>> 1 + 1
2

+------+------+
| cell | cell |
+------+------+

- A bullet item with **strong** text.

2. An enumerated item whose text
   runs on to a second line.

   Its literal block follows here::

      echo 5 > assign_adapter

   Its last paragraph comes after the block.
"""
    assert corpus.clean_rst(rst) == (
        "Use len to count, see Python and x. This line continues the paragraph.\n\n"
        "Notes are kept as prose too.\n\n"
        "The example below shows it:\n\n"
        "A bullet item with strong text.\n\n"
        "2. An enumerated item whose text runs on to a second line.\n\n"
        "Its literal block follows here:\n\n"
        "Its last paragraph comes after the block."
    )


def test_html_keeps_blocks_and_inline_text_and_drops_navigation_and_code():
    page = """<html><head><title>Page &amp; Title</title><style>p {color: red}</style></head>
<body><div class="related">Navigation links here and there</div>
<h1>A heading of four words</h1>
<p>The <code>ls</code> command lists
   files &amp; folders.</p>
<pre>ls -l /tmp and more code</pre>
<div class="highlight"><span>print("highlighted code is dropped")</span></div>
<p>x[0] = f(a, b) + g(c, d) * 2;</p>
<ul><li>First item of the list</li><li>Short</li></ul>
<script>var dropped = "a script";</script>
</body></html>"""
    assert corpus.clean_html(page) == (
        "A heading of four words\n\nThe ls command lists files & folders.\n\nFirst item of the list"
    )
    assert corpus.html_title(page) == "Page & Title"


def test_pod_keeps_prose_of_the_pod_and_drops_code_and_commands():
    pod = """package Foo;
use strict;

=head1 NAME

Foo - frobnicate the widgets

=head1 DESCRIPTION

Call C<frob()> on a L<widget|Foo::Widget> to see E<lt>magicE<gt> in B<bold>X<frob> here,
or C<< $obj->frob >> in L<perlobj>.

    my $x = Foo->new;  # a verbatim paragraph

=over 4

=item * Each item keeps its text here.

=back

=begin html

<p>Raw HTML for one formatter only.</p>

=end html

=cut

sub frob { return "code after =cut is no prose" }
"""
    assert corpus.clean_pod(pod) == (
        "Foo - frobnicate the widgets\n\n"
        "Call frob() on a widget to see <magic> in bold here, or $obj->frob in perlobj.\n\n"
        "Each item keeps its text here."
    )


def test_gcide_entry_loses_pronunciation_notes_and_citations():
    entry = """Abdication \\Ab`di*ca"tion\\, n. [L. abdicatio: cf. F.
   abdication.]
   The act of abdicating; the renunciation of a high office,
   dignity, or trust, by its holder. [R.] --Bailey.
   [1913 Webster]

   2. (Zool.) Having {abdominal} fins; as, an encyclop[ae]dia of
      [beta] fishes.
      [1913 Webster]

         He gave it up, and the crown with it.  --Sir W.
                                                  Scott.
         [1913 Webster]
"""
    assert corpus.clean_gcide(entry) == (
        "Abdication, n. The act of abdicating; the renunciation of a high office, dignity, or "
        "trust, by its holder.\n\n"
        "2. (Zool.) Having abdominal fins; as, an encyclopædia of β fishes.\n\n"
        "He gave it up, and the crown with it."
    )


def test_wordnet_synset_becomes_lemmas_and_gloss():
    line = (
        "05435855 08 n 02 sex_chromatin 0 Barr_body(a) 0 001 @ 05436080 n 0000 | chromatin "
        'found only in female cells; "the presence of sex chromatin"  \n'
    )
    assert corpus.clean_wordnet(line) == (
        'sex chromatin, Barr body: chromatin found only in female cells; "the presence of sex '
        'chromatin"'
    )
    assert corpus.clean_wordnet("  1 This software and database is being provided\n") == ""


def test_osis_drops_notes_and_tags_and_keeps_titles_as_paragraphs():
    osis = (
        '<title type="x-s">The Psalm of Asaph</title> <div sID="gen1" type="x-p"/>'
        '<hi type="italic">To the Chief Musician.</hi> Here is noble work'
        '<note type="x-footnote">A footnote that is dropped.</note> for him, '
        '“<w lemma="strong:H3588">Let</w> there be light” .<div eID="gen1" type="x-p"/>'
    )
    assert corpus.clean_osis(osis) == (
        "The Psalm of Asaph\n\n"
        "To the Chief Musician. Here is noble work for him, “Let there be light”."
    )


def test_boilerplate_repeated_across_documents_is_dropped():
    texts = [
        f"Page {n} has its own words.\n\nSmall. Fast. Reliable. Choose any three."
        for n in (1, 2, 3)
    ]
    assert corpus.drop_boilerplate(texts, limit=2) == [
        "Page 1 has its own words.",
        "Page 2 has its own words.",
        "Page 3 has its own words.",
    ]


def test_sword_module_is_read_block_by_block(tmp_path):
    """A two-verse zText module: both verses live in block 0; the second verse links to the
    first (as commentaries do), so its text comes once."""
    top = tmp_path / "usr/share/sword/modules/texts/ztext/demo"
    top.mkdir(parents=True)
    verse = b'<div type="x-p" sID="p1"/>' + b"In the beginning the word was plain prose. " * 20
    block = zlib.compress(verse)
    (top / "ot.bzz").write_bytes(block)
    (top / "ot.bzs").write_bytes(struct.pack("<III", 0, len(block), len(verse)))
    entries = [(0, 0, 0), (0, 0, len(verse)), (0, 0, len(verse))]  # empty heading, linked verse
    (top / "ot.bzv").write_bytes(b"".join(struct.pack("<IIH", *e) for e in entries))
    docs = list(corpus._sword_docs("demo")(tmp_path))
    assert docs == [("demo ot 000", ("In the beginning the word was plain prose. " * 20).strip())]


def test_failed_download_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    def refuse(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package nope\n")

    monkeypatch.setattr(
        corpus, "SOURCES", [corpus.Source("nope", "debian", "MIT", lambda root: iter(()))]
    )
    monkeypatch.setattr(corpus.subprocess, "run", refuse)
    assert corpus.main([str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 2
    assert capsys.readouterr().err == (
        "error: cannot download debian package nope: E: Unable to locate package nope\n"
    )


@pytest.mark.parametrize("text", ["", "Too short.", "x = f(a, b) + g(c, d) * 2;"])
def test_non_prose_paragraphs_are_dropped(text):
    assert corpus.clean_html(f"<p>{text}</p>") == ""


def test_long_documents_are_cut_at_paragraph_ends():
    paragraphs = [f"p{i} " + "x" * 96 for i in range(10)]  # 100 characters each
    doc = {"text": "\n\n".join(paragraphs), "source": "s", "title": "t"}
    parts = corpus.split_long(doc, limit=250)
    assert [p["title"] for p in parts] == ["t (part 1)", "t (part 2)", "t (part 3)", "t (part 4)"]
    # 3 paragraphs (306 characters with their separators) reach the limit; the last part holds 1
    assert [p["text"].count("\n\n") + 1 for p in parts] == [3, 3, 3, 1]
    assert "\n\n".join(p["text"] for p in parts) == doc["text"]
    assert corpus.split_long(doc, limit=10_000) == [doc]
    lines = {**doc, "text": "\n".join(paragraphs)}  # no blank line: cut at line ends
    assert [p["text"].count("\n") + 1 for p in corpus.split_long(lines, limit=250)] == [3, 3, 3, 1]


def test_the_order_mixes_sources_and_does_not_depend_on_the_input_order():
    docs = [{"text": "", "source": src, "title": str(i)} for src in "ab" for i in range(50)]
    once = corpus.shuffled(docs)
    assert once == corpus.shuffled(list(reversed(docs)))
    assert {d["source"] for d in once[-10:]} == {"a", "b"}  # a tail holds both sources
    assert sorted(once, key=lambda d: (d["source"], int(d["title"]))) == docs

"""Corpus sources, read as streams of pairs: SWORD Bible modules aligned by verse, tab-separated
pairs (a file or a folder of them), tables (CSV, parquet), two aligned text files, gettext catalogs.

Each reader yields (natural id or None, source side, target side) one pair at a time, so that no
source is ever held whole (but a Bible, which is bounded); what it cannot read is counted by
reason in `Drops`, with the first places, or raised as a CorpusError naming the file and line.
"""
from __future__ import annotations

import functools
import hashlib
import html
import itertools
import re
import struct
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pipeline import storage
from pipeline.align import align_verses
from pipeline.config import (FolderSource, GettextSource, InputError, Source, SwordSource, TableSource,
                             TextPairSource, TsvSource)


# A pair as read: (natural id or None, source side, target side). Sources yield them one at a time,
# so that none is ever held whole (but a Bible, which is bounded).
Row = tuple[str | None, str, str]


class CorpusError(InputError):
    """A source cannot be read at all; the message names the file (and line)."""


@dataclass
class Drops:
    """Counts of dropped or repaired rows by reason, with the first few places of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1, where: str | None = None) -> None:
        if n:
            self.counts[reason] += n
        if where and len(self.examples.setdefault(reason, [])) < 5:
            self.examples[reason].append(where)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


_CONTROL = re.compile(r"[\u0000-\u001f\u007f-\u009f\u200b\u200e\u200f\ufeff]")


def normalise(text: str) -> str:
    """Unicode NFC, control characters removed, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text)
    return " ".join(_CONTROL.sub(" ", text).split())


# ---------------------------------------------------------------- SWORD (OSIS markup)

# Elements whose content is not verse text: footnotes, cross references, section headings
# that are not part of the canonical text, and variant readings.
_DROP_ELEMENTS = re.compile(
    r"<(note|rdg|reference)\b[^>]*>.*?</\1>|<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>",
    re.S,
)
# Everything after a chapter's or book's closing marker is not verse text (the WEB appends its
# whole glossary to Rev.22.21 that way).
_TRAILING = re.compile(r"<chapter\b[^>]*\beID=|<div\b[^>]*type=\"(glossary|book)\"", re.S)
# Block-level markers separate words, and so does <transChange> (words a translator added, which
# the RV1909 module writes flush against the words around them: "que</w><transChange>estaba").
# Other inline tags (<w>, <q>) do not.
_BLOCK_TAGS = re.compile(r"</?(div|l|lg|lb|p|item|list|milestone|chapter|title|speaker|seg|transChange)\b[^>]*>")
_ANY_TAG = re.compile(r"<[^>]*>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)\]»])")


def osis_to_text(markup: str, drops: Drops | None = None) -> str:
    """Plain verse text from OSIS markup, without gluing words where an element is removed."""
    trailing = _TRAILING.search(markup)
    if trailing:
        if drops is not None and _ANY_TAG.sub("", markup[trailing.start():]).strip():
            drops.add("repaired_trailing_matter_cut")  # e.g. the WEB glossary after Revelation 22:21
        markup = markup[: trailing.start()]
    markup = _DROP_ELEMENTS.sub(" ", markup)
    markup = _BLOCK_TAGS.sub(" ", markup)
    text = html.unescape(_ANY_TAG.sub("", markup))
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))


def _open_bible(library: str, module: str):
    from pysword.modules import SwordModules

    if not (Path(library).is_dir() or Path(library).is_file() and library.endswith(".zip")):
        raise CorpusError(f"{library}: no SWORD library folder or module zip here "
                          "(the default needs the Debian packages sword-text-web and sword-text-sparv)")
    modules = SwordModules(library)
    found = modules.parse_modules()
    if module not in found:
        raise CorpusError(f"{library}: no SWORD module {module!r} (found: {', '.join(sorted(found)) or 'none'})")
    bible = modules.get_bible_from_module(module)
    # pysword decompresses a whole block for every verse; caching the last blocks makes
    # reading a Bible take a fraction of a second instead of most of a minute.
    bible._decompressed_text = functools.lru_cache(maxsize=8)(bible._decompressed_text)
    return bible


def read_sword_module(library: str, module: str, books: list[str] | None = None) -> dict[str, str]:
    """{OSIS reference: raw OSIS markup} for every verse of a module, e.g. {'Gen.1.1': '...'}."""
    bible = _open_bible(library, module)
    structure = bible.get_structure()
    wanted = {b.lower() for b in books} if books else None
    verses: dict[str, str] = {}
    for testament, testament_books in structure.get_books().items():
        for book in testament_books:
            if wanted and book.osis_name.lower() not in wanted:
                continue
            indices = structure.ref_to_indicies(books=[book.name])[testament]
            refs = [(c + 1, v + 1) for c, n in enumerate(book.chapter_lengths) for v in range(n)]
            for (chapter, verse), index in zip(refs, indices, strict=True):
                verses[f"{book.osis_name}.{chapter}.{verse}"] = bible._text_for_index(testament, index) or ""
    return verses


def read_sword_pairs(source: SwordSource, drops: Drops, notes: dict) -> list[Row]:
    """Verse pairs of two Bible modules. Verses are paired by reference, except in chapters where
    the translations number verses differently: there by length (see pipeline.align)."""
    src = {ref: osis_to_text(markup, drops) for ref, markup in
           read_sword_module(source.library, source.src_module, source.books).items()}
    tgt = {ref: osis_to_text(markup, drops) for ref, markup in
           read_sword_module(source.library, source.tgt_module, source.books).items()}
    pairs, realigned, misaligned = align_verses(src, tgt)
    src_left_out = {r for r in src if r.rsplit(".", 1)[0] in misaligned}
    tgt_left_out = {r for r in tgt if r.rsplit(".", 1)[0] in misaligned}
    drops.add("misaligned_chapter", sum(1 for r in src_left_out if src[r]))
    paired_src, paired_tgt = {s for s, _ in pairs} | src_left_out, {t for _, t in pairs} | tgt_left_out
    drops.add("no_counterpart_in_target", sum(1 for r, text in src.items() if text and r not in paired_src))
    drops.add("no_counterpart_in_source", sum(1 for r, text in tgt.items() if text and r not in paired_tgt))
    drops.add("repaired_verses_realigned", sum(1 for s, t in pairs if s != t))
    notes.setdefault("realigned_chapters", []).extend(realigned)
    notes.setdefault("misaligned_chapters_left_out", []).extend(misaligned)
    suffix = "" if source.variant is None else f"@{source.variant}"  # another version: ids of its own
    return [(s + suffix, src[s], tgt[t]) for s, t in pairs]


# ---------------------------------------------------------------- tab-separated pairs and tables

def content_id(src: str, tgt: str) -> str:
    """A stable id for a pair without one: a hash of its (cleaned) content."""
    return hashlib.sha1(f"{src}\t{tgt}".encode()).hexdigest()[:16]


def decoded_lines(path: str | Path, drops: Drops) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for every line of a UTF-8 text file, streamed; text is None where the
    line is unreadable (NUL bytes, invalid UTF-8), which is counted with its place. A BOM and CRLF
    line endings are accepted."""
    path = Path(path)
    try:
        file = open(path, "rb")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror}") from None
    with file:
        for number, raw in enumerate(file, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.removesuffix(b"\n").rstrip(b"\r")
            if b"\x00" in raw:
                drops.add("binary_line", where=f"{path}:{number}")
                yield number, None
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                drops.add("invalid_utf8", where=f"{path}:{number}")
                yield number, None


def tsv_rows(path: str | Path, drops: Drops) -> Iterator[Row]:
    """Pairs from `source<TAB>target[<TAB>attribution...]` lines; bad lines are counted, not fatal."""
    for number, line in decoded_lines(path, drops):
        if line is None or not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) < 2:
            drops.add("missing_column", where=f"{path}:{number}")
            continue
        yield None, fields[0], fields[1]


_END = object()


def text_pair_rows(src_path: str | Path, tgt_path: str | Path, drops: Drops) -> Iterator[Row]:
    """Pairs from two aligned plain-text files, line by line. Files of different lengths cannot
    be aligned, so they are an error rather than a guess."""
    src, tgt = decoded_lines(src_path, drops), decoded_lines(tgt_path, drops)
    for number, (left, right) in enumerate(itertools.zip_longest(src, tgt, fillvalue=_END), start=1):
        if left is _END or right is _END:
            longer = number + sum(1 for _ in (src if right is _END else tgt))
            src_lines, tgt_lines = (longer, number - 1) if right is _END else (number - 1, longer)
            raise CorpusError(f"{src_path} has {src_lines} lines but {tgt_path} has {tgt_lines}: "
                              "aligned files need one sentence a line on both sides")
        (_, s), (_, t) = left, right
        if s is None or t is None:
            if s is not None or t is not None:
                drops.add("partner_line_unreadable")
            continue
        yield None, s, t


def as_text(value) -> str:
    """A table's value as text, a null (Parquet and Arrow have them) as an empty side, which
    cleaning counts as such: never the text "None" or "nan", which would be trained on."""
    return "" if value is None or value != value else str(value)  # value != value: NaN


def csv_batches(path: Path, drops: Drops) -> tuple[list[str], Iterator]:
    """The column names and a stream of record batches of a CSV or TSV file, every value a string
    (no NA conversion: an empty field is an empty side); malformed rows are counted and skipped."""
    import pyarrow as pa
    from pyarrow import csv

    def malformed(row) -> str:
        drops.add("malformed_row")
        return "skip"

    def parse(on_bad_row) -> csv.ParseOptions:
        return csv.ParseOptions(delimiter="\t" if path.suffix in (".tsv", ".tab") else ",",
                                newlines_in_values=True, invalid_row_handler=on_bad_row)

    # A first look for the header, to type every column as text. It parses a first block of rows,
    # whose malformed ones the real read counts, not this one.
    with csv.open_csv(path, parse_options=parse(lambda row: "skip")) as probe:
        names = probe.schema.names
    convert = csv.ConvertOptions(column_types={name: pa.string() for name in names}, null_values=[],
                                 strings_can_be_null=False, quoted_strings_can_be_null=False)
    return names, csv.open_csv(path, parse_options=parse(malformed), convert_options=convert)


def table_rows(source: TableSource, drops: Drops, batch_rows: int) -> Iterator[Row]:
    """Pairs from a CSV, TSV or Parquet file with named columns, streamed in record batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(source.path)
    if not path.is_file():
        raise CorpusError(f"{path}: not found")
    try:
        if path.suffix == ".parquet":
            names, batches = pq.read_schema(path).names, None
        else:
            names, batches = csv_batches(path, drops)
        wanted = [c for c in (source.src_column, source.tgt_column, source.id_column) if c]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise CorpusError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)})")
        if batches is None:
            batches = storage.parquet_batches(path, wanted, batch_rows)
        for batch in batches:
            src, tgt = (map(as_text, batch.column(c).to_pylist()) for c in (source.src_column, source.tgt_column))
            ids = ((f"{source.name}:{i}" for i in batch.column(source.id_column).to_pylist())
                   if source.id_column else itertools.repeat(None))
            yield from zip(ids, src, tgt)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: cannot read as a table: {e}") from None


# ---------------------------------------------------------------- gettext catalogs

# Placeholders that make a message a template, not a sentence: printf's (%s, %1$d, %-5.2f, %.*s, %lu,
# %m; not the space flag, or "100% of" would be one; "%%" is a literal "%"), C99's %<PRIu64>, Qt's
# %1 and %L1, Python's (%(name)s, {name}, {0}) and the shell's ($HOME, ${name}).
_FORMAT = re.compile(r"%(?:\d+\$|\([^)]*\))?[-+#0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|z|j|t|q|I64)?"
                     r"[diouxXeEfFgGaAcspnm]|%<\w+>|%L?\d|\{\w*(?:[:!][^{}]*)?\}|\$\{?[A-Za-z_]\w*\}?")
# Command-line help: aligned columns (a tab, or three spaces or more inside the text: GNU writes two
# after a sentence end) or an indented option.
_COLUMNS = re.compile(r"\S {3,}\S|\t|^\s+--?\w")
_ENTITY = re.compile(r"&#?\w+;")  # &amp;, &#38;: not accelerators
# An accelerator in brackets after the label, as CJK catalogs write it: 文件(_F).
_BRACKETED_ACCELERATOR = re.compile(r"\s*\([_&][^\W_]\)")


def has_placeholder(text: str) -> bool:
    return _FORMAT.search(text.replace("%%", "")) is not None


def accelerator(text: str, at_word_start: bool) -> str | None:
    """GTK's "_" or Qt's "&" where `text` has exactly one of it, before a letter or digit (and at a
    word's start if asked): one, so that identifiers (max_size, _SDA_BASE_) and "&&" are left."""
    for mark in ("_", "&"):
        if text.count(mark) != 1:
            continue
        at = text.index(mark)
        before, after = text[at - 1:at], text[at + 1:at + 2]
        if after.isalnum() and not (at_word_start and before.isalnum()) and not _ENTITY.match(text, at):
            return mark
    return None


def remove_accelerators(src: str, tgt: str) -> tuple[str, str, bool]:
    """The pair without its keyboard accelerators: the source's at a word's start (_File, Save _As),
    the translation's wherever the translator put it (Co_mo), or bracketed (文件(_F))."""
    tgt_bracketless = _BRACKETED_ACCELERATOR.sub("", tgt)
    mark = accelerator(src, at_word_start=True)
    if mark is None:
        return src, tgt_bracketless, tgt_bracketless != tgt
    src = src.replace(mark, "", 1)
    if tgt_bracketless == tgt and accelerator(tgt, at_word_start=False) == mark:
        tgt_bracketless = tgt.replace(mark, "", 1)
    return src, tgt_bracketless, True


def gettext_files(source: GettextSource) -> list[Path]:
    """The source's catalogs, in a stable order (one file a name: a .mo before a .po); a named
    catalog that is missing, or a folder without one, is an error."""
    path = Path(source.path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CorpusError(f"{path}: no gettext catalog or folder of catalogs (ingest.sources: {source.name})")
    by_name: dict[str, Path] = {}
    for file in sorted((p for p in path.iterdir() if p.suffix in CATALOG_SUFFIXES and p.is_file()),
                       key=lambda p: (p.stem, CATALOG_SUFFIXES.index(p.suffix))):
        by_name.setdefault(file.stem, file)
    if not by_name:
        raise CorpusError(f"{path}: no gettext catalog here ({', '.join(CATALOG_SUFFIXES)}; ingest.sources: "
                          f"{source.name})")
    names = sorted(by_name) if source.catalogs is None else source.catalogs
    missing = [name for name in names if name not in by_name]
    if missing:
        raise CorpusError(f"{path}: no catalog {', '.join(map(repr, missing))} (found: {', '.join(sorted(by_name))})")
    return [by_name[name] for name in names]


CATALOG_SUFFIXES = (".mo", ".gmo", ".po")


def debian_package(path: Path) -> dict[str, str] | None:
    """The Debian package (and its version) that installed `path`, or None (not from a package, or
    no dpkg): the ingest report names where each catalog came from, since hosts differ."""
    import shutil
    import subprocess

    if shutil.which("dpkg-query") is None:
        return None
    found = subprocess.run(["dpkg-query", "-S", str(Path(path).resolve())], capture_output=True, text=True)
    if found.returncode != 0:
        return None
    package = found.stdout.split(":", 1)[0].split(",")[0].strip()
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return {"package": package, "version": version.stdout.strip()}


def read_catalog(path: Path):
    import polib

    try:
        return polib.pofile(str(path)) if path.suffix == ".po" else polib.mofile(str(path))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:  # struct: a truncated .mo
        raise CorpusError(f"{path}: cannot read as a gettext catalog: {e}") from None


def message_pair(src: str, tgt: str, drops: Drops, where: str) -> tuple[str, str] | None:
    """A message and its translation as a sentence pair, repaired, or None (counted by reason)."""
    if src.endswith("\n") or tgt.endswith("\n"):
        src, tgt = src.rstrip("\n"), tgt.rstrip("\n")
        drops.add("repaired_trailing_newline")
    for reason, found in (("multi_line", lambda t: "\n" in t), ("format_string", has_placeholder),
                          ("options_text", _COLUMNS.search)):
        if found(src) or found(tgt):
            drops.add(reason, where=where)
            return None
    src, tgt, repaired = remove_accelerators(src, tgt)
    if repaired:
        drops.add("repaired_accelerator")
    if "%%" in src or "%%" in tgt:  # a printf message: "%%" prints "%"
        src, tgt = src.replace("%%", "%"), tgt.replace("%%", "%")
        drops.add("repaired_percent_escape")
    return src, tgt


def gettext_rows(path: Path, source: GettextSource, drops: Drops, notes: dict) -> Iterator[Row]:
    """The pairs of one catalog. A message's id hashes its text alone, so every copy of it (in other
    catalogs, other contexts, other translations) falls in the same split and only the first is
    kept. Plural messages: the singular pair, and the plural pair where the catalog has two forms
    (English's own; with more or fewer, which form answers the English plural depends on n)."""
    debian = packaged(path, source)  # before reading: a catalog of an unnamed package is not read
    catalog = read_catalog(path)
    plural_forms = re.search(r"nplurals\s*=\s*(\d+)", catalog.metadata.get("Plural-Forms", ""))
    two_forms = plural_forms is not None and plural_forms.group(1) == "2"
    read = 0
    for entry in catalog:
        if not entry.msgid:  # the header
            continue
        where = f"{path}: msgid {entry.msgid[:40]!r}"
        if entry.obsolete or "fuzzy" in entry.flags:
            drops.add("obsolete_entry" if entry.obsolete else "fuzzy_translation", where=where)
            continue
        if entry.msgid_plural:
            forms = [(entry.msgid, entry.msgstr_plural.get(0, ""))]
            if two_forms:
                forms.append((entry.msgid_plural, entry.msgstr_plural.get(1, "")))
        else:
            forms = [(entry.msgid, entry.msgstr)]
        for src, tgt in forms:
            if not tgt:
                drops.add("untranslated", where=where)
                continue
            pair = message_pair(src, tgt, drops, where)
            if pair:
                read += 1
                yield f"{source.name}:{hashlib.sha1(normalise(pair[0]).encode()).hexdigest()[:16]}", *pair
    notes.setdefault("gettext_catalogs", {})[str(path)] = {
        "language": catalog.metadata.get("Language", ""), "pairs": read, "debian": debian}


def packaged(path: Path, source: GettextSource) -> dict[str, str] | None:
    """The catalog's Debian package and version, checked against the source's `packages`."""
    debian = debian_package(path)
    if source.packages is not None and debian is not None and debian["package"] not in source.packages:
        raise CorpusError(f"{path}: installed by the Debian package {debian['package']!r}, which "
                          f"ingest.sources ({source.name}).packages does not name ({', '.join(source.packages)})")
    return debian


def describe(source: Source) -> str:
    """Where a source reads from, for messages."""
    if isinstance(source, SwordSource):
        return f"{source.src_module} and {source.tgt_module} in {source.library}"
    if isinstance(source, TextPairSource):
        return f"{source.src_path} and {source.tgt_path}"
    return source.path


def source_parts(source: Source, drops: Drops, notes: dict, batch_rows: int) -> Iterator[Iterable[Row]]:
    """A source's rows, one iterable per file: a chunk never spans two files, so a file added to a
    folder adds shards and leaves the earlier ones as they were."""
    if isinstance(source, SwordSource):
        yield read_sword_pairs(source, drops, notes)
    elif isinstance(source, TsvSource):
        yield tsv_rows(source.path, drops)
    elif isinstance(source, TableSource):
        yield table_rows(source, drops, batch_rows)
    elif isinstance(source, TextPairSource):
        yield text_pair_rows(source.src_path, source.tgt_path, drops)
    elif isinstance(source, GettextSource):
        for path in gettext_files(source):
            yield gettext_rows(path, source, drops, notes)
    elif isinstance(source, FolderSource):
        if not Path(source.path).is_dir():
            raise CorpusError(f"{source.path}: not a folder (ingest.sources: {source.name})")
        for path in sorted(Path(source.path).glob("*.tsv")):
            yield tsv_rows(path, drops)
    else:
        raise TypeError(f"unknown source {source!r}")

"""Corpus sources and cleaning: SWORD Bible modules aligned by verse, and tab-separated pairs.

Every dropped pair is counted by reason; the counts go to reports/ingest.json and MLflow.
"""
from __future__ import annotations

import functools
import hashlib
import html
import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
import pandas as pd

from pipeline.align import align_verses
from pipeline.config import FolderSource, InputError, Source, SwordSource, TableSource, TextPairSource, TsvSource

log = logging.getLogger(__name__)

COLUMNS = ["id", "origin", "src", "tgt"]


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


def read_sword_pairs(source: SwordSource, drops: Drops, notes: dict) -> pd.DataFrame:
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
    frame = pd.DataFrame([(s, src[s], tgt[t]) for s, t in pairs], columns=["id", "src", "tgt"])
    frame.insert(1, "origin", source.name)
    return frame


# ---------------------------------------------------------------- tab-separated pairs


def content_id(src: str, tgt: str) -> str:
    """A stable id for a pair without one: a hash of its (cleaned) content."""
    return hashlib.sha1(f"{src}\t{tgt}".encode()).hexdigest()[:16]


def decoded_lines(path: str | Path, drops: Drops) -> list[tuple[int, str | None]]:
    """(line number, text) for every line of a UTF-8 text file; text is None where the line is
    unreadable (NUL bytes, invalid UTF-8), which is counted with its place. A BOM and CRLF line
    endings are accepted."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    out: list[tuple[int, str | None]] = []
    for number, raw in enumerate(lines, start=1):
        raw = raw.rstrip(b"\r")
        if b"\x00" in raw:
            drops.add("binary_line", where=f"{path}:{number}")
            out.append((number, None))
            continue
        try:
            out.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError:
            drops.add("invalid_utf8", where=f"{path}:{number}")
            out.append((number, None))
    return out


def read_tsv_pairs(path: str | Path, origin: str, drops: Drops) -> pd.DataFrame:
    """Pairs from `source<TAB>target[<TAB>attribution...]` lines; bad lines are counted, not fatal."""
    rows = []
    for number, line in decoded_lines(path, drops):
        if line is None or not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            drops.add("missing_column", where=f"{path}:{number}")
            continue
        rows.append((fields[0], fields[1]))
    return _frame(rows, origin)


def read_text_pair(src_path: str | Path, tgt_path: str | Path, origin: str, drops: Drops) -> pd.DataFrame:
    """Pairs from two aligned plain-text files, line by line. Files of different lengths cannot
    be aligned, so they are an error rather than a guess."""
    src, tgt = decoded_lines(src_path, drops), decoded_lines(tgt_path, drops)
    if len(src) != len(tgt):
        raise CorpusError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
                          "aligned files need one sentence a line on both sides")
    rows = [(s, t) for (_, s), (_, t) in zip(src, tgt)]
    unreadable = sum(1 for s, t in rows if s is None or t is None)
    drops.add("partner_line_unreadable", unreadable - sum(1 for s, t in rows if s is None and t is None))
    return _frame([(s, t) for s, t in rows if s is not None and t is not None], origin)


def read_table_pairs(source: TableSource, drops: Drops) -> pd.DataFrame:
    """Pairs from a CSV, TSV or Parquet file with named columns."""
    path = Path(source.path)
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".tab") else ",", dtype=str,
                                keep_default_na=False, encoding="utf-8-sig",
                                on_bad_lines=lambda fields: drops.add("malformed_row") and None, engine="python")
    except FileNotFoundError:
        raise CorpusError(f"{path}: not found") from None
    except (UnicodeDecodeError, ValueError, OSError, pd.errors.ParserError) as e:
        raise CorpusError(f"{path}: cannot read as a table: {e}") from None
    wanted = [c for c in (source.src_column, source.tgt_column, source.id_column) if c]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise CorpusError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(map(str, table.columns))})")
    frame = _frame(list(zip(text_column(table, source.src_column), text_column(table, source.tgt_column))),
                   source.name)
    if source.id_column:
        frame["id"] = [f"{source.name}:{i}" for i in table[source.id_column].astype(str)]
    return frame


def text_column(table: pd.DataFrame, column: str) -> list[str]:
    """A column's values as text, a null (Parquet and Arrow have them) as an empty side, which
    cleaning counts as such: never the text "None" or "nan", which would be trained on."""
    return ["" if pd.api.types.is_scalar(value) and pd.isna(value) else str(value) for value in table[column]]


def _frame(rows: list[tuple[str, str]], origin: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["src", "tgt"], dtype=object)
    frame.insert(0, "origin", origin)
    return frame


def describe(source: Source) -> str:
    """Where a source reads from, for messages."""
    if isinstance(source, SwordSource):
        return f"{source.src_module} and {source.tgt_module} in {source.library}"
    if isinstance(source, TextPairSource):
        return f"{source.src_path} and {source.tgt_path}"
    return source.path


def read_source(source: Source, drops: Drops, notes: dict) -> pd.DataFrame:
    if isinstance(source, SwordSource):
        return read_sword_pairs(source, drops, notes)
    if isinstance(source, TsvSource):
        return read_tsv_pairs(source.path, source.name, drops)
    if isinstance(source, TableSource):
        return read_table_pairs(source, drops)
    if isinstance(source, TextPairSource):
        return read_text_pair(source.src_path, source.tgt_path, source.name, drops)
    if isinstance(source, FolderSource):
        if not Path(source.path).is_dir():
            raise CorpusError(f"{source.path}: not a folder (ingest.sources: {source.name})")
        frames = [read_tsv_pairs(f, source.name, drops) for f in sorted(Path(source.path).glob("*.tsv"))]
        return pd.concat(frames, ignore_index=True) if frames else _frame([], source.name)
    raise TypeError(f"unknown source {source!r}")


# ---------------------------------------------------------------- cleaning

_CONTROL = re.compile(r"[\u0000-\u001f\u007f-\u009f\u200b\u200e\u200f\ufeff]")


def normalise(text: str) -> str:
    """Unicode NFC, control characters removed, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text)
    return " ".join(_CONTROL.sub(" ", text).split())


MAX_CHARS_PER_WORD = 25  # a side longer than max_words * this is over-long even without spaces


def clean_pairs(frame: pd.DataFrame, drops: Drops, max_words: int, max_ratio: float) -> pd.DataFrame:
    """Apply each cleaning rule in turn, counting the pairs it drops."""
    frame = frame.copy()
    for side in ("src", "tgt"):
        cleaned = frame[side].map(normalise)
        drops.add("repaired_unicode_or_whitespace", int((cleaned != frame[side]).sum()))
        frame[side] = cleaned

    def drop(mask: pd.Series, reason: str) -> None:
        nonlocal frame
        drops.add(reason, int(mask.sum()))
        frame = frame[~mask]

    drop((frame["src"] == "") | (frame["tgt"] == ""), "empty_side")
    src_words = frame["src"].str.split().str.len()
    tgt_words = frame["tgt"].str.split().str.len()
    too_many_chars = (frame["src"].str.len() > max_words * MAX_CHARS_PER_WORD) | (
        frame["tgt"].str.len() > max_words * MAX_CHARS_PER_WORD)
    drop((src_words > max_words) | (tgt_words > max_words) | too_many_chars, "too_long")
    src_words, tgt_words = src_words[frame.index], tgt_words[frame.index]
    ratio = (src_words + 1) / (tgt_words + 1)
    drop((ratio > max_ratio) | (ratio < 1 / max_ratio), "length_ratio")
    drop(frame["src"].str.casefold() == frame["tgt"].str.casefold(), "source_equals_target")
    drop(frame.duplicated(["src", "tgt"]), "duplicate")
    return frame.reset_index(drop=True)


def ingest(sources: list[Source], max_words: int, max_ratio: float) -> tuple[pd.DataFrame, dict]:
    """Read, clean and combine all sources; returns the pairs and a report of counts by reason."""
    drops, notes = Drops(), {}
    frames, read_per_source = [], {}
    for source in sources:
        frame = read_source(source, drops, notes)
        read_per_source[source.name] = len(frame)
        log.info("read %d pairs from %s source %r", len(frame), source.kind, source.name)
        frames.append(frame)
    raw = pd.concat(frames, ignore_index=True)
    pairs = clean_pairs(raw, drops, max_words, max_ratio)
    if pairs.empty:
        where = "; ".join(f"{s.kind} source {s.name!r} ({describe(s)}): {read_per_source[s.name]} read"
                          for s in sources)
        raise CorpusError(f"no pairs left to train on. {where}. Dropped: {drops.as_dict() or 'none'}")
    # Pairs without a natural id (not Bible verses) get a content hash of the cleaned text.
    missing = pairs["id"].isna() if "id" in pairs else pd.Series(True, index=pairs.index)
    pairs.loc[missing, "id"] = [
        f"{o}:{content_id(s, t)}" for o, s, t in pairs.loc[missing, ["origin", "src", "tgt"]].itertuples(index=False)
    ]
    duplicate_id = pairs["id"].duplicated()
    drops.add("duplicate_id", int(duplicate_id.sum()))
    pairs = pairs[~duplicate_id][COLUMNS].reset_index(drop=True)
    counts = drops.as_dict()
    report = {
        "read": read_per_source,
        "kept": len(pairs),
        "dropped": {k: v for k, v in counts.items() if not k.startswith("repaired_")},
        "repaired": {k.removeprefix("repaired_"): v for k, v in counts.items() if k.startswith("repaired_")},
        **notes,
        "examples": drops.examples,
    }
    return pairs, report

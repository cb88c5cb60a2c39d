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
from typing import Iterable

import pandas as pd

from pipeline.align import align_verses
from pipeline.config import FolderSource, Source, SwordSource, TsvSource

log = logging.getLogger(__name__)

COLUMNS = ["id", "origin", "src", "tgt"]


class CorpusError(ValueError):
    """A source cannot be read at all; the message names the file (and line)."""


@dataclass
class Drops:
    """Counts of dropped or repaired rows, by reason."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] += n

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
# Block-level markers separate words; inline tags (<w>, <transChange>, <q>) do not.
_BLOCK_TAGS = re.compile(r"</?(div|l|lg|lb|p|item|list|milestone|chapter|title|speaker|seg)\b[^>]*>")
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

    if not Path(library).is_dir():
        raise CorpusError(f"{library}: no SWORD library here (install sword-text-web and sword-text-sparv)")
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
    pairs, realigned = align_verses(src, tgt)
    paired_src, paired_tgt = {s for s, _ in pairs}, {t for _, t in pairs}
    drops.add("no_counterpart_in_target", sum(1 for r, text in src.items() if text and r not in paired_src))
    drops.add("no_counterpart_in_source", sum(1 for r, text in tgt.items() if text and r not in paired_tgt))
    drops.add("repaired_verses_realigned", sum(1 for s, t in pairs if s != t))
    notes.setdefault("realigned_chapters", []).extend(realigned)
    frame = pd.DataFrame([(s, src[s], tgt[t]) for s, t in pairs], columns=["id", "src", "tgt"])
    frame.insert(1, "origin", source.name)
    return frame


# ---------------------------------------------------------------- tab-separated pairs


def content_id(src: str, tgt: str) -> str:
    """A stable id for a pair without one: a hash of its (cleaned) content."""
    return hashlib.sha1(f"{src}\t{tgt}".encode()).hexdigest()[:16]


def read_tsv_pairs(path: str | Path, origin: str, drops: Drops) -> pd.DataFrame:
    """Pairs from `source<TAB>target[<TAB>...]` lines; unreadable lines are counted, not fatal."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        if b"\x00" in raw:
            drops.add("binary_line")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            drops.add("invalid_utf8")
            log.debug("%s:%d: invalid UTF-8", path, number)
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            drops.add("missing_column")
            continue
        rows.append((f"{path.name}:{number}", fields[0], fields[1]))
    frame = pd.DataFrame(rows, columns=["line", "src", "tgt"])
    frame.insert(0, "origin", origin)
    return frame


def read_source(source: Source, drops: Drops, notes: dict) -> pd.DataFrame:
    if isinstance(source, SwordSource):
        return read_sword_pairs(source, drops, notes)
    if isinstance(source, TsvSource):
        return read_tsv_pairs(source.path, source.name, drops)
    if isinstance(source, FolderSource):
        files = sorted(Path(source.path).glob("*.tsv"))
        frames = [read_tsv_pairs(f, source.name, drops) for f in files]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["origin", "src", "tgt"])
    raise TypeError(f"unknown source {source!r}")


# ---------------------------------------------------------------- cleaning

_CONTROL = re.compile(r"[\u0000-\u001f\u007f-\u009f\u200b\u200e\u200f\ufeff]")


def normalise(text: str) -> str:
    """Unicode NFC, control characters removed, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text)
    return " ".join(_CONTROL.sub(" ", text).split())


def clean_pairs(frame: pd.DataFrame, drops: Drops, max_words: int, max_ratio: float) -> pd.DataFrame:
    """Apply each cleaning rule in turn, counting the pairs it drops."""
    frame = frame.copy()
    frame["src"] = frame["src"].map(normalise)
    frame["tgt"] = frame["tgt"].map(normalise)

    def drop(mask: pd.Series, reason: str) -> None:
        nonlocal frame
        drops.add(reason, int(mask.sum()))
        frame = frame[~mask]

    drop((frame["src"] == "") | (frame["tgt"] == ""), "empty_side")
    src_words = frame["src"].str.split().str.len()
    tgt_words = frame["tgt"].str.split().str.len()
    drop((src_words > max_words) | (tgt_words > max_words), "too_long")
    src_words, tgt_words = src_words[frame.index], tgt_words[frame.index]
    ratio = (src_words + 1) / (tgt_words + 1)
    drop((ratio > max_ratio) | (ratio < 1 / max_ratio), "length_ratio")
    drop(frame["src"].str.casefold() == frame["tgt"].str.casefold(), "source_equals_target")
    drop(frame.duplicated(["src", "tgt"]), "duplicate")
    return frame.reset_index(drop=True)


def ingest(sources: Iterable[Source], max_words: int, max_ratio: float) -> tuple[pd.DataFrame, dict]:
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
    # Pairs without a natural id (not Bible verses) get a content hash of the cleaned text.
    missing = pairs["id"].isna() if "id" in pairs else pd.Series(True, index=pairs.index)
    pairs.loc[missing, "id"] = [
        f"{o}:{content_id(s, t)}" for o, s, t in pairs.loc[missing, ["origin", "src", "tgt"]].itertuples(index=False)
    ]
    pairs = pairs.drop_duplicates("id")[COLUMNS].reset_index(drop=True)
    counts = drops.as_dict()
    report = {
        "read": read_per_source,
        "kept": len(pairs),
        "dropped": {k: v for k, v in counts.items() if not k.startswith("repaired_")},
        "repaired": {k.removeprefix("repaired_"): v for k, v in counts.items() if k.startswith("repaired_")},
        **notes,
    }
    return pairs, report

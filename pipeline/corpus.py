"""Ingest: the sources' pairs (pipeline.sources) cleaned, deduplicated and written as shards.

Sources are read as streams, in chunks of `ingest.shard_pairs` pairs; each chunk is cleaned in a
task of pipeline.parallel's pool and deduplicated over the whole corpus by 64-bit hashes.

Every dropped pair is counted by reason; the counts go to reports/ingest.json and MLflow.
"""
from __future__ import annotations

import itertools
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.config import IngestParams, ParallelParams, Source
from pipeline.parallel import shard_pool
from pipeline.sources import CorpusError, Drops, Row, content_id, describe, normalise, source_parts
from pipeline.text import CJK_CHARACTERS

log = logging.getLogger(__name__)

COLUMNS = ["id", "origin", "src", "tgt"]


@dataclass
class Chunk:
    """Up to `ingest.shard_pairs` rows of one file, as read: a worker's task."""

    index: int
    origin: str
    rows: list[Row]


def read_chunks(sources: list[Source], drops: Drops, notes: dict, read: dict[str, int],
                chunk_rows: int) -> Iterator[Chunk]:
    """Every source's rows in chunks, in order, counting what each source gave in `read`."""
    index = 0
    for source in sources:
        read[source.name] = 0
        for rows in source_parts(source, drops, notes, chunk_rows):
            rows = iter(rows)
            while chunk := list(itertools.islice(rows, chunk_rows)):
                read[source.name] += len(chunk)
                yield Chunk(index, source.name, chunk)
                index += 1
        log.info("read %d pairs from %s source %r", read[source.name], source.kind, source.name)


# ---------------------------------------------------------------- cleaning

MAX_CHARS_PER_WORD = 25  # a side longer than max_words * this is over-long even without spaces


def word_count(texts: pd.Series) -> pd.Series:
    """Words per normalised text, which has one space between words: counting spaces spares a list
    of words per side (several hundred MB for a chunk of long pairs). A Chinese or Japanese
    character counts as a word, as their tokenisers make it one (pipeline.text), so that a pair of
    one of those languages is not dropped for its length ratio. (A space-separated run holding such
    characters counts one more: near enough, at the cost of one more vectorised count, not a
    regex match per word.)"""
    return texts.str.count(" ") + 1 + texts.str.count(f"[{CJK_CHARACTERS}]")


def clean_rows(frame: pd.DataFrame, drops: Drops, max_words: int, max_ratio: float) -> pd.DataFrame:
    """Apply each cleaning rule that looks at one pair alone, in turn, counting the pairs it drops."""
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
    src_words, tgt_words = word_count(frame["src"]), word_count(frame["tgt"])
    too_many_chars = (frame["src"].str.len() > max_words * MAX_CHARS_PER_WORD) | (
        frame["tgt"].str.len() > max_words * MAX_CHARS_PER_WORD)
    drop((src_words > max_words) | (tgt_words > max_words) | too_many_chars, "too_long")
    src_words, tgt_words = src_words[frame.index], tgt_words[frame.index]
    ratio = (src_words + 1) / (tgt_words + 1)
    drop((ratio > max_ratio) | (ratio < 1 / max_ratio), "length_ratio")
    drop(frame["src"].str.casefold() == frame["tgt"].str.casefold(), "source_equals_target")
    return frame


def clean_pairs(frame: pd.DataFrame, drops: Drops, max_words: int, max_ratio: float) -> pd.DataFrame:
    """clean_rows, then the duplicates dropped (in one frame; ingest does it over the whole corpus)."""
    frame = clean_rows(frame, drops, max_words, max_ratio)
    duplicate = frame.duplicated(["src", "tgt"])
    drops.add("duplicate", int(duplicate.sum()))
    return frame[~duplicate].reset_index(drop=True)


def hash64(texts: Iterable[str]) -> np.ndarray:
    """A 64-bit hash of each text (pandas' keyed SipHash: the same in every process and run)."""
    return pd.util.hash_array(np.array(list(texts), dtype=object))


@dataclass
class CleanedChunk:
    """What a chunk's task sends back: the drops and how many pairs it kept. The pairs stay in the
    chunk's file, and a hash of each pair's text and of its id, in order, in a file beside it
    (`hashes_path`), so that no process holds the whole corpus's hashes."""

    path: str
    counts: Counter
    size: int

    def hashes(self, row: int) -> np.ndarray:
        """Row 0: the hashes of the pairs' texts; row 1: of their ids (memory-mapped)."""
        return np.load(hashes_path(self.path), mmap_mode="r")[row]


def hashes_path(chunk_path: str) -> str:
    return f"{chunk_path}.hashes.npy"


def clean_chunk(chunk: Chunk, max_words: int, max_ratio: float, folder: str) -> CleanedChunk:
    """A worker's task: clean a chunk, give pairs without a natural id a content hash of the cleaned
    text, and write the kept pairs and their hashes to `folder`."""
    drops = Drops()
    frame = pd.DataFrame(chunk.rows, columns=["id", "src", "tgt"], dtype=object)
    frame.insert(1, "origin", chunk.origin)
    pairs = clean_rows(frame, drops, max_words, max_ratio).reset_index(drop=True)
    missing = pairs["id"].isna()
    pairs.loc[missing, "id"] = [f"{chunk.origin}:{content_id(s, t)}"
                                for s, t in pairs.loc[missing, ["src", "tgt"]].itertuples(index=False)]
    path = str(Path(folder) / storage.shard_name(chunk.index))
    pairs[COLUMNS].to_parquet(path, index=False)
    # Normalised text holds no tab, so "src<TAB>tgt" names a pair unambiguously.
    np.save(hashes_path(path), np.stack([hash64(pairs["src"] + "\t" + pairs["tgt"]), hash64(pairs["id"])]))
    return CleanedChunk(path, drops.counts, len(pairs))


def first_occurrences(parts: np.ndarray | Sequence[np.ndarray], among: np.ndarray | None = None) -> np.ndarray:
    """True where a hash is seen for the first time, in order, over the hashes of `parts` (arrays,
    maybe memory-mapped, in corpus order; or one array); with `among` (a mask), only rows it marks
    take part. Equal hashes share their top 4 bits, so each of the 16 ranges they define is
    deduplicated alone, gathered from the parts as it is needed: at 10M pairs a range holds 5 MB
    of hashes and as much of positions, where the whole corpus's hashes would be 80 MB and
    np.unique's sort several copies of them. (The parts are read once per range, from the page
    cache: cheaper than keeping their ranges.)"""
    parts = [parts] if isinstance(parts, np.ndarray) else list(parts)
    offsets = np.cumsum([0] + [len(part) for part in parts])
    seen_first = np.zeros(offsets[-1], dtype=bool)
    for b in range(16):
        hashes, rows = [], []
        for part, offset in zip(parts, offsets):
            assert part.dtype == np.uint64, part.dtype  # signed hashes would fall outside the ranges
            in_bucket = np.flatnonzero((part >> np.uint64(60)) == b)
            if among is not None:
                in_bucket = in_bucket[among[offset + in_bucket]]
            hashes.append(part[in_bucket])
            rows.append(offset + in_bucket)
        if rows:
            rows = np.concatenate(rows)
            _, first = np.unique(np.concatenate(hashes), return_index=True)
            seen_first[rows[first]] = True
    return seen_first


def keep_first_pairs(chunks: list[CleanedChunk], drops: Drops, no_pairs_left: Callable[[], None]) -> list[np.ndarray]:
    """Which pairs of each chunk to keep: the first of each text over the whole corpus (the rest count
    as `duplicate`), then among those the first of each id (the rest: `duplicate_id`)."""
    keep = first_occurrences([c.hashes(0) for c in chunks])
    drops.add("duplicate", int((~keep).sum()))
    if not keep.any():
        no_pairs_left()
    first_id = first_occurrences([c.hashes(1) for c in chunks], among=keep)
    drops.add("duplicate_id", int((keep & ~first_id).sum()))
    keep &= first_id
    return np.split(keep, np.cumsum([c.size for c in chunks])[:-1])


def write_shard(task: tuple[str, np.ndarray, str]) -> int:
    """A worker's task: a chunk's kept pairs, (chunk file, which rows, shard file), as a final shard."""
    chunk_path, keep, shard_path = task
    pairs = pd.read_parquet(chunk_path)[keep].reset_index(drop=True)
    pairs.to_parquet(shard_path, index=False)
    storage.fsync(Path(shard_path))
    Path(chunk_path).unlink()
    Path(hashes_path(chunk_path)).unlink()
    return len(pairs)


def ingest_shards(sources: list[Source], out: str | Path, *, max_words: int, max_ratio: float,
                  shard_pairs: int, parallel: ParallelParams) -> dict:
    """Read, clean and combine all sources into parquet shards in the folder `out` (replaced whole,
    atomically); returns a report of counts by reason. Reading and deduplication run here; cleaning
    and writing run as tasks of `parallel`'s pool, a chunk each."""
    out = Path(out).absolute()
    storage.remove_leftovers(out)
    drops, notes, read = Drops(), {}, {}

    def no_pairs_left() -> None:
        where = "; ".join(f"{s.kind} source {s.name!r} ({describe(s)}): {read[s.name]} read" for s in sources)
        raise CorpusError(f"no pairs left to train on. {where}. Dropped: {drops.as_dict() or 'none'}")

    with storage.temporary_folder_beside(out, "chunks") as chunk_folder, \
            storage.atomic_folder(out) as shard_folder:
        chunks = read_chunks(sources, drops, notes, read, shard_pairs)
        first = list(itertools.islice(chunks, 2))  # one chunk alone needs no cluster
        with shard_pool(parallel, tasks=len(first) if len(first) < 2 else None) as pool:
            cleaned = list(pool.map(clean_chunk, itertools.chain(first, chunks), max_words, max_ratio,
                                    str(chunk_folder)))
            for chunk in cleaned:
                for reason, n in chunk.counts.items():
                    drops.add(reason, n)
            keeps = keep_first_pairs(cleaned, drops, no_pairs_left)
            kept_chunks = [(c.path, keep) for c, keep in zip(cleaned, keeps) if keep.any()]
            tasks = [(path, keep, str(shard_folder / storage.shard_name(i)))
                     for i, (path, keep) in enumerate(kept_chunks)]
            kept = sum(pool.map(write_shard, tasks))
    counts = drops.as_dict()
    return {
        "read": read,
        "kept": kept,
        "shards": len(tasks),
        "dropped": {k: v for k, v in counts.items() if not k.startswith("repaired_")},
        "repaired": {k.removeprefix("repaired_"): v for k, v in counts.items() if k.startswith("repaired_")},
        **notes,
        "examples": drops.examples,
    }


def ingest(sources: list[Source], max_words: int, max_ratio: float,
           shard_pairs: int = IngestParams.model_fields["shard_pairs"].default,
           parallel: ParallelParams | None = None) -> tuple[pd.DataFrame, dict]:
    """ingest_shards into a temporary folder, read back whole: the pairs and the report (for tests
    and small tools; the stage keeps the shards)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "pairs"
        report = ingest_shards(sources, out, max_words=max_words, max_ratio=max_ratio, shard_pairs=shard_pairs,
                               parallel=parallel or ParallelParams(workers=1))
        return storage.read_raw_pairs(out), report

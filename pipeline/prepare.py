"""prepare, shard by shard: ingest's shards are tokenised in parallel (each shard's tokens cached by
its md5, so new data tokenises only new shards), split by a hash of the pair id (split_key: every
version of a Bible verse in one split) with capped held-out splits, counted per shard into one
vocabulary, and written as per-split text parquet (for evaluate and reports) and memory-mapped
token ids (for training). The parent process holds no more than one shard's part, the held-out
source sentences and the token counts.

The passes, each a pool.map over the shards (pipeline.parallel), results in shard order:
  tokenise    raw shard -> cached tokenised shard; returns the hashes of held-out candidates
  (parent)    the caps' hash cut-offs
  held_out    the held-out pairs' source tokens (a training pair with one of them leaks)
  split       per-split parts in a work folder, leaking training pairs dropped; train token counts
  (subwords)  sentencepiece trained on a sample of train; every part becomes pieces, then counted
  encode      a part's token ids, streamed by the parent into token_ids files
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage, token_ids
from pipeline.config import PARAMS_FILE, Params, ParamsError
from pipeline.parallel import shard_pool
from pipeline.storage import SPLITS, split_path
from pipeline.text import SUBWORD_FILE, Tokenizer, Vocab, train_subwords, word_tokenizers

log = logging.getLogger(__name__)

CACHE = Path(".vamos/cache/prepare")  # tokenised shards, by shard md5 and tokeniser settings
WORK = Path(".vamos/work/prepare")  # this run's per-split parts, removed at the end
# Bump when the code changes what a tokenised shard holds: older cache entries then miss.
TOKENISED_FORMAT = 1
RAW_COLUMNS = ["id", "origin", "src", "tgt"]
COLUMNS = RAW_COLUMNS + ["src_tokens", "tgt_tokens"]  # the prepared parquet's, in this order
HASH = "split_hash"
SIDES = ("src", "tgt")
TRAIN, VALID, TEST = range(3)  # split codes, in SPLITS' order


def split_hash(pair_id: str) -> int:
    """A pair's stable 64-bit hash: the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "big")


def hash_fraction(hashes: np.ndarray) -> np.ndarray:
    """The hashes as fractions in [0, 1), the same floats as `split_hash(i) / 2**64`."""
    return np.asarray(hashes, dtype=np.uint64).astype(np.float64) / 2.0**64


def split_key(pair_id: str, origin: str, variants: Mapping[str, str]) -> str:
    """What the split hashes for a pair: its id, less the "@<variant>" that a sword source with a
    `variant` (`variants`: {source name: variant}) appends to its own pairs' ids, so that every
    version of a verse ("Gen.1.1", "Gen.1.1@kjv") lands in one split. Any other id, "@" or not, is
    hashed as it is."""
    variant = variants.get(origin)
    return pair_id if variant is None else pair_id.removesuffix(f"@{variant}")


def split_of(pair_id: str, valid: float, test: float, origin: str = "",
             variants: Mapping[str, str] | None = None) -> str:
    """A pair's split before the caps, from a hash of its stable id (its split_key): the same pair
    always lands in the same split, however the corpus grows."""
    u = split_hash(split_key(pair_id, origin, variants or {})) / 2**64
    return "test" if u < test else "valid" if u < test + valid else "train"


@dataclass(frozen=True)
class HeldOut:
    """Which pairs are held out: those of a source held out whole (`whole`: origin, split code), and
    by hash those below a split's fraction and, where the split is capped, at most its cut-off (the
    largest hash kept)."""

    valid: float
    test: float
    valid_cut: int = 2**64 - 1
    test_cut: int = 2**64 - 1
    whole: tuple[tuple[str, int], ...] = ()

    def codes(self, hashes: np.ndarray, origins: np.ndarray | None = None) -> np.ndarray:
        hashes = np.asarray(hashes, dtype=np.uint64)
        u = hash_fraction(hashes)
        codes = np.full(len(hashes), TRAIN, dtype=np.int8)
        codes[(u >= self.test) & (u < self.test + self.valid) & (hashes <= np.uint64(self.valid_cut))] = VALID
        codes[(u < self.test) & (hashes <= np.uint64(self.test_cut))] = TEST
        if self.whole:
            if origins is None:
                raise ValueError("sources held out whole need each pair's origin")
            for origin, code in self.whole:
                codes[np.asarray(origins) == origin] = code
        return codes

    def by_hash(self, origins: np.ndarray) -> np.ndarray:
        """Which pairs the hash decides: those of no source held out whole (nor counted in the caps)."""
        return ~np.isin(np.asarray(origins), [origin for origin, _ in self.whole])


def capped(candidates: np.ndarray, cap: int) -> tuple[int, int]:
    """(cut-off, pairs moved to train) keeping the `cap` smallest of a split's candidate hashes."""
    if len(candidates) <= cap:
        return 2**64 - 1, 0
    return int(np.partition(candidates, cap - 1)[cap - 1]), len(candidates) - cap


def whole_sources(cfg) -> tuple[tuple[str, int], ...]:
    """prepare.split.hold_out as (origin, split code) pairs."""
    return tuple((origin, SPLITS.index(split)) for origin, split in sorted(cfg.hold_out.items()))


def held_out_split(cfg, candidates: np.ndarray) -> tuple[HeldOut, dict[str, int]]:
    u = hash_fraction(candidates)
    test_cut, test_moved = capped(candidates[u < cfg.test], cfg.max_test)
    valid_cut, valid_moved = capped(candidates[(u >= cfg.test) & (u < cfg.test + cfg.valid)], cfg.max_valid)
    return HeldOut(cfg.valid, cfg.test, valid_cut, test_cut, whole_sources(cfg)), {"valid": valid_moved, "test": test_moved}


def cache_key(shard_md5: str, tokenizers: tuple[Tokenizer, Tokenizer], variants: Mapping[str, str]) -> str:
    import sacremoses

    # The code that tokenises is part of the key: an edit to it reruns prepare (DVC) and must not
    # then be answered from the cache. The shard's sources' variants change its split hashes.
    code = {name: storage.file_md5(Path(__file__).with_name(name)) for name in ("text.py", "prepare.py")}
    settings = {"shard_md5": shard_md5, "format": TOKENISED_FORMAT, "sacremoses": sacremoses.__version__,
                "tokenizers": [[t.lang, t.lowercase] for t in tokenizers], "code": code, "variants": dict(variants)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def shard_variants(shard: str, variants: Mapping[str, str]) -> dict[str, str]:
    """The variants of the shard's own sources: adding a variant source leaves the others' shards cached."""
    if not variants:
        return {}
    origins = set(pq.read_table(shard, columns=["origin"])["origin"].to_pylist())
    return {origin: variant for origin, variant in variants.items() if origin in origins}


def tokenise_shard(shard: str, tokenizers: tuple[Tokenizer, Tokenizer], cache: str, held_out: HeldOut,
                   variants: Mapping[str, str]) -> dict:
    """Pass 1 (a task): the shard's Moses tokens and split hashes (of split_key, with `variants`:
    {sword source name: variant}), from the cache or made and cached; returns the cached file and
    the hashes of its held-out candidates (before the caps)."""
    variants = shard_variants(shard, variants)
    cached = Path(cache) / f"{cache_key(storage.file_md5(shard), tokenizers, variants)}.parquet"
    from_cache = cached.exists()
    if not from_cache:
        frame = pd.read_parquet(shard, columns=RAW_COLUMNS)
        for side, tokenizer in zip(SIDES, tokenizers):
            frame[f"{side}_tokens"] = [" ".join(tokenizer.tokenize(text)) for text in frame[side]]
        keys = (split_key(i, origin, variants) for i, origin in zip(frame["id"], frame["origin"]))
        frame[HASH] = np.fromiter(map(split_hash, keys), dtype=np.uint64, count=len(frame))
        with storage.atomic_path(cached) as tmp:
            frame.to_parquet(tmp, index=False)
    table = pq.read_table(cached, columns=[HASH, "origin"])
    hashes, origins = table[HASH].to_numpy(), table["origin"].to_numpy(zero_copy_only=False)
    return {"path": str(cached), "from_cache": from_cache,
            "candidates": hashes[(held_out.codes(hashes, origins) != TRAIN) & held_out.by_hash(origins)]}


def held_out_sources(cached: str, held_out: HeldOut) -> set[str]:
    """Pass 2 (a task): the source tokens of the shard's held-out pairs."""
    table = pq.read_table(cached, columns=[HASH, "origin", "src_tokens"])
    codes = held_out.codes(table[HASH].to_numpy(), table["origin"].to_numpy(zero_copy_only=False))
    return set(table["src_tokens"].to_numpy(zero_copy_only=False)[codes != TRAIN])


def part_path(work: str, split: str, index: int) -> Path:
    return Path(work) / split / storage.shard_name(index)


def write_part(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame[COLUMNS], preserve_index=False), path)


def token_counts(frame: pd.DataFrame) -> dict[str, Counter]:
    return {side: Counter(t for s in frame[f"{side}_tokens"] for t in s.split()) for side in SIDES}


def split_shard(shard: tuple[int, str], work: str, held_out: HeldOut, sources: frozenset[str], count: bool) -> dict:
    """Pass 3 (a task): shard (index, cached file)'s per-split parts, training pairs whose source
    is held out dropped; the parts' sizes, and with `count` the training part's token counts."""
    index, cached = shard
    frame = pd.read_parquet(cached)
    codes = held_out.codes(frame[HASH].to_numpy(), frame["origin"].to_numpy())
    leaking = (codes == TRAIN) & frame["src_tokens"].isin(sources).to_numpy()
    result = {"pairs": {}, "leaking": int(leaking.sum()), "counts": None}
    for code, split in enumerate(SPLITS):
        part = frame[(codes == code) & ~leaking].reset_index(drop=True)
        write_part(part, part_path(work, split, index))
        result["pairs"][split] = len(part)
        if code == TRAIN and count:
            result["counts"] = token_counts(part)
    return result


def piece_part(path: str, tokenizers: tuple[Tokenizer, Tokenizer], count: bool) -> dict[str, Counter] | None:
    """With subwords (a task): the part's Moses words become sentencepiece pieces; with `count`,
    their token counts."""
    frame = pd.read_parquet(path)
    for side, tokenizer in zip(SIDES, tokenizers):
        # dtype: an empty part's column must stay text, or its parquet schema differs from the others'.
        frame[f"{side}_tokens"] = pd.Series([" ".join(tokenizer.pieces(s.split())) for s in frame[f"{side}_tokens"]],
                                            index=frame.index, dtype="str")
    write_part(frame, Path(path))
    return token_counts(frame) if count else None


def encode_part(path: str, side: str, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Pass 4 (a task): a part's token ids on one side, as token_ids.write takes them."""
    column = pq.read_table(path, columns=[f"{side}_tokens"])[0].to_pylist()
    return token_ids.flatten(vocab.encode(s.split()) for s in column)


def merge_counts(results) -> dict[str, Counter]:
    """Per-part token counts merged as they arrive (never all parts' Counters at once)."""
    total = {side: Counter() for side in SIDES}
    for counts in results:
        if counts is not None:
            for side in SIDES:
                total[side].update(counts[side])
    return total


def split_all(pool, cached: list[str], work: str, held_out: HeldOut, sources: frozenset[str],
              count: bool) -> tuple[list[dict], dict[str, Counter]]:
    """split_shard over every shard: each shard's sizes (kept) and its training counts (merged)."""
    results = []

    def sizes_then_counts():
        for result in pool.map(split_shard, enumerate(cached), work, held_out, sources, count):
            results.append({"pairs": result["pairs"], "leaking": result["leaking"]})
            yield result["counts"]

    return results, merge_counts(sizes_then_counts())


def check_subword_vocab(sentences, vocab_size: int, side: str) -> None:
    """Sentencepiece needs a piece for every character, one for the word boundary and <unk>:
    say so in terms of params.yaml, before sentencepiece says it in its own."""
    needed = len(set("".join(sentences)) - {" "}) + 2
    if vocab_size < needed:
        raise ParamsError(f"{PARAMS_FILE}: prepare.subwords.vocab_size is {vocab_size}, but the {side} training "
                          f"split has {needed - 2} distinct characters: it needs at least {needed} pieces")


def sample_rows(train_parts: list[Path], sizes: list[int], wanted: int) -> Iterator[tuple[Path, np.ndarray]]:
    """The training rows sentencepiece learns from, per part: all of them in order, or where there
    are more than `wanted`, `wanted` rows evenly spaced through the split (the same on every run)."""
    total = sum(sizes)
    chosen = np.arange(total) if total <= wanted else (np.arange(wanted, dtype=np.int64) * total) // wanted
    start = 0
    for path, size in zip(train_parts, sizes):
        yield path, chosen[(chosen >= start) & (chosen < start + size)] - start
        start += size


def train_side_subwords(cfg, side: str, train_parts: list[Path], sizes: list[int]) -> bytes:
    sample = [sentence for path, rows in sample_rows(train_parts, sizes, cfg.sample_sentences)
              for sentence in pq.read_table(path, columns=[f"{side}_tokens"])[0].take(rows).to_pylist()]
    check_subword_vocab(sample, cfg.vocab_size, side)
    return train_subwords(sample, cfg.model, cfg.vocab_size, cfg.threads)


# Rows per row group of the prepared parquet: groups of a fixed size make the file's bytes the
# same however the corpus was sharded, and bound what the parent buffers.
ROW_GROUP = 100_000


def row_groups(parts: list[Path]) -> Iterator[pa.Table]:
    """The parts' rows one after another, re-cut into tables of ROW_GROUP rows (the last shorter)."""
    buffered, rows = [], 0
    for path in parts:
        table = pq.read_table(path)
        buffered.append(table)
        rows += table.num_rows
        while rows >= ROW_GROUP:
            joined = pa.concat_tables(buffered)
            yield joined.slice(0, ROW_GROUP)
            buffered, rows = [joined.slice(ROW_GROUP)], rows - ROW_GROUP
    if rows:
        yield pa.concat_tables(buffered)


def write_split_text(split: str, parts: list[Path]) -> None:
    """The split's parquet, streamed."""
    with storage.atomic_path(split_path(split)) as tmp:
        with pq.ParquetWriter(tmp, pq.read_schema(parts[0])) as writer:
            for table in row_groups(parts):
                writer.write_table(table.combine_chunks())  # pages cut the same wherever shards ended


def unk_rate(frame: pd.DataFrame, column: str, vocab: Vocab) -> float:
    tokens = [t for s in frame[column] for t in s.split()]
    return round(sum(t not in vocab for t in tokens) / max(len(tokens), 1), 4)


def prune_cache(cache: Path, used: set[str]) -> None:
    """Drop cached shards that this corpus no longer has (or other settings made), so the cache
    stays the size of one tokenised corpus."""
    for path in cache.glob("*.parquet"):
        if str(path) not in used:
            path.unlink(missing_ok=True)


def raw_shards() -> list[Path]:
    shards = storage.raw_shards()
    if not shards:
        raise FileNotFoundError(f"no shards (part-*.parquet) in {storage.RAW_PAIRS}: run `vamos ingest`")
    return shards


def prepare(params: Params) -> dict:
    cfg = params.prepare
    shards = [str(p.resolve()) for p in raw_shards()]
    cache, work = CACHE.resolve(), WORK.resolve()
    shutil.rmtree(work, ignore_errors=True)
    storage.PREPARED_MANIFEST.unlink(missing_ok=True)  # it would vouch for files this run replaces
    word_toks = word_tokenizers(params)
    subwords = cfg.subwords.model != "none"
    uncapped = HeldOut(cfg.split.valid, cfg.split.test, whole=whole_sources(cfg.split))
    with shard_pool(params.parallel, tasks=len(shards)) as pool:
        tokenised = list(pool.map(tokenise_shard, shards, word_toks, str(cache), uncapped,
                                  params.ingest.sword_variants()))
        cached = [t["path"] for t in tokenised]
        from_cache = sum(t["from_cache"] for t in tokenised)
        log.info("tokenised %d shards, %d from the cache", len(shards) - from_cache, from_cache)
        held_out, moved = held_out_split(cfg.split, np.concatenate([t["candidates"] for t in tokenised]))
        sources = frozenset().union(*pool.map(held_out_sources, cached, held_out))
        split_results, counts = split_all(pool, cached, str(work), held_out, sources, not subwords)
        parts = {split: [part_path(str(work), split, i) for i in range(len(cached))] for split in SPLITS}
        written = write_subword_models(params, parts, [r["pairs"]["train"] for r in split_results])
        if subwords:
            counts = prepare_pieces(pool, parts, word_toks, written)
        vocabs = {side: Vocab.from_counts(counts[side], cfg.vocab.min_freq, cfg.vocab.max_size) for side in SIDES}
        written += write_splits(pool, parts, vocabs)
    report = build_report(params, split_results, counts, vocabs, moved)
    # (How many shards came from the cache is logged above, not reported: reports/prepare.json is in
    # dvc.lock, which must not depend on what a machine had cached.)
    storage.write_json(storage.REPORTS / "prepare.json", report)
    # Last: the manifest vouches for a complete data/prepared.
    storage.write_json(storage.PREPARED_MANIFEST,
                       {"files": {p.name: storage.file_md5(p) for p in sorted(written, key=lambda p: p.name)}})
    prune_cache(cache, set(cached))
    shutil.rmtree(work, ignore_errors=True)
    log.info("prepared %s; vocab %s", report["pairs"], report["vocab"])
    return report | {"shards_tokenised": len(shards) - from_cache, "shards_from_cache": from_cache}


def write_splits(pool, parts: dict[str, list[Path]], vocabs: dict[str, Vocab]) -> list[Path]:
    """The vocabularies, and each split's parquet and token ids, streamed from the parts. The files
    written."""
    written = []
    for side, vocab in vocabs.items():
        vocab.save(storage.PREPARED / f"vocab.{side}.json")
        written.append(storage.PREPARED / f"vocab.{side}.json")
    for split in SPLITS:
        write_split_text(split, parts[split])
        written.append(split_path(split))
        for side in SIDES:
            chunks = pool.map(encode_part, map(str, parts[split]), side, vocabs[side])
            token_ids.write(storage.PREPARED, split, side, chunks)
            written += [token_ids.ids_path(storage.PREPARED, split, side),
                        token_ids.offsets_path(storage.PREPARED, split, side)]
    return written


def write_subword_models(params: Params, parts: dict[str, list[Path]], train_sizes: list[int]) -> list[Path]:
    """With subwords, train and write each side's sentencepiece model; without, remove those of an
    earlier subword run. The files written."""
    cfg = params.prepare.subwords
    written = []
    for side in SIDES:
        model_file = storage.PREPARED / SUBWORD_FILE.format(side=side)
        if cfg.model == "none":  # a word-level run leaves no models of an earlier subword run behind
            model_file.unlink(missing_ok=True)
            continue
        # Trained on the training split's (case-handled) Moses words; then every split's words
        # become pieces, which embed, train and evaluate take as they take words.
        model = train_side_subwords(cfg, side, parts["train"], train_sizes)
        with storage.atomic_path(model_file) as tmp:
            tmp.write_bytes(model)
        written.append(model_file)
    return written


def prepare_pieces(pool, parts: dict[str, list[Path]], word_toks: tuple[Tokenizer, Tokenizer],
                   model_files: list[Path]) -> dict[str, Counter]:
    """Every part's words become pieces; the training parts' piece counts, merged."""
    piece_toks = tuple(replace(tok, subwords=path.read_bytes()) for tok, path in zip(word_toks, model_files))
    counts = {}
    for split in SPLITS:
        counts[split] = merge_counts(pool.map(piece_part, map(str, parts[split]), piece_toks, split == "train"))
    return counts["train"]


def build_report(params: Params, split_results: list[dict], counts: dict[str, Counter], vocabs: dict[str, Vocab],
                 moved: dict[str, int]) -> dict:
    pairs = {split: sum(r["pairs"][split] for r in split_results) for split in SPLITS}
    test = pd.read_parquet(split_path("test"), columns=["src_tokens", "tgt_tokens"])  # at most max_test pairs
    train_tokens = {side: sum(counts[side].values()) for side in SIDES}
    report = {
        "pairs": pairs,
        "dropped_train_pairs_with_held_out_source": sum(r["leaking"] for r in split_results),
        "vocab": {side: len(vocabs[side]) for side in SIDES},
        "train_tokens": train_tokens,
        "test_unk_rate": {side: unk_rate(test, f"{side}_tokens", vocabs[side]) for side in SIDES},
        # Pieces, with subwords: fewer unknowns cost longer sequences.
        "mean_train_tokens_per_sentence": {side: round(n / max(pairs["train"], 1), 2)
                                           for side, n in train_tokens.items()},
        # Held-out candidates beyond prepare.split's caps, which train instead.
        "held_out_capped": moved,
    }
    if params.prepare.subwords.model != "none":
        import sentencepiece

        report["subwords"] = params.prepare.subwords.model_dump() | {"sentencepiece": sentencepiece.__version__}
    return report

"""Tokenised splits as id tensors, and length-bucketed batches with a token budget: the one loader
that training and the benchmarks share.

A split's ids are read memory-mapped from prepare's binarised files (pipeline.token_ids): only
the target lengths (4 bytes a pair) live in memory, and a batch gathers its rows from the map,
so a corpus of any size trains in bounded memory, and DDP ranks on one node share one copy of
the ids in the page cache."""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import pandas as pd
import torch

from pipeline import storage, token_ids
from pipeline.text import EOS_ID, PAD_ID, SOS_ID, Vocab


def load_split(split: str, root: Path = storage.PREPARED) -> pd.DataFrame:
    return pd.read_parquet(storage.split_path(split, root))


def load_vocabs(root: Path = storage.PREPARED) -> tuple[Vocab, Vocab]:
    return Vocab.load(root / "vocab.src.json"), Vocab.load(root / "vocab.tgt.json")


@dataclass
class Batch:
    src: torch.Tensor  # B x S
    src_len: torch.Tensor  # B
    tgt_in: torch.Tensor  # B x T   <sos> w1 .. wn
    tgt_out: torch.Tensor  # B x T   w1 .. wn <eos>
    index: np.ndarray  # rows of the split, for putting outputs back in order

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.src.to(device), self.src_len.to(device), self.tgt_in.to(device),
                     self.tgt_out.to(device), self.index)


def pad(sequences: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(sequences), max(map(len, sequences))), PAD_ID, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


class EncodedIds:
    """One side's ids in memory, laid out as token_ids.TokenIds maps them from disk (flat ids and
    offsets): for a split encoded on the fly (tests, benchmarks)."""

    def __init__(self, sequences: Iterable[list[int]]):
        flat, lengths = token_ids.flatten(sequences)
        self.ids = flat
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


Ids = EncodedIds | token_ids.TokenIds


def gather(side: Ids, rows: np.ndarray, shift: int = 0, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ids of `rows`, padded into a B x (`shift` + longest, at least 1) array, each row's ids
    starting at column `shift` (last to first with `reverse`); and the rows' lengths. One fancy-
    indexed read of the (memory-mapped) flat ids."""
    starts = np.asarray(side.offsets[rows], dtype=np.int64)
    lengths = np.asarray(side.offsets[rows + 1], dtype=np.int64) - starts
    width = max(int(lengths.max(initial=0)) + shift, 1)
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    columns = np.arange(width - shift)
    present = columns[None, :] < lengths[:, None]
    offsets = lengths[:, None] - 1 - columns[None, :] if reverse else columns[None, :]
    out[:, shift:][present] = side.ids[(starts[:, None] + offsets)[present]]
    return out, lengths


def side_lengths(side: Ids) -> np.ndarray:
    """Every sentence's length (int32: 4 bytes a pair), read from the offsets in slices."""
    offsets, out = side.offsets, np.empty(len(side), dtype=np.int32)
    step = 1 << 22
    for start in range(0, len(out), step):
        out[start:start + step] = np.diff(np.asarray(offsets[start:start + step + 1]))
    return out


class BatchPlan(Sequence):
    """An epoch's batches: rows in sort order, cut into groups, visited in a shuffled order. About
    4 to 8 bytes a pair however many batches, instead of one array object per batch."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, visit: np.ndarray):
        self.order = order
        self.bounds = np.append(starts, len(order))
        self.visit = visit

    def __len__(self) -> int:
        return len(self.visit)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        group = self.visit[i]
        return self.order[self.bounds[group]:self.bounds[group + 1]]


def group_starts(sorted_lengths: np.ndarray, batch_tokens: int) -> np.ndarray:
    """Where each batch starts in rows sorted by ascending length, filled greedily so that the
    longest row times the rows stays within `batch_tokens` (a longer row alone). Rows come in
    ascending length, so the row being added is the longest: a row joins its group if the group's
    size with it is within batch_tokens // its length. That capacity is one per distinct length,
    so the groups come from one arange per length, not a loop over rows."""
    n = len(sorted_lengths)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    run_starts = np.flatnonzero(np.diff(sorted_lengths)) + 1
    bounds = np.concatenate([[0], run_starts, [n]])
    starts, current = [np.zeros(1, dtype=np.int64)], 0
    for first, end in zip(bounds[:-1], bounds[1:]):
        capacity = max(1, batch_tokens // int(sorted_lengths[first]))
        new = np.arange(max(first, current + capacity), end, capacity, dtype=np.int64)
        if len(new):
            starts.append(new)
            current = int(new[-1])
    return np.concatenate(starts)


class ParallelData:
    """One split encoded with the vocabularies: ids memory-mapped from prepare's files (`open`) or
    encoded in memory (`from_frame`). `frame` holds the text where a split keeps it (validation).
    With `right_to_left`, batches hold each target backwards (a right-to-left model's training)."""

    def __init__(self, src: Ids, tgt: Ids, frame: pd.DataFrame | None = None, text_file: Path | None = None,
                 right_to_left: bool = False):
        if len(src) != len(tgt):
            raise ValueError(f"{text_file or 'the split'}: {len(src)} source sentences but {len(tgt)} targets")
        self.src, self.tgt, self.frame, self.text_file = src, tgt, frame, text_file
        self.right_to_left = right_to_left
        self.tgt_lengths = side_lengths(tgt)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, src_vocab: Vocab, tgt_vocab: Vocab,
                   right_to_left: bool = False) -> "ParallelData":
        frame = frame.reset_index(drop=True)
        return cls(EncodedIds(src_vocab.encode(s.split()) for s in frame["src_tokens"]),
                   EncodedIds(tgt_vocab.encode(s.split()) for s in frame["tgt_tokens"]), frame,
                   right_to_left=right_to_left)

    @classmethod
    def open(cls, root: Path, split: str, with_text: bool = False, right_to_left: bool = False) -> "ParallelData":
        """The split's ids memory-mapped; its text frame too if `with_text` (a small split's)."""
        text_file = storage.split_path(split, root)
        for path in (token_ids.ids_path(root, split, "src"), token_ids.ids_path(root, split, "tgt")):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: run `vamos prepare` (it writes the binarised ids)")
        data = cls(token_ids.TokenIds(root, split, "src"), token_ids.TokenIds(root, split, "tgt"),
                   load_split(split, root) if with_text else None, text_file, right_to_left)
        if data.frame is not None and len(data.frame) != len(data):
            raise ValueError(f"{text_file} has {len(data.frame)} pairs but its ids files {len(data)}: "
                             "run `vamos prepare` again")
        return data

    def __len__(self) -> int:
        return len(self.tgt_lengths)

    def make_batch(self, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows)
        src, src_len = gather(self.src, rows)  # an empty source is one <pad>, of length 1
        tgt_in, tgt_len = gather(self.tgt, rows, shift=1, reverse=self.right_to_left)
        tgt_in[:, 0] = SOS_ID
        tgt_out = np.full_like(tgt_in, PAD_ID)
        tgt_out[:, :-1] = tgt_in[:, 1:]
        tgt_out[np.arange(len(rows)), tgt_len] = EOS_ID
        return Batch(src=torch.from_numpy(src), src_len=torch.from_numpy(np.maximum(src_len, 1)),
                     tgt_in=torch.from_numpy(tgt_in), tgt_out=torch.from_numpy(tgt_out), index=rows)

    def target_words(self, rows: np.ndarray) -> np.ndarray:
        """Every target id of `rows` (int64), one after another."""
        return np.concatenate([np.asarray(self.tgt[i], dtype=np.int64) for i in rows]) if len(rows) else \
            np.zeros(0, dtype=np.int64)

    def target_tokens(self, rows: np.ndarray | None = None) -> int:
        """Target tokens of `rows` (all rows by default), <eos> included: what a batch trains on."""
        lengths = self.tgt_lengths if rows is None else self.tgt_lengths[rows]
        return int(lengths.sum(dtype=np.int64)) + len(lengths)

    def batches(self, batch_tokens: int, seed: int | None = None, rows: np.ndarray | None = None) -> BatchPlan:
        """Rows grouped by length so a batch wastes little on padding, about `batch_tokens`
        target tokens each. With a seed, lengths are jittered and batches shuffled (same seed,
        same order: that is what makes resuming mid-epoch exact). `rows`: plan only those rows
        (the batches then hold their row numbers). The keys, sort and shuffle draw what the
        row-by-row loop before them drew, so the batches are that loop's (tests/test_data.py)."""
        lengths = self.tgt_lengths if rows is None else self.tgt_lengths[rows]
        rng = np.random.default_rng(seed) if seed is not None else None
        if rng is not None:
            keys = rng.uniform(0, 1, len(lengths))
            keys += lengths + 1  # (length with <eos>) + jitter, as the loop added them
        order = np.argsort(keys if rng is not None else lengths, kind="stable")
        order = order.astype(np.int32 if len(lengths) < 2**31 else np.int64)
        starts = group_starts(lengths[order] + 1, batch_tokens)  # int32: 4 bytes a pair while planning
        visit = np.arange(len(starts))
        if rng is not None:
            rng.shuffle(visit)  # the same draws as shuffling the list of groups
        if rows is not None:
            order = np.asarray(rows)[order]
        return BatchPlan(order, starts, visit)

    def epoch_batches(self, batch_tokens: int, seed: int, epoch: int) -> BatchPlan:
        """Epoch `epoch`'s batches (from 0): a fixed order per seed and epoch, so a resumed epoch
        goes on at the same batch."""
        return self.batches(batch_tokens, seed=seed + epoch)

    def token_text(self, rows: np.ndarray) -> tuple[list[str], list[str]]:
        """The tokenised source and target text of `rows` (sorted ascending), for what needs words
        outside the vocabularies (the lexicon): from the frame, or streamed from the split's
        parquet file in record batches, keeping only these rows."""
        if self.frame is not None:
            picked = self.frame.iloc[rows]
            return picked["src_tokens"].tolist(), picked["tgt_tokens"].tolist()
        src, tgt, seen = [], [], 0
        for record_batch in storage.parquet_batches(self.text_file, ["src_tokens", "tgt_tokens"]):
            lo, hi = np.searchsorted(rows, [seen, seen + record_batch.num_rows])
            wanted = (rows[lo:hi] - seen).tolist()
            if wanted:
                src += record_batch.column("src_tokens").take(wanted).to_pylist()
                tgt += record_batch.column("tgt_tokens").take(wanted).to_pylist()
            seen += record_batch.num_rows
        if seen != len(self):
            raise ValueError(f"{self.text_file} has {seen} pairs but its ids files {len(self)}: "
                             "run `vamos prepare` again")
        return src, tgt


@dataclass
class Corpus:
    """What training reads from `prepare`'s output."""

    train: ParallelData
    valid: ParallelData
    src_vocab: Vocab
    tgt_vocab: Vocab


def load_corpus(root: Path = storage.PREPARED, right_to_left: bool = False) -> Corpus:
    """The training split's ids memory-mapped (its text is never read whole), the validation
    split's with its text (validation BLEU decodes the sentences; the split is small). With
    `right_to_left`, both splits' batches hold the targets backwards (validation loss included)."""
    src_vocab, tgt_vocab = load_vocabs(root)
    return Corpus(ParallelData.open(root, "train", right_to_left=right_to_left),
                  ParallelData.open(root, "valid", with_text=True, right_to_left=right_to_left),
                  src_vocab, tgt_vocab)


Item = TypeVar("Item")
Built = TypeVar("Built")


def prefetched(items: Iterable[Item], build: Callable[[Item], Built]) -> Iterator[tuple[Item, Built]]:
    """(item, build(item)) in order, the next item's built in a background thread while the caller
    works on this one (a one-item prefetch: loading overlaps compute). `build` must not draw
    random numbers, so results do not depend on the overlap."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = None
        for item in items:
            future = pool.submit(build, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()

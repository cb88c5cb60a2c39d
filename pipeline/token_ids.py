"""Token ids of one split and side, binarised: one flat array of ids and one of offsets, both read
memory-mapped (in the spirit of fairseq's binarised datasets). Only what a loader asks for comes
into memory; processes that map the same file share one copy in the page cache.

    {split}.{side}.ids.npy      uint32, every sentence's ids one after another
    {split}.{side}.offsets.npy  int64, n + 1 entries: sentence i is ids[offsets[i]:offsets[i + 1]]
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline import storage

ID_DTYPE = np.uint32


def ids_path(root: Path, split: str, side: str) -> Path:
    return Path(root) / f"{split}.{side}.ids.npy"


def offsets_path(root: Path, split: str, side: str) -> Path:
    return Path(root) / f"{split}.{side}.offsets.npy"


def flatten(sequences: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, lengths) of a list of id sequences: one shard's worth, as a task returns it."""
    sequences = list(sequences)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.fromiter((i for s in sequences for i in s), dtype=ID_DTYPE, count=int(lengths.sum()))
    return flat, lengths


def write(root: Path, split: str, side: str, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write a split's side from (flat ids, lengths) chunks in order, streamed: one chunk in memory
    at a time (the offsets, 8 bytes a sentence, are kept until the end). Both files are atomic."""
    lengths_seen: list[np.ndarray] = []
    with storage.atomic_path(ids_path(root, split, side)) as tmp_ids:
        with open(tmp_ids, "wb") as raw:
            raw.write(b"\0" * HEADER_BYTES)  # room for the .npy header, written once the length is known
            total = 0
            for flat, lengths in chunks:
                raw.write(np.ascontiguousarray(flat, dtype=ID_DTYPE).tobytes())
                lengths_seen.append(np.asarray(lengths, dtype=np.int64))
                total += len(flat)
            raw.seek(0)
            raw.write(npy_header(total))
    lengths = np.concatenate(lengths_seen) if lengths_seen else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    with storage.atomic_path(offsets_path(root, split, side)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, offsets)


HEADER_BYTES = 128


def npy_header(length: int) -> bytes:
    """A .npy (version 1.0) header of exactly HEADER_BYTES for a 1-D uint32 array of `length`."""
    text = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (np.dtype(ID_DTYPE).str, length)
    header = np.lib.format.MAGIC_PREFIX + bytes([1, 0]) + (HEADER_BYTES - 10).to_bytes(2, "little")
    return header + text.encode("latin1").ljust(HEADER_BYTES - 11) + b"\n"


class TokenIds:
    """A split's side, memory-mapped: `ids[i]` is sentence i's ids."""

    def __init__(self, root: Path, split: str, side: str):
        self.ids = np.load(ids_path(root, split, side), mmap_mode="r")
        self.offsets = np.load(offsets_path(root, split, side), mmap_mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

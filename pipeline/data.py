"""Tokenised splits as id tensors, and length-bucketed batches with a token budget: the one loader
that training and the benchmarks share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import storage
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


class ParallelData:
    """One split encoded with the vocabularies."""

    def __init__(self, frame: pd.DataFrame, src_vocab: Vocab, tgt_vocab: Vocab):
        self.frame = frame.reset_index(drop=True)
        self.src = [src_vocab.encode(s.split()) for s in self.frame["src_tokens"]]
        self.tgt = [tgt_vocab.encode(s.split()) for s in self.frame["tgt_tokens"]]

    def __len__(self) -> int:
        return len(self.src)

    def make_batch(self, rows: np.ndarray) -> Batch:
        src = [self.src[i] or [PAD_ID] for i in rows]
        tgt = [self.tgt[i] for i in rows]
        return Batch(
            src=pad(src),
            src_len=torch.tensor([max(len(self.src[i]), 1) for i in rows]),
            tgt_in=pad([[SOS_ID] + t for t in tgt]),
            tgt_out=pad([t + [EOS_ID] for t in tgt]),
            index=rows,
        )

    def batches(self, batch_tokens: int, seed: int | None = None) -> list[np.ndarray]:
        """Rows grouped by length so a batch wastes little on padding, about `batch_tokens`
        target tokens each. With a seed, lengths are jittered and batches shuffled (same seed,
        same order: that is what makes resuming mid-epoch exact)."""
        lengths = np.array([len(t) + 1 for t in self.tgt], dtype=np.float64)
        rng = np.random.default_rng(seed) if seed is not None else None
        keys = lengths + (rng.uniform(0, 1, len(lengths)) if rng is not None else 0)
        order = np.argsort(keys, kind="stable")
        groups, current, longest = [], [], 0
        for row in order:
            longest_if_added = max(longest, lengths[row])
            if current and longest_if_added * (len(current) + 1) > batch_tokens:
                groups.append(np.array(current))
                current, longest_if_added = [], lengths[row]
            current.append(row)
            longest = longest_if_added
        if current:
            groups.append(np.array(current))
        if rng is not None:
            rng.shuffle(groups)
        return groups

    def epoch_batches(self, batch_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
        """Epoch `epoch`'s batches (from 0): a fixed order per seed and epoch, so a resumed epoch
        goes on at the same batch."""
        return self.batches(batch_tokens, seed=seed + epoch)


@dataclass
class Corpus:
    """What training reads from `prepare`'s output."""

    train: ParallelData
    valid: ParallelData
    src_vocab: Vocab
    tgt_vocab: Vocab


def load_corpus(root: Path = storage.PREPARED) -> Corpus:
    src_vocab, tgt_vocab = load_vocabs(root)
    return Corpus(ParallelData(load_split("train", root), src_vocab, tgt_vocab),
                  ParallelData(load_split("valid", root), src_vocab, tgt_vocab), src_vocab, tgt_vocab)

"""Word-level tokenisation (Moses rules), detokenisation, and vocabularies."""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from sacremoses import MosesDetokenizer, MosesTokenizer

from pipeline import storage

PAD, UNK, SOS, EOS = "<pad>", "<unk>", "<sos>", "<eos>"
SPECIALS = (PAD, UNK, SOS, EOS)
PAD_ID, UNK_ID, SOS_ID, EOS_ID = range(4)

# Typographic quotes become ASCII ones so that "God’s" splits like "God's" and detokenises back.
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "«": '"', "»": '"'})


@dataclass(frozen=True)
class Tokenizer:
    lang: str
    lowercase: bool

    @functools.cached_property
    def _moses(self) -> MosesTokenizer:
        return MosesTokenizer(lang=self.lang)

    @functools.cached_property
    def _demoses(self) -> MosesDetokenizer:
        return MosesDetokenizer(lang=self.lang)

    def tokenize(self, text: str) -> list[str]:
        tokens = self.tokenize_cased(text)
        return [t.lower() for t in tokens] if self.lowercase else tokens

    def tokenize_cased(self, text: str) -> list[str]:
        """The same tokens with their case kept: what unknown words are copied from. (Lowercasing
        comes after tokenising because Moses uses case to tell a sentence end from an abbreviation.)"""
        return self._moses.tokenize(text.translate(_QUOTES), escape=False, aggressive_dash_splits=True)

    def detokenize(self, tokens: Sequence[str]) -> str:
        return self._demoses.detokenize([t for t in tokens if t not in SPECIALS or t == UNK]).replace(" @-@ ", "-")


def tokenizers(params) -> tuple[Tokenizer, Tokenizer]:
    """The (source, target) tokenisers of `params.prepare`: what prepare tokenised the data with,
    so training and translation tokenise alike."""
    cfg = params.prepare
    return Tokenizer(cfg.src_lang, cfg.lowercase_src), Tokenizer(cfg.tgt_lang, cfg.lowercase_tgt)


class Vocab:
    """Token <-> id, with the four specials first so their ids are fixed."""

    def __init__(self, tokens: Iterable[str]):
        self.itos: list[str] = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_freq: int, max_size: int) -> "Vocab":
        counts = Counter(t for s in sentences for t in s)
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls(ranked[: max_size - len(SPECIALS)])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(t, UNK_ID) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, SOS_ID):
                out.append(self.itos[i])
        return out

    def save(self, path: str | Path) -> None:
        storage.write_json(path, self.itos)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        return cls(storage.read_json(path))

"""A translation dictionary learned from the model's own attention over the training pairs.

Each target word of a training pair is aligned to the source word its attention weighs most when
teacher-forced (the alignment unknown-word replacement relies on too). Counting the aligned word
pairs gives, for each source word, its most frequent target words. Two uses:
- unknown-word replacement: an output <unk> becomes the most frequent translation of the source
  word it attends to (a name learned in training, "naomi" -> "Noemí"), not that word copied;
- a decoding shortlist, as Marian's: each batch scores only its source words' likely translations
  and the most frequent target words, instead of the whole output vocabulary.
Words are kept as strings, so a translation can be a word outside the target vocabulary."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.text import EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocab

# How many translations each source word keeps, and how many of the most frequent target words
# every shortlist holds (Marian's usual `--shortlist lex.s2t 100 100` keeps 100 of each).
TRANSLATIONS_PER_WORD = 20
FREQUENT_TARGETS = 1000


@dataclass
class Lexicon:
    translations: dict[str, list[str]]  # source word -> target words, most frequent first
    per_word: int = TRANSLATIONS_PER_WORD  # what a shortlist takes of each source word's translations
    frequent: int = FREQUENT_TARGETS  # and how many of the most frequent target words

    def best(self, source_word: str) -> str | None:
        candidates = self.translations.get(source_word)
        return candidates[0] if candidates else None

    def shortlist(self, sources: list[list[str]], tgt_vocab: Vocab) -> torch.Tensor:
        """The target ids worth scoring for these source sentences: their words' translations in
        the vocabulary, the most frequent target words (the vocabulary is ranked by frequency),
        <unk> and <eos>."""
        ids = set(range(len(SPECIALS), min(len(SPECIALS) + self.frequent, len(tgt_vocab)))) | {UNK_ID, EOS_ID}
        for word in {w for sentence in sources for w in sentence}:
            translations = self.translations.get(word, [])[: self.per_word]
            ids.update(tgt_vocab.stoi[t] for t in translations if t in tgt_vocab.stoi)
        return torch.tensor(sorted(ids), dtype=torch.long)

    def to_dict(self) -> dict:
        """Plain strings and lists, for a checkpoint that loads with weights_only=True."""
        return {"translations": self.translations, "per_word": self.per_word, "frequent": self.frequent}

    @classmethod
    def from_dict(cls, data: dict) -> "Lexicon":
        translations = {word: list(targets) for word, targets in data["translations"].items()}
        return cls(translations, data.get("per_word", TRANSLATIONS_PER_WORD), data.get("frequent", FREQUENT_TARGETS))


def aligned_pairs(model, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor,
                  tgt_out: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, source position, target position) for every real target word of a teacher-forced
    batch, aligned by the attention's argmax."""
    with torch.no_grad():
        _, weights = model(src, src_len, tgt_in)  # B x T x S
    aligned = weights.argmax(dim=2)
    real = (tgt_out != PAD_ID) & (tgt_out != EOS_ID)
    rows, positions = real.nonzero(as_tuple=True)
    return list(zip(rows.tolist(), aligned[rows, positions].tolist(), positions.tolist()))


def lexicon_rows(pairs: int, max_pairs: int | None, seed: int) -> np.ndarray | None:
    """The rows the lexicon reads: all (None) when there are at most `max_pairs`, else a fixed
    sample of that many for this seed, in row order (the lexicon's cost stays bounded)."""
    if max_pairs is None or pairs <= max_pairs:
        return None
    return np.sort(np.random.default_rng(seed).choice(pairs, size=max_pairs, replace=False))


def build_lexicon(model, data, batch_tokens: int = 4000, per_word: int = TRANSLATIONS_PER_WORD,
                  device: torch.device | str = "cpu", max_pairs: int | None = None, seed: int = 0) -> Lexicon:
    """The dictionary of `model`'s attention alignments over `data` (a pipeline.data.ParallelData,
    usually the training split), or over a seeded sample of `max_pairs` of its rows: each source
    word's `per_word` most frequent aligned target words, as strings from the tokenised pairs, so
    words outside the vocabularies count too."""
    was_training = model.training
    model.eval()
    counts: dict[str, Counter] = defaultdict(Counter)
    rows = lexicon_rows(len(data), max_pairs, seed)
    text_rows = np.arange(len(data)) if rows is None else rows
    src_text, tgt_text = data.token_text(text_rows)
    for batch_rows in data.batches(batch_tokens, rows=rows):
        batch = data.make_batch(batch_rows).to(device)
        at = np.searchsorted(text_rows, batch.index)  # each row's place in the text read
        src_words = [src_text[i].split() for i in at]
        tgt_words = [tgt_text[i].split() for i in at]
        for row, src_pos, tgt_pos in aligned_pairs(model, batch.src, batch.src_len, batch.tgt_in, batch.tgt_out):
            if src_pos < len(src_words[row]):  # an empty source is one <pad> position
                if data.right_to_left:  # the batch holds the target backwards (a right-to-left model)
                    tgt_pos = len(tgt_words[row]) - 1 - tgt_pos
                counts[src_words[row][src_pos]][tgt_words[row][tgt_pos]] += 1
    model.train(was_training)
    return Lexicon({word: [t for t, _ in targets.most_common(per_word)] for word, targets in counts.items()})

"""Word2vec embeddings per language (gensim): training, evaluation, projection, and the
matrices that initialise the seq2seq embedding layers."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline import storage
from pipeline.config import EmbedParams
from pipeline.text import PAD_ID, Vocab

log = logging.getLogger(__name__)

# Words whose neighbours are shown in the report, where the vocabulary has them.
PROBES = {
    "en": ["god", "king", "water", "love", "go", "son", "city", "bread"],
    "es": ["Dios", "rey", "agua", "amor", "ir", "hijo", "ciudad", "pan"],
}


def stable_hash(text: str) -> int:
    """gensim's `hashfxn`: Python's `hash` is salted per process (PYTHONHASHSEED), this is not.
    Module-level, so that a saved model can pickle it."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


class TokenStream:
    """The whitespace-split sentences of one column of a parquet file, read a batch of rows at a
    time, so that memory holds one batch, not the corpus. Restartable: gensim iterates it once for
    the vocabulary and once per epoch. With `max_tokens`, a budget for corpora larger than word2vec
    needs, only every k-th sentence is read, k the smallest that brings the column within the
    budget (an evenly spread sample: a prefix would leave out the later sources), and every pass
    ends after the same `max_tokens` tokens (the last sentence cut short). `every` sets k itself."""

    def __init__(self, path: Path, column: str, max_tokens: int | None = None, every: int | None = None,
                 batch_rows: int = 65536):
        import pyarrow.parquet as pq

        self.path, self.column, self.max_tokens, self.batch_rows = Path(path), column, max_tokens, batch_rows
        names = pq.read_schema(self.path).names
        if column not in names:
            raise ValueError(f"{self.path}: no column {column!r} (columns: {', '.join(names)})")
        self.every = every or (1 if max_tokens is None else sample_every(self.count_tokens(), max_tokens))

    def batches(self):
        return (b.column(0) for b in storage.parquet_batches(self.path, [self.column], self.batch_rows))

    def count_tokens(self) -> int:
        """The column's tokens, as str.split counts them (in Arrow, without Python strings)."""
        import pyarrow.compute as pc

        return sum(pc.sum(pc.list_value_length(pc.utf8_split_whitespace(c))).as_py() or 0 for c in self.batches())

    def __iter__(self):
        import numpy as np

        budget, row = self.max_tokens, 0
        for column in self.batches():
            texts = column.take(np.arange(-row % self.every, len(column), self.every)).to_pylist()
            row += len(column)
            for text in texts:
                tokens = text.split()
                if budget is not None:
                    if budget <= len(tokens):  # budget stays >= 1: it only falls by shorter sentences
                        yield tokens[:budget]
                        return
                    budget -= len(tokens)
                yield tokens


def sample_every(total_tokens: int, max_tokens: int | None) -> int:
    """Which sentences a budget of `max_tokens` reads, of a column of `total_tokens`: every k-th,
    with k the smallest that brings the sample within the budget (1 where the whole fits)."""
    return 1 if max_tokens is None else max(1, -(-total_tokens // max_tokens))


def train_word2vec(sentences, cfg: EmbedParams, seed: int):
    """`sentences`: a restartable iterable of token lists (a list, a TokenStream). Deterministic
    with one worker (the default): seeded weights, a stable hash. Several workers update the shared
    weights in a thread-timing-dependent order."""
    from gensim.models import Word2Vec

    return Word2Vec(sentences=sentences, sg=cfg.sg, vector_size=cfg.vector_size, window=cfg.window,
                    negative=cfg.negative, sample=cfg.sample, min_count=cfg.min_count, epochs=cfg.epochs,
                    max_final_vocab=cfg.max_vocab, workers=cfg.workers, seed=seed, hashfxn=stable_hash)


def save_vectors(path: Path, vectors) -> None:
    with storage.atomic_path(path) as tmp:
        vectors.save_word2vec_format(str(tmp), binary=True)


def load_vectors(path: Path):
    from gensim.models import KeyedVectors

    return KeyedVectors.load_word2vec_format(str(path), binary=True)


def evaluate_vectors(vectors, lang: str) -> dict:
    """Analogy accuracy and word-similarity correlation (English: gensim's bundled test sets),
    and nearest neighbours of a few probe words."""
    report: dict = {"words": len(vectors.index_to_key), "dim": vectors.vector_size}
    if lang == "en":
        from gensim.test.utils import datapath

        accuracy, sections = vectors.evaluate_word_analogies(datapath("questions-words.txt"))
        attempted = sum(len(s["correct"]) + len(s["incorrect"]) for s in sections if s["section"] == "Total accuracy")
        report["analogy_accuracy"] = round(float(accuracy), 4)
        report["analogy_questions_covered"] = attempted
        try:
            _, spearman, oov = vectors.evaluate_word_pairs(datapath("wordsim353.tsv"))
        except ValueError:  # gensim raises when no pair is in the vocabulary (small corpora)
            spearman, oov = (float("nan"),), 100.0
        report["wordsim353_spearman"] = None if np.isnan(spearman[0]) else round(float(spearman[0]), 4)
        report["wordsim353_oov_percent"] = round(float(oov), 2)
    probes = [w for w in PROBES.get(lang, []) if w in vectors.key_to_index] or vectors.index_to_key[:5]
    report["neighbours"] = {w: [n for n, _ in vectors.most_similar(w, topn=6)] for w in probes}
    return report


def plot_projection(vectors, path: Path, title: str, words: int = 150) -> None:
    """PCA of the most frequent words to 2-D, labelled: a quick look at what word2vec learned."""
    plt = storage.pyplot()

    keys = [k for k in vectors.index_to_key if any(c.isalpha() for c in k)][:words]
    points = np.stack([vectors[k] for k in keys])
    points = points - points.mean(0)
    _, _, components = np.linalg.svd(points, full_matrices=False)
    xy = points @ components[:2].T
    fig, ax = plt.subplots(figsize=(11, 9))
    ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.5)
    for (x, y), word in zip(xy, keys):
        ax.annotate(word, (x, y), fontsize=7, alpha=0.8)
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
    storage.save_figure(path, fig)


def embedding_matrix(vocab: Vocab, path: Path, std: float | None, seed: int) -> tuple[torch.Tensor, float]:
    """A vocab-sized matrix: word2vec vectors where the word has one, random ones of the same
    scale elsewhere; returns it with the share of the vocabulary covered.

    Word2vec's scale depends on corpus size and epochs (std 0.13 on the Bible, 0.02 on a few
    hundred sentences). On the Bible it is the right scale for the tied output layer (measured:
    valid BLEU 29.7 against 14.9 when rescaled to std 1.0); tiny corpora need `std` to rescale
    their barely-trained vectors, or the output layer's logits start too flat to learn from."""
    vectors = load_vectors(path)
    covered = [(i, vectors.key_to_index[w]) for i, w in enumerate(vocab.itos) if w in vectors.key_to_index]
    pretrained = vectors.vectors[[k for _, k in covered]].astype(np.float32)
    own_std = float(pretrained.std()) if covered else 0.1
    std = std or own_std
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(len(vocab), vectors.vector_size, generator=generator) * std
    if covered:
        matrix[[i for i, _ in covered]] = torch.from_numpy(pretrained * (std / max(own_std, 1e-8)))
    matrix[PAD_ID] = 0.0
    coverage = len(covered) / max(len(vocab) - 4, 1)
    return matrix, coverage

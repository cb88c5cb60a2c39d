"""`vamos embed` streams the train split: TokenStream yields the file's sentences in order, a
batch at a time, restarts for every pass, stops at a token budget; the vectors equal those of
the in-memory list the stage used to build."""
import numpy as np
import pandas as pd
import pytest

from pipeline.config import EmbedParams
from pipeline.embeddings import TokenStream, sample_every, stable_hash, train_word2vec
from tests.conftest import tiny_pairs

SMALL = dict(vector_size=16, epochs=3, min_count=1)


@pytest.fixture
def train_file(tmp_path):
    pairs = tiny_pairs() * 3  # 840 sentences: several of the 100-row batches below, and a part batch
    path = tmp_path / "train.parquet"
    pd.DataFrame({"src_tokens": [s.lower().replace(".", " .") for s, _ in pairs],
                  "tgt_tokens": [t.replace(".", " .") for _, t in pairs]}).to_parquet(path, row_group_size=250)
    return path


def sentences_of(path, column):
    return [text.split() for text in pd.read_parquet(path)[column]]


def test_stream_yields_the_sentences_in_order_and_restarts(train_file):
    stream = TokenStream(train_file, "tgt_tokens", batch_rows=100)
    expected = sentences_of(train_file, "tgt_tokens")
    assert list(stream) == expected
    assert list(stream) == expected  # a second pass, as gensim makes one per epoch


@pytest.mark.parametrize("budget", [1, 9, 10, 1001])
def test_max_tokens_stops_every_pass_at_the_budget(train_file, budget):
    stream = TokenStream(train_file, "src_tokens", max_tokens=budget, every=1, batch_rows=100)
    flat = [token for sentence in sentences_of(train_file, "src_tokens") for token in sentence]
    for _ in range(2):
        assert [token for sentence in stream for token in sentence] == flat[:budget]


def test_a_budget_samples_every_kth_sentence_within_it(train_file):
    sentences = sentences_of(train_file, "src_tokens")
    total = sum(map(len, sentences))
    assert TokenStream(train_file, "src_tokens").count_tokens() == total
    stream = TokenStream(train_file, "src_tokens", max_tokens=total // 3, batch_rows=100)
    assert stream.every == 3 == sample_every(total, total // 3)
    assert [t for s in stream for t in s] == [t for s in sentences[::3] for t in s][:total // 3]


def test_a_budget_beyond_the_corpus_yields_it_all(train_file):
    assert list(TokenStream(train_file, "src_tokens", max_tokens=10**9)) == sentences_of(train_file, "src_tokens")


@pytest.mark.parametrize("every", [1, 3, 7, 100])
def test_every_kth_sentence_across_batches(train_file, every):
    """Batches of 100 rows: the sample's stride runs on across batch boundaries."""
    expected = sentences_of(train_file, "tgt_tokens")[::every]
    stream = TokenStream(train_file, "tgt_tokens", every=every, batch_rows=100)
    assert list(stream) == expected
    assert list(stream) == expected


@pytest.mark.parametrize("total, budget, every", [(10, None, 1), (10, 10, 1), (10, 100, 1), (11, 10, 2),
                                                   (30, 10, 3), (31, 10, 4)])
def test_sample_every_brings_the_sample_within_the_budget(total, budget, every):
    assert sample_every(total, budget) == every


def test_a_missing_column_names_the_file(train_file):
    with pytest.raises(ValueError, match=rf"{train_file.name}: no column 'src_ids'"):
        TokenStream(train_file, "src_ids")


def test_max_vocab_caps_the_vocabulary(train_file):
    stream = TokenStream(train_file, "tgt_tokens")
    whole = train_word2vec(stream, EmbedParams(**SMALL), seed=1)
    capped = train_word2vec(stream, EmbedParams(**SMALL, max_vocab=10), seed=1)
    assert len(whole.wv) > 10
    assert 0 < len(capped.wv) <= 10
    assert set(capped.wv.index_to_key) <= set(whole.wv.index_to_key[:10])


def test_streamed_vectors_equal_the_list_based_ones(train_file):
    """What `embed` computed before it streamed: gensim on the whole split as a list in memory."""
    from gensim.models import Word2Vec

    cfg = EmbedParams(**SMALL)
    streamed = train_word2vec(TokenStream(train_file, "tgt_tokens", batch_rows=100), cfg, seed=7)
    listed = Word2Vec(sentences=sentences_of(train_file, "tgt_tokens"), sg=cfg.sg, vector_size=cfg.vector_size,
                      window=cfg.window, negative=cfg.negative, sample=cfg.sample, min_count=cfg.min_count,
                      epochs=cfg.epochs, workers=1, seed=7, hashfxn=stable_hash)
    assert streamed.wv.index_to_key == listed.wv.index_to_key
    np.testing.assert_array_equal(streamed.wv.vectors, listed.wv.vectors)

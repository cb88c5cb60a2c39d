from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import token_ids
from pipeline.data import ParallelData
from pipeline.decode import Translator, beam_search, replace_unknowns
from pipeline.lexicon import Lexicon, build_lexicon, lexicon_rows
from pipeline.text import EOS_ID, PAD_ID, SOS_ID, UNK_ID, Tokenizer, Vocab
from tests.test_model import make_model, source_batch


class DiagonalAttention(torch.nn.Module):
    """Target word t attends to source word t (the last one past the end): known alignments."""

    def forward(self, src, src_len, tgt_in):
        positions = torch.arange(tgt_in.size(1)).unsqueeze(0).clamp(max=src_len.unsqueeze(1) - 1)
        weights = torch.nn.functional.one_hot(positions, src.size(1)).float()
        return None, weights


def parallel(pairs: list[tuple[str, str]], right_to_left: bool = False) -> ParallelData:
    frame = pd.DataFrame({"src_tokens": [s for s, _ in pairs], "tgt_tokens": [t for _, t in pairs]})
    src_vocab = Vocab(sorted({w for s, _ in pairs for w in s.split()}))
    tgt_vocab = Vocab(sorted({w for _, t in pairs for w in t.split()}))
    return ParallelData.from_frame(frame, src_vocab, tgt_vocab, right_to_left)


def test_a_right_to_left_models_lexicon_pairs_each_source_word_with_the_word_it_attended_from():
    """The batches of a right-to-left training hold each target backwards: the diagonal attention's
    step 0 is the last word ("z"), which attends to the first source word ("a")."""
    pairs = [("a b c", "x y z"), ("a d", "x w")]
    assert build_lexicon(DiagonalAttention(), parallel(pairs)).translations == \
        {"a": ["x"], "b": ["y"], "c": ["z"], "d": ["w"]}
    backward = build_lexicon(DiagonalAttention(), parallel(pairs, right_to_left=True)).translations
    assert {word: sorted(targets) for word, targets in backward.items()} == \
        {"a": ["w", "z"], "b": ["y"], "c": ["x"], "d": ["x"]}


def test_each_source_word_keeps_its_most_frequently_aligned_target_words():
    data = parallel([("naomi went", "Noemí fue"), ("naomi came", "Noemí vino"), ("naomi went", "ella fue")])
    lexicon = build_lexicon(DiagonalAttention(), data)
    assert lexicon.translations == {"naomi": ["Noemí", "ella"], "went": ["fue"], "came": ["vino"]}
    assert lexicon.best("naomi") == "Noemí" and lexicon.best("ruth") is None


def test_build_lexicon_runs_on_the_real_model_and_leaves_it_as_it_was():
    data = parallel([("a b c", "x y"), ("b c", "y z w"), ("c", "w")])
    model = make_model(src_vocab=len(data.frame) + 10, tgt_vocab=12).train()
    lexicon = build_lexicon(model, data, per_word=2)
    assert model.training
    assert lexicon.translations and set(lexicon.translations) <= {"a", "b", "c"}
    assert all(1 <= len(t) <= 2 and set(t) <= {"x", "y", "z", "w"} for t in lexicon.translations.values())


def test_the_lexicon_survives_a_weights_only_checkpoint(tmp_path):
    lexicon = Lexicon({"naomi": ["Noemí", "ella"], "went": ["fue"]}, per_word=10, frequent=50)
    torch.save({"lexicon": lexicon.to_dict()}, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert Lexicon.from_dict(loaded["lexicon"]) == lexicon


def test_a_shortlist_holds_the_batchs_translations_the_frequent_words_unk_and_eos():
    tgt_vocab = Vocab(["de", "y", "Noemí", "fue", "vino", "casa"])  # ranked by frequency
    lexicon = Lexicon({"naomi": ["Noemí", "Rut", "ella"], "went": ["fue"], "came": ["vino"]}, frequent=2)
    ids = lexicon.shortlist([["naomi", "went"]], tgt_vocab).tolist()
    # The two most frequent words and the translations in the vocabulary ("Rut" is not in it).
    expected = {UNK_ID, EOS_ID, *(tgt_vocab.stoi[w] for w in ("de", "y", "Noemí", "fue"))}
    assert set(ids) == expected and ids == sorted(ids)
    assert PAD_ID not in ids and SOS_ID not in ids


def test_a_shortlist_of_every_word_decodes_as_the_full_vocabulary():
    model = make_model(tgt_vocab=10)
    src, src_len = source_batch()
    full = beam_search(model, src, src_len, beam_size=3)
    everything = beam_search(model, src, src_len, beam_size=3, shortlist=torch.arange(10))
    assert [h.tokens for h in full] == [h.tokens for h in everything]
    assert [h.score for h in full] == pytest.approx([h.score for h in everything], abs=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_with_a_shortlist_emits_only_its_words(beam_size):
    model = make_model(tgt_vocab=12)
    src, src_len = source_batch()
    allowed = {UNK_ID, EOS_ID, 5, 7}
    for hyp in beam_search(model, src, src_len, beam_size=beam_size, shortlist=torch.tensor([5, 7])):
        assert set(hyp.tokens) <= allowed


def test_unknown_words_are_translated_by_the_dictionary_where_it_has_the_word():
    attention = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).numpy()
    source = ["Naomi", "Xyz"]
    assert replace_unknowns(["<unk>", "<unk>"], attention, source, ["Noemí", None]) == ["Noemí", "Xyz"]


def test_a_translator_uses_its_lexicon_only_when_asked():
    model = make_model(src_vocab=12, tgt_vocab=10)
    src_vocab, tgt_vocab = Vocab(["a", "b", "c", "d"]), Vocab(["u", "v", "w", "x", "y", "z"])
    plain = Translator(model, Tokenizer("en", True), Tokenizer("es", False), src_vocab, tgt_vocab)
    with pytest.raises(ValueError, match="lexicon"):
        plain.translate_tokens([["a"]], shortlist=True)
    lexicon = Lexicon({w: ["u"] for w in "abcd"}, frequent=0)
    with_lexicon = Translator(model, Tokenizer("en", True), Tokenizer("es", False), src_vocab, tgt_vocab,
                              lexicon=lexicon)
    sentences = [["a", "b"], ["c", "d", "a"]]
    assert [w for w, _ in with_lexicon.translate_tokens(sentences, beam_size=2)] == \
        [w for w, _ in plain.translate_tokens(sentences, beam_size=2)]
    for words, _ in with_lexicon.translate_tokens(sentences, beam_size=2, shortlist=True, unk_dictionary=True):
        assert set(words) <= {"u", "<unk>"} | set(sentences[0] + sentences[1])  # an <unk> copies its source word


def test_evaluate_lexicon_switches_need_train_lexicon(tmp_path):
    import yaml

    from pipeline.config import ParamsError, load_params
    from tests.conftest import small_params

    for switch in ("unk_dictionary", "shortlist"):
        path = tmp_path / f"{switch}.yaml"
        path.write_text(yaml.safe_dump(small_params(**{f"evaluate.{switch}": True, "train.lexicon": False})))
        with pytest.raises(ParamsError, match=rf"evaluate\.{switch}.*train\.lexicon: true"):
            load_params(path)
        path.write_text(yaml.safe_dump(small_params(**{f"evaluate.{switch}": True, "train.lexicon": True})))
        assert getattr(load_params(path).evaluate, switch)


def test_training_with_lexicon_stores_it_in_model_pt_and_evaluate_uses_it(tmp_path, monkeypatch, mlflow_store,
                                                                           caplog):
    from pipeline.config import load_params
    from pipeline.evaluate import evaluate, source_tokens, translate_split
    from pipeline.model import load_translator
    from pipeline.stages import embed, ingest, prepare
    from pipeline.train import train
    from tests.conftest import make_project, small_params

    # 150 steps: a model that says words (at 20 it says only <eos>, and the shortlist check below
    # would hold for any decoder).
    root = make_project(tmp_path / "project", small_params(**{
        "train.lexicon": True, "train.max_steps": 150, "evaluate.unk_dictionary": True, "evaluate.shortlist": True}))
    monkeypatch.chdir(root)
    params = load_params()
    for stage in (ingest, prepare, embed):
        stage(params)
    train(params)
    model_file = root / "models" / "seq2seq" / "model.pt"
    assert "lexicon" in torch.load(model_file, weights_only=True)
    translator = load_translator(model_file)
    assert translator.lexicon is not None and translator.lexicon.translations
    first = model_file.read_bytes()
    train(params)  # the finished training again: the same model gives the same file, lexicon and all
    assert model_file.read_bytes() == first

    test = pd.read_parquet(root / "data" / "prepared" / "test.parquet")
    caplog.clear()
    metrics = evaluate(translator, test, params.evaluate, root / "reports")
    assert metrics["sentences"] == len(test) and "has no lexicon" not in caplog.text
    # Evaluate's decoding scores only the shortlist: with no frequent words in it, one translation
    # per source word and one sentence a batch, each output word the vocabulary knows is the best
    # translation of one of its own source words.
    translator.lexicon = replace(translator.lexicon, frequent=0, per_word=1)
    sources, _ = source_tokens(translator, test)
    vocab = translator.tgt_vocab
    outputs = translate_split(translator, test, params.evaluate.model_copy(update={"batch_size": 1}))
    for source, (words, _) in zip(sources, outputs, strict=True):
        allowed = {vocab.itos[i] for i in translator.lexicon.shortlist([source], vocab).tolist()}
        assert {w for w in words if w in vocab.stoi} <= allowed, (source, words)


def test_a_model_without_a_lexicon_is_decoded_plainly_when_the_switches_are_on():
    from pipeline.config import EvaluateParams
    from pipeline.evaluate import translate_split

    translator = Translator(make_model(src_vocab=12, tgt_vocab=10), Tokenizer("en", True), Tokenizer("es", False),
                            Vocab(["a", "b", "c", "d"]), Vocab(["u", "v", "w", "x", "y", "z"]))
    frame = pd.DataFrame({"src": ["a b", "c d a"], "src_tokens": ["a b", "c d a"]})
    on = translate_split(translator, frame, EvaluateParams(unk_dictionary=True, shortlist=True, max_len_ratio=2))
    off = translate_split(translator, frame, EvaluateParams(max_len_ratio=2))
    assert [w for w, _ in on] == [w for w, _ in off]


def test_the_lexicon_reads_a_fixed_sample_of_a_large_split_and_all_of_a_small_one(tmp_path):
    assert lexicon_rows(10, 10, seed=1) is None and lexicon_rows(10, None, seed=1) is None
    sample = lexicon_rows(1000, 50, seed=1)
    assert len(sample) == len(set(sample)) == 50 and list(sample) == sorted(sample)
    assert list(sample) == list(lexicon_rows(1000, 50, seed=1)) != list(lexicon_rows(1000, 50, seed=2))
    words = [f"w{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    pairs = [(" ".join(rng.choice(words, 3)), " ".join(w.upper() for w in rng.choice(words, 3))) for _ in range(60)]
    data = parallel(pairs)
    rows = lexicon_rows(60, 20, seed=5)
    sampled = build_lexicon(DiagonalAttention(), data, max_pairs=20, seed=5)
    assert sampled == build_lexicon(DiagonalAttention(), parallel([pairs[i] for i in rows]))
    assert sampled != build_lexicon(DiagonalAttention(), data)
    # The memory-mapped split (no text in memory) streams its sample's words from the parquet file.
    frame = data.frame
    frame.to_parquet(tmp_path / "train.parquet")
    for side, vocab in (("src", Vocab(words)), ("tgt", Vocab([w.upper() for w in words]))):
        token_ids.write(tmp_path, "train", side, [token_ids.flatten(vocab.encode(s.split())
                                                                     for s in frame[f"{side}_tokens"])])
    mapped = ParallelData.open(tmp_path, "train")
    assert mapped.frame is None
    assert build_lexicon(DiagonalAttention(), mapped, max_pairs=20, seed=5) == sampled
    assert build_lexicon(DiagonalAttention(), mapped) == build_lexicon(DiagonalAttention(), data)

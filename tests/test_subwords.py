"""prepare.subwords: sentencepiece pieces on top of the Moses words, real sentencepiece and torch."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import sentencepiece
import torch
import yaml

from pipeline import storage
from pipeline.config import ParamsError, load_params
from pipeline.decode import Translator, replace_unknowns
from pipeline.model import load_model, save_model
from pipeline.prepare import check_subword_vocab
from pipeline.stages import prepare
from pipeline.text import UNK, Tokenizer, Vocab, tokenizers, train_subwords
from tests.conftest import small_params, tiny_pairs
from tests.test_model import make_model

SENTENCES = {
    "en": ["In the beginning, God created the heavens and the earth.",
           "“Let’s go!” said the king's son; (the old man) didn't answer...",
           "Naïve café owners — 3,500 of them — met in São Paulo on 12/03/2024?",
           "The well-known dog-catcher's e-mail: dog@example.com!"],
    "es": ["¿Podrás tú hacerme entender el sueño? Y dijo: No, señor.",
           "En el principio creó Dios los cielos y la tierra.",
           "«Vamos», dijo el niño; ¡qué pequeño pájaro!",
           "Él comió años después, según Ñandú-Güemes (3,5 %)."],
}


def corpus(lang: str, tok: Tokenizer) -> list[str]:
    """Space-joined Moses words of a few hundred sentences: the tiny corpus and the ones above."""
    side = 0 if lang == "en" else 1
    return [" ".join(tok.words(p[side])) if not tok.lowercase else " ".join(tok.tokenize(p[side]))
            for p in tiny_pairs()] + [" ".join(tok.tokenize(s)) for s in SENTENCES[lang]] * 3


def subword_tokenizer(lang: str, lowercase: bool, model_type: str = "unigram", vocab_size: int = 150) -> Tokenizer:
    word = Tokenizer(lang, lowercase)
    return replace(word, subwords=train_subwords(corpus(lang, word), model_type, vocab_size))


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_training_gives_the_same_bytes_every_time(model_type):
    lines = corpus("es", Tokenizer("es", False))
    first = train_subwords(lines, model_type, 150)
    assert train_subwords(lines, model_type, 150) == first and len(first) > 1000
    assert train_subwords(lines[:-1], model_type, 150) != first  # the bytes do depend on the corpus


@pytest.mark.parametrize("lang,lowercase", [("en", True), ("en", False), ("es", False), ("es", True)])
def test_pieces_detokenise_to_the_moses_text(lang, lowercase):
    word, sub = Tokenizer(lang, lowercase), subword_tokenizer(lang, lowercase)
    for text in SENTENCES[lang] + ["Zebra ☃ Ωmega."]:  # unseen characters too
        pieces = sub.tokenize(text)
        assert pieces != word.tokenize(text) and len(pieces) > len(word.tokenize(text))
        assert "".join(pieces).replace("\u2581", " ").split() == word.tokenize(text)
        assert sub.detokenize(pieces) == word.detokenize(word.tokenize(text))
        assert sub.detokenize(pieces + ["<eos>", "<pad>"]) == word.detokenize(word.tokenize(text))


def test_a_literal_word_start_mark_is_kept_as_an_underscore():
    """Sentencepiece reads "▁" as a space. Moses splits a lone one off (prepare pieces those words
    directly), and a word holding one reaches from_cased from a caller's own words: both keep it."""
    sub = subword_tokenizer("en", True)
    assert sub.words("The a\u2581b dog.") == ["The", "a", "\u2581", "b", "dog", "."]
    pieces = sub.tokenize("The a\u2581b dog.")
    assert pieces == sub.pieces(["the", "a", "\u2581", "b", "dog", "."])  # as prepare pieces its words
    assert sub.detokenize(pieces) == "the a _ b dog."
    pieces, cased = sub.from_cased(["The", "a\u2581b", "dog", "."])
    assert "".join(pieces).replace("\u2581", " ").split() == ["the", "a_b", "dog", "."]
    assert "".join(cased).replace("\u2581", " ").split() == ["The", "a_b", "dog", "."]


def test_cased_pieces_align_with_the_lowercase_ones():
    sub = subword_tokenizer("en", True)
    words = sub.words("The Old KING's son met São Paulo's İstanbul-born Man.")
    pieces, cased = sub.from_cased(words)
    assert pieces == sub.pieces([w.lower() for w in words]) and len(cased) == len(pieces)
    assert [c.lower() for c in cased if "İ" not in c] == [p for p, c in zip(pieces, cased) if "İ" not in c]
    assert "".join(cased).replace("\u2581", " ").split()[:4] == ["The", "Old", "KING", "'s"]
    assert sub.tokenize_cased("The KING.") == sub.from_cased(sub.words("The KING."))[1]
    # word level: today's lowercase words and the cased words
    assert Tokenizer("en", True).from_cased(["The", "KING"]) == (["the", "king"], ["The", "KING"])


def test_copied_cased_pieces_and_unknowns_detokenise():
    sub = subword_tokenizer("es", False)
    _, cased = subword_tokenizer("en", True).from_cased(["Zorobabel"])  # pieces of another model
    assert len(cased) > 1 and "".join(cased) == "\u2581Zorobabel"
    assert sub.detokenize(cased + [UNK, "\u2581perro", "."]) == "Zorobabel <unk> perro."
    assert sub.detokenize(["\u2581el", UNK, "s", "\u2581perro"]) == "el <unk> s perro"  # <unk> stays a word


def test_translator_copies_cased_pieces_for_unknowns():
    src, tgt = subword_tokenizer("en", True), subword_tokenizer("es", False)
    tgt_vocab = Vocab(["\u2581el", "\u2581perro", "s", "\u2581rojo", ".", "a"])
    translator = Translator(make_model(src_vocab=12, tgt_vocab=10), src, tgt,
                            Vocab(["\u2581the", "\u2581dog", "s", "a", "b", "c", "d", "e"]), tgt_vocab)
    torch.manual_seed(0)
    text = "Zorobabel THE Great"
    pieces, cased = src.from_cased(src.words(text))
    [(words, _)] = translator.translate_tokens([pieces], originals=[cased], beam_size=2, max_len_ratio=3.0)
    assert set(words) <= (set(tgt_vocab.itos) - {UNK}) | set(cased)  # each output <unk> became a cased source piece
    [out] = translator.translate([text], beam_size=2, max_len_ratio=3.0)
    assert out == tgt.detokenize(words)
    # <unk>s attending to the pieces of "THE" and of "Zorobabel" copy them cased
    attention = np.zeros((3, len(pieces)))
    attention[0, pieces.index("\u2581the")] = attention[1, 0] = attention[2, 1] = 1.0
    copied = replace_unknowns([UNK, UNK, UNK, "\u2581perro"], attention, cased)
    assert copied == ["\u2581THE", cased[0], cased[1], "\u2581perro"]
    assert tgt.detokenize(copied) == "THE " + "".join(cased[:2]).strip("\u2581") + " perro"


def test_checkpoint_carries_the_subword_models(tmp_path):
    src, tgt = subword_tokenizer("en", True), subword_tokenizer("es", False, "bpe")
    model = make_model()
    vocabs = Vocab([f"s{i}" for i in range(26)]), Vocab([f"t{i}" for i in range(21)])
    save_model(tmp_path / "m.pt", model, *vocabs, src, tgt)
    bundle = torch.load(tmp_path / "m.pt", weights_only=True)
    assert bundle["src_tokenizer"]["subwords"].dtype == torch.uint8
    _, _, _, src2, tgt2, _ = load_model(tmp_path / "m.pt")
    assert src2 == src and tgt2 == tgt
    for tok, tok2, lang in ((src, src2, "en"), (tgt, tgt2, "es")):
        for text in SENTENCES[lang]:
            assert tok2.tokenize(text) == tok.tokenize(text) and tok2.tokenize_cased(text) == tok.tokenize_cased(text)
    # word level: the bundle holds today's keys only
    save_model(tmp_path / "w.pt", model, *vocabs, Tokenizer("en", True), Tokenizer("es", False))
    bundle = torch.load(tmp_path / "w.pt", weights_only=True)
    assert bundle["src_tokenizer"] == {"lang": "en", "lowercase": True}
    assert bundle["tgt_tokenizer"] == {"lang": "es", "lowercase": False}
    loaded = load_model(tmp_path / "w.pt")
    assert (loaded.src_tokenizer, loaded.tgt_tokenizer) == (Tokenizer("en", True), Tokenizer("es", False))


def write_project(root, model: str, vocab_size: int = 120):
    root.mkdir(parents=True, exist_ok=True)
    params = small_params()
    params["prepare"]["subwords"] = {"model": model, "vocab_size": vocab_size}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pairs = tiny_pairs() + list(zip(SENTENCES["en"], SENTENCES["es"])) * 2
    frame = pd.DataFrame({"id": [f"t.{i}" for i in range(len(pairs))], "origin": "tiny",
                          "src": [s for s, _ in pairs], "tgt": [t for _, t in pairs]})
    storage.RAW_PAIRS.mkdir(parents=True, exist_ok=True)
    half = len(frame) // 2  # two shards, as ingest writes them
    for i, shard in enumerate((frame[:half], frame[half:])):
        shard.to_parquet(storage.RAW_PAIRS / storage.shard_name(i), index=False)
    return load_params()


def test_prepare_writes_subword_models_and_pieces(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    word = prepare(write_project(tmp_path, "none"))
    word_train = pd.read_parquet("data/prepared/train.parquet")
    assert not list(storage.PREPARED.glob("spm.*"))

    params = write_project(tmp_path, "unigram")
    report = prepare(params)
    models = {side: storage.PREPARED / f"spm.{side}.model" for side in ("src", "tgt")}
    assert all(p.stat().st_size > 1000 for p in models.values())
    src_tok, tgt_tok = tokenizers(params)
    assert src_tok.subwords == models["src"].read_bytes() and tgt_tok.subwords == models["tgt"].read_bytes()
    train = pd.read_parquet("data/prepared/train.parquet")
    assert list(train["id"]) == list(word_train["id"])
    for row in train.itertuples():  # pieces, which spell the Moses words of the word-level run
        assert row.src_tokens.split() == src_tok.tokenize(row.src)
        assert row.tgt_tokens.split() == tgt_tok.tokenize(row.tgt)
    for (row, word_row) in zip(train.itertuples(), word_train.itertuples()):
        assert "".join(row.tgt_tokens.split()).replace("\u2581", " ").split() == word_row.tgt_tokens.split()
    assert report["subwords"] == {"model": "unigram", "vocab_size": 120, "sample_sentences": 1_000_000, "threads": 1,
                                  "sentencepiece": sentencepiece.__version__}
    assert report["mean_train_tokens_per_sentence"]["tgt"] > word["mean_train_tokens_per_sentence"]["tgt"]
    assert report["test_unk_rate"]["tgt"] <= word["test_unk_rate"]["tgt"]
    written = json.loads((storage.REPORTS / "prepare.json").read_text())
    assert written == {k: v for k, v in report.items() if k not in ("shards_tokenised", "shards_from_cache")}
    vocab = Vocab.load(storage.PREPARED / "vocab.tgt.json")
    assert vocab.itos[:4] == ["<pad>", "<unk>", "<sos>", "<eos>"]

    first = {p: p.read_bytes() for p in storage.PREPARED.iterdir()}
    prepare(params)  # the same bytes again
    assert {p: p.read_bytes() for p in storage.PREPARED.iterdir()} == first

    prepare(write_project(tmp_path, "none"))  # back to words: the models go, the data is today's
    assert not list(storage.PREPARED.glob("spm.*"))
    assert pd.read_parquet("data/prepared/train.parquet").equals(word_train)


def test_tokenizers_need_the_prepared_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="vamos prepare"):
        tokenizers(write_project(tmp_path, "bpe"))


def test_word_tokenizers_refuse_data_prepared_with_subwords(tmp_path, monkeypatch):
    """Switching prepare.subwords back to none without re-preparing must not train words on pieces."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/spm.src.model").write_bytes(b"pieces")
    with pytest.raises(FileNotFoundError, match="prepared with subwords.*vamos prepare"):
        tokenizers(write_project(tmp_path, "none"))


def test_served_limits_count_the_models_pieces(tmp_path):
    """One long unknown word is one Moses word but hundreds of pieces of encoder work: the
    sentence limit counts pieces, and the error names the limit."""
    from pipeline.config import Params
    from pipeline.serving import RequestError, TranslatorModel, model_config

    src, tgt = subword_tokenizer("en", True), subword_tokenizer("es", False, "bpe")
    vocabs = Vocab([f"s{i}" for i in range(26)]), Vocab([f"t{i}" for i in range(21)])
    save_model(tmp_path / "m.pt", make_model(), *vocabs, src, tgt)
    config = model_config(Params()) | {"max_sentence_tokens": 40, "beam_size": 1}
    served = TranslatorModel().configure(tmp_path / "m.pt", config)
    word = "qzxvkjqzxvkj" * 10
    assert len(src.words(word)) == 1 and len(src.tokenize(word)) > 40
    with pytest.raises(RequestError, match="has [0-9]+ tokens; the limit is 40 .serve.max_sentence_tokens."):
        served.translate([word])
    assert len(served.translate(["the king went out."])) == 1  # a short sentence still goes through


def test_a_subword_vocabulary_below_the_characters_is_a_params_error():
    """prepare says which key is too small before sentencepiece fails with its own message; the bound
    is sentencepiece's: one fewer piece fails there, that many trains."""
    sentences = [" ".join(chr(c) * 3 for c in range(start, start + 30)) for start in range(0x100, 0x1A0, 30)]
    needed = len(set("".join(sentences)) - {" "}) + 2  # 180 characters, the word boundary and <unk>
    with pytest.raises(ParamsError, match=rf"prepare.subwords.vocab_size is {needed - 1}, but the tgt training "
                                          rf"split has {needed - 2} distinct characters: it needs at least {needed}"):
        check_subword_vocab(sentences, needed - 1, "tgt")
    with pytest.raises(RuntimeError, match="Vocabulary size is smaller than required_chars"):
        train_subwords(sentences, "bpe", needed - 1)
    check_subword_vocab(sentences, needed, "tgt")
    assert len(train_subwords(sentences, "bpe", needed)) > 1000

from hypothesis import given, strategies as st
import pytest

from pipeline.text import EOS_ID, PAD_ID, SOS_ID, UNK_ID, Tokenizer, Vocab


def test_tokenize_splits_punctuation_and_lowercases_after():
    tokens = Tokenizer("en", lowercase=True).tokenize("The water. The fire, “Let’s go!”")
    assert tokens == ["the", "water", ".", "the", "fire", ",", '"', "let", "'s", "go", "!", '"']


def test_spanish_round_trip_is_readable():
    tok = Tokenizer("es", lowercase=False)
    text = "¿Podrás tú hacerme entender el sueño? Y dijo: No, señor."
    assert tok.detokenize(tok.tokenize(text)) == text


@pytest.mark.parametrize("lang", ["zh", "zh_CN", "zh-Hans", "ja"])
def test_chinese_and_japanese_characters_are_tokens_and_join_again(lang):
    tok = Tokenizer(lang, lowercase=False)
    text = "无法打开文件：权限不够。保存对 GNOME 3.5 的更改吗？"
    tokens = tok.tokenize(text)
    assert tokens[:7] == ["无", "法", "打", "开", "文", "件", "："]
    assert "GNOME" in tokens and "3.5" in tokens and tokens[-1] == "？"
    assert tok.detokenize(tokens) == text  # no space between characters, nor beside their punctuation
    quoted = "点击“保存”按钮"  # typographic quotes kept, and joined
    assert tok.tokenize(quoted)[2] == "“" and tok.detokenize(tok.tokenize(quoted)) == quoted
    assert tok.tokenize("ＡＢＣ１２的") == ["ＡＢＣ１２", "的"]  # fullwidth Latin is a word, not characters


def test_vocab_specials_have_fixed_ids():
    vocab = Vocab.build([["a", "b", "a"], ["c", "a"]], min_freq=1, max_size=100)
    assert [vocab.stoi[t] for t in ("<pad>", "<unk>", "<sos>", "<eos>")] == [PAD_ID, UNK_ID, SOS_ID, EOS_ID]
    assert vocab.itos[4] == "a"  # most frequent first


def test_vocab_caps_and_unknowns(tmp_path):
    vocab = Vocab.build([["a"] * 5 + ["b"] * 3 + ["c"]], min_freq=2, max_size=5)
    assert "a" in vocab and "b" not in vocab and "c" not in vocab and len(vocab) == 5
    assert vocab.encode(["a", "zzz"]) == [4, UNK_ID]
    vocab.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json").itos == vocab.itos


def test_decode_stops_at_eos_and_skips_padding():
    vocab = Vocab(["x", "y"])
    assert vocab.decode([SOS_ID, 4, 5, EOS_ID, 4, PAD_ID]) == ["x", "y"]


@given(st.lists(st.text(alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd", "Po")), min_size=1,
                        max_size=8), min_size=1, max_size=12))
def test_vocab_round_trip(words):
    vocab = Vocab.build([words], min_freq=1, max_size=1000)
    assert vocab.decode(vocab.encode(words)) == [w for w in words]


MIXED = ["Mr. Smith paid $3.50 for U.S. goods -- isn't it 'odd'?", "¿Dónde está el Sr. García? ¡Aquí!",
         "L'homme a dit: « c'est l'été ».", "中.国. 好", "東京.大阪. です", "한.국. 가", "ÉCOLE. école.",
         "", "e.g. 3.14 ... etc."]


@pytest.mark.parametrize("lang", ["en", "es", "fr", "zh", "ja", "ko"])
def test_faster_moses_gives_sacremoses_own_tokens(lang):
    """_Moses only caches sacremoses' character sets: every token must be the library's own."""
    from sacremoses import MosesTokenizer

    from pipeline.text import _Moses

    ours, theirs = _Moses(lang=lang), MosesTokenizer(lang=lang)
    for text in MIXED:
        for aggressive in (False, True):
            assert ours.tokenize(text, escape=False, aggressive_dash_splits=aggressive) == \
                theirs.tokenize(text, escape=False, aggressive_dash_splits=aggressive), (lang, text)

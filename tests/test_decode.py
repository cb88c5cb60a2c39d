import numpy as np

from pipeline.decode import Translator, beam_search, greedy_search, replace_unknowns
from pipeline.text import Tokenizer, Vocab
from tests.test_model import make_model, source_batch


def translator() -> Translator:
    model = make_model(src_vocab=12, tgt_vocab=10)
    src_vocab = Vocab(["a", "b", "c", "d", "e", "f", "g", "h"])
    tgt_vocab = Vocab(["u", "v", "w", "x", "y", "z"])
    return Translator(model, Tokenizer("en", True), Tokenizer("es", False), src_vocab, tgt_vocab)


def test_beam_of_one_is_greedy():
    model = make_model()
    src, src_len = source_batch()
    greedy = greedy_search(model, src, src_len)
    beam = beam_search(model, src, src_len, beam_size=1)
    assert [h.tokens for h in greedy] == [h.tokens for h in beam]


def test_beam_hypotheses_are_well_formed():
    model = make_model()
    src, src_len = source_batch()
    for hyp, length in zip(beam_search(model, src, src_len, beam_size=4, max_len_ratio=2.0), [5, 2]):
        assert 3 not in hyp.tokens  # <eos> ends a hypothesis, it is not part of it
        assert hyp.attention.shape == (len(hyp.tokens), length)
        assert np.allclose(hyp.attention.sum(1), 1, atol=1e-5)
        assert len(hyp.tokens) <= length * 2.0 + 5


def test_translations_do_not_depend_on_batch_composition():
    t = translator()
    sentences = [["a", "b"], ["c", "d", "e", "f", "g", "h", "a"], ["h"], ["b", "b", "c"]]
    together = t.translate_tokens(sentences, beam_size=3, batch_size=4)
    for sentence, (words, attention) in zip(sentences, together):
        alone_words, alone_attention = t.translate_tokens([sentence], beam_size=3)[0]
        assert words == alone_words
        assert np.allclose(attention, alone_attention, atol=1e-5)


def test_unknown_words_are_copied_from_the_attended_source():
    attention = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert replace_unknowns(["<unk>", "casa"], attention, ["the", "naomi"]) == ["naomi", "casa"]


def test_translate_text_end_to_end_returns_strings():
    outputs = translator().translate(["A b c.", "H"], beam_size=2)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)

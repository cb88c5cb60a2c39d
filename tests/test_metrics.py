"""pipeline.metrics: BLEU, chrF and TER set for the target language."""
import pytest
import sacrebleu

from pipeline.metrics import base_language, corpus_score, metric

HYPS = ["the house is small", "I saw a dog in the garden today"]
REFS = ["the house is very small", "today I saw a dog in the garden"]


@pytest.mark.parametrize("lang", ["es", "en", "fr"])
def test_spaced_languages_score_as_sacrebleu_defaults(lang):
    """What evaluate and validation computed before: sacrebleu's corpus functions, 13a tokens."""
    assert corpus_score("bleu", HYPS, REFS, lang) == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert corpus_score("chrf", HYPS, REFS, lang) == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    assert corpus_score("ter", HYPS, REFS, lang) == sacrebleu.corpus_ter(HYPS, [REFS]).score


@pytest.mark.parametrize("lang", ["zh", "zh_CN", "zh-Hans", "ja", "ko"])
def test_unspaced_languages_are_scored_by_character(lang):
    """Without spaces a whole sentence is one 13a word: a near miss would score 0."""
    hyp, ref = ["我爱北京天安门广场"], ["我爱北京天安门"]
    assert sacrebleu.corpus_bleu(hyp, [ref]).score == 0
    assert corpus_score("bleu", hyp, ref, lang) > 50
    assert sacrebleu.corpus_ter(hyp, [ref]).score == 100
    assert corpus_score("ter", hyp, ref, lang) == pytest.approx(100 * 2 / 7)  # 2 characters to delete, of 7


def test_language_codes_reduce_to_their_base():
    assert [base_language(c) for c in ("zh_CN", "zh-Hans", "ES", "pt_BR")] == ["zh", "zh", "es", "pt"]


def test_an_unknown_metric_is_named():
    with pytest.raises(KeyError, match="no metric 'meteor'"):
        metric("meteor", "es")

"""sacrebleu's metrics set for the target language: the one place that decides how validation,
evaluate and register score a translation, so that all three agree for every language pair."""
from __future__ import annotations

from pipeline.text import base_language

# Word tokenisers for BLEU where words are not separated by spaces: sacrebleu's own for Chinese,
# characters for Japanese, Korean and Thai (sacrebleu's MeCab tokenisers need dictionaries that
# are not installed). Everywhere else 13a, sacrebleu's default, so English-Spanish scores are
# those of `sacrebleu.corpus_bleu`.
BLEU_TOKENIZERS = {"zh": "zh", "ja": "char", "ko": "char", "th": "char"}


def metric(name: str, lang: str):
    """The sacrebleu metric object `name` (bleu, chrf, ter) for output in language `lang`."""
    import sacrebleu.metrics as metrics

    base = base_language(lang)
    if name == "bleu":
        return metrics.BLEU(tokenize=BLEU_TOKENIZERS.get(base, "13a"))
    if name == "chrf":
        return metrics.CHRF()
    if name == "ter":
        # sacrebleu's TER splits CJK characters only when it also normalises (tercom's own rules):
        # without that a Chinese sentence is one word, and any miss is a TER of 100.
        spaceless = base in BLEU_TOKENIZERS
        return metrics.TER(asian_support=spaceless, normalized=spaceless)
    raise KeyError(f"no metric {name!r} (bleu, chrf, ter)")


def corpus_score(name: str, hypotheses: list[str], references: list[str], lang: str) -> float:
    """The metric over a corpus: one reference per hypothesis."""
    return metric(name, lang).corpus_score(hypotheses, [references]).score

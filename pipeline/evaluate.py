"""Test-set evaluation: sacrebleu BLEU, chrF and TER for greedy and beam search, BLEU by
sentence length, attention heatmaps and sample translations."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.config import METRICS, EvaluateParams
from pipeline.decode import Translator
from pipeline.metrics import corpus_score
from pipeline.text import Tokenizer

log = logging.getLogger(__name__)

LENGTH_BINS = [0, 10, 20, 30, 40, 1000]


def score(hypotheses: list[str], references: list[str], lang: str) -> dict[str, float]:
    """BLEU, chrF and TER of output in language `lang`."""
    return {name: round(corpus_score(name, hypotheses, references, lang), 2) for name in METRICS}


def score_by_source(frame: pd.DataFrame, hypotheses: list[str], lang: str) -> dict[str, dict]:
    """Each source's scores where the test split mixes sources (a held-out catalog beside Bible
    verses): one corpus score hides a domain the model cannot translate."""
    if "origin" not in frame or frame["origin"].nunique() < 2:
        return {}
    scores = {}
    for origin, index in frame.reset_index(drop=True).groupby("origin").groups.items():
        hyps, refs = [hypotheses[i] for i in index], frame["tgt"].iloc[index].tolist()
        scores[origin] = {**score(hyps, refs, lang), "sentences": len(index)}
    return scores


def samples_by_source(frame: pd.DataFrame, samples: int, order: np.ndarray | None = None) -> list[int]:
    """The rows shown in samples.md and the heatmaps: each source's first in turn, so that a mixed
    test split shows every source (its first source alone, or its shortest messages, would fill
    them). Without `order`, firsts in the frame's order and the rows sorted; with `order` (row
    numbers, e.g. shortest first), firsts in that order and the rows as picked."""
    origins = frame["origin"].to_numpy() if "origin" in frame else np.zeros(len(frame), dtype=int)
    rows = np.arange(len(frame)) if order is None else np.asarray(order)
    rank = pd.Series(origins[rows]).groupby(origins[rows], sort=False).cumcount()
    picked = rows[rank.sort_values(kind="stable").index[:samples]].tolist()
    return sorted(picked) if order is None else picked


def bleu_by_length(frame: pd.DataFrame, hypotheses: list[str], tokenizer: Tokenizer, lang: str) -> pd.DataFrame:
    """Test BLEU by source length in Moses words (not subword pieces, which vary with the model)."""
    lengths = pd.Series([len(tokenizer.words(text)) for text in frame["src"]], index=frame.index)
    bins = pd.cut(lengths, LENGTH_BINS, right=False,
                  labels=[f"{a}-{b - 1}" if b < 1000 else f"{a}+" for a, b in zip(LENGTH_BINS, LENGTH_BINS[1:])])
    rows = []
    for label, index in frame.groupby(bins, observed=True).groups.items():
        hyps = [hypotheses[i] for i in index]
        refs = frame.loc[index, "tgt"].tolist()
        rows.append({"source_length": str(label), "sentences": len(index),
                     "bleu": round(corpus_score("bleu", hyps, refs, lang), 2)})
    return pd.DataFrame(rows)


def plot_attention(source: list[str], output: list[str], attention: np.ndarray, path: Path, title: str) -> None:
    plt = storage.pyplot()

    # A search keeps one attention row per output word and none for <eos> (Hypothesis.attention), so
    # the slice takes every row there is and an "<eos>" label is drawn only for a matrix that has that row.
    rows = len(output) + 1
    weights = attention[:rows, : len(source)]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(source) + 2), max(3, 0.35 * rows + 1.5)))
    ax.imshow(weights, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(len(source)), source, rotation=90, fontsize=8)
    ax.set_yticks(range(weights.shape[0]), (output + ["<eos>"])[: weights.shape[0]], fontsize=8)
    ax.set_title(title, fontsize=9)
    storage.save_figure(path, fig)


def source_tokens(translator: Translator, frame: pd.DataFrame) -> tuple[list[list[str]], list[list[str]]]:
    """(the model's tokens, their cased twins) for each source text, by the model's own tokeniser:
    a champion with other subword pieces than today's prepared data is scored on its own pieces
    (in word mode these are the prepared `src_tokens`)."""
    return translator.src_tok.from_cased_all(translator.src_tok.words(text) for text in frame["src"])


def translate_split(translator: Translator, frame: pd.DataFrame, cfg: EvaluateParams,
                    beam_size: int | None = None) -> list[tuple[list[str], np.ndarray]]:
    """(output tokens, attention) for each row of a prepared split, decoded with the evaluate
    settings: the one decoding that test scores and the registry's comparisons share."""
    sources, originals = source_tokens(translator, frame)
    lexicon = {"unk_dictionary": cfg.unk_dictionary, "shortlist": cfg.shortlist}
    if any(lexicon.values()) and translator.lexicon is None:
        # A model saved without train.lexicon (a champion registered before it was switched on).
        log.warning("the model has no lexicon: decoding it without unk_dictionary and shortlist")
        lexicon = {}
    return translator.translate_tokens(
        sources, beam_size=beam_size or cfg.beam_size, alpha=cfg.length_penalty, max_len_ratio=cfg.max_len_ratio,
        batch_size=cfg.batch_size, originals=originals,
        precision=cfg.precision, unk_penalty=cfg.unk_penalty, **lexicon)


def detokenize_all(translator: Translator, outputs: list[tuple[list[str], np.ndarray]]) -> list[str]:
    return [translator.tgt_tok.detokenize(words) for words, _ in outputs]


def evaluate(translator: Translator, test: pd.DataFrame, cfg: EvaluateParams, reports: Path) -> dict:
    sources, _ = source_tokens(translator, test)
    references = test["tgt"].tolist()
    log.info("decoding %d test sentences (greedy, then beam %d)", len(sources), cfg.beam_size)
    greedy_text = detokenize_all(translator, translate_split(translator, test, cfg, beam_size=1))
    beam = translate_split(translator, test, cfg)
    beam_text = detokenize_all(translator, beam)
    lang = translator.tgt_tok.lang
    metrics = {**score(beam_text, references, lang), "greedy": score(greedy_text, references, lang),
               "beam_size": cfg.beam_size, "sentences": len(references)}
    by_source = score_by_source(test, beam_text, lang)
    if by_source:
        metrics["by_source"] = by_source

    by_length = bleu_by_length(test.reset_index(drop=True), beam_text, translator.src_tok, lang)
    with storage.atomic_path(reports / "bleu_by_length.csv") as tmp:
        by_length.to_csv(tmp, index=False)

    sample_rows = samples_by_source(test, cfg.samples)
    lines = ["| id | source | reference | translation (beam) |", "|---|---|---|---|"]
    lines += [f"| {test['id'].iloc[i]} | {test['src'].iloc[i]} | {references[i]} | {beam_text[i]} |"
              for i in sample_rows]
    storage.write_text(reports / "samples.md", "\n".join(lines) + "\n")

    # Heatmaps for the shortest few test sentences of each source in turn: readable at a glance.
    shortest = samples_by_source(test, cfg.heatmaps, np.argsort([len(s) for s in sources], kind="stable"))
    for n, i in enumerate(shortest):
        words, attention = beam[i]
        plot_attention(sources[i], words, attention, reports / "attention" / f"attention_{n}.png",
                       f"{test['id'].iloc[i]}: {beam_text[i]}")
    return metrics

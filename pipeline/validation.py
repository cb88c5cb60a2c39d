"""Measuring a model during training on the validation split: the loss (full softmax) and greedy
BLEU, which picks the best model and stops training."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data import ParallelData
from pipeline.decode import Translator
from pipeline.loss import sequence_loss
from pipeline.metrics import corpus_score
from pipeline.model import Seq2Seq
from pipeline.text import Tokenizer


@dataclass
class ValidationSet:
    """The validation split tokenised once, for BLEU after every epoch."""

    data: ParallelData
    sources: list[list[str]]
    originals: list[list[str]]  # cased tokens, for unknown-word copying
    references: list[str]

    @classmethod
    def of(cls, data: ParallelData, src_tok: Tokenizer) -> "ValidationSet":
        frame = data.frame
        return cls(data, [s.split() for s in frame["src_tokens"]],
                   [src_tok.tokenize_cased(s) for s in frame["src"]], frame["tgt"].tolist())


@torch.no_grad()
def validation_loss(model: Seq2Seq, data: ParallelData, batch_tokens: int, device: torch.device) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for rows in data.batches(batch_tokens):
        batch = data.make_batch(rows).to(device)
        attentional, _ = model(batch.src, batch.src_len, batch.tgt_in)
        loss, n = sequence_loss(model, attentional, batch.tgt_out, 0, 0.0)
        total, tokens = total + loss.item(), tokens + n
    return total / max(tokens, 1)


def validation_bleu(translator: Translator, valid: ValidationSet) -> float:
    """Greedy BLEU on the validation split: cheap enough to run every epoch, and it is what
    a translator is judged by, so it picks the model and stops training."""
    translator.model.eval()
    outputs = translator.translate_tokens(valid.sources, beam_size=1, originals=valid.originals)
    hypotheses = [translator.tgt_tok.detokenize(words) for words, _ in outputs]
    return corpus_score("bleu", hypotheses, valid.references, translator.tgt_tok.lang)

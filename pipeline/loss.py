"""The training loss: masked cross-entropy over a sequence, with a sampled softmax (log-Q
corrected) in training where it saves most of the output layer's cost on a CPU.

Label smoothing under the sampled softmax spreads its mass over the sampled candidates (the
batch's gold words, <pad>, <sos> and the drawn negatives), not uniformly over the vocabulary as
ordinary label smoothing does: a cheaper regulariser of the same kind, measured as such (see
docs/decisions.md); validation and evaluation use the full softmax."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pipeline.model import Seq2Seq
from pipeline.text import PAD_ID, SOS_ID

# Never a target, so never a sampled candidate: they join every candidate set instead, which
# teaches the model to keep their logits low.
ALWAYS_NEGATIVE = (PAD_ID, SOS_ID)
# oneDNN (bf16 on a CPU) builds and caches a matmul for each distinct shape. The loss's rows (a
# batch's real target tokens) and columns (its candidate words) differ in every batch, so every
# step built new ones, which pushed reusable ones out of the cache and grew memory all run long.
# Padded up to these multiples, a bounded set of shapes serves every batch (docs/decisions.md).
ROW_MULTIPLE = 64
COLUMN_MULTIPLE = 128


@functools.lru_cache(maxsize=4)
def log_uniform(vocab_size: int, device: torch.device) -> torch.Tensor:
    """Zipf's law over ids, P(k) ∝ log((k + 2) / (k + 1)) (TF's log_uniform_candidate_sampler): the
    vocabulary is sorted by frequency, so this approximates the unigram distribution without counts."""
    probs = torch.log1p(1.0 / (torch.arange(vocab_size, dtype=torch.float64) + 1.0))
    probs[list(ALWAYS_NEGATIVE)] = 0.0
    return (probs / probs.sum()).float().to(device)


def padded(tensor: torch.Tensor, multiple: int, value: float = 0) -> torch.Tensor:
    """`tensor` with rows of `value` appended up to a multiple of `multiple` rows."""
    missing = -tensor.size(0) % multiple
    return torch.cat([tensor, tensor.new_full((missing, *tensor.shape[1:]), value)]) if missing else tensor


def output_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  columns: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits N x C of `hidden` (N x D) for the output words `columns` (all C words by
    default), computed in padded shapes (ROW_MULTIPLE, COLUMN_MULTIPLE) and cut back: each logit
    is the same dot product, and the padding's cut-off logits get no gradient."""
    rows, width = hidden.size(0), weight.size(0) if columns is None else len(columns)
    if columns is not None:
        columns = padded(columns, COLUMN_MULTIPLE, PAD_ID)
        weight, bias = weight[columns], bias[columns]
    return F.linear(padded(hidden, ROW_MULTIPLE), weight, bias)[:rows, :width].float()


def sampled_logits(hidden: torch.Tensor, gold: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   negatives: int, gold_words: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled softmax with the log-Q correction, shared by the batch. The candidates are the
    batch's gold words, <pad> and <sos>, all certain members that count exactly (uncorrected), plus
    the other words among `negatives` draws from log_uniform, each logit lowered by the log of its
    inclusion probability 1 - (1 - p)^negatives. The draws' exp-logits are then an unbiased
    (Horvitz-Thompson) estimate of the rest of the softmax's normaliser, so a rare gold word is not
    favoured for being present, and as `negatives` grows the loss tends to the full softmax's.
    Returns (logits N x C, each position's gold column). Under DDP a rank holds part of the batch:
    `gold_words` (the whole batch's gold words, a superset of `gold`) and `generator` (advanced in
    lockstep on every rank) give every rank the candidates one process would use."""
    words = gold if gold_words is None else gold_words
    certain = torch.unique(torch.cat([words, torch.tensor(ALWAYS_NEGATIVE, device=gold.device)]))  # sorted
    probs = log_uniform(weight.size(0), gold.device)
    drawn = torch.unique(torch.multinomial(probs, negatives, replacement=True, generator=generator))
    drawn = drawn[~torch.isin(drawn, certain)]
    log_inclusion = torch.log(-torch.expm1(negatives * torch.log1p(-probs[drawn])))
    candidates = torch.cat([certain, drawn])
    logits = output_logits(hidden, weight, bias, candidates)
    correction = torch.cat([torch.zeros_like(certain, dtype=logits.dtype), log_inclusion])
    return logits - correction, torch.searchsorted(certain, gold)


def sequence_loss(model: Seq2Seq, attentional: torch.Tensor, targets: torch.Tensor, negatives: int,
                  label_smoothing: float, gold_words: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over real (non-pad) target positions, all time steps at once: sampled
    softmax in training when 0 < `negatives` < vocabulary (most of the saving on a CPU), else and in
    evaluation the full softmax."""
    mask = targets != PAD_ID
    hidden, gold = attentional[mask], targets[mask]
    weight, bias = model.generator.weight, model.generator.bias
    if model.training and 0 < negatives < weight.size(0):
        logits, gold_columns = sampled_logits(hidden, gold, weight, bias, negatives, gold_words, generator)
    else:
        logits, gold_columns = output_logits(hidden, weight, bias), gold
    loss = F.cross_entropy(logits, gold_columns, reduction="sum", label_smoothing=label_smoothing)
    return loss, int(gold.numel())

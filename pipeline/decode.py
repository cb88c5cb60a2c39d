"""Batched greedy and beam search, and translation of raw text with a trained model."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.device import has_bf16
from pipeline.model.ensemble import Ensemble, PerMember
from pipeline.text import EOS_ID, PAD_ID, SOS_ID, UNK, UNK_ID, Tokenizer, Vocab

log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    tokens: list[int]  # without <sos>, up to and without <eos>
    attention: np.ndarray  # len(tokens) x source length
    score: float


# Never a training target, only ever among the softmax's other words (sampled softmax adds both to
# every candidate set and draws from all other ids, <unk> and <eos> included). Never meaningful either:
# a <pad> would end the sentence and both would shift the word-to-attention index unknown-word
# replacement uses.
NEVER_EMITTED = (PAD_ID, SOS_ID)


def max_lengths(src_len: torch.Tensor, ratio: float) -> torch.Tensor:
    """Each sentence's output limit: long enough for a translation, short enough to stop babble."""
    return (src_len.float() * ratio).long() + 5


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's length normalisation: ((5 + length) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


class OutputLayer:
    """Next-token log-probabilities over the words that can be emitted: the vocabulary less <pad>
    and <sos>, or a shortlist of target ids (the output projection is most of a decoding step).
    With `dtype` bfloat16 the projection multiplies a bf16 copy of its weights, cached on the model
    by `projection`: autocast would recast the vocabulary x D matrix at every call (for a one-sentence
    request, as much work as the product). The scores stay fp32."""

    def __init__(self, model, shortlist: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 unk_penalty: float = 0.0):
        self.model, self.ids, self.dtype, self.weight = model, None, dtype, None
        self.unk_penalty = unk_penalty
        if shortlist is not None or dtype != torch.float32:
            self.weight, self.bias = projection(model, dtype)
        if shortlist is not None:
            ids = torch.unique(torch.cat([shortlist.long().cpu(), torch.tensor([UNK_ID, EOS_ID])]))
            self.ids = ids[~torch.isin(ids, torch.tensor(NEVER_EMITTED))].to(self.weight.device)
            self.weight = self.weight.index_select(0, self.ids)
            self.bias = None if self.bias is None else self.bias.index_select(0, self.ids)
        self.eos = EOS_ID if self.ids is None else int((self.ids == EOS_ID).nonzero())
        self.unk = UNK_ID if self.ids is None else int((self.ids == UNK_ID).nonzero())

    def log_probs(self, attentional: torch.Tensor) -> torch.Tensor:
        """The model's next-word log-probabilities, rows x the words that can be emitted. (One
        log_softmax pass costs less than logsumexp and topk on the raw logits: CPU logsumexp is
        five passes.)"""
        if self.weight is None:
            logits = self.model.logits(attentional).float()
        else:
            logits = F.linear(attentional.to(self.dtype), self.weight, self.bias).float()
        if self.ids is None:
            logits[:, list(NEVER_EMITTED)] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    def best(self, attentional, at_limit: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's `count` most likely next words: (log-probabilities, positions), rows x count.
        Rows flagged `at_limit` may only end, at the model's price for <eos>."""
        log_probs = self.log_probs(attentional)
        if self.unk_penalty:  # a score penalty, as fairseq's --unkpen: the probabilities stay the model's
            log_probs[:, self.unk] -= self.unk_penalty
        if bool(at_limit.any()):
            only_eos = torch.full_like(log_probs[0], float("-inf"))
            only_eos[self.eos] = 0.0
            log_probs = torch.where(at_limit.unsqueeze(1), log_probs + only_eos, log_probs)
        if count == 1:  # greedy: one pass, where topk sorts
            return log_probs.max(dim=-1, keepdim=True)
        return log_probs.topk(min(count, log_probs.size(1)), dim=-1)

    def token_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions if self.ids is None else self.ids[positions]


class EnsembleOutput(OutputLayer):
    """The output layer of a pipeline.model.ensemble.Ensemble: each member's log-probabilities
    from its own attentional state, averaged; the choice of words as for one model."""

    def __init__(self, ensemble: Ensemble, shortlist: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, unk_penalty: float = 0.0):
        self.members = [OutputLayer(model, shortlist, dtype) for model in ensemble.members]
        first = self.members[0]
        self.ids, self.eos, self.unk, self.unk_penalty = first.ids, first.eos, first.unk, unk_penalty

    def log_probs(self, attentional: PerMember) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0].log_probs(attentional[0])
        return torch.stack([out.log_probs(a) for out, a in zip(self.members, attentional)]).mean(0)


def output_layer(model, shortlist: torch.Tensor | None = None, **scoring) -> OutputLayer:
    return (EnsembleOutput if isinstance(model, Ensemble) else OutputLayer)(model, shortlist, **scoring)


def projection(model, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output layer's weight and bias in `dtype`, converted once per set of weights (a copy
    per batch would cost as much as decoding a short sentence)."""
    weight, bias = model.generator.weight, model.generator.bias
    if weight.dtype == dtype:
        return weight, bias
    key = (dtype, weight.data_ptr(), weight._version)
    cached = getattr(model, "_decoding_projection", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
        model._decoding_projection = cached
    return cached[1], cached[2]


@functools.lru_cache(maxsize=None)  # one warning per device, not per request
def decoding_dtype(device: torch.device, precision: str) -> torch.dtype:
    """bf16 for "bfloat16" where the hardware has it: under autocast, as `train.amp` trains, every
    matrix product runs in bf16 (2x fp32's decoding speed on a CPU with AVX512-BF16; the LSTMs cost
    as much as the output projection) while attention weights, scores and, on a CPU, the LSTM
    states stay fp32 (pipeline.model.precision). Without native bf16, emulated bf16 would be slower
    than fp32, so fp32 it is, as for training."""
    if precision != "bfloat16":
        return torch.float32
    if not has_bf16(device):
        log.warning("precision bfloat16: %s has no native bf16, decoding in float32", device)
        return torch.float32
    return torch.bfloat16


class SearchHistory:
    """Back-pointers, one entry per step: the rows' attention, and for each row that goes on, the
    token it chose and the row it came from. Paths are read back once, at the end, instead of
    copying every hypothesis's history at every step."""

    def __init__(self, batch: int, device: torch.device, n_best: int = 1):
        self.n_best = n_best
        # With n_best > 1, every hypothesis that ended: (sentence, score, step, row) tensors per step.
        self.endings: list[tuple[torch.Tensor, ...]] = []
        self.weights: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        self.parents: list[torch.Tensor] = []
        # The best finished hypothesis of each sentence: score, and the step and row it ended at.
        self.best_score = torch.full((batch,), float("-inf"), device=device)
        self.best_step = torch.zeros(batch, dtype=torch.long, device=device)
        self.best_row = torch.zeros(batch, dtype=torch.long, device=device)

    def record(self, weights: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        self.weights.append(weights)
        self.tokens.append(tokens)
        self.parents.append(parents)

    def finish(self, sentences: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor, step: int) -> None:
        """Keep each sentence's candidate where it beats that sentence's best so far."""
        better = scores > self.best_score[sentences]
        sentences, scores, rows = sentences[better], scores[better], rows[better]
        self.best_score[sentences] = scores
        self.best_step[sentences] = step
        self.best_row[sentences] = rows

    def end_all(self, sentences: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor, step: int) -> None:
        """Keep every candidate that ends here (finite `scores`), for the n-best lists."""
        ended = torch.isfinite(scores)
        self.endings.append((sentences[ended], scores[ended], torch.full_like(rows[ended], step), rows[ended]))

    def read(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        return ([w.float().cpu().numpy() for w in self.weights], [t.cpu().numpy() for t in self.tokens],
                [p.cpu().numpy() for p in self.parents])

    @staticmethod
    def path(history, score: float, step: int, row: int, length: int) -> Hypothesis:
        """The hypothesis that ended at `step` in `row`, read back along the parents."""
        weights, tokens, parents = history
        path, attention = [], []
        for s in range(step - 1, -1, -1):
            path.append(int(tokens[s][row]))
            row = int(parents[s][row])
            attention.append(weights[s][row, :length])
        attention = np.stack(attention[::-1]) if attention else np.zeros((0, length), dtype=np.float32)
        return Hypothesis(path[::-1], attention, score)

    def hypotheses(self, src_len: torch.Tensor) -> list[Hypothesis]:
        """Each sentence's best hypothesis."""
        history = self.read()
        return [self.path(history, *ended) for ended in zip(self.best_score.tolist(), self.best_step.tolist(),
                                                              self.best_row.tolist(), src_len.tolist())]

    def n_best_lists(self, src_len: torch.Tensor) -> list[list[Hypothesis]]:
        """Each sentence's `n_best` best hypotheses that ended, best first."""
        history = self.read()
        lengths = src_len.tolist()
        if not self.endings:  # an empty batch
            return [[] for _ in lengths]
        sentences, scores, steps, rows = (torch.cat(column).tolist() for column in zip(*self.endings))
        ended: list[list[tuple]] = [[] for _ in lengths]
        for sentence, score, step, row in zip(sentences, scores, steps, rows):
            ended[sentence].append((score, step, row))
        return [[self.path(history, *candidate, lengths[sentence])
                 for candidate in sorted(candidates, key=lambda c: -c[0])[:self.n_best]]
                for sentence, candidates in enumerate(ended)]


@torch.no_grad()
def greedy_search(model, src: torch.Tensor, src_len: torch.Tensor, max_len_ratio: float = 1.5,
                  shortlist: torch.Tensor | None = None, **scoring) -> list[Hypothesis]:
    """The most likely next word at each step; a sentence leaves the batch once it has ended.
    The score is the sum of the chosen words' log-probabilities, <eos> included."""
    device = src.device
    memory, state = model.encode(src, src_len)
    output = output_layer(model, shortlist, **scoring)
    history = SearchHistory(src.size(0), device)
    sentences = torch.arange(src.size(0), device=device)  # the batch rows still searching
    limits = max_lengths(src_len, max_len_ratio).to(device)
    prev = torch.full_like(sentences, SOS_ID)
    scores = torch.zeros(src.size(0), device=device)
    for step in range(int(limits.max())):
        attentional, state, weights = model.decoder.step(prev, state, memory)
        best, positions = output.best(attentional, step + 1 >= limits[sentences], 1)
        tokens, scores = output.token_ids(positions.squeeze(1)), scores + best.squeeze(1)
        ended = tokens == EOS_ID
        history.finish(sentences[ended], scores[ended], ended.nonzero().squeeze(1), step)
        going_on = (~ended).nonzero().squeeze(1)
        history.record(weights, tokens[going_on], going_on)
        if len(going_on) == 0:
            break
        if len(going_on) < len(sentences):
            memory, state = memory.select(going_on), state.select(going_on)
            sentences, scores = sentences[going_on], scores[going_on]
        prev = tokens[going_on]
    return history.hypotheses(src_len)


@torch.no_grad()
def beam_search(model, src: torch.Tensor, src_len: torch.Tensor, beam_size: int = 5, alpha: float = 1.0,
                max_len_ratio: float = 1.5, shortlist: torch.Tensor | None = None, **scoring) -> list[Hypothesis]:
    """Beam search over the whole batch at once: sentences x beam rows advance together, and a
    sentence leaves the batch once it is done. A hypothesis ends with <eos> (forced, at the model's
    price, at the sentence's length limit) and scores log p / length_penalty(length + 1, alpha).
    `scoring` goes to OutputLayer: the projection's dtype and an unk_penalty."""
    if beam_size == 1:
        hypotheses = greedy_search(model, src, src_len, max_len_ratio, shortlist, **scoring)
    elif rerankers(model):  # the beam's n-best list, reranked by the right-to-left members
        n_best = beam_history(model, src, src_len, beam_size, alpha, max_len_ratio, shortlist, beam_size,
                              **scoring).n_best_lists(src_len)
        hypotheses = rerank(model, src, src_len, n_best, alpha, scoring.get("unk_penalty", 0.0))
    else:
        hypotheses = search_beams(model, src, src_len, beam_size, alpha, max_len_ratio, shortlist, **scoring)
    return read_forwards(model, hypotheses)


def rerankers(model) -> list:
    return list(model.rerankers) if isinstance(model, Ensemble) else []


def read_forwards(model, hypotheses: list[Hypothesis]) -> list[Hypothesis]:
    """A right-to-left model's hypotheses in reading order (its attention rows follow its words)."""
    if not model.config.right_to_left:
        return hypotheses
    return [Hypothesis(h.tokens[::-1], h.attention[::-1].copy(), h.score) for h in hypotheses]


# Rows x target length x vocabulary floats that one teacher-forced pass may hold (about 256 MB).
SCORED_FLOATS = 1 << 26


@torch.no_grad()
def sequence_log_probs(model, src: torch.Tensor, src_len: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Each target's log-probability under `model` (a Seq2Seq) over its whole vocabulary: its words
    then <eos>, read by teacher forcing, backwards for a right-to-left model. `targets` in reading
    order, one per row of `src`; in chunks of rows, so the vocabulary-wide scores stay bounded."""
    from pipeline.data import pad

    if model.config.right_to_left:
        targets = [t[::-1] for t in targets]
    longest = max((len(t) for t in targets), default=0) + 1
    chunk = max(1, SCORED_FLOATS // (longest * model.config.tgt_vocab))
    output, totals = OutputLayer(model), []
    for start in range(0, len(targets), chunk):
        part = targets[start:start + chunk]
        tgt_in = pad([[SOS_ID] + t for t in part]).to(src.device)
        tgt_out = pad([t + [EOS_ID] for t in part]).to(src.device)
        attentional, _ = model(src[start:start + chunk], src_len[start:start + chunk], tgt_in)
        log_probs = output.log_probs(attentional.reshape(-1, attentional.size(-1)))
        picked = log_probs.gather(1, tgt_out.view(-1, 1)).view(tgt_out.shape)
        totals.append(picked.masked_fill(tgt_out == PAD_ID, 0.0).sum(1))
    return torch.cat(totals) if totals else torch.zeros(0, device=src.device)


def rerank(model, src: torch.Tensor, src_len: torch.Tensor, n_best: list[list[Hypothesis]],
           alpha: float, unk_penalty: float = 0.0) -> list[Hypothesis]:
    """Each sentence's best hypothesis by the mean of two length-normalised scores: the search's
    (left to right) and the right-to-left members' mean log-probability of it (Sennrich et al.,
    WMT 2016), so that an ending the left-to-right model liked must also make a likely beginning.
    Each <unk> costs both scores the `unk_penalty`. (With a shortlist the search normalised over
    the shortlist's words, the right-to-left models over their whole vocabulary.)"""
    rows = torch.tensor([i for i, hyps in enumerate(n_best) for _ in hyps], device=src.device)
    candidates = [h for hyps in n_best for h in hyps]
    targets = [h.tokens for h in candidates]
    backwards = torch.stack([sequence_log_probs(r2l, src[rows], src_len[rows], targets)
                             for r2l in rerankers(model)]).mean(0).tolist()
    best, start = [], 0
    for hyps in n_best:
        combined = [(h.score + (back - unk_penalty * h.tokens.count(UNK_ID))
                     / length_penalty(len(h.tokens) + 1, alpha)) / 2
                    for h, back in zip(hyps, backwards[start:start + len(hyps)])]
        best.append(hyps[int(np.argmax(combined))])
        start += len(hyps)
    return best


@torch.no_grad()
def search_beams(model, src: torch.Tensor, src_len: torch.Tensor, beam_size: int, alpha: float = 1.0,
                 max_len_ratio: float = 1.5, shortlist: torch.Tensor | None = None, **scoring) -> list[Hypothesis]:
    """Beam search proper, for any beam size (beam_search hands a beam of one to greedy_search)."""
    return beam_history(model, src, src_len, beam_size, alpha, max_len_ratio, shortlist,
                        **scoring).hypotheses(src_len)


@torch.no_grad()
def beam_history(model, src: torch.Tensor, src_len: torch.Tensor, beam_size: int, alpha: float = 1.0,
                 max_len_ratio: float = 1.5, shortlist: torch.Tensor | None = None, n_best: int = 1,
                 **scoring) -> SearchHistory:
    """The search itself; its history holds each sentence's best hypothesis and, with `n_best`
    above one, the best `n_best` that ended (at most the beam's size)."""
    batch, k, device = src.size(0), beam_size, src.device
    memory, state = model.encode(src, src_len)
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    memory, state = memory.select(rows), state.select(rows)
    output = output_layer(model, shortlist, **scoring)
    history = SearchHistory(batch, device, n_best)
    sentences = torch.arange(batch, device=device)
    finished = torch.zeros(batch, dtype=torch.long, device=device)  # hypotheses ended, per sentence
    limits = max_lengths(src_len, max_len_ratio).to(device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    prev = torch.full((batch * k,), SOS_ID, dtype=torch.long, device=device)
    for step in range(int(limits.max())):
        attentional, state, weights = model.decoder.step(prev, state, memory)
        at_limit = step + 1 >= limits[sentences]
        # The best 2k candidates of a sentence are among the best 2k words of each of its rows.
        row_best, row_positions = output.best(attentional, at_limit.repeat_interleave(k), 2 * k)
        n, per_row = scores.size(0), row_best.size(1)
        candidates = (scores.view(-1, 1) + row_best).view(n, k * per_row)
        top_scores, top_ids = candidates.topk(min(2 * k, k * per_row), dim=1)
        parent_rows = top_ids // per_row + torch.arange(n, device=device).unsqueeze(1) * k
        positions = row_positions.view(n, k * per_row).gather(1, top_ids)
        is_eos = positions == output.eos

        # Candidates that end here and would have made the beam become finished hypotheses.
        ending = is_eos & torch.isfinite(top_scores)
        ending[:, k:] = False
        finished[sentences] += ending.sum(1)
        normalised = (top_scores / length_penalty(step + 1, alpha)).masked_fill(~ending, float("-inf"))
        best, rank = normalised.max(dim=1)
        history.finish(sentences, best, parent_rows.gather(1, rank.unsqueeze(1)).squeeze(1), step)
        if n_best > 1:
            history.end_all(sentences.unsqueeze(1).expand_as(normalised).reshape(-1), normalised.reshape(-1),
                            parent_rows.reshape(-1), step)

        # The best k candidates that did not end go on, in the sentences that are not done: a
        # sentence is done once k hypotheses have ended and the best of them beats the best that
        # any live one could still reach (counting only the k would let improbable endings stop a
        # likely path). A log-probability only falls as words are added, while the length penalty
        # grows up to the sentence's limit: logp / lp(limit) bounds a live hypothesis's final score.
        keep = (torch.arange(top_ids.size(1), device=device) + is_eos.long() * 2 * k).topk(k, largest=False).indices
        next_scores = top_scores.gather(1, keep)
        live_best = next_scores.max(dim=1).values / length_penalty(limits[sentences].float(), alpha)
        done = at_limit | ((finished[sentences] >= k) & (history.best_score[sentences] >= live_best))
        going_on = (~done).nonzero().squeeze(1)
        keep = keep[going_on]
        parents = parent_rows[going_on].gather(1, keep).view(-1)
        tokens = output.token_ids(positions[going_on].gather(1, keep).view(-1))
        history.record(weights, tokens, parents)
        if len(going_on) == 0:
            break
        if len(going_on) < n:
            memory = memory.select((going_on.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1))
            sentences = sentences[going_on]
        scores = next_scores[going_on]
        state, prev = state.select(parents), tokens
    return history


def replace_unknowns(tokens: list[str], attention: np.ndarray, source_tokens: list[str],
                     translations: list[str | None] | None = None) -> list[str]:
    """Each <unk> in the output becomes the source word it attended to most (names, numbers), or
    that word's dictionary translation where `translations` (one per source word) has one."""
    if not source_tokens:
        return tokens
    out = []
    for i, tok in enumerate(tokens):
        if tok == UNK and i < len(attention):
            position = int(attention[i].argmax())
            tok = (translations[position] if translations else None) or source_tokens[position]
        out.append(tok)
    return out


class Translator:
    """Text in, text out: tokenise, encode, search, replace unknowns, detokenise. With a lexicon
    (pipeline.lexicon), unknown words can be translated by it and the search can score a shortlist."""

    def __init__(self, model, src_tok: Tokenizer, tgt_tok: Tokenizer, src_vocab: Vocab, tgt_vocab: Vocab,
                 device: torch.device | str = "cpu", lexicon=None):
        self.model = model.to(device).eval()
        self.src_tok, self.tgt_tok = src_tok, tgt_tok
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.device = torch.device(device)
        self.lexicon = lexicon

    def translate_tokens(self, sources: list[list[str]], beam_size: int = 5, alpha: float = 1.0,
                         max_len_ratio: float = 1.5, batch_size: int = 64,
                         originals: list[list[str]] | None = None, unk_dictionary: bool = False,
                         shortlist: bool = False, precision: str = "float32",
                         unk_penalty: float = 0.0) -> list[tuple[list[str], np.ndarray]]:
        """Token lists in, (output tokens, attention) out, in the input order. Unknown output
        words are copied from `originals` (the cased source tokens) where given, or translated by
        the lexicon with `unk_dictionary`; `shortlist` scores only the lexicon's likely words;
        `precision` "bfloat16" runs the network's matrix products in bf16 (decoding_dtype);
        `unk_penalty` is taken off the score of every output <unk>."""
        if (unk_dictionary or shortlist) and self.lexicon is None:
            raise ValueError("unk_dictionary and shortlist need a Translator with a lexicon")
        originals = originals or sources
        from pipeline.data import pad

        results: list = [None] * len(sources)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # similar lengths per batch
        dtype = decoding_dtype(self.device, precision)
        # One autocast context for the whole call: it casts each weight once.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                ids = [self.src_vocab.encode(sources[i]) or [PAD_ID] for i in rows]
                src = pad(ids).to(self.device)
                src_len = torch.tensor([max(len(sources[i]), 1) for i in rows], device=self.device)
                words_to_score = self.lexicon.shortlist([sources[i] for i in rows], self.tgt_vocab) if shortlist else None
                hypotheses = beam_search(self.model, src, src_len, beam_size, alpha, max_len_ratio, words_to_score,
                                         dtype=dtype, unk_penalty=unk_penalty)
                for i, hyp in zip(rows, hypotheses):
                    translations = [self.lexicon.best(w) for w in sources[i]] if unk_dictionary else None
                    words = replace_unknowns(self.tgt_vocab.decode(hyp.tokens), hyp.attention, originals[i], translations)
                    results[i] = (words, hyp.attention)
        return results

    def translate(self, texts: list[str], **search) -> list[str]:
        sources, originals = self.src_tok.from_cased_all(self.src_tok.words(t) for t in texts)
        outputs = self.translate_tokens(sources, originals=originals, **search)
        return [self.tgt_tok.detokenize(words) for words, _ in outputs]

"""Batched greedy and beam search, and translation of raw text with a trained model."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.text import EOS_ID, PAD_ID, SOS_ID, UNK, Tokenizer, Vocab


@dataclass
class Hypothesis:
    tokens: list[int]  # without <sos>, up to and without <eos>
    attention: np.ndarray  # len(tokens) x source length
    score: float


def max_lengths(src_len: torch.Tensor, ratio: float) -> torch.Tensor:
    """Each sentence's output limit: long enough for a translation, short enough to stop babble."""
    return (src_len.float() * ratio).long() + 5


@torch.no_grad()
def greedy_search(model, src: torch.Tensor, src_len: torch.Tensor, max_len_ratio: float = 1.5) -> list[Hypothesis]:
    memory, state = model.encode(src, src_len)
    batch = src.size(0)
    prev = torch.full((batch,), SOS_ID, dtype=torch.long, device=src.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    tokens, attentions, scores = [], [], torch.zeros(batch, device=src.device)
    limits = max_lengths(src_len, max_len_ratio).to(src.device)
    for step in range(int(limits.max())):
        attentional, state, weights = model.decoder.step(prev, state, memory)
        log_probs = torch.log_softmax(model.logits(attentional).float(), dim=-1)
        best, prev = log_probs.max(dim=-1)
        prev = prev.masked_fill(finished, PAD_ID)
        scores += best.masked_fill(finished, 0.0)
        tokens.append(prev)
        attentions.append(weights.float())
        finished |= (prev == EOS_ID) | (step + 1 >= limits)
        if finished.all():
            break
    tokens = torch.stack(tokens, 1).cpu().numpy()
    attentions = torch.stack(attentions, 1).cpu().numpy()
    out = []
    for b in range(batch):
        row = list(tokens[b])
        length = next((i for i, t in enumerate(row) if t in (EOS_ID, PAD_ID)), len(row))
        out.append(Hypothesis(row[:length], attentions[b, :length, : int(src_len[b])], float(scores[b])))
    return out


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's length normalisation: ((5 + length) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model, src: torch.Tensor, src_len: torch.Tensor, beam_size: int = 5, alpha: float = 1.0,
                max_len_ratio: float = 1.5) -> list[Hypothesis]:
    """Beam search over the whole batch at once: batch x beam rows advance together."""
    if beam_size == 1:
        return greedy_search(model, src, src_len, max_len_ratio)
    batch, k, device = src.size(0), beam_size, src.device
    memory, state = model.encode(src, src_len)
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    memory, state = memory.select(rows), state.select(rows)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    prev = torch.full((batch * k,), SOS_ID, dtype=torch.long, device=device)
    history = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
    attn_history = torch.zeros(batch * k, 0, src.size(1), device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    limits = max_lengths(src_len, max_len_ratio).to(device)
    src_lengths = src_len.tolist()

    for step in range(int(limits.max())):
        attentional, state, weights = model.decoder.step(prev, state, memory)
        log_probs = torch.log_softmax(model.logits(attentional).float(), dim=-1)
        vocab = log_probs.size(1)
        candidates = (scores.view(-1, 1) + log_probs).view(batch, k * vocab)
        top_scores, top_ids = candidates.topk(2 * k, dim=1)
        beam_ids, token_ids = top_ids // vocab, top_ids % vocab
        source_rows = (beam_ids + torch.arange(batch, device=device).unsqueeze(1) * k)  # batch x 2k
        is_eos = token_ids == EOS_ID
        last_step = (step + 1 >= limits).unsqueeze(1)  # batch x 1

        # Hypotheses that end here (and, at a sentence's last step, every live one) are set aside.
        ending = (is_eos | last_step) & torch.isfinite(top_scores)
        ending[:, k:] = False  # only candidates that would have made the beam
        for b, r in ending.nonzero().tolist():
            if done[b]:
                continue
            row = int(source_rows[b, r])
            toks = history[row].tolist() + ([] if is_eos[b, r] else [int(token_ids[b, r])])
            attn = torch.cat([attn_history[row], weights[row].float().unsqueeze(0)])[: len(toks)]
            finished[b].append(Hypothesis(toks, attn[:, : src_lengths[b]].cpu().numpy(),
                                          float(top_scores[b, r]) / length_penalty(len(toks) + 1, alpha)))
        done |= np.array([len(f) >= k for f in finished]) | last_step.squeeze(1).cpu().numpy()
        if done.all():
            break

        # The best k candidates that did not end continue.
        rank = torch.arange(2 * k, device=device).expand(batch, -1) + is_eos.long() * 2 * k
        keep = rank.topk(k, dim=1, largest=False).indices
        prev = token_ids.gather(1, keep)
        stopped = torch.from_numpy(done).to(device).unsqueeze(1) | (prev == EOS_ID)
        scores = top_scores.gather(1, keep).masked_fill(stopped, float("-inf"))
        chosen_rows = source_rows.gather(1, keep).view(-1)
        prev = prev.view(-1)
        state = state.select(chosen_rows)
        history = torch.cat([history[chosen_rows], prev.unsqueeze(1)], dim=1)
        attn_history = torch.cat([attn_history[chosen_rows], weights[chosen_rows].float().unsqueeze(1)], dim=1)
    return [max(f, key=lambda h: h.score) for f in finished]


def replace_unknowns(tokens: list[str], attention: np.ndarray, source_tokens: list[str]) -> list[str]:
    """Each <unk> in the output becomes the source word it attended to most (names, numbers)."""
    if not source_tokens:
        return tokens
    return [source_tokens[int(attention[i].argmax())] if tok == UNK and i < len(attention) else tok
            for i, tok in enumerate(tokens)]


class Translator:
    """Text in, text out: tokenise, encode, search, replace unknowns, detokenise."""

    def __init__(self, model, src_tok: Tokenizer, tgt_tok: Tokenizer, src_vocab: Vocab, tgt_vocab: Vocab,
                 device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.src_tok, self.tgt_tok = src_tok, tgt_tok
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.device = torch.device(device)

    def translate_tokens(self, sources: list[list[str]], beam_size: int = 5, alpha: float = 1.0,
                         max_len_ratio: float = 1.5, batch_size: int = 64,
                         originals: list[list[str]] | None = None) -> list[tuple[list[str], np.ndarray]]:
        """Token lists in, (output tokens, attention) out, in the input order. Unknown output
        words are copied from `originals` (the cased source tokens) where given."""
        originals = originals or sources
        from pipeline.data import pad

        results: list = [None] * len(sources)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # similar lengths per batch
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids = [self.src_vocab.encode(sources[i]) or [PAD_ID] for i in rows]
            src = pad(ids).to(self.device)
            src_len = torch.tensor([max(len(sources[i]), 1) for i in rows], device=self.device)
            for i, hyp in zip(rows, beam_search(self.model, src, src_len, beam_size, alpha, max_len_ratio)):
                words = replace_unknowns(self.tgt_vocab.decode(hyp.tokens), hyp.attention, originals[i])
                results[i] = (words, hyp.attention)
        return results

    def translate(self, texts: list[str], **search) -> list[str]:
        originals = [self.src_tok.tokenize_cased(t) for t in texts]
        sources = [[t.lower() for t in s] for s in originals] if self.src_tok.lowercase else originals
        outputs = self.translate_tokens(sources, originals=originals, **search)
        return [self.tgt_tok.detokenize(words) for words, _ in outputs]

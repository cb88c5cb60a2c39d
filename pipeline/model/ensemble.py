"""Several trained models decoding as one: at each step the search scores the next word by the
members' averaged log-probabilities (the ensemble of RNN translation systems, e.g. separately
seeded runs or checkpoints of one run). The search sees the interface of one Seq2Seq: `encode`,
`decoder.step`, and per-member states that follow the hypotheses with `select`.

The members must share both vocabularies (the same ids mean the same words); their sizes and
architectures may differ. Right-to-left members (ModelConfig.right_to_left) beside left-to-right
ones do not search: they rerank the left-to-right members' n-best list (pipeline.decode.rerank)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.model.seq2seq import Seq2Seq


class PerMember(tuple):
    """One value per member (memories, decoder states, attentional states), selected together."""

    def select(self, index: torch.Tensor) -> "PerMember":
        return PerMember(value.select(index) for value in self)


class EnsembleDecoder:
    """The members' decoders stepped together on the same previous words."""

    def __init__(self, members: nn.ModuleList):
        self.members = members

    def step(self, prev: torch.Tensor, state: PerMember, memory: PerMember):
        """prev B token ids -> (attentional states per member, new states per member, the members'
        mean attention B x S: what unknown-word replacement and the attention plots read)."""
        steps = [model.decoder.step(prev, s, m) for model, s, m in zip(self.members, state, memory)]
        attentional, states, weights = zip(*steps)
        return PerMember(attentional), PerMember(states), torch.stack(weights).mean(0)


class Ensemble(nn.Module):
    def __init__(self, members: list[Seq2Seq]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        sizes = {(m.config.src_vocab, m.config.tgt_vocab) for m in members}
        if len(sizes) > 1:
            raise ValueError(f"ensemble members have different vocabulary sizes (source, target): {sorted(sizes)}")
        forwards = [m for m in members if not m.config.right_to_left]
        searching = forwards or members  # right-to-left members alone search, backwards
        self.members = nn.ModuleList(searching)
        self.rerankers = nn.ModuleList([m for m in members if forwards and m.config.right_to_left])
        self.config = searching[0].config
        self.decoder = EnsembleDecoder(self.members)

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple[PerMember, PerMember]:
        encoded = [model.encode(src, src_len) for model in self.members]
        memories, states = zip(*encoded)
        return PerMember(memories), PerMember(states)

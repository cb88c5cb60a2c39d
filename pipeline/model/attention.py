"""Attention over encoder states: Luong (dot, general) and Bahdanau (additive)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Memory(NamedTuple):
    """What the decoder attends to, computed once per source batch."""

    values: torch.Tensor  # B x S x M   encoder states
    keys: torch.Tensor  # B x S x K   values projected for scoring (precomputed: it is per source, not per step)
    mask: torch.Tensor  # B x S       True at real (non-pad) source positions

    def select(self, index: torch.Tensor) -> "Memory":
        """Rows reordered or repeated, e.g. to follow beam-search hypotheses."""
        return Memory(*(t.index_select(0, index) for t in self))


class Attention(nn.Module):
    def __init__(self, kind: str, query_size: int, memory_size: int):
        super().__init__()
        self.kind = kind
        if kind == "dot":
            if query_size != memory_size:
                raise ValueError(f"dot attention needs equal sizes, got {query_size} and {memory_size}")
            self.key_proj = nn.Identity()
        elif kind == "general":
            self.key_proj = nn.Linear(memory_size, query_size, bias=False)
        elif kind == "bahdanau":
            self.key_proj = nn.Linear(memory_size, query_size, bias=False)
            self.query_proj = nn.Linear(query_size, query_size, bias=True)
            self.energy = nn.Linear(query_size, 1, bias=False)
        else:
            raise ValueError(f"unknown attention {kind!r}")

    def memory(self, values: torch.Tensor, mask: torch.Tensor) -> Memory:
        return Memory(values, self.key_proj(values), mask)

    def forward(self, query: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        """query B x Q -> (context B x M, weights B x S); weights are 0 on padding and sum to 1."""
        context, weights = self.attend_all(query.unsqueeze(1), memory)
        return context.squeeze(1), weights.squeeze(1)

    def attend_all(self, queries: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        """queries B x T x Q -> (contexts B x T x M, weights B x T x S): all steps in one batched matmul."""
        if self.kind == "bahdanau":
            hidden = torch.tanh(memory.keys.unsqueeze(1) + self.query_proj(queries).unsqueeze(2))
            scores = self.energy(hidden).squeeze(3)
        else:
            scores = torch.bmm(queries, memory.keys.transpose(1, 2))
        scores = scores.float().masked_fill(~memory.mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=2).to(memory.values.dtype)
        return torch.bmm(weights, memory.values), weights

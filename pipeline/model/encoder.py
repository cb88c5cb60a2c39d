"""A (bi)LSTM encoder over packed sequences, so padding never enters the recurrence."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.text import PAD_ID


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, emb_size: int, hidden_size: int, layers: int, bidirectional: bool,
                 dropout: float):
        super().__init__()
        directions = 2 if bidirectional else 1
        if hidden_size % directions:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by {directions} for a biLSTM")
        self.embedding = nn.Embedding(vocab_size, emb_size, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        # Each direction gets half the size, so the concatenated states have the decoder's size
        # and the final states can seed the decoder directly (the tutorial's "context vector").
        self.rnn = nn.LSTM(emb_size, hidden_size // directions, num_layers=layers, batch_first=True,
                           bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)
        self.layers, self.directions, self.output_size = layers, directions, hidden_size

    def forward(self, src: torch.Tensor, lengths: torch.Tensor):
        """src B x S (padded), lengths B -> states B x S x H, final (h, c) each layers x B x H."""
        embedded = self.dropout(self.embedding(src))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, (h, c) = self.rnn(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=src.size(1))
        return outputs, (self._join_directions(h), self._join_directions(c))

    def _join_directions(self, state: torch.Tensor) -> torch.Tensor:
        # (layers * directions) x B x h  ->  layers x B x (directions * h)
        layers_first = state.view(self.layers, self.directions, state.size(1), state.size(2))
        return torch.cat(layers_first.unbind(1), dim=2)

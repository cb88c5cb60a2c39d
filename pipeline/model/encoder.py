"""A (bi)LSTM encoder over packed sequences, so padding never enters the recurrence."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.model.precision import cell_weights, steps_with_fp32_states
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
        if steps_with_fp32_states(src, self.training):
            return self.forward_by_steps(embedded, lengths.to(src.device))
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, (h, c) = self.rnn(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=src.size(1))
        return outputs, (self._join_directions(h), self._join_directions(c))

    def forward_by_steps(self, embedded: torch.Tensor, lengths: torch.Tensor):
        """The same recurrence step by step with torch.lstm_cell, for decoding under CPU bf16
        autocast (steps_with_fp32_states): the states stay fp32, whatever the batch. Without the
        dropout between layers, which only training applies."""
        positions = torch.arange(embedded.size(1), device=embedded.device)
        active = (positions.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2)  # B x S x 1
        # Each sentence read backwards within its own length (padding stays at the end).
        backwards = (lengths.unsqueeze(1) - 1 - positions).clamp(min=0).unsqueeze(2)
        inputs, finals = embedded, []
        for layer in range(self.layers):
            outputs = []
            for direction in range(self.directions):
                read = inputs if direction == 0 else inputs.gather(1, backwards.expand_as(inputs))
                states, final = run_cell(read, active, cell_weights(self.rnn, layer, reverse=direction == 1))
                outputs.append(states if direction == 0 else states.gather(1, backwards.expand_as(states)))
                finals.append(final)
            inputs = torch.cat(outputs, dim=2) * active  # zeros at padding, as pad_packed_sequence gives
        h, c = (torch.stack([final[i] for final in finals]) for i in range(2))
        return inputs, (self._join_directions(h), self._join_directions(c))

    def _join_directions(self, state: torch.Tensor) -> torch.Tensor:
        # (layers * directions) x B x h  ->  layers x B x (directions * h)
        layers_first = state.view(self.layers, self.directions, state.size(1), state.size(2))
        return torch.cat(layers_first.unbind(1), dim=2)


def run_cell(inputs: torch.Tensor, active: torch.Tensor, weights: list[torch.Tensor]):
    """One LSTM layer over B x S inputs: (outputs B x S x H, final (h, c) at each row's last real step)."""
    batch, hidden = inputs.size(0), weights[1].size(1)
    h = c = inputs.new_zeros(batch, hidden, dtype=torch.float32)
    outputs = []
    for t, x in enumerate(inputs.unbind(1)):
        new_h, new_c = torch.lstm_cell(x, (h, c), *weights)
        h, c = torch.where(active[:, t], new_h, h), torch.where(active[:, t], new_c, c)
        outputs.append(new_h)
    return torch.stack(outputs, dim=1), (h, c)

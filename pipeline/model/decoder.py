"""An LSTM decoder with attention, with or without input feeding (Luong et al., 2015)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pipeline.model.attention import Attention, Memory
from pipeline.model.precision import cell_weights, steps_with_fp32_states
from pipeline.text import PAD_ID


# Decoding steps of at most this many rows run torch.lstm_cell; nn.LSTM (oneDNN) is faster above
# in fp32. Under CPU bf16 autocast every step runs lstm_cell, whose states stay fp32 (nn.LSTM's turn
# bf16), so that a sentence's translation does not depend on how many rows share its batch.
CELL_ROWS = 32


class DecoderState(NamedTuple):
    h: torch.Tensor  # layers x B x H
    c: torch.Tensor  # layers x B x H
    feed: torch.Tensor  # B x D   the previous attentional state, fed back as input (B x 0 without input feeding)

    def select(self, index: torch.Tensor) -> "DecoderState":
        return DecoderState(self.h.index_select(1, index), self.c.index_select(1, index),
                            self.feed.index_select(0, index))


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, emb_size: int, hidden_size: int, layers: int, attention: str,
                 dropout: float, output_size: int, input_feeding: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_size, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.feed_size = output_size if input_feeding else 0
        self.rnn = nn.LSTM(emb_size + self.feed_size, hidden_size, num_layers=layers, batch_first=True,
                           dropout=dropout if layers > 1 else 0.0)
        self.attention = Attention(attention, hidden_size, hidden_size)
        # The attentional state has the embedding size when output and embeddings are tied.
        self.combine = nn.Linear(2 * hidden_size, output_size, bias=False)
        self.layers, self.output_size, self.input_feeding = layers, output_size, input_feeding

    def initial_state(self, final: tuple[torch.Tensor, torch.Tensor]) -> DecoderState:
        """Start from the encoder's final long- and short-term memory, layer by layer when the
        depths match, else from its top layer."""
        h, c = final
        if h.size(0) != self.layers:
            h = h[-1:].expand(self.layers, -1, -1).contiguous()
            c = c[-1:].expand(self.layers, -1, -1).contiguous()
        return DecoderState(h, c, h.new_zeros(h.size(1), self.feed_size))

    def attend(self, queries: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        """LSTM outputs B x T x H -> (attentional states B x T x D, attention B x T x S)."""
        context, weights = self.attention.attend_all(queries, memory)
        return torch.tanh(self.combine(torch.cat([context, queries], dim=2))), weights

    def step(self, prev: torch.Tensor, state: DecoderState, memory: Memory):
        """One step: prev B token ids -> (attentional state B x D, new state, attention B x S)."""
        return self.step_embedded(self.dropout(self.embedding(prev)), state, memory)

    def step_embedded(self, embedded: torch.Tensor, state: DecoderState, memory: Memory):
        """The same step from the previous tokens' (dropped-out) embeddings, B x E."""
        inputs = torch.cat([embedded, state.feed], dim=1)
        if steps_with_fp32_states(inputs, self.training) or (not self.training and inputs.size(0) <= CELL_ROWS):
            output, h, c = self.cell_step(inputs, state)
        else:
            output, (h, c) = self.rnn(inputs.unsqueeze(1), (state.h, state.c))
        attentional, weights = self.attend(output, memory)
        attentional, weights = attentional.squeeze(1), weights.squeeze(1)
        feed = attentional if self.input_feeding else state.feed
        return attentional, DecoderState(h, c, feed), weights

    def cell_step(self, inputs: torch.Tensor, state: DecoderState):
        """The LSTM's step layer by layer with torch.lstm_cell, on the same weights: for a few rows
        nn.LSTM's per-call set-up costs more than the step (0.56 vs 0.13 ms for 5 rows on a CPU)."""
        hs, cs = [], []
        for layer in range(self.layers):
            h, c = torch.lstm_cell(inputs, (state.h[layer], state.c[layer]), *cell_weights(self.rnn, layer))
            hs.append(h)
            cs.append(c)
            inputs = h
        return inputs.unsqueeze(1), torch.stack(hs), torch.stack(cs)

    def forward(self, tgt_in: torch.Tensor, state: DecoderState, memory: Memory, teacher_forcing: float = 1.0,
                predict=None):
        """Run over B x T inputs. With teacher_forcing < 1, each step feeds back the model's own
        prediction (from `predict`, attentional -> token ids) with probability 1 - teacher_forcing.
        Teacher-forced without input feeding, no step depends on an earlier output: one LSTM call
        and one batched attention cover the whole sequence, instead of T small ones."""
        if not self.input_feeding and teacher_forcing >= 1.0:
            outputs, _ = self.rnn(self.dropout(self.embedding(tgt_in)), (state.h, state.c))
            attentional, weights = self.attend(outputs, memory)
            return self.dropout(attentional), weights
        # One lookup for the whole sequence, unbound into steps (one gradient for all of them in
        # the backward pass): a lookup per step costs a dense vocabulary x embedding gradient per
        # step, and a slice per step a full-sequence one (input feeding trained 1.2x as fast).
        embedded = self.dropout(self.embedding(tgt_in)).unbind(1)
        outputs, attentions = [], []
        inputs = embedded[0]
        for t in range(tgt_in.size(1)):
            attentional, state, weights = self.step_embedded(inputs, state, memory)
            outputs.append(attentional)
            attentions.append(weights)
            if t + 1 < tgt_in.size(1):
                inputs = embedded[t + 1]
                if teacher_forcing < 1.0:
                    own = torch.rand(inputs.size(0), 1, device=inputs.device) >= teacher_forcing
                    if bool(own.any()):  # the model's own words, looked up only when some row takes them
                        predicted = self.dropout(self.embedding(predict(attentional.detach())))
                        inputs = torch.where(own, predicted, inputs)
        return self.dropout(torch.stack(outputs, dim=1)), torch.stack(attentions, dim=1)

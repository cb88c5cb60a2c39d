"""The encoder-decoder: what the reference tutorial teaches, with attention and tied embeddings."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.model.attention import Memory
from pipeline.model.decoder import Decoder, DecoderState
from pipeline.model.encoder import Encoder


@dataclass(frozen=True)
class ModelConfig:
    src_vocab: int
    tgt_vocab: int
    emb_size: int
    hidden_size: int
    encoder_layers: int = 1
    decoder_layers: int = 1
    bidirectional: bool = True
    attention: str = "general"
    dropout: float = 0.2
    tie_embeddings: bool = True
    input_feeding: bool = True  # models saved before the option had it
    # Trained on reversed targets (its output read backwards): decodes alone, or reranks the n-best
    # list of left-to-right models (pipeline.model.ensemble).
    right_to_left: bool = False

    def to_dict(self) -> dict:
        """A left-to-right model's dict has no `right_to_left` key, as before the option, so that
        its saved file stays byte for byte what it was."""
        config = asdict(self)
        if not self.right_to_left:
            del config["right_to_left"]
        return config


class Seq2Seq(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        output_size = config.emb_size if config.tie_embeddings else config.hidden_size
        self.encoder = Encoder(config.src_vocab, config.emb_size, config.hidden_size, config.encoder_layers,
                               config.bidirectional, config.dropout)
        self.decoder = Decoder(config.tgt_vocab, config.emb_size, config.hidden_size, config.decoder_layers,
                               config.attention, config.dropout, output_size, config.input_feeding)
        self.generator = nn.Linear(output_size, config.tgt_vocab)
        if config.tie_embeddings:
            self.generator.weight = self.decoder.embedding.weight

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple[Memory, DecoderState]:
        states, final = self.encoder(src, src_len)
        mask = torch.arange(src.size(1), device=src.device).unsqueeze(0) < src_len.unsqueeze(1)
        return self.decoder.attention.memory(states, mask), self.decoder.initial_state(final)

    def logits(self, attentional: torch.Tensor) -> torch.Tensor:
        return self.generator(attentional)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor,
                teacher_forcing: float = 1.0):
        """Attentional states B x T x D for the target inputs; the loss projects them to the
        vocabulary all time steps at once, which is where most of the compute goes."""
        memory, state = self.encode(src, src_len)
        predict = lambda a: self.logits(a).argmax(-1)  # noqa: E731
        return self.decoder(tgt_in, state, memory, teacher_forcing, predict)

    def load_embeddings(self, src: torch.Tensor | None, tgt: torch.Tensor | None) -> None:
        with torch.no_grad():
            if src is not None:
                self.encoder.embedding.weight.copy_(src)
            if tgt is not None:
                self.decoder.embedding.weight.copy_(tgt)

    def freeze_embeddings(self) -> None:
        self.encoder.embedding.weight.requires_grad_(False)
        self.decoder.embedding.weight.requires_grad_(False)

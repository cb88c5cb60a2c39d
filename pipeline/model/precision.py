"""How decoding keeps fp32 LSTM states under bf16 autocast (where bf16 pays: pipeline/device.py)."""
from __future__ import annotations

import torch
from torch import nn


def steps_with_fp32_states(inputs: torch.Tensor, training: bool) -> bool:
    """Whether the LSTMs run step by step with lstm_cell: when decoding under CPU bf16 autocast.
    There nn.LSTM computes all in bf16 (oneDNN) when a batch's sentences have one length and keeps
    fp32 states otherwise, so a sentence's encoding would depend on its batch; CPU autocast runs
    only lstm_cell's products in bf16 and keeps its states fp32. (CUDA autocast casts lstm_cell's
    states too, and cuDNN is bf16 throughout whatever the lengths: GPUs keep nn.LSTM.)"""
    return not training and inputs.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def cell_weights(rnn: nn.LSTM, layer: int, reverse: bool = False) -> list[torch.Tensor]:
    """One layer's (and direction's) weights of `rnn`, in torch.lstm_cell's argument order."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    return [getattr(rnn, name + suffix) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

"""What both benchmarks share: params with --set overrides, and the model and data as training sees them."""
from __future__ import annotations

import yaml

from pipeline.config import Params, load_params
from pipeline.data import ParallelData, load_split, load_vocabs
from pipeline.storage import EMBEDDINGS
from pipeline.train import initial_model, pick_device


def params_with(overrides: list[str]) -> Params:
    """params.yaml with `section.key=value` overrides (YAML values), validated."""
    raw = load_params().model_dump(by_alias=True)
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return Params.model_validate(raw)


def setup(params: Params):
    """(model, train data, valid frame, src vocab, tgt vocab, device), as `vamos train` builds them."""
    import torch

    torch.manual_seed(params.seed)
    device = pick_device(params.train.device)
    if device.type == "cpu" and params.train.threads:
        torch.set_num_threads(params.train.threads)
    src_vocab, tgt_vocab = load_vocabs()
    data = ParallelData(load_split("train"), src_vocab, tgt_vocab)
    model, _, _ = initial_model(params, src_vocab, tgt_vocab, EMBEDDINGS, device)
    return model, data, load_split("valid"), src_vocab, tgt_vocab, device

"""What both benchmarks share: params with --set overrides, and the model and data as training sees them."""
from __future__ import annotations

import yaml

from pipeline import allocator, config
from pipeline.config import Params
from pipeline.data import load_corpus, load_split, load_vocabs
from pipeline.device import pick_device
from pipeline.storage import EMBEDDINGS, MODEL_FILE
from pipeline.train import initial_model


def params_with(overrides: list[str]) -> Params:
    """params.yaml with `section.key=value` overrides (YAML values), validated (pipeline/config.py's params_with)."""
    pairs = (item.split("=", 1) for item in overrides)
    return config.params_with(config.PARAMS_FILE, {key: yaml.safe_load(value) for key, value in pairs})


def setup(params: Params):
    """(model, train data, valid frame, src vocab, tgt vocab, device), loaded as `vamos train` loads them."""
    import torch

    torch.manual_seed(params.seed)
    device = pick_device(params.train.device)
    if device.type == "cpu":
        # As `vamos train` runs: under tcmalloc (this re-executes the benchmark, once), else glibc keeping freed memory.
        allocator.reexec_with_tcmalloc()
        allocator.tune_for_training(device.type)
        if params.train.threads:
            torch.set_num_threads(params.train.threads)
    corpus = load_corpus(right_to_left=params.train.right_to_left)
    model, _, _ = initial_model(params, corpus.src_vocab, corpus.tgt_vocab, EMBEDDINGS, device)
    return model, corpus.train, corpus.valid.frame, corpus.src_vocab, corpus.tgt_vocab, device


def decoding_setup(params: Params, data_root, split: str):
    """(model, source token lists, src vocab, tgt vocab, device, notes) for a decoding benchmark.
    Falls back to what this checkout can make without `dvc repro`, and says so in `notes`: a model
    of the configured size with random weights when there is no embedding file, and synthetic
    sentences of the test split's length distribution when there is no prepared data."""
    from pathlib import Path

    import numpy as np
    import torch

    from pipeline.model import ModelConfig, Seq2Seq
    from pipeline.text import Vocab

    torch.manual_seed(params.seed)
    device = pick_device(params.train.device)
    if device.type == "cpu" and params.train.threads:
        torch.set_num_threads(params.train.threads)
    data_root, notes = Path(data_root), []
    if (data_root / f"{split}.parquet").exists():
        src_vocab, tgt_vocab = load_vocabs(data_root)
        sources = [s.split() for s in load_split(split, data_root)["src_tokens"]]
    else:
        src_vocab, tgt_vocab = (Vocab([f"w{i}" for i in range(n - 4)]) for n in DEFAULT_VOCAB_SIZES)
        sources = synthetic_sources(src_vocab, SYNTHETIC_SENTENCES, params.seed)
        notes.append(f"no {data_root}/{split}.parquet: {len(sources)} synthetic sentences "
                     f"(gamma lengths, mean {np.mean([len(s) for s in sources]):.1f} tokens)")
    if MODEL_FILE.exists() and (data_root / f"{split}.parquet").exists():
        # The trained model: it stops where a translation ends, as served (its own vocabularies).
        from pipeline.model import load_model

        model, src_vocab, tgt_vocab, *_ = load_model(MODEL_FILE, device)
        notes.append(f"the trained model {MODEL_FILE}")
    elif (EMBEDDINGS / "src.w2v").exists():
        model, _, _ = initial_model(params, src_vocab, tgt_vocab, EMBEDDINGS, device)
        notes.append("an untrained model (no models/seq2seq/model.pt): it runs every sentence to its limit")
    else:
        cfg = params.train
        model = Seq2Seq(ModelConfig(
            src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), emb_size=params.embed.vector_size,
            hidden_size=cfg.hidden_size, encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
            bidirectional=cfg.bidirectional, attention=cfg.attention, dropout=cfg.dropout,
            tie_embeddings=cfg.tie_embeddings, input_feeding=cfg.input_feeding)).to(device)
        notes.append(f"no {EMBEDDINGS}/src.w2v: the configured model with random weights, which almost "
                     "never emits <eos>, so every sentence runs to its length limit")
    return model.eval(), sources, src_vocab, tgt_vocab, device, notes


# The default corpus's vocabulary sizes and test split (8,519 / 16,079 words; 281 sentences, 27.8
# source tokens on average), for synthetic stand-ins.
DEFAULT_VOCAB_SIZES = (8519, 16079)
SYNTHETIC_SENTENCES = 281


def synthetic_sources(vocab, count: int, seed: int, mean_length: float = 28.0) -> list[list[str]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.gamma(4.0, mean_length / 4.0, count).round().astype(int), 1, 80)
    words = vocab.itos[4:]
    return [[words[i] for i in rng.integers(0, len(words), n)] for n in lengths]

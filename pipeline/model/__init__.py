"""The seq2seq model, and its self-contained checkpoint: weights, config, vocabularies and
tokeniser settings (sentencepiece models included) in one file, loadable with torch.load(weights_only=True)."""
from __future__ import annotations

import io
from pathlib import Path

import torch

from pipeline import storage
from pipeline.model.seq2seq import ModelConfig, Seq2Seq
from pipeline.text import Tokenizer, Vocab

__all__ = ["ModelConfig", "Seq2Seq", "NotAModel", "save_model", "load_model", "load_translator"]

# Keys that pipeline.checkpoint.save writes (last.pt, to resume training) in place of a saved model's.
TRAINING_CHECKPOINT_KEYS = {"model", "optimizer", "progress", "rng"}


class NotAModel(ValueError):
    """A file that torch loads but that holds no saved model; the message names the file."""


def save_model(path: str | Path, model: Seq2Seq, src_vocab: Vocab, tgt_vocab: Vocab, src_tok: Tokenizer,
               tgt_tok: Tokenizer, lexicon=None) -> None:
    bundle = {
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "src_vocab": src_vocab.itos,
        "tgt_vocab": tgt_vocab.itos,
        "src_tokenizer": tokenizer_settings(src_tok),
        "tgt_tokenizer": tokenizer_settings(tgt_tok),
    }
    if lexicon is not None:  # a pipeline.lexicon.Lexicon, as plain strings and lists
        bundle["lexicon"] = lexicon.to_dict()
    # Through a buffer: torch.save names the zip's records after the file, and atomic_path's
    # temporary name is random, which would give every save of the same weights other bytes.
    buffer = io.BytesIO()
    torch.save(bundle, buffer)
    with storage.atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, src_vocab, tgt_vocab, src_tokenizer, tgt_tokenizer) from a saved bundle."""
    bundle = torch.load(path, map_location=device, weights_only=True)
    check_is_model(path, bundle)
    model = Seq2Seq(ModelConfig(**bundle["config"]))
    model.load_state_dict(bundle["state_dict"])
    return (model.to(device).eval(), Vocab(bundle["src_vocab"]), Vocab(bundle["tgt_vocab"]),
            tokenizer_of(bundle["src_tokenizer"]), tokenizer_of(bundle["tgt_tokenizer"]))


def check_is_model(path: str | Path, bundle) -> None:
    """A training checkpoint loads as well as a model does, and then lacks the model's keys."""
    if isinstance(bundle, dict) and "config" in bundle:
        return
    if isinstance(bundle, dict) and TRAINING_CHECKPOINT_KEYS <= bundle.keys():
        raise NotAModel(f"{path} is a training checkpoint (weights, optimizer and progress, to resume training), "
                        "not a saved model: use models/seq2seq/model.pt or the best.pt beside it")
    raise NotAModel(f"{path} is not a saved vamos model (it holds no model config): use models/seq2seq/model.pt")


def tokenizer_settings(tok: Tokenizer) -> dict:
    """A tokeniser as weights_only-loadable values. A sentencepiece model travels as a uint8
    tensor (torch.load with weights_only=True refuses bytes); a word-level one adds no key."""
    settings = {"lang": tok.lang, "lowercase": tok.lowercase}
    if tok.subwords is not None:
        settings["subwords"] = torch.frombuffer(bytearray(tok.subwords), dtype=torch.uint8)
    return settings


def tokenizer_of(settings: dict) -> Tokenizer:
    subwords = settings.get("subwords")
    return Tokenizer(settings["lang"], settings["lowercase"],
                     subwords=None if subwords is None else subwords.cpu().numpy().tobytes())


def load_translator(path: str | Path, device: str | torch.device = "cpu"):
    from pipeline.decode import Translator
    from pipeline.lexicon import Lexicon

    model, src_vocab, tgt_vocab, src_tok, tgt_tok = load_model(path, device)
    lexicon = torch.load(path, map_location="cpu", weights_only=True).get("lexicon")
    return Translator(model, src_tok, tgt_tok, src_vocab, tgt_vocab, device,
                      lexicon=Lexicon.from_dict(lexicon) if lexicon is not None else None)

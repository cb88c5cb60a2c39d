"""The seq2seq model, and its self-contained checkpoint: weights, config, vocabularies and
tokeniser settings (sentencepiece models included) in one file, loadable with torch.load(weights_only=True)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline import storage
from pipeline.model.ensemble import Ensemble
from pipeline.model.seq2seq import ModelConfig, Seq2Seq
from pipeline.lexicon import Lexicon
from pipeline.text import Tokenizer, Vocab

__all__ = ["ModelConfig", "Seq2Seq", "Ensemble", "NotAModel", "save_model", "load_model", "load_translator",
           "pack_ensemble"]

# Keys that pipeline.checkpoint.save writes (last.pt, to resume training) in place of a saved model's.
TRAINING_CHECKPOINT_KEYS = {"model", "optimizer", "progress", "rng"}


class NotAModel(ValueError):
    """A file that torch loads but that holds no saved model; the message names the file."""


def save_model(path: str | Path, model: Seq2Seq | Ensemble, src_vocab: Vocab, tgt_vocab: Vocab, src_tok: Tokenizer,
               tgt_tok: Tokenizer, lexicon=None) -> None:
    """One file with everything a translator needs. An Ensemble's first member takes the keys of
    a single model; the others, rerankers last, follow under "members"."""
    first, *others = [*model.members, *model.rerankers] if isinstance(model, Ensemble) else [model]
    bundle = {
        **member_bundle(first),
        "src_vocab": src_vocab.itos,
        "tgt_vocab": tgt_vocab.itos,
        "src_tokenizer": tokenizer_settings(src_tok),
        "tgt_tokenizer": tokenizer_settings(tgt_tok),
    }
    if others:
        bundle["members"] = [member_bundle(member) for member in others]
    if lexicon is not None:  # a pipeline.lexicon.Lexicon, as plain strings and lists
        bundle["lexicon"] = lexicon.to_dict()
    # Through a buffer: torch.save names the zip's records after the file, and atomic_path's
    # temporary name is random, which would give every save of the same weights other bytes.
    buffer = io.BytesIO()
    torch.save(bundle, buffer)
    with storage.atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())


def member_bundle(model: Seq2Seq) -> dict:
    return {"config": model.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def member_of(bundle: dict) -> Seq2Seq:
    model = Seq2Seq(ModelConfig(**bundle["config"]))
    model.load_state_dict(bundle["state_dict"])
    return model


class LoadedModel(NamedTuple):
    model: Seq2Seq | Ensemble
    src_vocab: Vocab
    tgt_vocab: Vocab
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    lexicon: Lexicon | None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Everything a saved bundle holds, read once; the model is an Ensemble where the bundle has
    several members."""
    bundle = torch.load(path, map_location=device, weights_only=True)
    check_is_model(path, bundle)
    model = member_of(bundle)
    if bundle.get("members"):
        model = Ensemble([model, *map(member_of, bundle["members"])])
    lexicon = bundle.get("lexicon")
    return LoadedModel(model.to(device).eval(), Vocab(bundle["src_vocab"]), Vocab(bundle["tgt_vocab"]),
                       tokenizer_of(bundle["src_tokenizer"]), tokenizer_of(bundle["tgt_tokenizer"]),
                       Lexicon.from_dict(lexicon) if lexicon is not None else None)


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

    model, src_vocab, tgt_vocab, src_tok, tgt_tok, lexicon = load_model(path, device)
    return Translator(model, src_tok, tgt_tok, src_vocab, tgt_vocab, device, lexicon=lexicon)


def pack_ensemble(paths: list[Path], output: Path) -> int:
    """Write one model file that decodes as the ensemble of the saved models at `paths` (an
    ensemble file among them adds its members), with the first model's lexicon; returns the
    number of members. The models must share vocabularies and tokenisers: the same ids must mean
    the same words."""
    if not paths:
        raise ValueError("no models to pack")
    loaded = [load_model(path) for path in paths]
    model, src_vocab, tgt_vocab, src_tok, tgt_tok, lexicon = loaded[0]
    for path, (_, other_src, other_tgt, other_src_tok, other_tgt_tok, _) in zip(paths[1:], loaded[1:]):
        if (other_src.itos, other_tgt.itos) != (src_vocab.itos, tgt_vocab.itos):
            raise NotAModel(f"{path}: its vocabularies differ from {paths[0]}'s; an ensemble's models must share them "
                            "(models trained on the same prepared data do)")
        if (other_src_tok, other_tgt_tok) != (src_tok, tgt_tok):
            raise NotAModel(f"{path}: its tokenisers differ from {paths[0]}'s")
    members = [member for m, *_ in loaded for member in ([*m.members, *m.rerankers] if isinstance(m, Ensemble) else [m])]
    save_model(output, Ensemble(members), src_vocab, tgt_vocab, src_tok, tgt_tok, lexicon)
    return len(members)

"""The pipeline's stages as plain functions: read inputs and params, write outputs atomically.
dvc.yaml calls each through `vamos <stage>`; nothing here knows about Prefect."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

import pandas as pd
from rich.console import Console
from rich.table import Table

from pipeline import storage
from pipeline.config import PARAMS_FILE, Params, ParamsError
from pipeline.storage import SPLITS, split_path

log = logging.getLogger(__name__)


def show_counts(title: str, counts: dict[str, int]) -> None:
    log.info(title)
    table = Table()
    table.add_column("reason")
    table.add_column("pairs", justify="right")
    for reason, n in counts.items():
        table.add_row(reason, f"{n:,}")
    Console(stderr=True).print(table)


def ingest(params: Params) -> dict:
    from pipeline.corpus import ingest as read_and_clean

    cfg = params.ingest
    pairs, report = read_and_clean(cfg.sources, cfg.max_words, cfg.max_length_ratio)
    storage.write_parquet(storage.RAW_PAIRS, pairs)
    storage.write_json(storage.REPORTS / "ingest.json", report)
    show_counts(f"kept {report['kept']:,} pairs; dropped by reason:", report["dropped"])
    if report["repaired"]:
        show_counts("repaired and kept, by reason:", report["repaired"])
    for reason, places in report["examples"].items():
        log.warning("%s, e.g. at %s", reason.replace("_", " "), ", ".join(places))
    for key in ("realigned_chapters", "misaligned_chapters_left_out"):
        if report.get(key):
            log.info("%s: %s", key.replace("_", " "), ", ".join(report[key]))
    return report


def split_of(pair_id: str, valid: float, test: float) -> str:
    """A pair's split from a hash of its stable id: the same pair always lands in the same split,
    however the corpus grows."""
    u = int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test else "valid" if u < test + valid else "train"


def check_subword_vocab(sentences, vocab_size: int, side: str) -> None:
    """Sentencepiece needs a piece for every character, one for the word boundary and <unk>:
    say so in terms of params.yaml, before sentencepiece says it in its own."""
    needed = len(set("".join(sentences)) - {" "}) + 2
    if vocab_size < needed:
        raise ParamsError(f"{PARAMS_FILE}: prepare.subwords.vocab_size is {vocab_size}, but the {side} training "
                          f"split has {needed - 2} distinct characters: it needs at least {needed} pieces")


def prepare(params: Params) -> dict:
    from pipeline import token_ids  # noqa: F401  interim: replaced by pipeline/prepare.py
    from pipeline.text import SUBWORD_FILE, Vocab, train_subwords, word_tokenizers

    cfg = params.prepare
    pairs = pd.read_parquet(storage.RAW_PAIRS)
    src_tok, tgt_tok = word_tokenizers(params)
    pairs["src_tokens"] = [" ".join(src_tok.tokenize(s)) for s in pairs["src"]]
    pairs["tgt_tokens"] = [" ".join(tgt_tok.tokenize(t)) for t in pairs["tgt"]]
    pairs["split"] = [split_of(i, cfg.split.valid, cfg.split.test) for i in pairs["id"]]
    # A held-out source sentence must not be seen in training, even paired with another target.
    held_out = set(pairs.loc[pairs["split"] != "train", "src_tokens"])
    leaking = (pairs["split"] == "train") & pairs["src_tokens"].isin(held_out)
    pairs = pairs[~leaking]
    frames = {s: pairs[pairs["split"] == s].drop(columns="split").reset_index(drop=True) for s in SPLITS}
    subwords = cfg.subwords.model != "none"
    for side in ("src", "tgt"):
        model_file = storage.PREPARED / SUBWORD_FILE.format(side=side)
        if not subwords:  # a word-level run leaves no models of an earlier subword run behind
            model_file.unlink(missing_ok=True)
            continue
        # Trained on the training split's (case-handled) Moses words; then every split's words
        # become pieces, which embed, train and evaluate take as they take words.
        check_subword_vocab(frames["train"][f"{side}_tokens"], cfg.subwords.vocab_size, side)
        model = train_subwords(frames["train"][f"{side}_tokens"], cfg.subwords.model, cfg.subwords.vocab_size)
        with storage.atomic_path(model_file) as tmp:
            tmp.write_bytes(model)
        tok = replace(src_tok if side == "src" else tgt_tok, subwords=model)
        for frame in frames.values():
            frame[f"{side}_tokens"] = [" ".join(tok.pieces(s.split())) for s in frame[f"{side}_tokens"]]
    for split, frame in frames.items():
        storage.write_parquet(split_path(split), frame)
    train = frames["train"]
    src_vocab = Vocab.build((s.split() for s in train["src_tokens"]), cfg.vocab.min_freq, cfg.vocab.max_size)
    tgt_vocab = Vocab.build((s.split() for s in train["tgt_tokens"]), cfg.vocab.min_freq, cfg.vocab.max_size)
    src_vocab.save(storage.PREPARED / "vocab.src.json")
    tgt_vocab.save(storage.PREPARED / "vocab.tgt.json")
    write_ids_and_manifest(frames, src_vocab, tgt_vocab)  # interim: replaced by pipeline/prepare.py

    def unk_rate(frame: pd.DataFrame, column: str, vocab: Vocab) -> float:
        tokens = [t for s in frame[column] for t in s.split()]
        return round(sum(t not in vocab for t in tokens) / max(len(tokens), 1), 4)

    train_tokens = {side: int(train[f"{side}_tokens"].str.split().str.len().sum()) for side in ("src", "tgt")}
    report = {
        "pairs": {s: len(f) for s, f in frames.items()},
        "dropped_train_pairs_with_held_out_source": int(leaking.sum()),
        "vocab": {"src": len(src_vocab), "tgt": len(tgt_vocab)},
        "train_tokens": train_tokens,
        "test_unk_rate": {"src": unk_rate(frames["test"], "src_tokens", src_vocab),
                          "tgt": unk_rate(frames["test"], "tgt_tokens", tgt_vocab)},
        # Pieces, with subwords: fewer unknowns cost longer sequences.
        "mean_train_tokens_per_sentence": {side: round(n / max(len(train), 1), 2)
                                           for side, n in train_tokens.items()},
    }
    if subwords:
        import sentencepiece

        report["subwords"] = cfg.subwords.model_dump() | {"sentencepiece": sentencepiece.__version__}
    storage.write_json(storage.REPORTS / "prepare.json", report)
    log.info("prepared %s; vocab %s", report["pairs"], report["vocab"])
    return report


def write_ids_and_manifest(frames: dict[str, pd.DataFrame], src_vocab, tgt_vocab) -> None:
    # interim: replaced by pipeline/prepare.py
    from pipeline import token_ids

    for split, frame in frames.items():
        for side, vocab in (("src", src_vocab), ("tgt", tgt_vocab)):
            column = f"{side}_tokens"
            token_ids.write(storage.PREPARED, split, side,
                            [token_ids.flatten(vocab.encode(s.split()) for s in frame[column])])
    files = sorted(p for p in storage.PREPARED.iterdir() if p.is_file() and p != storage.PREPARED_MANIFEST)
    storage.write_json(storage.PREPARED_MANIFEST, {"files": {p.name: storage.file_md5(p) for p in files}})


def embed(params: Params) -> dict:
    from pipeline.embeddings import evaluate_vectors, plot_projection, save_vectors, train_word2vec

    train = pd.read_parquet(split_path("train"))
    report = {}
    for side, column, lang in (("src", "src_tokens", params.prepare.src_lang),
                               ("tgt", "tgt_tokens", params.prepare.tgt_lang)):
        sentences = [s.split() for s in train[column]]
        log.info("word2vec (%s) on %d %s sentences", "skip-gram" if params.embed.sg else "CBOW", len(sentences), lang)
        model = train_word2vec(sentences, params.embed, params.seed)
        save_vectors(storage.EMBEDDINGS / f"{side}.w2v", model.wv)
        report[side] = evaluate_vectors(model.wv, lang)
        plot_projection(model.wv, storage.PLOTS / f"embeddings_{side}.png", f"word2vec ({lang}): PCA of frequent words")
    storage.write_json(storage.REPORTS / "embeddings.json", report)
    return report


def train(params: Params) -> dict:
    from pipeline.device import keep_freed_memory, pick_device
    from pipeline.train import train as run_training

    if pick_device(params.train.device).type == "cpu":
        keep_freed_memory()
    return run_training(params)


def model_run_id(params: Params) -> str:
    """The MLflow run of the model in models/seq2seq. `train` records it in .vamos/run.json and tags
    the run with the model's md5; a model that came from elsewhere (dvc pull, a run-cache restore,
    a temp experiment) is found by that tag, or gets a run of its own here."""
    from pipeline.tracking import mlflow_setup

    mlflow = mlflow_setup(params.registry.experiment)
    md5 = storage.file_md5(storage.MODEL_FILE)
    if storage.RUN_FILE.exists():
        run_id = storage.read_json(storage.RUN_FILE)["run_id"]
        run = mlflow.search_runs(filter_string=f"attributes.run_id = '{run_id}'", output_format="list")
        if run and run[0].data.tags.get("model_md5") == md5:
            return run_id
    tagged = mlflow.search_runs(filter_string=f"tags.model_md5 = '{md5}'", output_format="list",
                                order_by=["attributes.start_time ASC"])
    if tagged:
        return tagged[0].info.run_id
    log.warning("no MLflow run in this store trained %s (md5 %s): logging to a new run", storage.MODEL_FILE, md5)
    with mlflow.start_run(tags={"model_md5": md5, "trained_elsewhere": "true"}) as run:
        return run.info.run_id


def evaluate(params: Params) -> dict:
    from pipeline.evaluate import evaluate as run_evaluation
    from pipeline.model import load_translator
    from pipeline.device import pick_device
    from pipeline.tracking import mlflow_setup

    translator = load_translator(storage.MODEL_FILE, pick_device(params.train.device))
    metrics = run_evaluation(translator, pd.read_parquet(split_path("test")), params.evaluate, storage.REPORTS)
    storage.write_json(storage.REPORTS / "metrics.json", {"test": metrics})
    mlflow = mlflow_setup(params.registry.experiment)
    with mlflow.start_run(run_id=model_run_id(params)):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)})
        mlflow.log_metrics({f"test_greedy_{k}": v for k, v in metrics["greedy"].items()})
        mlflow.log_artifact(str(storage.REPORTS / "samples.md"))
        mlflow.log_artifact(str(storage.REPORTS / "bleu_by_length.csv"))
        mlflow.log_artifacts(str(storage.REPORTS / "attention"), "attention")
    log.info("test BLEU %.2f, chrF %.2f, TER %.2f (beam %d); greedy BLEU %.2f", metrics["bleu"], metrics["chrf"],
             metrics["ter"], metrics["beam_size"], metrics["greedy"]["bleu"])
    return metrics


def register(params: Params) -> dict:
    from pipeline.registry import register as register_model

    result = register_model(params, storage.MODEL_FILE, model_run_id(params), pd.read_parquet(split_path("test")))
    storage.write_json(storage.REPORTS / "registry.json", result)
    return result


STAGES = {f.__name__: f for f in (ingest, prepare, embed, train, evaluate, register)}

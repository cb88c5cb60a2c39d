"""The pipeline's stages as plain functions: read inputs and params, write outputs atomically.
dvc.yaml calls each through `vamos <stage>`; nothing here knows about Prefect."""
from __future__ import annotations

import logging

import pandas as pd
from rich.console import Console
from rich.table import Table

from pipeline import storage
from pipeline.config import METRICS, Params
from pipeline.storage import split_path

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
    from pipeline.corpus import ingest_shards

    cfg = params.ingest
    report = ingest_shards(cfg.sources, storage.RAW_PAIRS, max_words=cfg.max_words, max_ratio=cfg.max_length_ratio,
                           shard_pairs=cfg.shard_pairs, parallel=params.parallel)
    storage.write_json(storage.REPORTS / "ingest.json", report)
    show_counts(f"kept {report['kept']:,} pairs in {report['shards']} shards; dropped by reason:", report["dropped"])
    if report["repaired"]:
        show_counts("repaired and kept, by reason:", report["repaired"])
    for reason, places in report["examples"].items():
        log.warning("%s, e.g. at %s", reason.replace("_", " "), ", ".join(places))
    for key in ("realigned_chapters", "misaligned_chapters_left_out"):
        if report.get(key):
            log.info("%s: %s", key.replace("_", " "), ", ".join(report[key]))
    return report


def prepare(params: Params) -> dict:
    from pipeline.prepare import prepare as prepare_shards

    return prepare_shards(params)


def embed(params: Params) -> dict:
    from pipeline.embeddings import TokenStream, evaluate_vectors, plot_projection, save_vectors, train_word2vec

    report = {}
    for side, column, lang in (("src", "src_tokens", params.prepare.src_lang),
                               ("tgt", "tgt_tokens", params.prepare.tgt_lang)):
        sentences = TokenStream(split_path("train"), column, params.embed.max_tokens)
        model = train_word2vec(sentences, params.embed, params.seed)
        log.info("word2vec (%s) on %d %s sentences (every %s of the training split), %d words, %d in the "
                 "vocabulary", "skip-gram" if params.embed.sg else "CBOW", model.corpus_count, lang,
                 "one" if sentences.every == 1 else f"{sentences.every}th", model.corpus_total_words, len(model.wv))
        save_vectors(storage.EMBEDDINGS / f"{side}.w2v", model.wv)
        report[side] = evaluate_vectors(model.wv, lang)
        plot_projection(model.wv, storage.PLOTS / f"embeddings_{side}.png", f"word2vec ({lang}): PCA of frequent words")
    storage.write_json(storage.REPORTS / "embeddings.json", report)
    return report


def train(params: Params) -> dict:
    from pipeline import allocator
    from pipeline.device import pick_device
    from pipeline.train import train as run_training

    allocator.tune_for_training(pick_device(params.train.device).type)
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
        mlflow.log_metrics({f"test_{origin}_{k}": v for origin, scores in metrics.get("by_source", {}).items()
                            for k, v in scores.items() if k in METRICS})
        mlflow.log_artifact(str(storage.REPORTS / "samples.md"))
        mlflow.log_artifact(str(storage.REPORTS / "bleu_by_length.csv"))
        mlflow.log_artifacts(str(storage.REPORTS / "attention"), "attention")
    log.info("test BLEU %.2f, chrF %.2f, TER %.2f (beam %d); greedy BLEU %.2f", metrics["bleu"], metrics["chrf"],
             metrics["ter"], metrics["beam_size"], metrics["greedy"]["bleu"])
    for origin, scores in metrics.get("by_source", {}).items():
        log.info("  %s: %d sentences, BLEU %.2f, chrF %.2f, TER %.2f", origin, scores["sentences"], scores["bleu"],
                 scores["chrf"], scores["ter"])
    return metrics


def register(params: Params) -> dict:
    from pipeline.registry import register as register_model

    result = register_model(params, storage.MODEL_FILE, model_run_id(params), pd.read_parquet(split_path("test")))
    storage.write_json(storage.REPORTS / "registry.json", result)
    return result


STAGES = {f.__name__: f for f in (ingest, prepare, embed, train, evaluate, register)}

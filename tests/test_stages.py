"""One test per stage, on the outputs of every stage run once on the tiny corpus."""
import itertools
import json
import os
import random
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.storage import SPLITS, read_raw_pairs
from pipeline.embeddings import load_vectors
from pipeline.evaluate import bleu_by_length, samples_by_source, score_by_source
from pipeline.prepare import split_of
from pipeline.text import Tokenizer, Vocab
from tests.conftest import small_params, use_store, write_tsv


def read_json(path):
    return json.loads(path.read_text())


def test_ingest_combines_sources_and_reports_counts(trained_project):
    pairs = read_raw_pairs(trained_project / "data/raw/pairs")
    assert list(pairs.columns) == ["id", "origin", "src", "tgt"]
    assert set(pairs["origin"]) == {"bible", "incoming"}
    assert pairs["id"].is_unique and "Ruth.1.1" in set(pairs["id"])
    report = read_json(trained_project / "reports/ingest.json")
    assert report["kept"] == len(pairs)
    assert report["read"] == {"bible": 85, "incoming": 240}
    assert report["kept"] + sum(report["dropped"].values()) == sum(report["read"].values())  # none lost


def test_prepare_splits_without_leaks(trained_project):
    frames = {s: pd.read_parquet(trained_project / f"data/prepared/{s}.parquet") for s in SPLITS}
    for frame in frames.values():
        assert {"id", "src", "tgt", "src_tokens", "tgt_tokens"} <= set(frame.columns)
    ids = [set(f["id"]) for f in frames.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    held_out = set(frames["valid"]["src_tokens"]) | set(frames["test"]["src_tokens"])
    assert not held_out & set(frames["train"]["src_tokens"])
    assert len(frames["train"]) > 10 * (len(frames["valid"]) + len(frames["test"])) / 2
    assert (frames["train"]["src"] != frames["train"]["src_tokens"]).all()  # the text, not its tokens
    vocab = Vocab.load(trained_project / "data/prepared/vocab.tgt.json")
    assert vocab.itos[:4] == ["<pad>", "<unk>", "<sos>", "<eos>"] and "perro" in vocab


def test_split_is_stable_when_the_corpus_grows():
    ids = [f"Gen.{c}.{v}" for c in range(1, 30) for v in range(1, 40)]
    before = {i: split_of(i, 0.05, 0.05) for i in ids}
    after = {i: split_of(i, 0.05, 0.05) for i in ids + [f"new:{n}" for n in range(500)]}
    assert all(after[i] == before[i] for i in ids)
    counts = Counter(before.values())
    assert 0.02 < counts["test"] / len(ids) < 0.08 and 0.02 < counts["valid"] / len(ids) < 0.08


def test_split_of_is_the_same_in_every_process():
    """From sha256 of the id, not Python's hash(), which is salted anew in each process."""
    ids = [f"Gen.{c}.{v}" for c in range(1, 20) for v in range(1, 20)]
    here = [split_of(i, 0.05, 0.05) for i in ids]
    code = "import json, sys; from pipeline.prepare import split_of; " \
           "print(json.dumps([split_of(i, 0.05, 0.05) for i in json.load(sys.stdin)]))"
    for seed in ("1", "2"):
        other = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
                               env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        assert json.loads(other.stdout) == here
    assert set(here) == {"train", "valid", "test"}


def test_embed_writes_vectors_reports_and_projections(trained_project):
    vectors = load_vectors(trained_project / "models/embeddings/tgt.w2v")
    assert vectors.vector_size == 24 and "perro" in vectors.key_to_index
    report = read_json(trained_project / "reports/embeddings.json")
    assert "analogy_accuracy" in report["src"] and "wordsim353_spearman" in report["src"]
    assert report["tgt"]["neighbours"]
    for side in ("src", "tgt"):
        assert (trained_project / f"reports/plots/embeddings_{side}.png").stat().st_size > 10_000


def test_train_writes_model_curve_and_run(trained_project):
    summary = read_json(trained_project / "reports/train.json")
    assert summary["epochs"] == 12 and summary["stopped_by"] == "epochs"  # patience 12 cannot fire in 12
    assert "train_minutes" not in summary  # timings: train_speed.json
    assert read_json(trained_project / "reports/train_speed.json")["peak_memory_mb"] > 0
    curve = pd.read_csv(trained_project / "reports/learning_curve.csv")
    assert {"epoch", "train_loss", "valid_loss", "valid_bleu"} <= set(curve.columns)
    assert (trained_project / "models/seq2seq/model.pt").exists()
    assert read_json(trained_project / ".vamos/run.json")["run_id"]


def test_evaluate_scores_the_test_split(trained_project):
    metrics = read_json(trained_project / "reports/metrics.json")["test"]
    test = pd.read_parquet(trained_project / "data/prepared/test.parquet")
    assert metrics["sentences"] == len(test)
    for key in ("bleu", "chrf", "ter"):
        assert 0 <= metrics[key] and 0 <= metrics["greedy"][key]
    assert metrics["chrf"] > 5  # the tiny model has learned something of the target language
    assert len(list((trained_project / "reports/attention").glob("*.png"))) == 2
    assert "| id |" in (trained_project / "reports/samples.md").read_text()
    assert not pd.read_csv(trained_project / "reports/bleu_by_length.csv").empty
    # The test split mixes the two sources, so each is also scored apart.
    by_source = metrics["by_source"]
    assert set(by_source) == set(test["origin"]) == {"bible", "incoming"}
    assert sum(scores["sentences"] for scores in by_source.values()) == len(test)
    for scores in by_source.values():
        assert {"bleu", "chrf", "ter"} <= set(scores)


def test_bleu_by_length_counts_moses_words_not_the_models_tokens():
    frame = pd.DataFrame({"src": ["Go.", "a b c d e f g h i j k l", "Let's go, now!"],
                          "src_tokens": ["g@@ o .", "a", "let 's go , now !"],  # pieces would differ
                          "tgt": ["Ve a la casa.", "a b c d e f g h i j k l", "¡Vamos ya, ahora mismo!"]})
    table = bleu_by_length(frame, frame["tgt"].tolist(), Tokenizer("en", True), "es")
    assert table.to_dict("list") == {"source_length": ["0-9", "10-19"], "sentences": [2, 1],
                                     "bleu": [100.0, 100.0]}


def test_scores_by_source_are_each_sources_own_corpus_scores():
    frame = pd.DataFrame({"origin": ["a", "b", "a"], "tgt": ["el perro duerme .", "gato", "la casa grande ."]})
    hypotheses = ["el perro duerme .", "perro", "la casa grande ."]
    scores = score_by_source(frame, hypotheses, "es")
    assert scores["a"]["bleu"] == 100.0 and scores["a"]["sentences"] == 2
    assert scores["b"]["chrf"] < 20 and scores["b"]["sentences"] == 1
    assert score_by_source(frame[frame["origin"] == "a"], hypotheses[:1], "es") == {}  # one source: none


def test_samples_take_each_source_in_turn():
    frame = pd.DataFrame({"origin": ["bible"] * 5 + ["software"] * 2})
    assert samples_by_source(frame, 4) == [0, 1, 5, 6]
    assert samples_by_source(frame, 20) == list(range(7))
    assert samples_by_source(frame.drop(columns="origin"), 3) == [0, 1, 2]
    # The heatmaps: the shortest of each source in turn (rows 6 and 2 are each source's shortest).
    shortest_first = np.array([6, 2, 5, 0, 1, 3, 4])
    assert samples_by_source(frame, 3, shortest_first) == [6, 2, 5]
    assert samples_by_source(frame.drop(columns="origin"), 3, shortest_first) == [6, 2, 5]


def test_register_makes_a_champion(trained_project):
    registry = read_json(trained_project / "reports/registry.json")
    assert registry["alias"] == "champion" and registry["version"] == 1
    assert registry["model"] == "vamos-en-es"


# English to Chinese, where words are not separated by spaces: "The red dog sleeps." -> "红色的狗在睡觉。"
NOUNS_ZH = {"dog": "狗", "cat": "猫", "king": "国王", "man": "男人", "horse": "马", "bird": "鸟"}
ADJECTIVES_ZH = {"red": "红色的", "big": "大", "small": "小", "old": "老", "black": "黑色的"}
VERBS_ZH = {"sleeps": "在睡觉", "eats": "在吃饭", "runs": "在跑步", "sings": "在唱歌", "walks": "在散步"}


@pytest.mark.slow
def test_english_to_chinese_runs_end_to_end(tmp_path, monkeypatch):
    """A pair in another script, ingest to register: characters as tokens and word2vec words,
    sacrebleu's zh tokeniser, no pair lost to the length ratio, and a model named after the pair."""
    from pipeline.config import load_params
    from pipeline.stages import STAGES

    pairs = [(f"The {a} {n} {v}.", f"{ADJECTIVES_ZH[a]}{NOUNS_ZH[n]}{VERBS_ZH[v]}。")
             for n, a, v in itertools.product(NOUNS_ZH, ADJECTIVES_ZH, VERBS_ZH)]
    random.Random(0).shuffle(pairs)
    params = small_params(**{"train.epochs": 12, "train.patience": 12})
    params["ingest"]["sources"] = [{"kind": "folder", "name": "incoming", "path": "data/incoming"}]
    params["prepare"].update(tgt_lang="zh_CN", lowercase_tgt=False)
    root = tmp_path / "project"
    (root / "data/incoming").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_tsv(root / "data/incoming/zh.tsv", pairs)
    use_store(monkeypatch, f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.chdir(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for stage in STAGES.values():
            stage(load_params())
    assert not [w for w in caught if "missing from font" in str(w.message)]  # the plots have CJK glyphs

    ingest = read_json(root / "reports/ingest.json")
    assert ingest["kept"] == len(pairs) and "length_ratio" not in ingest["dropped"]
    assert set(Vocab.load(root / "data/prepared/vocab.tgt.json").itos) >= {"狗", "睡", "觉", "。"}
    assert {"狗", "国", "王"} <= set(load_vectors(root / "models/embeddings/tgt.w2v").key_to_index)
    metrics = read_json(root / "reports/metrics.json")["test"]
    assert metrics["bleu"] > 30  # characters scored as words: the tiny grammar is learnt
    assert read_json(root / "reports/registry.json")["model"] == "vamos-en-zh_CN"
    from pipeline.model import load_translator

    (translation,) = load_translator(root / "models/seq2seq/model.pt").translate(["The black horse sings."])
    assert " " not in translation and translation.endswith("。")  # detokenised as Chinese is written

"""prepare, sharded (pipeline.prepare): the same outputs from one shard or several, inline or on a
real Dask cluster; capped held-out splits that never take a training pair; a cache that
tokenises only new shards; token ids that are the vocabulary's encoding of the tokens."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

import pipeline.prepare
from dask_cluster import dask_scheduler  # noqa: F401
from pipeline import storage, token_ids
from pipeline.config import load_params
from pipeline.prepare import CACHE, hash_fraction, sample_rows, split_hash, split_key, split_of
from pipeline.stages import prepare
from pipeline.storage import SPLITS
from pipeline.text import Vocab
from tests.conftest import small_params

ANIMALS = ["dog", "cat", "king", "man", "horse", "bird", "son", "brother"]


def corpus(n: int, start: int = 0) -> pd.DataFrame:
    """n pairs of distinct sentences (so no training pair shares a held-out source), ids p.<i>."""
    rows = range(start, start + n)
    return pd.DataFrame({"id": [f"p.{i}" for i in rows], "origin": "tests",
                         "src": [f"The {ANIMALS[i % 8]} number {i} sleeps." for i in rows],
                         "tgt": [f"El {ANIMALS[i % 8]} número {i} duerme." for i in rows]})


def write_shards(root: Path, frames: list[pd.DataFrame]) -> None:
    folder = root / storage.RAW_PAIRS
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        frame.to_parquet(folder / storage.shard_name(i), index=False)


def cut(frame: pd.DataFrame, shards: int) -> list[pd.DataFrame]:
    bounds = np.linspace(0, len(frame), shards + 1).astype(int)
    return [frame[a:b].reset_index(drop=True) for a, b in zip(bounds[:-1], bounds[1:])]


def run_prepare(root: Path, monkeypatch, frames: list[pd.DataFrame], **settings) -> dict:
    """prepare in the project `root`, on these shards; settings are dotted params (`split.max_test`)."""
    params = small_params()
    params["parallel"] = {"workers": 1, "scheduler": None}
    for key, value in settings.items():
        *path, name = key.split(".")
        section = params
        for part in path:
            section = section[part]
        section[name] = value
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_shards(root, frames)
    monkeypatch.chdir(root)
    return prepare(load_params())


def prepared_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / storage.PREPARED).iterdir())}


def frames(root: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(storage.split_path(s, root / storage.PREPARED)) for s in SPLITS}


def without_shard_counts(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("shards_tokenised", "shards_from_cache")}


def test_several_shards_give_the_outputs_of_one(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.prepare, "ROW_GROUP", 7)  # row groups that straddle shards
    pairs = corpus(300)
    one = run_prepare(tmp_path / "one", monkeypatch, [pairs])
    three = run_prepare(tmp_path / "three", monkeypatch, cut(pairs, 3))
    assert (one["shards_tokenised"], three["shards_tokenised"]) == (1, 3)
    assert without_shard_counts(one) == without_shard_counts(three)
    for split, frame in frames(tmp_path / "one").items():
        assert frame.equals(frames(tmp_path / "three")[split])
    assert prepared_files(tmp_path / "one") == prepared_files(tmp_path / "three")
    assert pq.ParquetFile(tmp_path / "one/data/prepared/train.parquet").num_row_groups > 30
    assert sum(len(f) for f in frames(tmp_path / "one").values()) == len(pairs)


def test_subwords_with_shards_whose_held_out_parts_are_empty(tmp_path, monkeypatch):
    """Shards of one pair: most have no valid or test pair, so their parts are empty frames; their
    piece columns must stay text, or the parts' schemas disagree and the split cannot be written."""
    pairs = corpus(60)
    subwords = {"prepare.subwords": {"model": "unigram", "vocab_size": 100, "sample_sentences": 1000, "threads": 1}}
    one = run_prepare(tmp_path / "one", monkeypatch, [pairs], **subwords)
    many = run_prepare(tmp_path / "many", monkeypatch, cut(pairs, 60), **subwords)
    assert min(one["pairs"]["valid"], one["pairs"]["test"]) > 0
    assert without_shard_counts(one) == without_shard_counts(many)
    assert prepared_files(tmp_path / "one") == prepared_files(tmp_path / "many")


def test_token_ids_are_the_vocabularys_encoding_and_the_manifest_their_md5s(tmp_path, monkeypatch):
    run_prepare(tmp_path, monkeypatch, cut(corpus(200), 2), **{"prepare.vocab.min_freq": 2})
    prepared = tmp_path / storage.PREPARED
    for split, frame in frames(tmp_path).items():
        for side in ("src", "tgt"):
            vocab = Vocab.load(prepared / f"vocab.{side}.json")
            ids = token_ids.TokenIds(prepared, split, side)
            assert len(ids) == len(frame) > 0
            for i, tokens in enumerate(frame[f"{side}_tokens"]):
                assert ids[i].tolist() == vocab.encode(tokens.split())
    assert token_ids.TokenIds(prepared, "train", "src")[0].tolist().count(1) >= 1  # min_freq 2 left unknowns
    manifest = json.loads((prepared / "manifest.json").read_text())["files"]
    assert set(manifest) == set(prepared_files(tmp_path)) - {"manifest.json"}
    assert all(storage.file_md5(prepared / name) == md5 for name, md5 in manifest.items())


def held_out_ids(root: Path) -> dict[str, set[str]]:
    return {s: set(f["id"]) for s, f in frames(root).items()}


def test_capped_splits_keep_the_smallest_hashes_and_never_take_a_training_pair(tmp_path, monkeypatch):
    caps = {"prepare.split": {"valid": 0.2, "test": 0.2, "max_valid": 9, "max_test": 7}}
    pairs = corpus(300)
    report = run_prepare(tmp_path, monkeypatch, cut(pairs, 2), **caps)
    u = hash_fraction([split_hash(i) for i in pairs["id"]])
    candidates = {"test": pairs["id"][u < 0.2], "valid": pairs["id"][(u >= 0.2) & (u < 0.4)]}
    before = held_out_ids(tmp_path)
    for split, cap in (("valid", 9), ("test", 7)):
        smallest = sorted(candidates[split], key=split_hash)[:cap]
        assert before[split] == set(smallest)
        assert report["held_out_capped"][split] == len(candidates[split]) - cap > 0
    assert report["pairs"]["train"] == len(pairs) - 16

    grown = run_prepare(tmp_path, monkeypatch, cut(pairs, 2) + [corpus(300, start=300)], **caps)
    after = held_out_ids(tmp_path)
    assert grown["pairs"]["valid"] == 9 and grown["pairs"]["test"] == 7
    for split in ("valid", "test"):
        assert not after[split] & before["train"]  # the threshold only tightens
    assert after["valid"] | after["test"] != before["valid"] | before["test"]  # new pairs did come in


def test_a_source_held_out_whole_is_all_test_uncapped_and_its_sentences_never_train(tmp_path, monkeypatch):
    bible, catalog = corpus(300), corpus(40, start=1000).assign(origin="incoming")
    catalog["id"] = [f"incoming:{i}" for i in range(len(catalog))]
    copy = catalog.iloc[:3].assign(origin="bible", id=["copy.1", "copy.2", "copy.3"])  # seen in training
    settings = {"prepare.split": {"valid": 0.2, "test": 0.2, "max_valid": 9, "max_test": 7,
                                  "hold_out": {"incoming": "test"}}}
    report = run_prepare(tmp_path, monkeypatch, [bible, pd.concat([catalog, copy])], **settings)
    ids = held_out_ids(tmp_path)
    assert set(catalog["id"]) <= ids["test"]  # every pair of the source, beyond max_test
    u = hash_fraction([split_hash(i) for i in bible["id"]])
    by_hash = sorted(bible["id"][u < 0.2], key=split_hash)[:7]  # the cap counts the other sources only
    assert ids["test"] == set(catalog["id"]) | set(by_hash)
    assert not ids["train"] & {"copy.1", "copy.2", "copy.3"}  # a held-out sentence does not train
    assert report["pairs"]["test"] == 47 and report["dropped_train_pairs_with_held_out_source"] >= 3
    vocab = Vocab.load(tmp_path / storage.PREPARED / "vocab.src.json")
    numbers = {token for token in vocab.stoi if token.isdigit()}
    assert not numbers & {str(i) for i in range(1000, 1040)}  # no word of a held-out sentence
    assert len(numbers) > 200  # the training sentences' numbers

    valid = run_prepare(tmp_path, monkeypatch, [bible, catalog], **{"prepare.split": {"hold_out": {"incoming": "valid"}}})
    assert set(catalog["id"]) <= held_out_ids(tmp_path)["valid"] and valid["pairs"]["valid"] >= len(catalog)


def test_a_held_out_source_must_be_a_source_and_leave_one_to_train(tmp_path, monkeypatch):
    from pipeline.config import ParamsError

    for hold_out, message in (({"nowhere": "test"}, "no source named 'nowhere'"),
                              ({"bible": "test", "incoming": "valid"}, "nothing would train")):
        with pytest.raises(ParamsError, match=message):
            run_prepare(tmp_path, monkeypatch, [corpus(10)], **{"prepare.split": {"hold_out": hold_out}})


def test_a_verses_versions_always_fall_in_one_split(tmp_path, monkeypatch):
    """Ruth.1.1 and Ruth.1.1@kjv (a sword source with `variant: kjv`) are both kept and always share
    a split, so no test verse trains in another wording; another source's id ending in "@kjv" is
    hashed whole. A variant added later retokenises only the shards of its source."""
    web = corpus(300).assign(origin="bible")
    kjv = web.assign(origin="bible-kjv", id=web["id"] + "@kjv", src=web["src"].str.replace("sleeps", "sleepeth"))
    table = corpus(200, start=1000).assign(origin="tab", id=[f"tab:{i}@kjv" for i in range(200)])
    shards = [web, kjv[:150].reset_index(drop=True), pd.concat([kjv[150:], table], ignore_index=True)]
    split = {"prepare.split": {"valid": 0.2, "test": 0.2}}
    bible, tab = {"kind": "sword", "name": "bible"}, {"kind": "table", "name": "tab", "path": "tab.csv"}
    kjv_as_a_table = {"kind": "table", "name": "bible-kjv", "path": "kjv.csv"}
    kjv_version = {"kind": "sword", "name": "bible-kjv", "src_module": "engKJV2006eb", "variant": "kjv"}

    def splits() -> dict[str, str]:
        return {i: s for s, f in frames(tmp_path).items() for i in f["id"]}

    run_prepare(tmp_path, monkeypatch, shards, **split, **{"ingest.sources": [bible, kjv_as_a_table, tab]})
    assert any(splits()[i] != splits()[f"{i}@kjv"] for i in web["id"])  # no variant: ids hashed whole

    report = run_prepare(tmp_path, monkeypatch, shards, **split, **{"ingest.sources": [bible, kjv_version, tab]})
    assert (report["shards_tokenised"], report["shards_from_cache"]) == (2, 1)  # the web verses' shard: cached
    where = splits()
    assert len(where) == sum(report["pairs"].values()) == 800  # both versions kept, nothing dropped
    assert all(where[i] == where[f"{i}@kjv"] for i in web["id"])
    assert min(Counter(where[i] for i in web["id"]).values()) > 40  # every split has many verses
    variants = {"bible-kjv": "kjv"}
    assert all(where[i] == split_of(i, 0.2, 0.2, "bible-kjv", variants) == split_of(verse, 0.2, 0.2)
               for i, verse in zip(kjv["id"], web["id"]))
    # tab's "@kjv" is its own: its ids are hashed whole, many then in another split than without "@kjv"
    assert all(where[i] == split_of(i, 0.2, 0.2, "tab", variants) == split_of(i, 0.2, 0.2) for i in table["id"])
    assert sum(where[i] != split_of(i.removesuffix("@kjv"), 0.2, 0.2) for i in table["id"]) > 40


def test_only_a_configured_variant_leaves_the_split_key():
    variants = {"bible-kjv": "kjv"}
    assert split_key("Gen.1.1@kjv", "bible-kjv", variants) == "Gen.1.1"
    assert split_key("Gen.1.1", "bible", variants) == "Gen.1.1"
    for pair_id, origin in (("a@b", "tab"), ("tab:a@kjv", "tab"), ("Gen.1.1@esv", "bible-kjv")):
        assert split_key(pair_id, origin, variants) == pair_id  # hashed as it always was
    assert split_hash("a@b") == int.from_bytes(hashlib.sha256(b"a@b").digest()[:8], "big") != split_hash("a")


def test_a_new_shard_is_the_only_one_tokenised_and_the_outputs_are_a_cold_runs(tmp_path, monkeypatch):
    pairs = corpus(240)
    run_prepare(tmp_path, monkeypatch, cut(pairs[:160], 2))
    warm = run_prepare(tmp_path, monkeypatch, cut(pairs[:160], 2) + [pairs[160:].reset_index(drop=True)])
    assert (warm["shards_tokenised"], warm["shards_from_cache"]) == (1, 2)
    warm_files = prepared_files(tmp_path)
    shutil.rmtree(tmp_path / CACHE)
    cold = run_prepare(tmp_path, monkeypatch, cut(pairs[:160], 2) + [pairs[160:].reset_index(drop=True)])
    assert (cold["shards_tokenised"], cold["shards_from_cache"]) == (3, 0)
    assert prepared_files(tmp_path) == warm_files
    assert without_shard_counts(cold) == without_shard_counts(warm)
    # dvc.lock holds the report's md5: what a machine had cached must not show in it.
    assert json.loads((tmp_path / "reports/prepare.json").read_text()) == without_shard_counts(cold)
    # A shard that leaves the corpus leaves the cache.
    run_prepare(tmp_path, monkeypatch, cut(pairs[:160], 2))
    assert len(list((tmp_path / CACHE).glob("*.parquet"))) == 2


def test_changed_tokeniser_settings_miss_the_cache(tmp_path, monkeypatch):
    shards = cut(corpus(60), 2)
    run_prepare(tmp_path, monkeypatch, shards)
    report = run_prepare(tmp_path, monkeypatch, shards, **{"prepare.lowercase_src": False})
    assert report["shards_tokenised"] == 2
    assert frames(tmp_path)["train"]["src_tokens"].str.startswith("The ").all()


def test_an_edit_to_the_tokenisers_code_misses_the_cache(tmp_path, monkeypatch):
    shards = cut(corpus(60), 2)
    run_prepare(tmp_path, monkeypatch, shards)
    real_md5 = storage.file_md5
    # text.py as if edited: its md5 is all the cache key can know of the code
    monkeypatch.setattr(storage, "file_md5", lambda p: "edited" if Path(p).name == "text.py" else real_md5(p))
    assert run_prepare(tmp_path, monkeypatch, shards)["shards_tokenised"] == 2


def test_the_sentencepiece_sample_is_evenly_spaced_across_parts():
    parts = [Path("a"), Path("b"), Path("c")]
    everything = [rows.tolist() for _, rows in sample_rows(parts, [3, 0, 4], 10)]
    assert everything == [[0, 1, 2], [], [0, 1, 2, 3]]
    sampled = [rows.tolist() for _, rows in sample_rows(parts, [5, 0, 5], 4)]
    assert sampled == [[0, 2], [], [0, 2]]  # global rows 0, 2, 5, 7 of 10


def test_no_shards_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"no shards .* in data/raw/pairs: run `vamos ingest`"):
        run_prepare(tmp_path, monkeypatch, [])


def test_a_real_dask_cluster_writes_the_inline_runs_bytes(tmp_path, monkeypatch, dask_scheduler):  # noqa: F811
    shards = cut(corpus(240), 4)
    run_prepare(tmp_path / "inline", monkeypatch, shards)
    cluster = run_prepare(tmp_path / "cluster", monkeypatch, shards, **{"parallel.scheduler": dask_scheduler})
    assert cluster["shards_tokenised"] == 4
    assert prepared_files(tmp_path / "cluster") == prepared_files(tmp_path / "inline")
    assert (tmp_path / "cluster/reports/prepare.json").read_bytes() == \
           (tmp_path / "inline/reports/prepare.json").read_bytes()

"""Streamed, sharded ingest: the same pairs, order, counts and examples however the corpus is cut
into chunks and wherever the chunks are cleaned (inline, a local cluster, a real Dask cluster)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from dask_cluster import dask_scheduler  # noqa: F401
from pipeline.config import FolderSource, ParallelParams, TableSource, TextPairSource, TsvSource, load_params
from pipeline.corpus import first_occurrences, ingest, ingest_shards
from pipeline.stages import ingest as ingest_stage
from pipeline.storage import raw_shards


def pair(i: int) -> str:
    return f"Sentence number {i} is here.\tLa frase número {i} está aquí.\n"


def write_corpus(root: Path) -> list:
    """Four sources whose duplicates (by text and by id) and bad lines fall in different chunks of 5."""
    lines = [pair(i) for i in range(1, 12)]
    lines[8] = pair(2)  # line 9 repeats line 2: a duplicate in the chunk after it
    tsv = b"".join(line.encode() for line in lines) + b"Caf\xe9 au lait.\tCaf\xe9 con leche.\n" + b"no tab here\n"
    (root / "a.tsv").write_bytes(tsv + pair(12).encode())  # bad lines 12 and 13, in the third chunk
    (root / "incoming").mkdir()
    # pair 3 again: a duplicate across sources
    (root / "incoming" / "1.tsv").write_text(pair(3) + pair(20) + pair(21), encoding="utf-8")
    (root / "incoming" / "2.tsv").write_text("".join(pair(i) for i in range(22, 29)), encoding="utf-8")
    rows = ["key,english,spanish"] + [f"k{i},Table row {i}.,Fila {i} de la tabla." for i in range(1, 8)]
    rows.insert(7, "k2,Another text.,Otro texto.")  # k2 again, other text: a duplicate id, in the second chunk
    (root / "t.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "en.txt").write_text("".join(f"Line {i} of the text.\n" for i in range(12)), encoding="utf-8")
    (root / "es.txt").write_text("".join(f"Línea {i} del texto.\n" for i in range(12)), encoding="utf-8")
    return [TsvSource(name="a", path=str(root / "a.tsv")), FolderSource(name="incoming", path=str(root / "incoming")),
            TableSource(name="t", path=str(root / "t.csv"), src_column="english", tgt_column="spanish",
                        id_column="key"),
            TextPairSource(name="text", src_path=str(root / "en.txt"), tgt_path=str(root / "es.txt"))]


def without_shards(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "shards"}


def test_many_small_chunks_give_what_one_chunk_gives(tmp_path):
    sources = write_corpus(tmp_path)
    whole, whole_report = ingest(sources, 80, 3.0, shard_pairs=100_000)
    chunked, chunked_report = ingest(sources, 80, 3.0, shard_pairs=5)
    assert chunked.equals(whole)
    assert without_shards(chunked_report) == without_shards(whole_report)
    assert (whole_report["shards"], chunked_report["shards"]) == (5, 11)  # a shard never spans two files
    assert whole_report["read"] == {"a": 12, "incoming": 10, "t": 8, "text": 12}
    assert whole_report["dropped"] == {"duplicate": 2, "duplicate_id": 1, "invalid_utf8": 1, "missing_column": 1}
    assert whole_report["examples"] == {"invalid_utf8": [f"{tmp_path}/a.tsv:12"],
                                        "missing_column": [f"{tmp_path}/a.tsv:13"]}
    assert chunked["id"].is_unique and "t:k2" in set(chunked["id"])
    assert chunked.set_index("id").loc["t:k2", "src"] == "Table row 2."  # the first of the id is kept
    assert chunked["src"].tolist()[:3] == [f"Sentence number {i} is here." for i in (1, 2, 3)]
    assert chunked["src"].tolist().count("Sentence number 2 is here.") == 1


def test_a_file_added_to_a_folder_adds_shards_and_leaves_the_others(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "1.tsv").write_text("".join(pair(i) for i in range(7)), encoding="utf-8")
    sources = [FolderSource(name="in", path=str(tmp_path / "in"))]
    options = dict(max_words=80, max_ratio=3.0, shard_pairs=5, parallel=ParallelParams(workers=1))
    report = ingest_shards(sources, tmp_path / "pairs", **options)
    before = {p.name: p.read_bytes() for p in raw_shards(tmp_path / "pairs")}
    (tmp_path / "in" / "2.tsv").write_text(pair(0) + pair(50), encoding="utf-8")  # one duplicate, one new
    report = ingest_shards(sources, tmp_path / "pairs", **options)
    after = {p.name: p.read_bytes() for p in raw_shards(tmp_path / "pairs")}
    assert report["shards"] == 3 and report["dropped"] == {"duplicate": 1}
    assert {name: after[name] for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "pairs"]  # no temporary folder left


def run_ingest_stage(root: Path, corpus: Path, monkeypatch, **parallel) -> dict[str, bytes]:
    """`vamos ingest` in a project of its own at `root`; the bytes of every shard and the report."""
    root.mkdir()
    params = {"ingest": {"shard_pairs": 5, "sources": [
        {"kind": "tsv", "name": "a", "path": str(corpus / "a.tsv")},
        {"kind": "folder", "name": "incoming", "path": str(corpus / "incoming")},
        {"kind": "table", "name": "t", "path": str(corpus / "t.csv"), "src_column": "english",
         "tgt_column": "spanish", "id_column": "key"}]},
        "parallel": parallel}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    ingest_stage(load_params())
    files = {p.name: p.read_bytes() for p in raw_shards(root / "data/raw/pairs")}
    return {**files, "report": (root / "reports/ingest.json").read_bytes()}


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    write_corpus(corpus)
    with pytest.MonkeyPatch.context() as monkeypatch:
        outputs = run_ingest_stage(tmp_path_factory.mktemp("inline") / "p", corpus, monkeypatch, workers=1)
    assert json.loads(outputs["report"])["shards"] == 8 == len(outputs) - 1
    return corpus, outputs


def test_a_local_cluster_writes_the_same_bytes(inline_run, tmp_path, monkeypatch):
    corpus, inline = inline_run
    assert run_ingest_stage(tmp_path / "p", corpus, monkeypatch, workers=2) == inline


def test_a_dask_cluster_writes_the_same_bytes(inline_run, dask_scheduler, tmp_path, monkeypatch):  # noqa: F811
    corpus, inline = inline_run
    assert run_ingest_stage(tmp_path / "p", corpus, monkeypatch, scheduler=dask_scheduler) == inline


def test_first_occurrences_by_bucket_equal_one_sort():
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 2**64, size=5000, dtype=np.uint64)
    hashes = distinct[rng.integers(0, len(distinct), size=20000)]  # many repeats, in every bucket
    _, first = np.unique(hashes, return_index=True)
    expected = np.zeros(len(hashes), dtype=bool)
    expected[first] = True
    assert np.array_equal(first_occurrences(hashes), expected)
    assert len(np.unique(hashes >> np.uint64(60))) == 16
    # The same from the chunks' parts (as ingest reads them, one file each), also under a mask.
    parts = np.split(hashes, [0, 7, 7, 5000, 12345])
    assert np.array_equal(first_occurrences(parts), expected)
    among = rng.random(len(hashes)) < 0.5
    _, first = np.unique(hashes[among], return_index=True)
    expected_among = np.zeros(len(hashes), dtype=bool)
    expected_among[np.flatnonzero(among)[first]] = True
    assert np.array_equal(first_occurrences(parts, among=among), expected_among)
    assert not first_occurrences(np.empty(0, np.uint64)).any()


# A filesystem that fails, mounted over the project's data/raw in a mount namespace of the stage's
# own (unshare: no root needed, nothing seen outside): a full tmpfs, or a read-only one.
FAULT = r"""
set -e
mount -t tmpfs -o size=4m vamos-fault data/raw
cp -a "$SAVED"/. data/raw/
case "$FAULT" in
  full) dd if=/dev/zero of=data/raw/.filler bs=64k 2>/dev/null || true ;;
  read-only) mount -o remount,ro data/raw ;;
esac
set +e
"$PYTHON" -m pipeline.cli ingest > stage.out 2> stage.err
echo "rc=$?"
cd data/raw && find . -type f ! -name .filler | sort | xargs md5sum | sed 's/^/md5 /'
"""


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_disk_fails_the_stage_naming_the_path_and_keeps_the_old_outputs(inline_run, tmp_path,
                                                                                            monkeypatch, fault):
    import hashlib
    import shutil
    import subprocess
    import sys

    corpus, _ = inline_run
    root = tmp_path / "p"
    before = run_ingest_stage(root, corpus, monkeypatch, workers=1)
    saved = tmp_path / "saved-raw"
    shutil.copytree(root / "data/raw", saved)
    (corpus / "incoming" / "3.tsv").write_text(pair(40), encoding="utf-8")  # new data: new shards to write
    try:
        result = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", FAULT], cwd=root,
                                env={**os.environ, "SAVED": str(saved), "FAULT": fault, "PYTHON": sys.executable},
                                capture_output=True, text=True, timeout=300)
    finally:
        (corpus / "incoming" / "3.tsv").unlink()
    assert "rc=1" in result.stdout, result.stdout + result.stderr
    error = (root / "stage.err").read_text()
    reason = {"full": "No space left on device", "read-only": "Read-only file system"}[fault]
    assert reason in error and f"cannot write {root / 'data/raw'}" in error, error[-3000:]  # what failed, and where
    # What the failed stage left on that filesystem: the old shards, byte for byte, and nothing else.
    left = dict(line.split()[:0:-1] for line in result.stdout.splitlines() if line.startswith("md5 "))
    assert left == {f"./pairs/{name}": hashlib.md5(data).hexdigest()
                    for name, data in before.items() if name != "report"}
    assert (root / "reports/ingest.json").read_bytes() == before["report"]

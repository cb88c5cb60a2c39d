"""`vamos embed` is deterministic: the same vectors, byte for byte, in any process."""
import hashlib
import os
import shutil
import sys

import pytest

from pipeline.config import load_params
from pipeline.embeddings import stable_hash
from pipeline.stages import STAGES
from tests.conftest import make_project, run, small_params

VAMOS = [sys.executable, "-m", "pipeline.cli"]


def test_stable_hash_is_not_salted():
    out = run([sys.executable, "-c", "from pipeline.embeddings import stable_hash; print(stable_hash('perro'))"],
              cwd=None, env={**os.environ, "PYTHONHASHSEED": "7"})
    assert int(out.stdout) == stable_hash("perro")


def embed_digests(project, hash_seed: str) -> dict[str, str]:
    shutil.rmtree(project / "models" / "embeddings", ignore_errors=True)
    result = run([*VAMOS, "embed"], project, env={**os.environ, "PYTHONHASHSEED": hash_seed})
    assert result.returncode == 0, result.stderr
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted((project / "models/embeddings").glob("*.w2v"))}


@pytest.mark.slow
def test_embed_gives_identical_bytes_in_two_processes(tmp_path, monkeypatch, mlflow_store):
    """Over 10,000 words an epoch (Ruth and Mark), so that gensim splits each epoch into several
    jobs: with 2 workers the bytes then differ between runs; with the default 1 they do not."""
    params = small_params()
    params["ingest"]["sources"][0]["books"] = ["Ruth", "Mark"]
    project = make_project(tmp_path / "project", params)
    monkeypatch.chdir(project)
    params = load_params()
    assert params.embed.workers == 1  # the project's default, as in params.yaml
    STAGES["ingest"](params)
    STAGES["prepare"](params)
    first, second = embed_digests(project, "1"), embed_digests(project, "2")
    assert set(first) == {"src.w2v", "tgt.w2v"}
    assert first == second

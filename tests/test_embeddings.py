"""`vamos embed` is deterministic: the same vectors, byte for byte, in any process."""
import hashlib
import os
import shutil
import sys

import pytest

from pipeline.config import load_params
from pipeline.embeddings import stable_hash
from pipeline.stages import STAGES
from tests.conftest import run

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
def test_embed_gives_identical_bytes_in_two_processes(project):
    params = load_params()
    assert params.embed.workers == 1  # the project's default, as in params.yaml
    STAGES["ingest"](params)
    STAGES["prepare"](params)
    first, second = embed_digests(project, "1"), embed_digests(project, "2")
    assert set(first) == {"src.w2v", "tgt.w2v"}
    assert first == second

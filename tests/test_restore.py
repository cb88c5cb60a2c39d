"""`vamos restore`: a registered version comes back from its commit, its dvc.lock and the DVC
remote, in a temp git repo whose cache has been thrown away."""
import shutil
import sys

import pytest
from mlflow import MlflowClient

from pipeline.registry import file_md5
from tests.conftest import make_dvc_repo, run, write_tsv

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_restore_brings_back_an_older_version(tmp_path, mlflow_store):
    repo = make_dvc_repo(tmp_path / "repo")
    ok(run([*DVC, "remote", "add", "--force", "--default", "local", str(tmp_path / "remote")], repo))
    ok(run(["git", "commit", "-qam", "a local remote"], repo))
    ok(run([*DVC, "repro"], repo))
    ok(run([*DVC, "push"], repo))
    write_tsv(repo / "data/incoming/more.tsv", [("The dog is here.", "El perro está aquí."),
                                                ("The king is here.", "El rey está aquí.")])
    ok(run([*DVC, "repro"], repo))
    ok(run([*DVC, "push"], repo))
    client = MlflowClient()
    first, second = (client.get_model_version("vamos-en-es", v) for v in ("1", "2"))
    assert first.tags["model_md5"] != second.tags["model_md5"]
    assert first.tags["dvc.remote_url"] == str(tmp_path / "remote")

    shutil.rmtree(repo / ".dvc" / "cache")
    for out in ("data/raw", "data/prepared", "models"):
        shutil.rmtree(repo / out)
    restored = ok(run([sys.executable, "-m", "pipeline.cli", "restore", "1", "--into", str(tmp_path / "v1")], repo))
    assert "matches the registry" in restored.stdout
    assert file_md5(tmp_path / "v1/models/seq2seq/model.pt") == first.tags["model_md5"]
    assert (tmp_path / "v1/data/prepared/test.parquet").exists()
    assert ok(run(["git", "status", "--porcelain", "--untracked-files=no"], tmp_path / "v1")).stdout.strip() in (
        "", "M dvc.lock")  # the code is the commit's; only the run's dvc.lock was laid over it

    again = run([sys.executable, "-m", "pipeline.cli", "restore", "1", "--into", str(tmp_path / "v1")], repo)
    assert again.returncode == 2 and "not empty" in again.stderr
    missing = run([sys.executable, "-m", "pipeline.cli", "restore", "9", "--into", str(tmp_path / "v9")], repo)
    assert missing.returncode == 2 and "version 9" in missing.stderr

"""MLflow set-up: experiments open on their runs in MLflow 3's UI, and DVC experiments (--temp and
--queue ones too, which run in a copy without git-ignored files) log to the workspace's store."""
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.tracking import EXPERIMENT_KIND, mlflow_setup
from tests.conftest import make_dvc_repo, run

DVC = [sys.executable, "-m", "dvc"]
KEY, VALUE = EXPERIMENT_KIND


def test_the_experiment_is_marked_as_model_development(mlflow_store):
    mlflow_setup("vamos")
    assert MlflowClient().get_experiment_by_name("vamos").tags[KEY] == VALUE


def test_an_existing_experiment_is_marked_too(mlflow_store):
    client = MlflowClient()
    client.create_experiment("older")
    mlflow_setup("older")
    assert client.get_experiment_by_name("older").tags[KEY] == VALUE


PROBE = '''
from pipeline.tracking import experiment_name, mlflow_setup
mlflow = mlflow_setup("vamos")
with mlflow.start_run():
    mlflow.set_tag("dvc.experiment", experiment_name() or "")
    mlflow.log_text("hello", "probe.txt")
open("probe.txt", "w").write("ok")
'''


def probe_repo(tmp_path):
    """make_dvc_repo with one stage that logs an MLflow run through pipeline.tracking."""
    repo = make_dvc_repo(tmp_path / "repo")
    (repo / "probe.py").write_text(PROBE)
    (repo / "dvc.yaml").write_text("stages:\n  probe:\n    cmd: python probe.py\n    deps: [probe.py]\n"
                                   "    params: [seed]\n    outs: [probe.txt]\n")
    assert run(["git", "add", "-A"], repo).returncode == 0
    assert run(["git", "commit", "-qm", "probe"], repo).returncode == 0
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("how", [["--temp"], ["--queue"]])
def test_dvc_experiments_log_to_the_workspace_store(tmp_path, monkeypatch, how):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: the workspace's mlflow.db
    repo = probe_repo(tmp_path)
    result = run([*DVC, "exp", "run", *how, "-n", "probe-exp", "-S", "seed=7"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    if how == ["--queue"]:
        started = run([*DVC, "queue", "start"], repo)
        assert started.returncode == 0, started.stderr
        waited = run([*DVC, "queue", "logs", "probe-exp", "--follow"], repo, timeout=300)
        assert waited.returncode == 0, waited.stdout + waited.stderr
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vamos")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.data.tags["dvc.experiment"] == "probe-exp"
    assert experiment.artifact_location.startswith(str(repo / "mlruns"))  # not in the throwaway copy
    artifact = client.download_artifacts(logged.info.run_id, "probe.txt", str(tmp_path))
    assert Path(artifact).read_text() == "hello"  # the artifact the experiment logged, readable after it

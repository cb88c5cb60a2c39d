"""The whole pipeline end to end through real DVC in a temp git repo, with a real MLflow store."""
import json
import shutil
import sys

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.stages import STAGES
from tests.conftest import REPO, make_dvc_repo, run

pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]


def test_dvc_repro_runs_every_stage_then_nothing(tmp_path, mlflow_store):
    repo = make_dvc_repo(tmp_path / "repo")
    first = run([*DVC, "repro"], repo)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    prepared = [o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared"][0]
    assert prepared["md5"].endswith(".dir")

    metrics = json.loads((repo / "reports/metrics.json").read_text())["test"]
    assert {"bleu", "chrf", "ter"} <= set(metrics)
    shown = run([*DVC, "metrics", "show", "--json"], repo)
    assert shown.returncode == 0 and "bleu" in shown.stdout and "chrf" in shown.stdout
    plots = run([*DVC, "plots", "show", "-o", str(tmp_path / "plots")], repo)
    assert plots.returncode == 0, plots.stderr
    assert "learning_curve" in (tmp_path / "plots" / "index.html").read_text()

    client = MlflowClient()
    champion = client.get_model_version_by_alias("vamos-en-es", "champion")
    run_info = client.get_run(champion.run_id)
    assert run_info.data.tags["dvc.prepared_md5"] == prepared["md5"]
    assert "test_bleu" in run_info.data.metrics
    assert mlflow.pyfunc.load_model("models:/vamos-en-es@champion").predict(["The red dog sleeps."])[0]

    second = run([*DVC, "repro"], repo)
    assert second.returncode == 0
    # register alone runs again: always_changed keeps it out of the run-cache (it is cheap when
    # the model is already registered)
    assert [line for line in second.stdout.splitlines() if "Running stage" in line] == ["Running stage 'register':"]
    assert "didn't change, skipping" in second.stdout

    pushed = push_to_a_new_local_remote(repo, tmp_path / "remote")
    model = [o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/seq2seq"][0]
    assert (pushed / "files" / "md5" / model["md5"][:2] / model["md5"][2:]).exists()


def push_to_a_new_local_remote(repo, remote):
    """The shipped .dvc/config (its default remote), overridden in .dvc/config.local as the README says."""
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    assert run([*DVC, "remote", "modify", "--local", "local", "url", str(remote)], repo).returncode == 0
    result = run([sys.executable, "-m", "pipeline.cli", "push"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(remote) in result.stdout
    return remote


def test_new_incoming_data_retrains(tmp_path, mlflow_store):
    repo = make_dvc_repo(tmp_path / "repo")
    assert run([*DVC, "repro"], repo).returncode == 0
    with open(repo / "data/incoming/more.tsv", "w", encoding="utf-8") as f:
        f.write("The dog is here.\tEl perro está aquí.\n")
    again = run([*DVC, "repro"], repo)
    assert again.returncode == 0, again.stderr
    assert "Running stage 'ingest'" in again.stdout and "Running stage 'train'" in again.stdout
    assert int(MlflowClient().get_model_version_by_alias("vamos-en-es", "champion").version) >= 1
    versions = MlflowClient().search_model_versions("name='vamos-en-es'")
    assert len(versions) == 2


def test_a_temp_experiment_logs_to_the_workspace_store(tmp_path, monkeypatch):
    """`dvc exp run --temp` runs in a copy under .dvc/tmp/exps/ without the git-ignored mlflow.db:
    the training run must still land in the workspace's store, tagged with the experiment's name."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store
    repo = make_dvc_repo(tmp_path / "repo")
    result = run([*DVC, "exp", "run", "--temp", "-n", "tiny-lr", "-S", "train.lr=0.02"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vamos").experiment_id])
    assert [r.data.params.get("train.lr") for r in runs] == ["0.02"]
    assert client.search_model_versions(f"run_id='{runs[0].info.run_id}'")  # register ran there too
    assert runs[0].data.tags.get("dvc.experiment") == "tiny-lr"  # train.py: tracking.experiment_name()


def test_two_fresh_projects_give_the_same_dvc_lock(tmp_path, mlflow_store):
    """Seeded, deterministic stages stopped by epochs: the same commit and params give the same
    dvc.lock (timings and registry ids live in top-level metrics, which the lock does not hash)."""
    locks = []
    for name in ("a", "b"):
        repo = make_dvc_repo(tmp_path / name)
        result = run([*DVC, "repro"], repo)
        assert result.returncode == 0, result.stdout + result.stderr
        locks.append(yaml.safe_load((repo / "dvc.lock").read_text()))
    assert locks[0] == locks[1]
    model = [o for o in locks[0]["stages"]["train"]["outs"] if o["path"] == "models/seq2seq"][0]
    assert model["md5"].endswith(".dir")


def stage_outs(lock: dict, stage: str) -> dict[str, str]:
    return {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}


def test_ingest_and_prepare_reproduce_the_committed_lock_on_any_host(tmp_path, mlflow_store):
    """What can be compared across hosts: ingest and prepare (no BLAS, no threads) give the committed
    dvc.lock's outputs bit for bit on any CPU. embed and train are bit-identical only on the CPU model
    that made the lock (reports/train.json `host`); elsewhere they agree within the test set's noise."""
    repo = make_dvc_repo(tmp_path / "repo")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    shutil.rmtree(repo / "data" / "incoming")
    shutil.copytree(REPO / "data" / "incoming", repo / "data" / "incoming")
    assert run(["git", "add", "-A"], repo).returncode == 0 and run(["git", "commit", "-qm", "real"], repo).returncode == 0
    done = run([*DVC, "repro", "prepare"], repo)
    assert done.returncode == 0, done.stdout + done.stderr
    committed, made = (yaml.safe_load((root / "dvc.lock").read_text()) for root in (REPO, repo))
    for stage in ("ingest", "prepare"):
        assert stage_outs(made, stage) == stage_outs(committed, stage), stage

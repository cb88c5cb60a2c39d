import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.config import load_params
from pipeline.stages import embed, ingest, prepare
from pipeline.train import train
from tests.conftest import make_project, small_params


def prepared_project(root: Path, **overrides) -> Path:
    make_project(root, small_params(**overrides))
    return root


def run_until_train(root: Path, monkeypatch, **train_overrides) -> dict:
    monkeypatch.chdir(root)
    params = load_params()
    if not Path("models/embeddings").exists():
        for stage in (ingest, prepare, embed):
            stage(params)
    if train_overrides:
        raw = yaml.safe_load(Path("params.yaml").read_text())
        raw["train"].update(train_overrides)
        Path("params.yaml").write_text(yaml.safe_dump(raw))
        params = load_params()
    return train(params)


def last_checkpoint(root: Path) -> dict:
    (path,) = root.glob(".vamos/checkpoints/*/last.pt")
    return torch.load(path, weights_only=True)


def test_training_learns_and_writes_its_reports(tmp_path, monkeypatch, mlflow_store):
    root = prepared_project(tmp_path / "p")
    summary = run_until_train(root, monkeypatch, epochs=4, patience=4)
    curve = pd.read_csv(root / "reports/learning_curve.csv")
    assert list(curve["epoch"]) == [1, 2, 3, 4]
    assert curve["valid_loss"].iloc[-1] < curve["valid_loss"].iloc[0]
    assert curve["train_loss"].iloc[-1] < curve["train_loss"].iloc[0]
    assert summary["stopped_by"] == "epochs" and summary["steps"] > 0
    assert (root / "models/seq2seq/model.pt").exists() and (root / "reports/plots/learning_curve.png").exists()
    assert 0 < summary["embedding_coverage"]["src"] <= 1


def test_resume_continues_exactly(tmp_path, monkeypatch, mlflow_store):
    """Two epochs in one go and one epoch, then a second run that resumes, end identical."""
    straight = prepared_project(tmp_path / "straight")
    run_until_train(straight, monkeypatch, epochs=2)
    resumed = prepared_project(tmp_path / "resumed")
    first = run_until_train(resumed, monkeypatch, epochs=1)
    second = run_until_train(resumed, monkeypatch, epochs=2)
    assert first["epochs"] == 1 and second["epochs"] == 2
    a, b = last_checkpoint(straight), last_checkpoint(resumed)
    assert a["progress"]["step"] == b["progress"]["step"]
    assert a["progress"]["history"][-1]["valid_loss"] == pytest.approx(b["progress"]["history"][-1]["valid_loss"])
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-6), name
    # The resumed training kept its MLflow run.
    assert first is not second and (resumed / "models/seq2seq/run.json").exists()


def test_finished_training_rerun_restores_the_best_model(tmp_path, monkeypatch, mlflow_store):
    root = prepared_project(tmp_path / "p")
    run_until_train(root, monkeypatch, epochs=1)
    shutil.rmtree(root / "models/seq2seq")  # what `dvc repro -f` does to the outputs
    summary = run_until_train(root, monkeypatch, epochs=1)
    assert summary["epochs"] == 1
    assert (root / "models/seq2seq/model.pt").exists()

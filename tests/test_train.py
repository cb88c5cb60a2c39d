import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline import storage
from pipeline.config import Params, load_params
from pipeline.stages import embed, ingest, prepare
from pipeline.text import EOS_ID, PAD_ID, SOS_ID, UNK_ID
from pipeline.data import load_corpus
from pipeline.schedule import learning_rate, planned_steps
from pipeline.train import drop_words, train
from pipeline.model import load_translator, pack_ensemble
from tests.conftest import make_project, small_params, tiny_pairs

MODEL = "models/seq2seq/model.pt"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    """A tiny project up to `embed`, made once; each test trains in its own copy."""
    root = make_project(tmp_path_factory.mktemp("train") / "base", small_params())
    old = Path.cwd()
    os.chdir(root)
    try:
        params = load_params()
        for stage in (ingest, prepare, embed):
            stage(params)
    finally:
        os.chdir(old)
    return root


def copy_of(embedded: Path, root: Path) -> Path:
    shutil.copytree(embedded, root)
    return root


def set_train(root: Path, **overrides) -> Params:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"].update(overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return Params.model_validate(raw)


def run_train(root: Path, monkeypatch, **overrides) -> dict:
    params = set_train(root, **overrides)
    monkeypatch.chdir(root)
    return train(params)


def weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / MODEL, weights_only=True)["state_dict"]


def last_checkpoint(root: Path) -> dict:
    (path,) = root.glob(".vamos/checkpoints/*/last.pt")
    return torch.load(path, weights_only=True)


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def runs(uri: str):
    return MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("vamos").experiment_id])


def test_training_learns_and_writes_its_reports(embedded, tmp_path, monkeypatch, mlflow_store):
    root = copy_of(embedded, tmp_path / "p")
    summary = run_train(root, monkeypatch, epochs=4, patience=4)
    curve = pd.read_csv(root / "reports/learning_curve.csv")
    assert list(curve["epoch"]) == [1, 2, 3, 4] and curve["whole_epoch"].all()
    assert curve["valid_loss"].iloc[-1] < curve["valid_loss"].iloc[0]
    assert curve["train_loss"].iloc[-1] < curve["train_loss"].iloc[0]
    assert summary["stopped_by"] == "epochs" and summary["steps"] > 0 and not summary["machine_dependent"]
    assert summary["epochs"] == summary["epochs_completed"] == 4
    assert (root / MODEL).exists() and (root / "reports/plots/learning_curve.png").exists()
    assert 0 < summary["embedding_coverage"]["src"] <= 1
    assert [r.info.status for r in runs(mlflow_store)] == ["FINISHED"]


def test_same_seed_same_data_same_model_file(embedded, tmp_path, monkeypatch, mlflow_store):
    """Stopped by epochs, two trainings write byte-identical model files (no clock inside)."""
    a, b = copy_of(embedded, tmp_path / "a"), copy_of(embedded, tmp_path / "b")
    run_train(a, monkeypatch, epochs=2)
    run_train(b, monkeypatch, epochs=2)
    assert (a / MODEL).read_bytes() == (b / MODEL).read_bytes()


def test_a_cut_epoch_counts_as_partial_and_raising_the_budget_continues_inside_it(
        embedded, tmp_path, monkeypatch, mlflow_store):
    straight = copy_of(embedded, tmp_path / "straight")
    run_train(straight, monkeypatch, epochs=2)
    by_steps, by_epochs = copy_of(embedded, tmp_path / "by_steps"), copy_of(embedded, tmp_path / "by_epochs")
    cut = run_train(by_steps, monkeypatch, epochs=2, max_steps=7)  # less than one epoch: still a model
    assert cut["stopped_by"] == "max_steps" and cut["steps"] == 7 and cut["epochs_completed"] == 0
    assert 0 < cut["epochs"] < 1 and (by_steps / MODEL).exists()
    history = last_checkpoint(by_steps)["progress"]["history"]
    assert [h["whole_epoch"] for h in history] == [False]
    resumed = run_train(by_steps, monkeypatch, epochs=2, max_steps=None)
    assert run_train(by_epochs, monkeypatch, epochs=1)["epochs"] == 1
    run_train(by_epochs, monkeypatch, epochs=2)
    expected = last_checkpoint(straight)
    for root in (by_steps, by_epochs):
        got = last_checkpoint(root)
        assert got["progress"]["step"] == expected["progress"]["step"] == resumed["steps"]
        assert_identical(got["model"], expected["model"])
    whole = [h for h in last_checkpoint(by_steps)["progress"]["history"] if h["whole_epoch"]]
    assert [h["valid_loss"] for h in whole] == [h["valid_loss"] for h in expected["progress"]["history"]]


def test_finished_training_rerun_restores_the_best_model(embedded, tmp_path, monkeypatch, mlflow_store, caplog):
    root = copy_of(embedded, tmp_path / "p")
    first = run_train(root, monkeypatch, epochs=1)
    written, run_file = (root / MODEL).read_bytes(), json.loads((root / storage.RUN_FILE).read_text())
    shutil.rmtree(root / "models/seq2seq")  # what `dvc repro -f` does to the outputs
    caplog.clear()
    caplog.set_level(logging.INFO, logger="pipeline.train")
    summary = run_train(root, monkeypatch, epochs=1)
    # Restored from the finished checkpoint, not trained again: same steps, same MLflow run.
    assert "resuming from" in caplog.text and summary["steps"] == first["steps"]
    assert [r.info.run_id for r in runs(mlflow_store)] == [run_file["run_id"]]
    assert (root / MODEL).read_bytes() == written


def test_a_resume_that_owes_a_validation_logs_no_speed_and_the_speed_is_weighted(
        embedded, tmp_path, monkeypatch, mlflow_store):
    """A run killed after its last update's checkpoint but before measuring it resumes by measuring:
    that measurement trained nothing, so it logs no tokens/s (it used to log 0, which pulled down
    train_speed.json's mean), and the speed is every update's tokens over their seconds."""
    root = copy_of(embedded, tmp_path / "p")
    run_train(root, monkeypatch, epochs=1, max_steps=6)
    (path,) = root.glob(".vamos/checkpoints/*/last.pt")
    state = torch.load(path, weights_only=True)
    state["progress"]["history"].pop()  # as if killed between the last checkpoint and its validation
    torch.save(state, path)
    run_train(root, monkeypatch, epochs=1, max_steps=6)
    progress = last_checkpoint(root)["progress"]
    assert [h["tokens_per_sec"] is None for h in progress["history"]] == [True]
    (run,) = runs(mlflow_store)
    logged = MlflowClient(mlflow_store).get_metric_history(run.info.run_id, "tokens_per_sec")
    assert [m.step for m in logged] == [6] and all(m.value > 0 for m in logged)  # the first run's, none since
    speed = json.loads((root / "reports/train_speed.json").read_text())["tokens_per_sec"]
    assert speed == round(progress["tokens_trained"] / progress["update_seconds"], 1) and speed > 0


def test_a_run_records_its_host_and_its_data(embedded, tmp_path, monkeypatch, mlflow_store):
    """Bit-identical training needs the same CPU model: the host goes into reports/train.json and
    the MLflow run, with the libraries; the run's datasets are the splits, by their md5."""
    root = copy_of(embedded, tmp_path / "p")
    summary = run_train(root, monkeypatch, epochs=1, max_steps=3)
    cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name"))
    assert summary["host"]["cpu"] == cpu and summary["host"]["gpu"] is None
    assert json.loads((root / "reports/train.json").read_text())["host"] == summary["host"]
    (run,) = runs(mlflow_store)
    assert run.data.tags["host.cpu"] == cpu and run.data.tags["software.torch"] == torch.__version__
    assert "software.numpy" in run.data.tags and "software.openblas_coretype" in run.data.tags
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "valid", "test"}
    for split, dataset in inputs.items():
        assert dataset.digest == storage.file_md5(root / f"data/prepared/{split}.parquet")
        assert json.loads(dataset.source)["uri"].endswith(f"data/prepared/{split}.parquet")


def test_a_wall_clock_stop_says_the_model_depends_on_the_machine(embedded, tmp_path, monkeypatch, mlflow_store,
                                                                   caplog):
    root = copy_of(embedded, tmp_path / "p")
    summary = run_train(root, monkeypatch, epochs=3, max_minutes=1e-5)
    assert summary["stopped_by"] == "time_budget" and summary["machine_dependent"] is True
    assert summary["steps"] >= 1 and (root / MODEL).exists()
    assert json.loads((root / "reports/train.json").read_text())["machine_dependent"] is True
    (run,) = runs(mlflow_store)
    assert run.data.tags["machine_dependent"] == "true" and run.data.tags["stopped_by"] == "time_budget"
    assert "depends on this machine" in caplog.text


def test_a_checkpoint_whose_mlflow_run_is_gone_starts_a_new_run(embedded, tmp_path, monkeypatch, mlflow_store):
    root = copy_of(embedded, tmp_path / "p")
    run_train(root, monkeypatch, epochs=1, max_steps=5)
    old_run = last_checkpoint(root)["progress"]["run_id"]
    MlflowClient(mlflow_store).delete_run(old_run)
    summary = run_train(root, monkeypatch, epochs=1, max_steps=None)
    assert summary["stopped_by"] == "epochs"
    (run,) = runs(mlflow_store)  # the deleted one is not listed
    assert run.info.run_id != old_run and run.info.status == "FINISHED"
    assert run.data.tags["continues_run"] == old_run and run.data.tags["resumed_from_step"] == "5"


def test_average_checkpoints_writes_the_mean_of_the_last_snapshots(embedded, tmp_path, monkeypatch, mlflow_store):
    root = copy_of(embedded, tmp_path / "p")
    summary = run_train(root, monkeypatch, epochs=3, average_checkpoints=2)
    snapshots = sorted(root.glob(".vamos/checkpoints/*/weights-*.pt"))
    assert len(snapshots) == 2 and summary["averaged_valid_bleu"] is not None
    a, b = (torch.load(p, weights_only=True) for p in snapshots)
    for name, tensor in weights(root).items():
        assert torch.allclose(tensor, (a[name] + b[name]) / 2, atol=1e-6), name


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_gives_the_same_weights(embedded, tmp_path, monkeypatch, mlflow_store):
    """`vamos train` killed at a random step after its first checkpoint, then run again, ends with
    the weights of a run that was never interrupted, bit for bit."""
    overrides = dict(epochs=4, checkpoint_every=3, word_dropout=0.2)  # its draws resume too
    straight = copy_of(embedded, tmp_path / "straight")
    run_train(straight, monkeypatch, **overrides)
    killed = copy_of(embedded, tmp_path / "killed")
    set_train(killed, **overrides)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    vamos = ["vamos", "train"]  # conftest puts this interpreter's scripts first on PATH
    process = subprocess.Popen(vamos, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(killed.glob(".vamos/checkpoints/*/last.pt")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 1.0))
    assert process.poll() is None, "training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_at_kill = last_checkpoint(killed)["progress"]["step"]
    assert 0 < steps_at_kill < last_checkpoint(straight)["progress"]["step"]
    rerun = subprocess.run(vamos, cwd=killed, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_identical(last_checkpoint(killed)["model"], last_checkpoint(straight)["model"])
    assert_identical(weights(killed), weights(straight))
    run_id = json.loads((killed / ".vamos/run.json").read_text())["run_id"]
    assert MlflowClient(mlflow_store).get_run(run_id).info.status == "FINISHED"  # resumed, not left RUNNING
    assert all(r.info.status == "FINISHED" for r in runs(mlflow_store))


def test_word_dropout_turns_only_words_into_unk_and_draws_nothing_at_rate_zero():
    ids = torch.tensor([[SOS_ID] + list(range(4, 2004)) + [EOS_ID, PAD_ID, PAD_ID]])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert drop_words(ids, 0.0) is ids and torch.equal(torch.get_rng_state(), state)
    dropped = drop_words(ids, 0.25)
    changed = dropped != ids
    assert (dropped[changed] == UNK_ID).all()
    assert not changed[0, [0, -3, -2, -1]].any()  # <sos>, <eos> and padding stay
    assert 0.2 < changed.float().sum() / 2000 < 0.3
    torch.manual_seed(0)
    assert torch.equal(drop_words(ids, 0.25), dropped)  # seeded: the same words each run
    specials = torch.tensor([PAD_ID, UNK_ID, SOS_ID, EOS_ID] * 500)
    assert torch.equal(drop_words(specials, 0.99), specials)  # never a special token, even at 0.99


def test_a_warm_up_as_long_as_the_plan_is_reported(embedded, caplog):
    data = load_corpus(embedded / storage.PREPARED).train
    cfg = Params().train.model_copy(update={"lr_schedule": "cosine", "epochs": 1, "warmup_steps": 0})
    steps = planned_steps(cfg, data)
    last_rate = {w: learning_rate(cfg.model_copy(update={"warmup_steps": w}), steps - 1, steps, 1.0)
                 for w in (steps - 2, steps - 1)}
    assert last_rate[steps - 2] < cfg.lr == last_rate[steps - 1]  # one step before the end: no decay
    for warmup in (0, steps - 2):
        planned_steps(cfg.model_copy(update={"warmup_steps": warmup}), data)
    assert "warmup_steps" not in caplog.text
    planned_steps(cfg.model_copy(update={"warmup_steps": steps - 1}), data)
    assert f"({steps - 1}) leaves the {steps} planned steps no room to decay\n" in caplog.text
    planned_steps(cfg.model_copy(update={"warmup_steps": steps + 1}), data)
    assert f"({steps + 1}) leaves the {steps} planned steps no room to decay, nor to reach train.lr" in caplog.text


def test_validate_every_measures_inside_the_epoch_and_a_resume_that_owes_one_stays_exact(
        embedded, tmp_path, monkeypatch, mlflow_store):
    """validate_every 5: validations at steps 5, 10, ... besides the epoch ends. A run cut at step
    10 and killed before measuring it resumes with that owed validation and ends as the straight run."""
    overrides = dict(epochs=2, validate_every=5, patience=10)
    straight = copy_of(embedded, tmp_path / "straight")
    summary = run_train(straight, monkeypatch, **overrides)
    history = last_checkpoint(straight)["progress"]["history"]
    per_epoch = summary["steps"] // 2
    assert per_epoch > 10
    expected_steps = sorted(set(range(5, summary["steps"] + 1, 5)) | {per_epoch, summary["steps"]})
    assert [h["step"] for h in history] == expected_steps
    assert [h["whole_epoch"] for h in history] == [s in (per_epoch, summary["steps"]) for s in expected_steps]

    cut = copy_of(embedded, tmp_path / "cut")
    run_train(cut, monkeypatch, **overrides, max_steps=10)
    (path,) = cut.glob(".vamos/checkpoints/*/last.pt")
    state = torch.load(path, weights_only=True)
    assert state["progress"]["history"][-1]["step"] == 10
    state["progress"]["history"].pop()  # as if killed between step 10's checkpoint and its validation
    torch.save(state, path)
    run_train(cut, monkeypatch, **overrides, max_steps=None)
    resumed = last_checkpoint(cut)
    assert [(h["step"], h["valid_loss"], h["whole_epoch"]) for h in resumed["progress"]["history"]] == \
        [(h["step"], h["valid_loss"], h["whole_epoch"]) for h in history]
    assert_identical(resumed["model"], last_checkpoint(straight)["model"])
    assert (cut / MODEL).read_bytes() == (straight / MODEL).read_bytes()


def test_a_validate_every_point_counts_for_early_stopping(embedded, tmp_path, monkeypatch, mlflow_store):
    """A rate too small to move BLEU: the second validation (step 6, inside epoch 1) is no better,
    so patience 1 stops there; without validate_every it stops after epoch 2."""
    root = copy_of(embedded, tmp_path / "p")
    summary = run_train(root, monkeypatch, epochs=3, patience=1, smoothing=1, lr=1e-12, validate_every=3)
    assert summary["stopped_by"] == "early_stopping" and summary["steps"] == 6
    assert summary["epochs_completed"] == 0 and (root / MODEL).exists()  # best.pt from step 3's validation


def test_a_right_to_left_model_trains_backwards_reads_forwards_and_reranks(embedded, tmp_path, monkeypatch,
                                                                            mlflow_store):
    """train.right_to_left on the tiny corpus: the model learns the reversed targets, translates in
    reading order on its own, and packed after a left-to-right model reranks that model's n-best lists."""
    forward, backward = copy_of(embedded, tmp_path / "l2r"), copy_of(embedded, tmp_path / "r2l")
    run_train(forward, monkeypatch, epochs=6, patience=6)
    run_train(backward, monkeypatch, epochs=6, patience=6, right_to_left=True)
    curve = pd.read_csv(backward / "reports/learning_curve.csv")
    assert curve["valid_loss"].iloc[-1] < curve["valid_loss"].iloc[0]
    r2l = load_translator(backward / MODEL)
    assert r2l.model.config.right_to_left and not load_translator(forward / MODEL).model.config.right_to_left
    pairs = tiny_pairs()[:60]
    sources = [s for s, _ in pairs]
    alone = r2l.translate(sources, beam_size=3)
    # Its first word learned is the last of every reference, the full stop: in reading order it ends
    # the output (read as searched, backwards, it would begin it).
    assert sum(out.endswith(".") and not out.startswith(".") for out in alone) >= 50, alone[:5]
    pack_ensemble([forward / MODEL, backward / MODEL], tmp_path / "both.pt")
    both, l2r = load_translator(tmp_path / "both.pt"), load_translator(forward / MODEL)
    assert len(both.model.members) == 1 and len(both.model.rerankers) == 1
    # Greedy search leaves no list to rerank; the beam's lists are reranked (tests/test_ensemble.py
    # checks the choice itself against scores computed word by word).
    assert both.translate(sources, beam_size=1) == l2r.translate(sources, beam_size=1)
    reranked = both.translate(sources, beam_size=3)
    assert len(reranked) == len(sources) and all(reranked)

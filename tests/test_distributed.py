"""Data-parallel training (pipeline.distributed): two gloo processes under a real torchrun follow
one process's loss curve, resume from their checkpoint, and leave checkpoints and a model that one
process loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import distributed
from pipeline.model import load_translator
from tests.test_train import MODEL, copy_of, embedded, last_checkpoint, run_train, set_train  # noqa: F401

# Sampled softmax on (the tiny target vocabulary has ~660 words): the candidates must be the
# same on both ranks and the same as one process's for the curves to match.
# fp32 (amp off): bf16 rounds two half batches differently from one whole batch, which would hide
# the equality of the math under rounding noise.
SAMPLED = dict(sampled_softmax=100, dropout=0.0, teacher_forcing=1.0, checkpoint_every=10, amp=False)
# Per-step relative difference allowed between one process and two. Both compute the same
# gradient of the same loss (same global batch, same candidates, dropout 0), only summed in
# another order (two half batches, then gloo's all-reduce), so they differ by float32 rounding,
# which Adam carries forward without amplifying much over 66 steps: measured below 1e-6; 1e-4
# leaves room for other CPUs and thread counts while any real divergence (another candidate set,
# a mis-normalised loss, a shard trained twice) moves the loss by more than 1e-2.
TOLERANCE = 1e-4


def read_losses(path: Path) -> list[tuple[int, float, int]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [(int(step), float(loss), int(tokens)) for step, loss, tokens in rows]


def torchrun(root: Path, env: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline.cli", "train"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:  # every rank's own error first: torchrun's summary only names the signal
        errors = [line for line in result.stderr.splitlines()
                  if any(word in line for word in ("Error", "error", "what()", "terminate", "Traceback"))]
        result.stderr = "\n".join(errors[:40]) + "\n...\n" + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_follow_one_process_resume_and_hand_over_to_one(embedded, tmp_path, monkeypatch,
                                                                       mlflow_store):
    one = copy_of(embedded, tmp_path / "one")
    monkeypatch.setenv("VAMOS_LOSS_LOG", str(tmp_path / "one.tsv"))
    straight = run_train(one, monkeypatch, epochs=3, **SAMPLED)

    # Two ranks: cut at step 15 (mid-epoch), resumed under DDP to the end of epoch 2, then one
    # process takes the DDP checkpoint on to epoch 3.
    two = copy_of(embedded, tmp_path / "two")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(MLFLOW_TRACKING_URI=mlflow_store, VAMOS_LOSS_LOG=str(tmp_path / "two.tsv"))
    for overrides in (dict(epochs=2, max_steps=15), dict(epochs=2, max_steps=None)):
        set_train(two, **overrides, **SAMPLED)
        result = torchrun(two, env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "data-parallel training: 2 processes (gloo)" in result.stderr
    checkpoint = last_checkpoint(two)
    assert checkpoint["progress"]["step"] == 44 and checkpoint["progress"]["epoch"] == 2
    assert len(checkpoint["rng_ranks"]) == 2 and "candidates_rng" in checkpoint
    assert not any(name.startswith("module.") for name in checkpoint["model"])  # the unwrapped module's
    translator = load_translator(two / MODEL)  # the model written under DDP, in this process
    (translation,) = translator.translate(["The red dog sleeps."], beam_size=1)
    assert translation.strip()

    monkeypatch.setenv("VAMOS_LOSS_LOG", str(tmp_path / "two.tsv"))
    summary = run_train(two, monkeypatch, epochs=3, **SAMPLED)  # one process resumes the DDP checkpoint
    assert summary["steps"] == straight["steps"] == 66 and summary["stopped_by"] == "epochs"

    single, data_parallel = read_losses(tmp_path / "one.tsv"), read_losses(tmp_path / "two.tsv")
    assert [s for s, _, _ in data_parallel] == [s for s, _, _ in single] == list(range(1, 67))
    assert [t for _, _, t in data_parallel] == [t for _, _, t in single]  # the same global batches
    a = np.array([loss / tokens for _, loss, tokens in single])
    b = np.array([loss / tokens for _, loss, tokens in data_parallel])
    print("\nstep  loss/token (1 process)  loss/token (2 processes)  rel. diff")
    for step, (x, y) in enumerate(zip(a, b), 1):
        print(f"{step:4d}  {x:22.6f}  {y:24.6f}  {abs(x - y) / x:9.1e}")
    assert np.all(np.abs(a - b) / a < TOLERANCE), np.max(np.abs(a - b) / a)
    assert b[-22:].mean() < 0.75 * b[:22].mean()  # it learns (epoch 3 against epoch 1)

    # Validation, the plateau schedule and the best score were rank 0's, as in one process.
    got, expected = last_checkpoint(two)["progress"], last_checkpoint(one)["progress"]
    whole = [h for h in got["history"] if h["whole_epoch"]]
    assert [h["step"] for h in whole] == [h["step"] for h in expected["history"]] == [22, 44, 66]
    np.testing.assert_allclose([h["valid_loss"] for h in whole], [h["valid_loss"] for h in expected["history"]],
                               rtol=TOLERANCE)
    assert got["plateau_scale"] == expected["plateau_scale"]


@pytest.mark.slow
def test_early_stopping_under_ddp_stops_every_rank_at_rank_0s_step(embedded, tmp_path, mlflow_store):
    """A learning rate so small that validation BLEU cannot move: the second validation is no
    better, so patience 1 stops after epoch 2 of 5, and both ranks end there (torchrun exits 0
    only when both do, and a rank that kept training would wait forever for the other)."""
    root = copy_of(embedded, tmp_path / "p")
    set_train(root, **{**SAMPLED, "epochs": 5, "patience": 1, "smoothing": 1, "lr": 1e-12})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(MLFLOW_TRACKING_URI=mlflow_store)
    result = torchrun(root, env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "reports/train.json").read_text())
    assert report["stopped_by"] == "early_stopping" and report["steps"] == 44 and report["epochs_completed"] == 2
    assert last_checkpoint(root)["progress"]["step"] == 44


def test_each_rank_takes_a_disjoint_share_of_the_global_batch():
    targets = [[5, 6], [7], [5, 8, 9], [10], [11, 12]]
    rows = np.array([3, 1, 0, 4, 2])
    shards = [distributed.Distributed(True, rank, 2).shard(rows, targets, 2, torch.device("cpu"), None)
              for rank in range(2)]
    assert [list(s.rows) for s in shards] == [[3, 0, 2], [1, 4]]
    for s in shards:
        assert s.tokens == 14 and s.weight == 1.0 and s.world_size == 2  # the global batch's tokens with <eos>
        assert s.gold_words.tolist() == [2, 5, 6, 7, 8, 9, 10, 11, 12]
    # Fewer sentences than ranks: the rank left over runs a stand-in sentence that counts nothing.
    lonely = distributed.Distributed(True, 1, 2).shard(np.array([3]), targets, 2, torch.device("cpu"), None)
    assert list(lonely.rows) == [3] and lonely.weight == 0.0 and lonely.tokens == 2


def test_ranks_share_the_cores_and_one_process_needs_no_group(monkeypatch):
    assert distributed.threads_per_rank(16, 2) == 8 and distributed.threads_per_rank(2, 4) == 1
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist, device = distributed.init(torch.device("cpu"))
    assert dist is distributed.SINGLE and not dist.enabled and dist.is_main and device == torch.device("cpu")
    assert dist.broadcast({"x": 1}) == {"x": 1} and dist.sum(2.5, device) == 2.5
    assert distributed.rank_seed(1, 1) != distributed.rank_seed(1, 2)

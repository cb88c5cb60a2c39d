"""What a finished training leaves for people and for DVC: reports/train.json (what was trained,
where, and why it stopped), reports/train_speed.json (timings, kept out of dvc.lock), the
learning curve as CSV and PNG, and the same figures in the MLflow run."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from pipeline import allocator, storage
from pipeline.checkpoint import Progress
from pipeline.config import TrainParams
from pipeline.device import host, peak_memory_mb, precision_name
from pipeline.runlog import NullRunLog

log = logging.getLogger(__name__)


def plot_learning_curve(history: list[dict], path: Path) -> None:
    plt = storage.pyplot()

    frame = pd.DataFrame(history)
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(frame["epoch"], frame["train_loss"], marker="o", label="train")
    ax_loss.plot(frame["epoch"], frame["valid_loss"], marker="o", label="valid (full softmax)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy per token", title="Loss")
    ax_loss.legend()
    ax_bleu.plot(frame["epoch"], frame["valid_bleu"], marker="o", color="tab:green")
    ax_bleu.set(xlabel="epoch", ylabel="BLEU", title="Validation BLEU (greedy)")
    storage.save_figure(path, fig)


def warn_if_machine_dependent(stop_reason: str, steps: int) -> bool:
    if stop_reason != "time_budget":
        return False
    log.warning("!" * 80 + "\nTRAINING WAS STOPPED BY THE WALL-CLOCK BUDGET (train.max_minutes) after %d steps:\n"
                "this model depends on this machine's speed; another machine trains another model.\n"
                "Stop by train.epochs or train.max_steps for a reproducible result.\n" + "!" * 80, steps)
    return True


def write_reports(progress: Progress, cfg: TrainParams, device: torch.device, batches_in_epoch: int,
                  stop_reason: str, averaged_bleu: float | None, coverage: tuple[float, float],
                  runlog: NullRunLog, reports: Path) -> dict:
    machine_dependent = warn_if_machine_dependent(stop_reason, progress.step)
    summary = {
        "best_valid_bleu": progress.best_bleu,
        "averaged_valid_bleu": averaged_bleu,
        "epochs": round(progress.epoch + progress.batch / batches_in_epoch, 3),
        "epochs_completed": progress.epoch,
        "steps": progress.step,
        "embedding_coverage": {"src": round(coverage[0], 4), "tgt": round(coverage[1], 4)},
        "stopped_by": stop_reason,
        "machine_dependent": machine_dependent,
        "device": str(device),
        "precision": precision_name(cfg.amp, device),
        "host": host(device),  # bit-identical training needs the same CPU model (and GPU)
    }
    # Timings go to a file of their own that dvc.lock does not hash (a top-level metric in
    # dvc.yaml): the same training on a faster machine must give the same dvc.lock.
    speed = {"train_minutes": round(progress.elapsed / 60, 2),
             "tokens_per_sec": round(progress.tokens_per_sec, 1),
             "peak_memory_mb": round(peak_memory_mb(device), 1), "allocator": allocator.in_use()}
    runlog.metrics({"best_valid_bleu": progress.best_bleu, "train_minutes": speed["train_minutes"],
                    "train_tokens_per_sec": speed["tokens_per_sec"], "peak_memory_mb": speed["peak_memory_mb"],
                    "steps": progress.step} | ({} if averaged_bleu is None else {"averaged_valid_bleu": averaged_bleu}))
    runlog.tags({"stopped_by": stop_reason, "machine_dependent": str(machine_dependent).lower()})
    # No timings in the curve: it is a DVC output, and its md5 in dvc.lock must not depend on the
    # machine's speed (train_speed.json carries them; so does MLflow).
    curve = pd.DataFrame(progress.history).drop(columns=["tokens_per_sec"])
    with storage.atomic_path(reports / "learning_curve.csv") as tmp:
        curve.to_csv(tmp, index=False, float_format="%.4f")
    plot_learning_curve(progress.history, reports / "plots" / "learning_curve.png")
    runlog.artifact(reports / "plots" / "learning_curve.png", "plots")
    storage.write_json(reports / "train.json", summary)
    storage.write_json(reports / "train_speed.json", speed)
    log.info("training stopped by %s after %d steps (%.2f epochs, %.1f minutes, %s target tokens/s); best valid "
             "BLEU %.2f", stop_reason, progress.step, summary["epochs"], progress.elapsed / 60,
             f"{speed['tokens_per_sec']:,.0f}", progress.best_bleu)
    return summary

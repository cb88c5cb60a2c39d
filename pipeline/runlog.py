"""What a training tells MLflow: its params, data, host, per-validation metrics, plots and result.

`RunLog.open` starts (or, after a crash, reopens) the checkpoint's MLflow run on rank 0; every
other DDP rank gets a `NullRunLog`, which takes the same calls and does nothing, so the training
loop never asks which rank it is on before logging."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline import storage
from pipeline.config import Params
from pipeline.device import host, software
from pipeline.tracking import dvc_hashes, experiment_name, flatten, git_commit, mlflow_setup, split_dataset

log = logging.getLogger(__name__)


class NullRunLog:
    """The run log of a rank other than 0: it logs nothing."""

    run_id, is_new = "", False

    def describe(self, *args, **kwargs) -> None:
        pass

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        pass

    def tags(self, values: dict[str, str]) -> None:
        pass

    def artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class RunLog(NullRunLog):
    """The training's MLflow run."""

    def __init__(self, mlflow, run, is_new: bool):
        self.mlflow, self.run, self.run_id, self.is_new = mlflow, run, run.info.run_id, is_new

    @classmethod
    def open(cls, params: Params, checkpoint_run: str) -> "RunLog":
        """The checkpoint's run reopened (a run left RUNNING by a killed training is finished by its
        resume), or a new one when there is none or it was deleted. `.vamos/run.json` names it for
        evaluate and register."""
        mlflow = mlflow_setup(params.registry.experiment)
        run = reopened(mlflow, checkpoint_run)
        runlog = cls(mlflow, run or mlflow.start_run(log_system_metrics=True), is_new=run is None)
        storage.write_json(storage.RUN_FILE, {"run_id": runlog.run_id, "experiment_id": runlog.run.info.experiment_id})
        return runlog

    def describe(self, params: Params, device, coverage: tuple[float, float], world_size: int | None,
                 prepared: Path, embeddings: Path, reports: Path) -> None:
        """A new run's description: params, the data (splits, the ingest and prepare reports and their
        DVC hashes), the code, the device and host; a reopened run has it already."""
        if not self.is_new:
            return
        mlflow = self.mlflow
        described = {"embedding_coverage.src": round(coverage[0], 4), "embedding_coverage.tgt": round(coverage[1], 4)}
        if world_size:
            described["distributed.world_size"] = world_size
        mlflow.log_params(flatten(params.model_dump(by_alias=True, exclude={"ingest"})) | described)
        log_splits(mlflow, prepared)
        log_data_reports(mlflow, reports)
        hashes = dvc_hashes()
        self.tags({"git_commit": git_commit(), "dvc.prepared_md5": hashes.get(str(prepared), "unknown"),
                   "dvc.embeddings_md5": hashes.get(str(embeddings), "unknown"), "device": str(device),
                   **flatten(host(device), "host."), **flatten(software(), "software.")})
        if experiment := experiment_name():  # a `dvc exp run`: its name ties the run to `dvc exp show`
            self.tags({"dvc.experiment": experiment})

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.mlflow.log_metrics(values, step=step)

    def tags(self, values: dict) -> None:
        self.mlflow.set_tags({key: str(value) for key, value in values.items()})

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), folder)

    def finish(self, failed: bool = False) -> None:
        """End the run; a FAILED one is resumed from the checkpoint by a later `vamos train`."""
        self.mlflow.end_run("FAILED" if failed else "FINISHED")


def reopened(mlflow, run_id: str):
    """The run `run_id` started again, or None when there is none or it was deleted."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        alive = mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        alive = False
    if alive:
        return mlflow.start_run(run_id=run_id, log_system_metrics=True)
    log.warning("the checkpoint's MLflow run %s no longer exists: logging to a new run", run_id)
    return None


def log_splits(mlflow, prepared: Path) -> None:
    """Every split as a dataset of the run: the runs table's Dataset column."""
    for split in storage.SPLITS:
        if storage.split_path(split, prepared).exists():
            mlflow.log_input(split_dataset(split, prepared), context="training" if split == "train" else split)


def log_data_reports(mlflow, reports: Path) -> None:
    """The ingest and prepare reports (rows dropped by reason, split sizes) belong with the run."""
    for name in ("ingest", "prepare"):
        path = reports / f"{name}.json"
        if path.exists():
            mlflow.log_artifact(str(path), "data")
    if (reports / "ingest.json").exists():
        dropped = storage.read_json(reports / "ingest.json").get("dropped", {})
        mlflow.log_metrics({f"ingest_dropped_{reason}": n for reason, n in dropped.items()})

"""What a training tells MLflow: its params, data, host, per-validation metrics, plots and result.

`RunLog.open` starts (or, after a crash, reopens) the checkpoint's MLflow run on rank 0; every
other DDP rank gets a `NullRunLog`, which takes the same calls and does nothing, so the training
loop never asks which rank it is on before logging."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline import storage
from pipeline.config import Params
from pipeline.tracking import dvc_hashes, experiment_name, flatten, git_commit, mlflow_setup

log = logging.getLogger(__name__)


class NullRunLog:
    """The run log of a rank other than 0: it logs nothing."""

    run_id = ""

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
    def open(cls, params: Params, progress_run: str, step: int, described: dict, tags: dict,
             prepared: Path, embeddings: Path, reports: Path) -> "RunLog":
        """The checkpoint's run `progress_run` reopened (a run left RUNNING by a killed training is
        finished by its resume), or a new one when there is none or it was deleted, described in
        full: params and `described` (more params), the data, the code, and `tags` (device, host).
        `.vamos/run.json` names it for evaluate and register."""
        mlflow = mlflow_setup(params.registry.experiment)
        run = reopened(mlflow, progress_run)
        runlog = cls(mlflow, run or mlflow.start_run(log_system_metrics=True), is_new=run is None)
        if runlog.is_new:
            runlog.describe(params, described, tags, prepared, embeddings, reports)
            if step:  # a checkpoint whose run was deleted: say where this one takes over
                runlog.tags({"resumed_from_step": step, "continues_run": progress_run})
        storage.write_json(storage.RUN_FILE, {"run_id": runlog.run_id, "experiment_id": runlog.run.info.experiment_id})
        return runlog

    def describe(self, params: Params, described: dict, tags: dict, prepared: Path, embeddings: Path,
                 reports: Path) -> None:
        mlflow = self.mlflow
        mlflow.log_params(flatten(params.model_dump(by_alias=True, exclude={"ingest"})) | described)
        log_splits(mlflow, prepared)
        log_data_reports(mlflow, reports)
        hashes = dvc_hashes()
        self.tags({"git_commit": git_commit(), "dvc.prepared_md5": hashes.get(str(prepared), "unknown"),
                   "dvc.embeddings_md5": hashes.get(str(embeddings), "unknown"), **tags})
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


def split_dataset(split: str, prepared: Path = storage.PREPARED):
    """A split as an MLflow dataset: its file as the source, and its md5, the one DVC records for
    it, as the digest."""
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset

    # MLflow registers its local-file source twice (for "" and "file:" URIs), and resolving a
    # path by URI warns that it is ambiguous: take the class itself.
    local_file = next(source for source in get_registered_sources() if source._get_source_type() == "local")
    path = storage.split_path(split, prepared)
    return MetaDataset(local_file(path.resolve().as_uri()), name=split, digest=storage.file_md5(path))


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

"""MLflow set-up shared by every stage: a local SQLite store unless MLFLOW_TRACKING_URI says otherwise."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage

# Marks the experiment as model development for MLflow 3's UI (its runs still open on the GenAI
# overview in 3.17: the README gives the link to the training runs).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def offline_environment() -> None:
    """No code path may phone home: MLflow, Prefect and DVC telemetry off."""
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "GIT_PYTHON_REFRESH": "quiet",
    }.items():
        os.environ.setdefault(key, value)


def workspace_root() -> Path:
    """The main DVC workspace. `dvc exp run --temp` and `--queue` run stages in a copy under
    .dvc/tmp/exps/ that lacks git-ignored files such as mlflow.db; DVC sets DVC_ROOT to the
    workspace for them (and to the repo root for `dvc repro`)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def default_store() -> str:
    """The workspace's own SQLite store: DVC experiments log beside `dvc repro`."""
    return f"sqlite:///{workspace_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_store()


def experiment_name() -> str | None:
    """The DVC experiment this process runs in (`dvc exp run -n NAME`, or DVC's generated name)."""
    return os.environ.get("DVC_EXP_NAME") or None


def mlflow_setup(experiment: str | None = None):
    offline_environment()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if experiment:
        _ensure_experiment(mlflow, experiment)
        mlflow.set_experiment(experiment)
    return mlflow


def _ensure_experiment(mlflow, name: str) -> None:
    """Create the experiment, or mark an existing one, as model development (EXPERIMENT_KIND).
    With the default store its artifacts go to the workspace's mlruns/ too: a store first used
    by a temp experiment would otherwise point them into its throwaway copy."""
    from mlflow.exceptions import MlflowException

    client, (key, value) = mlflow.MlflowClient(), EXPERIMENT_KIND
    found = client.get_experiment_by_name(name)
    if found is None:
        local = mlflow.get_tracking_uri() == default_store()
        artifacts = str(workspace_root() / "mlruns" / name) if local else None
        try:
            client.create_experiment(name, artifact_location=artifacts, tags={key: value})
        except MlflowException:
            if client.get_experiment_by_name(name) is None:  # not a concurrent stage that won the race
                raise
    elif found.tags.get(key) != value:
        client.set_experiment_tag(found.experiment_id, key, value)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_hashes(lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """The md5 of every output that dvc.lock records, keyed by path: what exact data a run saw."""
    try:
        lock = yaml.safe_load(Path(lock_file).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {out["path"]: out.get("md5", "") for stage in lock.get("stages", {}).values()
            for out in stage.get("outs", [])}


def split_dataset(split: str, prepared: Path = storage.PREPARED):
    """A split as an MLflow dataset: its file as the source, and its md5, the one DVC records for
    it, as the digest."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = storage.split_path(split, prepared)
    with warnings.catch_warnings():  # MLflow registers its local-file source twice ("" and "file:")
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(path.resolve().as_uri())
    return MetaDataset(source, name=split, digest=storage.file_md5(path))

"""MLflow set-up shared by every stage: a local SQLite store unless MLFLOW_TRACKING_URI says otherwise."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


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


def mlflow_setup(experiment: str | None = None):
    offline_environment()
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    if experiment:
        mlflow.set_experiment(experiment)
    return mlflow


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

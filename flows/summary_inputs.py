"""What the run summary (flows/summary.py) is made of, read from where the run left it: reports/*.json
of the workspace or of an experiment's commit, `dvc metrics diff`, and the model's MLflow run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flows.summary import REPORTS, MlflowRun


def read_reports(project: str, rev: str | None) -> dict[str, dict]:
    """reports/*.json of the workspace, or of a git revision (an experiment's commit); {} for a missing one."""
    from pipeline.storage import read_json

    found = {}
    for name in REPORTS:
        path = Path(project) / "reports" / f"{name}.json"
        if rev is None:
            found[name] = read_json(path) if path.exists() else {}
        else:
            shown = subprocess.run(["git", "show", f"{rev}:reports/{name}.json"], cwd=project, capture_output=True,
                                   text=True)
            found[name] = json.loads(shown.stdout) if shown.returncode == 0 else {}
    return found


def experiment_ref(project: str, name: str) -> str | None:
    """The git ref of a DVC experiment (refs/exps/<baseline>/<name>)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project,
                          capture_output=True, text=True).stdout.split()
    return next((ref for ref in refs if ref.rsplit("/", 1)[-1] == name), None)


def dvc_metrics_diff(project: str, rev: str | None) -> dict | str:
    """`dvc metrics diff HEAD [rev] --json`, parsed: this run's metrics against the last commit's; or,
    when DVC failed, the end of what it said."""
    cmd = [sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", *([rev] if rev else []), "--json"]
    result = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    try:
        diff = json.loads(result.stdout or "{}")
    except ValueError:
        diff = None
    if result.returncode != 0 or diff is None:
        return (result.stderr or result.stdout).strip()[-300:]
    return diff


def mlflow_run(project: str, registry: dict) -> MlflowRun:
    """The tracking store the stages logged to, and the model's run: the registered one, else the last
    training's (.vamos/run.json)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project) / 'mlflow.db'}"
    run_id = registry.get("run_id")
    run_file = Path(project) / ".vamos" / "run.json"
    if not run_id and run_file.exists():
        run_id = json.loads(run_file.read_text()).get("run_id")
    if not run_id:
        return MlflowRun(uri)
    try:
        from mlflow import MlflowClient

        return MlflowRun(uri, run_id, MlflowClient(uri).get_run(run_id).info.experiment_id)
    except Exception:  # noqa: BLE001 - a link without the right experiment still names the run
        return MlflowRun(uri, run_id)

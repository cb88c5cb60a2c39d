"""Restore a registered model version anywhere: the code of its commit, the dvc.lock of its run,
and its data, embeddings and model pulled from the DVC remote, checked against the registered md5."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline import storage
from pipeline.config import Params
from pipeline.registry import LOCK_ARTIFACT, dvc_remote_url
from pipeline.storage import file_md5
from pipeline.tracking import mlflow_setup

log = logging.getLogger(__name__)


class RestoreError(RuntimeError):
    """The version cannot be restored; the message says which step failed and why."""


def _run(cmd: list[str], cwd: Path, step: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RestoreError(f"{step} failed ({' '.join(cmd)}):\n{(result.stderr or result.stdout).strip()}")


def _pull_version(registered, into: Path) -> tuple[str, str]:
    """Lay the version's dvc.lock over the worktree, pull its outputs, check the model's md5."""
    import mlflow

    tags = registered.tags
    with tempfile.TemporaryDirectory() as tmp:
        lock = mlflow.artifacts.download_artifacts(run_id=registered.run_id, artifact_path=LOCK_ARTIFACT, dst_path=tmp)
        shutil.copyfile(lock, into / "dvc.lock")
    # The remote the version was pushed to, unless this checkout now points elsewhere (config.local).
    remote = dvc_remote_url() or tags.get("dvc.remote_url", "")
    if not remote:
        raise RestoreError("no DVC remote is configured here and the version names none")
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "remote", "add", "--local", "--force", "--default", "restore", remote], into, "dvc remote add")
    _run([*dvc, "pull"], into, "dvc pull")
    md5 = file_md5(into / storage.MODEL_FILE)
    if md5 != tags["model_md5"]:
        raise RestoreError(f"{into / storage.MODEL_FILE}: md5 {md5} differs from the registered {tags['model_md5']}")
    return md5, remote


def check_lock_logged(client, registered, what: str) -> None:
    """The run's dvc.lock says which data and model to pull; `register` logs it only where one exists."""
    logged = {f.path for f in client.list_artifacts(registered.run_id, str(Path(LOCK_ARTIFACT).parent))}
    if LOCK_ARTIFACT not in logged:
        raise RestoreError(f"{what} cannot be restored: it was registered where no dvc.lock existed (run "
                           f"{registered.run_id} has no {LOCK_ARTIFACT}), so nothing records which data and model "
                           "to pull; versions registered by `dvc repro` or the Prefect flow have one")


def restore(params: Params, version: int, into: Path) -> dict:
    """Check out version `version` of the registered model into a clean git worktree at `into`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow_setup()
    name, client = params.registry.model_name, MlflowClient()
    try:
        registered = client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RestoreError(f"{name} version {version}: not in the registry ({e.message})") from None
    tags = registered.tags
    if tags.get("git_commit", "unknown") == "unknown" or "model_md5" not in tags:
        raise RestoreError(f"{name} version {version} was registered without a git commit or model md5")
    check_lock_logged(client, registered, f"{name} version {version}")
    into = into.resolve()
    if into.exists() and any(into.iterdir()):
        raise RestoreError(f"{into} exists and is not empty")

    if tags.get("git_dirty") == "true":
        log.warning("version %s was registered from a checkout with uncommitted changes: the code restored is "
                    "its commit's, not exactly what trained it", version)
    log.info("restoring %s version %s: commit %s into %s", name, version, tags["git_commit"][:10], into)
    _run(["git", "worktree", "add", "--detach", str(into), tags["git_commit"]], Path.cwd(), "git worktree add")
    try:
        md5, remote = _pull_version(registered, into)
    except BaseException:
        # A failed restore leaves nothing behind, so that the same command can simply be run again.
        subprocess.run(["git", "worktree", "remove", "--force", str(into)], capture_output=True)
        raise
    log.info("restored %s version %s; model md5 %s matches the registry", name, version, md5)
    return {"model": name, "version": int(version), "path": str(into), "git_commit": tags["git_commit"],
            "remote": remote, "model_md5": md5, "registered_md5": tags["model_md5"]}

"""The Prefect flow: one task per DVC stage, each reproduced through DVC's CLI.

dvc.yaml stays the single definition of the DAG (the flow reads its stages from DVC's own graph);
this flow adds scheduling, retries, logs in the Prefect UI, a push of data and models to the DVC
remote, and a metrics artifact. A stage that DVC finds unchanged is skipped in seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.tracking import offline_environment

offline_environment()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402



def dvc_stages(project: str) -> list[str]:
    """dvc.yaml's stages, each after the stages it depends on (DVC's graph; ties in file order)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(project) as repo:
        position = {stage: i for i, stage in enumerate(repo.index.stages)}
        # DVC's edges point from a stage to its upstream stages: reverse them for run order.
        ordered = nx.lexicographical_topological_sort(repo.index.graph.reverse(copy=True), key=position.get)
        return [_target(stage, repo.root_dir) for stage in ordered if isinstance(stage, PipelineStage)]


def _target(stage, root: str) -> str:
    """What `dvc repro` in `root` calls the stage (`stage.addressing` is relative to our cwd)."""
    dvcfile = os.path.relpath(stage.dvcfile.path, root)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


class StageFailed(RuntimeError):
    def __init__(self, stage: str, output: str, transient: bool):
        super().__init__(f"dvc repro {stage} failed:\n{output[-4000:]}")
        self.transient = transient


def _retry_if_transient(task, task_run, state) -> bool:
    """Bad params or bad input fail the same way every time: retrying them only wastes time."""
    try:
        state.result()
    except StageFailed as e:
        return e.transient
    except Exception:
        return True
    return False


@task(task_run_name="check params")
def check_params(project: str) -> None:
    from pipeline.config import load_params

    load_params(Path(project) / "params.yaml")  # raises ParamsError naming the bad key


@task(retries=2, retry_delay_seconds=15, retry_condition_fn=_retry_if_transient, task_run_name="dvc repro {stage}")
def reproduce(stage: str, project: str) -> str:
    """Run one stage through DVC; returns 'ran' or 'skipped' (unchanged since the last run)."""
    logger = get_run_logger()
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=project,
                            capture_output=True, text=True)
    output = result.stdout + result.stderr
    for line in output.splitlines():
        if line.strip():
            logger.info(line.rstrip())
    if result.returncode != 0:
        # `vamos <stage>` reports bad params and bad input this way; anything else may be transient.
        raise StageFailed(stage, output, transient=f"vamos {stage}: error:" not in output)
    return "skipped" if "didn't change, skipping" in output else "ran"


@task(retries=2, retry_delay_seconds=15, task_run_name="dvc push")
def push_outputs(project: str) -> str:
    """Push data and models to the default DVC remote, so that any registered version can be restored."""
    from pipeline.storage import NoRemote, default_remote, push

    logger = get_run_logger()
    try:
        _, url = default_remote(project)
    except NoRemote as e:
        logger.warning("not pushed: %s", e)
        return ""
    result = push(project)
    if result.returncode != 0:
        raise RuntimeError(f"dvc push to {url} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    logger.info("pushed to %s: %s", url, result.stdout.strip().splitlines()[-1:])
    return url


@task(task_run_name="publish metrics")
def publish_metrics(project: str, statuses: dict[str, str], remote: str = "") -> dict:
    from pipeline.storage import read_json

    reports = Path(project) / "reports"
    metrics = read_json(reports / "metrics.json")["test"]
    registry = read_json(reports / "registry.json") if (reports / "registry.json").exists() else {}
    train = read_json(reports / "train.json") if (reports / "train.json").exists() else {}
    speed = read_json(reports / "train_speed.json") if (reports / "train_speed.json").exists() else {}
    rows = [
        ("test BLEU (beam)", metrics["bleu"]), ("test chrF (beam)", metrics["chrf"]), ("test TER (beam)", metrics["ter"]),
        ("test BLEU (greedy)", metrics["greedy"]["bleu"]), ("best valid BLEU", train.get("best_valid_bleu", "")),
        ("training minutes", speed.get("train_minutes", "")), ("stopped by", train.get("stopped_by", "")),
        ("registered", f"{registry.get('model', '')} v{registry.get('version', '')} → {registry.get('alias', '')}"),
        ("pushed to", remote or "no DVC remote"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    stages = ", ".join(f"{s}: {st}" for s, st in statuses.items())
    create_markdown_artifact(
        key="vamos-metrics",
        markdown=f"# vamos run\n\nStages: {stages}\n\n| metric | value |\n|---|---|\n{table}\n",
        description="Test metrics of the model this run produced or kept",
    )
    return {"statuses": statuses, "test": metrics, "registry": registry, "remote": remote}


@flow(name="vamos-pipeline", log_prints=True)
def vamos_pipeline(project: str = ".") -> dict:
    """Reproduce the whole DVC pipeline in `project`, stage by stage, and publish its metrics."""
    project = str(Path(project).resolve())
    check_params(project)
    statuses = {}
    for stage in dvc_stages(project):
        statuses[stage] = reproduce(stage, project)
    return publish_metrics(project, statuses, push_outputs(project))

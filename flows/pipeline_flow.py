"""The Prefect flow: one task per DVC stage, each reproduced through DVC.

dvc.yaml stays the single definition of the DAG (the flow reads its stages from DVC's own graph);
this flow adds scheduling, timeouts, retries by cause, logs in the Prefect UI, a push of data and
models to the DVC remote, and a Markdown artifact. A stage that DVC finds unchanged is skipped in seconds.

- Each stage runs in a child process (flows/dvc_stage.py, DVC's Python API) in a process group of
  its own; its output streams into the task's log line by line while it runs (flows/supervision.py).
- A stage still running after its timeout (params.yaml `flow:`; train's follows its budget) has its
  process group killed; the run fails naming the stage, and stale DVC lock entries are reported (DVC drops
  them; flows/dvc_locks.py).
- The status of a stage comes from DVC itself: unchanged (`Repo.status`) -> "skipped"; reproduced
  by running its command -> "ran"; reproduced from DVC's run-cache, command not run -> "restored".
- Retries go by the stage command's exit code (pipeline/cli.py): 75, a lock or a busy database, is
  retried with the back-off of `flow.retry_delays_seconds`; 2 (bad input or params), 1 (a crash, with
  its traceback in the log) and a kill by a signal are not. A train killed midway resumes from its
  checkpoint on the next run.
- `overrides` ({"train.hidden_size": 512}) run the whole pipeline as one DVC experiment
  (`dvc exp run --temp -S ...`): params.yaml is never edited, and the MLflow run is tagged with the
  experiment's name.
- The run ends with a Markdown artifact of the model's metrics with links to MLflow (flows/summary.py)."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.tracking import offline_environment

offline_environment()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from flows.dvc_locks import report_stale_dvc_locks  # noqa: E402
from flows.summary import Experiment, run_summary  # noqa: E402
from flows.summary_inputs import dvc_metrics_diff, experiment_ref, mlflow_run, read_reports  # noqa: E402
from flows.supervision import stream  # noqa: E402
from pipeline.cli import EXIT_BAD_INPUT, EXIT_TEMPFAIL  # noqa: E402
from pipeline.config import dvc_set_args, params_with  # noqa: E402

STAGE_RUNNER = Path(__file__).with_name("dvc_stage.py")


class StageFailed(RuntimeError):
    """A stage's command (or DVC) exited with `code`; pipeline/cli.py's codes say why."""

    def __init__(self, stage: str, code: int, output: str):
        if code == EXIT_TEMPFAIL:
            why = "a lock or a busy database (exit 75): retried with back-off"
        elif code == EXIT_BAD_INPUT:
            why = "bad params or input (exit 2): fix them; not retried"
        elif code > 128:
            name = signal.Signals(code - 128).name if code - 128 in signal.Signals._value2member_map_ else code - 128
            why = f"killed by signal {name} (exit {code}); not retried: the next run resumes (train from its checkpoint)"
        else:
            why = f"crashed (exit {code}), traceback above; not retried"
        super().__init__(f"stage {stage!r} failed: {why}\n{output[-4000:]}")
        self.stage, self.code = stage, code


class StageTimeout(RuntimeError):
    def __init__(self, stage: str, minutes: float):
        super().__init__(f"stage {stage!r} timed out after {minutes:g} minutes (params.yaml flow:): its process "
                         "group was killed; not retried")
        self.stage, self.minutes = stage, minutes


def _retry_if_temporary(task, task_run, state) -> bool:
    """Only a lock or a busy database (exit 75) may go away by itself: anything else fails alike again."""
    try:
        state.result()
    except StageFailed as e:
        return e.code == EXIT_TEMPFAIL
    except Exception:
        return False
    return False


@flow(name="vamos-pipeline", log_prints=True)
def vamos_pipeline(project: str = ".", overrides: dict[str, Any] | None = None) -> dict:
    """Reproduce the whole DVC pipeline in `project`, stage by stage, and publish its metrics. With
    `overrides` ({"train.hidden_size": 512}) it runs as a DVC experiment instead; params.yaml stays as it is."""
    project = str(Path(project).resolve())
    params = check_params(project, overrides)
    report_stale_dvc_locks(project, get_run_logger())  # left by a run that was killed with its worker
    stages = dvc_stages(project)
    timeouts = {stage: params.flow.timeout_minutes(stage, params.train) for stage in stages}
    delays = list(params.flow.retry_delays_seconds)
    retrying = {"retries": len(delays), "retry_delay_seconds": delays or 0}
    if overrides:
        name = _experiment_name()
        statuses = run_experiment.with_options(**retrying)(name, project, overrides, sum(timeouts.values()))
        return publish_metrics(project, statuses, "", name)
    statuses = {}
    for stage in stages:
        statuses[stage] = reproduce.with_options(**retrying)(stage, project, timeouts[stage])
    return publish_metrics(project, statuses, push_outputs(project))


@task(task_run_name="check params")
def check_params(project: str, overrides: dict[str, Any] | None = None):
    """Validate params.yaml, with the overrides applied, before any stage runs."""
    return params_with(Path(project) / "params.yaml", overrides)


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


@task(retry_condition_fn=_retry_if_temporary, task_run_name="dvc repro {stage}")
def reproduce(stage: str, project: str, timeout_minutes: float) -> str:
    """Run one stage through DVC; returns 'skipped' (DVC found it unchanged), 'ran' (its command ran)
    or 'restored' (DVC restored its outputs from the run-cache; its command did not run)."""
    result = _run_runner(["repro", stage], project, timeout_minutes, stage)
    status = result["statuses"].get(stage, "skipped")
    get_run_logger().info("stage %s: %s", stage, status)
    return status


@task(retry_condition_fn=_retry_if_temporary, task_run_name="dvc exp run {name}")
def run_experiment(name: str, project: str, overrides: dict[str, Any], timeout_minutes: float) -> dict[str, str]:
    """The whole pipeline as one DVC experiment in a temporary copy (`dvc exp run --temp -n NAME -S ...`):
    the workspace and its params.yaml stay as they are; the results are in the experiment's commit."""
    sets = dvc_set_args(overrides)
    get_run_logger().info("dvc exp run --temp -n %s %s", name, " ".join(f"-S {s}" for s in sets))
    return _run_runner(["exp", name, *sets], project, timeout_minutes, f"experiment {name}")["statuses"]


def _experiment_name() -> str:
    """vamos-<UTC time>-<flow run name>, in the characters a git ref and DVC allow."""
    from prefect.runtime import flow_run

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"vamos-{stamp}-{flow_run.name or 'run'}")


def _run_runner(args: list[str], project: str, minutes: float, name: str) -> dict:
    """Run flows/dvc_stage.py with `args` under supervision; its result, or StageTimeout / StageFailed."""
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="vamos-stage-") as tmp:
        result_file = Path(tmp) / "result.json"
        code, timed_out, tail = stream([sys.executable, str(STAGE_RUNNER), *args[:2], str(result_file), *args[2:]],
                                       project, minutes * 60, logger)
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if timed_out:
        logger.error("%s: still running after %g minutes: its process group was killed", name, minutes)
        report_stale_dvc_locks(project, logger)
        raise StageTimeout(name, minutes)
    if code < 0:  # the runner itself was killed by signal -code
        code = 128 - code
    if code != 0:
        if code > 128:
            report_stale_dvc_locks(project, logger)
        raise StageFailed(name, code, tail)
    return result


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
def publish_metrics(project: str, statuses: dict[str, str], remote: str = "", experiment: str | None = None) -> dict:
    """The run's Markdown summary as the Prefect artifact `vamos-metrics`; returns what it shows."""
    rev = experiment_ref(project, experiment) if experiment else None
    reports = read_reports(project, rev)
    registry = reports["registry"]
    create_markdown_artifact(
        key="vamos-metrics",
        markdown=run_summary(statuses, reports, dvc_metrics_diff(project, rev), mlflow_run(project, registry), remote,
                             Experiment(experiment, rev) if experiment else None),
        description="Test metrics of the model this run produced or kept, with links to MLflow",
    )
    test = reports["metrics"].get("test", {})
    return {"statuses": statuses, "test": test, "registry": registry, "remote": remote, "experiment": experiment}

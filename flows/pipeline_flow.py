"""The Prefect flow: one task per DVC stage, each reproduced through DVC.

dvc.yaml stays the single definition of the DAG (the flow reads its stages from DVC's own graph);
this flow adds scheduling, timeouts, retries by cause, logs in the Prefect UI, a push of data and
models to the DVC remote, and a Markdown artifact. A stage that DVC finds unchanged is skipped in seconds.

- Each stage runs in a child process (flows/dvc_stage.py, DVC's Python API) in a process group of
  its own; its output streams into the task's log line by line while it runs.
- A stage still running after its timeout (params.yaml `flow:`; train's follows its budget) has its
  process group killed; the run fails naming the stage, and stale DVC lock entries are reported (DVC drops them).
- The status of a stage comes from DVC itself: unchanged (`Repo.status`) -> "skipped"; reproduced
  by running its command -> "ran"; reproduced from DVC's run-cache, command not run -> "restored".
- Retries go by the stage command's exit code (pipeline/cli.py): 75, a lock or a busy database, is
  retried with the back-off of `flow.retry_delays_seconds`; 2 (bad input or params), 1 (a crash, with
  its traceback in the log) and a kill by a signal are not. A train killed midway resumes from its
  checkpoint on the next run.
- `overrides` ({"train.hidden_size": 512}) run the whole pipeline as one DVC experiment
  (`dvc exp run --temp -S ...`): params.yaml is never edited, and the MLflow run is tagged with the
  experiment's name."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.tracking import offline_environment

offline_environment()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from pipeline.cli import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_TEMPFAIL  # noqa: E402

STAGE_RUNNER = Path(__file__).with_name("dvc_stage.py")
KILL_GRACE_SECONDS = 10  # between SIGTERM and SIGKILL to a timed-out stage's process group


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


def _kill_group(process: subprocess.Popen, logger) -> None:
    """SIGTERM the whole process group (the runner, DVC, the stage command and its children), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, 0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        logger.warning("sent %s to the process group %d", sig.name, process.pid)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def stream(cmd: list[str], cwd: str, timeout_s: float, logger, env: dict | None = None) -> tuple[int, bool, str]:
    """Run `cmd` in a new process group, logging each output line as it comes; kill the group after
    `timeout_s`. Returns (exit code, timed out, the output's last lines)."""
    env = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace",
                               bufsize=1)
    timed_out = threading.Event()

    def on_timeout():
        if process.poll() is not None:  # it ended just in time: its own exit code decides
            return
        timed_out.set()
        _kill_group(process, logger)

    timer = threading.Timer(timeout_s, on_timeout)
    timer.daemon = True
    timer.start()
    tail: deque[str] = deque(maxlen=60)
    try:
        for line in process.stdout:  # ends when every process holding the pipe has exited
            line = line.rstrip()
            if line.strip():
                logger.info(line)
                tail.append(line)
        code = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # interrupted here (e.g. the flow run was cancelled)
            _kill_group(process, logger)
    if timed_out.is_set():
        timer.join()
    return code, timed_out.is_set(), "\n".join(tail)


def clear_stale_dvc_locks(project: str, logger) -> list[str]:
    """After a stage's processes were killed: report DVC's per-path lock entries (.dvc/tmp/rwlock)
    that name dead processes. DVC drops those itself on its next run (under its own guard lock: the
    file is never edited here, where a concurrent dvc command could lose its entry). The repository
    lock (.dvc/tmp/lock) is an fcntl lock, which the kernel released with its process: check that
    it can be taken."""
    import psutil

    stale = []
    try:
        lock = json.loads((Path(project) / ".dvc" / "tmp" / "rwlock").read_text())
    except (OSError, ValueError):
        lock = {}
    for mode in ("read", "write"):
        for path, infos in (lock.get(mode, {}) if isinstance(lock, dict) else {}).items():
            for entry in infos if isinstance(infos, list) else [infos]:
                if not psutil.pid_exists(int(entry.get("pid", 0))):
                    stale.append(f"{mode} lock on {path} held by killed PID {entry.get('pid')} ({entry.get('cmd')})")
    for entry in stale:
        logger.warning("stale DVC lock (DVC drops it on its next run): %s", entry)
    repo_lock = Path(project) / ".dvc" / "tmp" / "lock"
    if repo_lock.exists():
        import zc.lockfile

        try:
            zc.lockfile.LockFile(str(repo_lock)).close()
        except zc.lockfile.LockError:
            logger.warning("DVC's repository lock %s is held by a live process (another dvc command?)", repo_lock)
        else:
            logger.info("DVC's repository lock %s is free", repo_lock)
    return stale


@task(task_run_name="check params")
def check_params(project: str, overrides: dict[str, Any] | None = None):
    """Validate params.yaml, with the overrides applied, before any stage runs."""
    return load_params_with(project, overrides)


def load_params_with(project: str, overrides: dict[str, Any] | None = None):
    import yaml

    from pipeline.config import Params, ParamsError, _describe, load_params
    from pydantic import ValidationError

    path = Path(project) / "params.yaml"
    params = load_params(path)  # raises ParamsError naming the bad key
    if not overrides:
        return params
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"override {key!r}: {'.'.join(parents)} is not a section of {path}")
            node = node[part]
        if leaf not in node:
            raise ParamsError(f"override {key!r}: no such param in {path}")
        node[leaf] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(f"overrides {overrides}: invalid params\n{_describe(e)}") from None


def _run_runner(args: list[str], project: str, minutes: float, name: str) -> dict:
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="vamos-stage-") as tmp:
        result_file = Path(tmp) / "result.json"
        code, timed_out, tail = stream([sys.executable, str(STAGE_RUNNER), *args[:2], str(result_file), *args[2:]],
                                       project, minutes * 60, logger)
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if timed_out:
        logger.error("%s: still running after %g minutes: its process group was killed", name, minutes)
        clear_stale_dvc_locks(project, logger)
        raise StageTimeout(name, minutes)
    if code < 0:  # the runner itself was killed by signal -code
        code = 128 - code
    if code != 0:
        if code > 128:
            clear_stale_dvc_locks(project, logger)
        raise StageFailed(name, code, tail)
    return result


@task(retry_condition_fn=_retry_if_temporary, task_run_name="dvc repro {stage}")
def reproduce(stage: str, project: str, timeout_minutes: float) -> str:
    """Run one stage through DVC; returns 'skipped' (DVC found it unchanged), 'ran' (its command ran)
    or 'restored' (DVC restored its outputs from the run-cache; its command did not run)."""
    result = _run_runner(["repro", stage], project, timeout_minutes, stage)
    status = result["statuses"].get(stage, "skipped")
    get_run_logger().info("stage %s: %s", stage, status)
    return status


def hydra_value(value: Any) -> str:
    """A param value in the override grammar of `dvc exp run -S` (Hydra's): JSON, but with dict keys
    unquoted, which Hydra would read as one string. (`++key=` sets a key, also one that a dict lacks.)"""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(hydra_value(item) for item in value) + "]"
    return json.dumps(value)


@task(retry_condition_fn=_retry_if_temporary, task_run_name="dvc exp run {name}")
def run_experiment(name: str, project: str, overrides: dict[str, Any], timeout_minutes: float) -> dict[str, str]:
    """The whole pipeline as one DVC experiment in a temporary copy (`dvc exp run --temp -n NAME -S ...`):
    the workspace and its params.yaml stay as they are; the results are in the experiment's commit."""
    sets = [f"++{key}={hydra_value(value)}" for key, value in overrides.items()]
    get_run_logger().info("dvc exp run --temp -n %s %s", name, " ".join(f"-S {s}" for s in sets))
    return _run_runner(["exp", name, *sets], project, timeout_minutes, f"experiment {name}")["statuses"]


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


def _read_reports(project: str, rev: str | None) -> dict[str, dict]:
    """reports/*.json of the workspace, or of a git revision (an experiment's commit)."""
    from pipeline.storage import read_json

    found = {}
    for name in ("metrics", "registry", "train", "train_speed"):
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


def metrics_diff(project: str, rev: str | None) -> str:
    """`dvc metrics diff HEAD [rev]` as a Markdown table: this run's metrics against the last commit's."""
    cmd = [sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", *([rev] if rev else []), "--json"]
    result = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    try:
        diff = json.loads(result.stdout or "{}")
    except ValueError:
        diff = None
    if result.returncode != 0 or diff is None:
        return f"(`dvc metrics diff HEAD` failed: {(result.stderr or result.stdout).strip()[-300:]})"
    rows = [f"| {path} | {metric} | {change.get('old', '')} | {change.get('new', '')} | {change.get('diff', '')} |"
            for path, metrics in diff.items() for metric, change in metrics.items()
            if not isinstance(change.get("new"), (dict, list))]
    if not rows:
        return "No metric changed since the last commit (`dvc metrics diff HEAD`)."
    return "| file | metric | HEAD | this run | change |\n|---|---|---|---|---|\n" + "\n".join(rows)


def mlflow_links(project: str, registry: dict) -> list[tuple[str, str]]:
    """Markdown links to the model's MLflow run and registered version. A file or SQLite store has no web
    address: the links then point at `mlflow ui` on its default port, started as the row says."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project) / 'mlflow.db'}"
    run_id = registry.get("run_id")
    run_file = Path(project) / ".vamos" / "run.json"
    if not run_id and run_file.exists():
        run_id = json.loads(run_file.read_text()).get("run_id")
    if uri.startswith(("http://", "https://")):
        base, how = uri.rstrip("/"), ""
    else:
        base, how = "http://127.0.0.1:5000", f" (after `mlflow ui --backend-store-uri {uri}`)"
    experiment_id = "0"
    if run_id:
        try:
            from mlflow import MlflowClient

            experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - a link without the right experiment still names the run
            pass
    rows = [("MLflow store", f"`{uri}`")]
    if run_id:
        rows.append(("MLflow run", f"[{run_id}]({base}/#/experiments/{experiment_id}/runs/{run_id}){how}"))
    if registry.get("version"):
        model, version = registry.get("model", ""), registry["version"]
        rows.append(("model version", f"[{model} v{version}]({base}/#/models/{model}/versions/{version}){how}, "
                                      f"alias {registry.get('alias') or 'none'}"))
    return rows


@task(task_run_name="publish metrics")
def publish_metrics(project: str, statuses: dict[str, str], remote: str = "", experiment: str | None = None) -> dict:
    rev = experiment_ref(project, experiment) if experiment else None
    reports = _read_reports(project, rev)
    metrics, registry, train, speed = (reports[k] for k in ("metrics", "registry", "train", "train_speed"))
    test = metrics.get("test", {})
    rows = [
        ("test BLEU (beam)", test.get("bleu", "")), ("test chrF (beam)", test.get("chrf", "")),
        ("test TER (beam)", test.get("ter", "")), ("test BLEU (greedy)", test.get("greedy", {}).get("bleu", "")),
        ("best valid BLEU", train.get("best_valid_bleu", "")),
        ("training minutes", speed.get("train_minutes", "")), ("stopped by", train.get("stopped_by", "")),
        ("registered", f"{registry.get('model', '')} v{registry.get('version', '')} → {registry.get('alias', '')}"),
        *mlflow_links(project, registry),
        ("pushed to", remote or ("not pushed (an experiment)" if experiment else "no DVC remote")),
    ]
    if experiment:
        rows.insert(0, ("DVC experiment", f"`{experiment}` ({rev or 'ref not found'}): `dvc exp apply {experiment}`"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    stages = ", ".join(f"{s}: {st}" for s, st in statuses.items())
    create_markdown_artifact(
        key="vamos-metrics",
        markdown=f"# vamos run\n\nStages: {stages}\n\n| metric | value |\n|---|---|\n{table}\n\n"
                 f"## Against the last commit\n\n{metrics_diff(project, rev)}\n",
        description="Test metrics of the model this run produced or kept, with links to MLflow",
    )
    return {"statuses": statuses, "test": test, "registry": registry, "remote": remote, "experiment": experiment}


def _experiment_name() -> str:
    from prefect.runtime import flow_run

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"vamos-{stamp}-{flow_run.name or 'run'}")


@flow(name="vamos-pipeline", log_prints=True)
def vamos_pipeline(project: str = ".", overrides: dict[str, Any] | None = None) -> dict:
    """Reproduce the whole DVC pipeline in `project`, stage by stage, and publish its metrics. With
    `overrides` ({"train.hidden_size": 512}) it runs as a DVC experiment instead; params.yaml stays as it is."""
    project = str(Path(project).resolve())
    params = check_params(project, overrides)
    clear_stale_dvc_locks(project, get_run_logger())  # left by a run that was killed with its worker
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

"""prefect.yaml on a process work pool, as the README tells a user to run it: a real `prefect server
start`, `prefect work-pool create`, `prefect deploy`, and `prefect worker start` in subprocesses,
against a tiny DVC checkout; plus the one-run-at-a-time rule, in prefect.yaml and in serve()."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.deploy import CONCURRENCY, DEFAULT_CRON, build_deployment
from tests.conftest import REPO, free_port, http_status, make_dvc_repo, run, wait_healthy

BIN = Path(sys.executable).parent


def nightly() -> dict:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [deployment] = [d for d in config["deployments"] if d["name"] == "nightly"]
    return deployment


def test_prefect_yaml_deploys_the_flow_on_the_vamos_pool_like_serve():
    from prefect.flows import load_flow_from_entrypoint

    config, deployment = yaml.safe_load((REPO / "prefect.yaml").read_text()), nightly()
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow.name == "vamos-pipeline"
    assert deployment["work_pool"]["name"] == "vamos"
    assert [s["cron"] for s in deployment["schedules"]] == [DEFAULT_CRON]
    # serve() and the work pool allow one run at a time, and cancel the one that collides
    assert deployment["concurrency_limit"] == {"limit": CONCURRENCY.limit,
                                               "collision_strategy": CONCURRENCY.collision_strategy.value}
    served = build_deployment()
    assert (served.concurrency_limit, served.concurrency_options.collision_strategy) == (1, CONCURRENCY.collision_strategy)
    # local code: no pull step reaches the network
    steps = [name for step in config["pull"] for name in step]
    assert steps == ["prefect.deployments.steps.set_working_directory"]


def offline_env(home: Path, api_url: str, auth: str) -> dict[str, str]:
    """What every Prefect process of the test gets: its own PREFECT_HOME and server, no telemetry,
    and the login of a team's secured server (README: Prefect with a login)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(home), PREFECT_API_URL=api_url,
        PREFECT_API_AUTH_STRING=auth,
        DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1", PREFECT_UI_ENABLED="false",
        # no nightly run may start by itself during the test (the schedule is checked, not waited for)
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_HEARTBEAT_SECONDS="5",
    )
    return env


@contextlib.contextmanager
def process(cmd: list[str], env: dict, cwd: Path, log: Path):
    """A subprocess in its own process group, its output in `log`; stopped (SIGINT, as Ctrl-C
    would, then SIGKILL) and waited for on the way out."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def prefect(*args: str, env: dict, cwd: Path) -> str:
    result = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def checkout(root: Path) -> Path:
    """A user's checkout: the real dvc.yaml, pipeline/ and flows/ and prefect.yaml, tiny params."""
    repo = make_dvc_repo(root)
    params = yaml.safe_load((repo / "params.yaml").read_text())  # the least work that still trains
    params["train"].update(epochs=1, max_steps=10)
    params["evaluate"].update(beam_size=1, heatmaps=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(REPO / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", repo / "prefect.yaml")
    for cmd in (["git", "add", "flows", "prefect.yaml", "params.yaml"], ["git", "commit", "-qm", "flows"]):
        assert run(cmd, repo).returncode == 0
    return repo


def wait_for_line(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)


async def wait_for(client, flow_run_id, done, timeout: float, worker_log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = await client.read_flow_run(flow_run_id)
        if done(flow_run.state):
            return flow_run
        await asyncio.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} is {flow_run.state!r} after {timeout}s; worker:\n"
                         f"{worker_log.read_text()[-6000:]}")


@pytest.mark.slow
def test_a_worker_runs_the_deployment_and_a_colliding_run_is_cancelled(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    repo = checkout(tmp_path / "checkout")
    api_url = f"http://127.0.0.1:{free_port()}/api"
    auth = f"vamos:{secrets.token_urlsafe(16)}"
    # A secret in the worker's environment, which no log or artifact of the run may show.
    planted = secrets.token_urlsafe(16)
    env = {**offline_env(tmp_path / "prefect-home", api_url, auth), "MLFLOW_TRACKING_PASSWORD": planted}
    server_env = {**env, "PREFECT_SERVER_API_AUTH_STRING": auth}
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    port = api_url.rsplit(":", 1)[1].split("/")[0]
    with process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                 server_env, tmp_path, server_log) as server:
        wait_healthy(f"{api_url}/health", server, server_log)
        assert http_status(f"{api_url}/flows/filter", data=b"{}") == 401
        anonymous = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
        refused = subprocess.run([str(BIN / "prefect"), "work-pool", "ls"], env=anonymous, cwd=repo,
                                 capture_output=True, text=True, timeout=180)
        assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
        # the README's three commands, from the checkout
        prefect("work-pool", "create", "vamos", "--type", "process", env=env, cwd=repo)
        deployed = prefect("--no-prompt", "deploy", "-n", "nightly", env=env, cwd=repo)
        assert "vamos-pipeline/nightly" in deployed
        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}), \
                process([str(BIN / "prefect"), "worker", "start", "--pool", "vamos"], env, repo, worker_log) as worker:
            first, second, deployment, shown = asyncio.run(two_runs(get_client, worker_log))
            # the run's own last line, streamed through the worker, before the worker is stopped
            wait_for_line(worker_log, f"Flow run '{first.name}' - Finished in state", 30)
            assert worker.poll() is None
        assert worker.returncode is not None  # stopped by the test (SIGINT), and waited for
    print(f"\n--- prefect deploy ---\n{deployed}\n--- worker output ---\n{worker_log.read_text()}")

    assert deployment.work_pool_name == "vamos"
    assert [s.schedule.cron for s in deployment.schedules] == [DEFAULT_CRON]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(repo.resolve())}}]

    assert first.state.is_completed(), first.state
    assert second.state.is_cancelled() and "concurrency limit" in second.state.message.lower(), second.state
    # the run reproduced the checkout's pipeline: a model was trained, evaluated and registered
    assert (repo / "reports" / "metrics.json").exists() and (repo / "models" / "seq2seq" / "model.pt").exists()
    assert json.loads((repo / "reports" / "registry.json").read_text())["alias"] == "champion"
    log = worker_log.read_text()
    assert f"submitting flow run '{first.id}'" in log and f"Flow run '{first.name}' - Finished in state Completed" in log
    assert f"Aborted submission of flow run '{second.id}'" in log
    # No secret in what the run showed (its logs and artifacts on the server, the worker's output) or
    # wrote: reports, data, models, MLflow's store (params, tags, artifacts) and DVC's cache.
    written = [p for p in repo.rglob("*") if p.is_file() and ".git" not in p.relative_to(repo).parts]
    assert any(p.name == "mlflow.db" for p in written)
    for secret in (planted, auth.split(":", 1)[1]):
        assert secret not in shown and secret not in log
        assert not [str(p) for p in written if secret.encode() in p.read_bytes()]


async def two_runs(get_client, worker_log: Path):
    """Run the deployment; once the worker has started it, run it again: the second is cancelled."""
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("vamos-pipeline/nightly")
        first = await client.create_flow_run_from_deployment(deployment.id)
        await wait_for(client, first.id, lambda s: s.is_running() or s.is_final(), 90, worker_log)
        second = await client.create_flow_run_from_deployment(deployment.id)
        second = await wait_for(client, second.id, lambda s: s.is_final(), 60, worker_log)
        first = await wait_for(client, first.id, lambda s: s.is_final(), 300, worker_log)
        return first, second, deployment, await shown_by(client, first.id)


async def shown_by(client, flow_run_id) -> str:
    """Every log line and artifact that the server holds for a flow run, as one text."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    logs, page = [], 200  # the server's largest page
    while len(logs) % page == 0:
        more = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                      limit=page, offset=len(logs))
        logs += more
        if not more:
            break
    artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert logs and artifacts  # the run logged its stages and published its summary
    return "\n".join([*(entry.message for entry in logs), *(str(a.data) for a in artifacts)])

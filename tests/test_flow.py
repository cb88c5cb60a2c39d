"""The Prefect flow under a real (temporary) Prefect server: one task per DVC stage."""
import asyncio
import sys

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline_flow import dvc_stages, vamos_pipeline
from pipeline.stages import STAGES
from tests.conftest import make_dvc_repo, run

# A stage the flow knows nothing about, defined first although it needs evaluate's output.
SUMMARY = {"cmd": "python -c \"import json; print(json.load(open('reports/metrics.json'))['test']['bleu'])\""
                  " > reports/summary.txt",
           "deps": ["reports/metrics.json"], "outs": [{"reports/summary.txt": {"cache": False}}]}


def add_summary_stage(repo):
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {"summary": SUMMARY, **dvc_yaml["stages"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))


def test_the_flow_takes_its_stages_from_dvc_yaml_in_dependency_order(tmp_path):
    repo = make_dvc_repo(tmp_path / "repo")
    assert dvc_stages(str(repo)) == list(STAGES)
    add_summary_stage(repo)
    assert dvc_stages(str(repo)) == ["ingest", "prepare", "embed", "train", "evaluate", "summary", "register"]


@pytest.fixture(scope="session")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def task_runs_of(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


async def artifact(key):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return found[0] if found else None


@pytest.mark.slow
def test_flow_runs_stages_as_tasks_then_skips_them(prefect_server, tmp_path, mlflow_store):
    repo = make_dvc_repo(tmp_path / "repo")
    add_summary_stage(repo)
    remote = tmp_path / "remote"  # not there yet: the push creates it
    assert run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], repo).returncode == 0
    state = vamos_pipeline(str(repo), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["statuses"] == {stage: "ran" for stage in dvc_stages(str(repo))}
    assert "summary" in result["statuses"] and (repo / "reports/summary.txt").exists()
    assert result["registry"]["alias"] == "champion"
    assert result["remote"] == str(remote) and any((remote / "files" / "md5").iterdir())

    names = {t.name for t in asyncio.run(task_runs_of(state.state_details.flow_run_id))}
    assert {f"dvc repro {stage}" for stage in STAGES} <= names
    table = asyncio.run(artifact("vamos-metrics"))
    assert table is not None and "test BLEU" in table.data

    again = vamos_pipeline(str(repo))
    # register always runs (never restored from DVC's run-cache) and is cheap when nothing changed
    assert again["statuses"] == {stage: "ran" if stage == "register" else "skipped" for stage in result["statuses"]}


@pytest.mark.slow
def test_bad_params_fail_before_any_stage(prefect_server, tmp_path, mlflow_store):
    repo = make_dvc_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("beam_size: 3", "beam_size: 0"))
    state = vamos_pipeline(str(repo), return_state=True)
    assert state.is_failed()
    assert "evaluate.beam_size" in str(state.message) or "evaluate.beam_size" in repr(state.result(raise_on_failure=False))
    assert not (repo / "data" / "raw").exists()


@pytest.mark.slow
def test_deployment_has_the_cron_schedule_and_one_run_at_a_time(prefect_server, tmp_path):
    from flows.deploy import build_deployment

    deployment_id = build_deployment("0 3 * * *", tmp_path, "nightly-test").apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    deployment = asyncio.run(read())
    assert deployment.name == "nightly-test"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters == {"project": str(tmp_path.resolve())}
    assert deployment.global_concurrency_limit.limit == 1  # concurrency_limit is deprecated, always None

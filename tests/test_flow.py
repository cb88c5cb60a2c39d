"""The Prefect flow under a real (temporary) Prefect server: one task per DVC stage."""
import asyncio

import pytest
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline_flow import STAGES, vamos_pipeline
from tests.conftest import make_dvc_repo

pytestmark = pytest.mark.slow


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


def test_flow_runs_stages_as_tasks_then_skips_them(prefect_server, tmp_path, mlflow_store):
    repo = make_dvc_repo(tmp_path / "repo")
    state = vamos_pipeline(str(repo), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["statuses"] == {stage: "ran" for stage in STAGES}
    assert result["registry"]["alias"] == "champion"

    names = {t.name for t in asyncio.run(task_runs_of(state.state_details.flow_run_id))}
    assert {f"dvc repro {stage}" for stage in STAGES} <= names
    table = asyncio.run(artifact("vamos-metrics"))
    assert table is not None and "test BLEU" in table.data

    again = vamos_pipeline(str(repo))
    assert again["statuses"] == {stage: "skipped" for stage in STAGES}


def test_bad_params_fail_before_any_stage(prefect_server, tmp_path, mlflow_store):
    repo = make_dvc_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("beam_size: 3", "beam_size: 0"))
    state = vamos_pipeline(str(repo), return_state=True)
    assert state.is_failed()
    assert "evaluate.beam_size" in str(state.message) or "evaluate.beam_size" in repr(state.result(raise_on_failure=False))
    assert not (repo / "data" / "raw").exists()


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
    assert deployment.concurrency_limit == 1 or deployment.global_concurrency_limit.limit == 1

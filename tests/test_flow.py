"""The Prefect flow under a real (temporary) Prefect server: one task per DVC stage, and the faults a
scheduled run must survive, with real processes (DVC, `vamos` stages, SQLite, signals)."""
import asyncio
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline_flow import dvc_stages, vamos_pipeline
from flows.supervision import stream
from pipeline.stages import STAGES
from tests.conftest import make_dvc_repo, run

# A stage the flow knows nothing about, defined first although it needs evaluate's output.
SUMMARY = {"cmd": "python -c \"import json; print(json.load(open('reports/metrics.json'))['test']['bleu'])\""
                  " > reports/summary.txt",
           "deps": ["reports/metrics.json"], "outs": [{"reports/summary.txt": {"cache": False}}]}


# A stage that hangs while a HANG file exists (no deps: the flow runs it first).
HANG = {"cmd": "python -c \"import pathlib, time; print('hanging'); "
               "time.sleep(600 if pathlib.Path('HANG').exists() else 0); "
               "pathlib.Path('hang.txt').write_text('ok')\"",
        "outs": [{"hang.txt": {"cache": False}}]}


def add_summary_stage(repo, **first):
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {**first, "summary": SUMMARY, **dvc_yaml["stages"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))


def set_params(repo, **values):
    """Set `section.key` params in the repo's params.yaml (not committed: DVC reads the workspace)."""
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in values.items():
        section, name = key.split(".")
        raw[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


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


async def logs_of(flow_run_id):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


async def artifact_of(flow_run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        return found[0] if found else None


async def artifact(key):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return found[0] if found else None


def live_dvc_lock_entries(repo) -> list:
    """Entries of DVC's per-path lock held by processes still alive (DVC ignores and drops the others)."""
    path = repo / ".dvc" / "tmp" / "rwlock"
    lock = json.loads(path.read_text()) if path.exists() else {}
    return [path for mode in ("read", "write") for path, infos in lock.get(mode, {}).items()
            if any(psutil.pid_exists(int(e["pid"])) for e in (infos if isinstance(infos, list) else [infos]))]


@pytest.mark.slow
def test_flow_runs_stages_as_tasks_then_skips_them(prefect_server, tmp_path, mlflow_store):
    """Also: a hung stage is stopped by its timeout and the next run starts normally; a binary file in
    data/incoming is counted as dropped and leaves the champion alone; a run-cache hit reads 'restored'."""
    repo = make_dvc_repo(tmp_path / "repo")
    add_summary_stage(repo, hang=HANG)
    set_params(repo, **{"flow.stage_timeouts": {"hang": 0.2}})
    remote = tmp_path / "remote"  # not there yet: the push creates it
    assert run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], repo).returncode == 0

    (repo / "HANG").touch()
    started = time.monotonic()
    hung = vamos_pipeline(str(repo), return_state=True)
    assert hung.is_failed() and time.monotonic() - started < 60
    assert "stage 'hang' timed out after 0.2 minutes" in str(hung.message)
    assert not live_dvc_lock_entries(repo) and not (repo / "data" / "raw").exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if "HANG" in " ".join(p.info["cmdline"] or [])]
    # The stage's output reached the Prefect log while it ran, seconds before the timeout killed it.
    deadline = time.monotonic() + 30  # Prefect sends logs to its API in batches
    while True:
        logs = asyncio.run(logs_of(hung.state_details.flow_run_id))
        printed = [log.timestamp for log in logs if log.message == "hanging"]
        killed = [log.timestamp for log in logs if "its process group was killed" in log.message]
        if (printed and killed) or time.monotonic() > deadline:
            break
        time.sleep(1)
    printed, killed = printed[0], killed[0]
    assert (killed - printed).total_seconds() > 5
    (repo / "HANG").unlink()

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
    run_id = result["registry"]["run_id"]
    assert f"[{run_id}](http://127.0.0.1:5000/#/experiments/" in table.data
    assert "/#/models/vamos-en-es/versions/1)" in table.data
    assert "| reports/metrics.json | test.bleu |" in table.data  # dvc metrics diff HEAD

    # A binary file named .tsv: its lines are counted as dropped; the corpus, and so the model, stay.
    (repo / "data" / "incoming" / "junk.tsv").write_bytes(bytes(range(256)) * 40)
    again = vamos_pipeline(str(repo))
    # register always runs (never restored from DVC's run-cache) and is cheap when nothing changed
    assert again["statuses"] == {stage: "ran" if stage in ("ingest", "register") else "skipped"
                                 for stage in result["statuses"]}
    assert json.loads((repo / "reports/ingest.json").read_text())["dropped"]["binary_line"] == 40
    assert again["registry"]["version"] == 1 and again["registry"]["alias"] == "champion"

    (repo / "data" / "incoming" / "junk.tsv").unlink()  # back to the first run's input: DVC's run-cache has it
    restored = vamos_pipeline(str(repo))
    assert restored["statuses"]["ingest"] == "restored" and restored["statuses"]["prepare"] == "skipped"


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


FLAKY = """import pathlib, sys
codes = pathlib.Path("codes").read_text().split()
attempt = int(pathlib.Path("attempts").read_text()) if pathlib.Path("attempts").exists() else 0
pathlib.Path("attempts").write_text(str(attempt + 1))
print(f"attempt {attempt + 1}: exit {codes[min(attempt, len(codes) - 1)]}", flush=True)
if codes[min(attempt, len(codes) - 1)] == "0":
    pathlib.Path("out.txt").write_text("ok")
sys.exit(int(codes[min(attempt, len(codes) - 1)]))
"""


def make_flaky_repo(root: Path, codes: str) -> Path:
    """A DVC repo with one stage, whose command exits with `codes` in turn (one per attempt)."""
    from tests.conftest import small_params

    root.mkdir(parents=True)
    params = small_params(**{"flow.retry_delays_seconds": [0.5, 1]})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "flaky.py").write_text(FLAKY)
    (root / "codes").write_text(codes)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"flaky": {
        "cmd": "python flaky.py", "deps": ["flaky.py", "codes"], "outs": [{"out.txt": {"cache": False}}]}}}))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"],
                [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        assert run(cmd, root).returncode == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("codes, completes, attempts, says", [
    ("75 75 0", True, 3, ""),  # a lock or a busy database: retried with back-off until it goes away
    ("2 0", False, 1, "bad params or input (exit 2)"),
    ("1 0", False, 1, "crashed (exit 1)"),
])
def test_retries_go_by_the_stage_exit_code(prefect_server, tmp_path, mlflow_store, codes, completes, attempts, says):
    repo = make_flaky_repo(tmp_path / "repo", codes)
    state = vamos_pipeline(str(repo), return_state=True)
    assert state.is_completed() == completes, state.message
    assert (repo / "attempts").read_text() == str(attempts)
    assert says in str(state.message) and (completes or "stage 'flaky' failed" in str(state.message))


def test_vamos_stage_exits_75_on_a_locked_database(tmp_path, monkeypatch):
    """A real SQLITE_BUSY inside a stage gives EX_TEMPFAIL; another error gives 1 with its traceback."""
    import sqlite3

    from typer.testing import CliRunner

    from pipeline import stages
    from pipeline.cli import EXIT_CRASH, EXIT_TEMPFAIL, app

    db = tmp_path / "busy.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")

    def write_to_the_locked_db(params):
        sqlite3.connect(db, timeout=0.1).execute("INSERT INTO t VALUES (1)")

    def crash(params):
        raise KeyError("a bug")

    (tmp_path / "params.yaml").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(stages.STAGES, "ingest", write_to_the_locked_db)
    busy = CliRunner().invoke(app, ["ingest"])
    assert busy.exit_code == EXIT_TEMPFAIL and "database is locked" in busy.output
    monkeypatch.setitem(stages.STAGES, "ingest", crash)
    crashed = CliRunner().invoke(app, ["ingest"])
    assert crashed.exit_code == EXIT_CRASH and "Traceback" in crashed.output and "a bug" in crashed.output
    holder.rollback()


def train_process():
    """The `vamos train` that DVC started for the flow (a descendant of this process)."""
    for process in psutil.Process().children(recursive=True):
        try:
            cmd = process.cmdline()
        except psutil.Error:
            continue
        if cmd[-1:] == ["train"] and any(part.endswith("vamos") for part in cmd):
            return process
    return None


def kill_train_after_its_first_checkpoint(repo: Path, killed: list) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        process = train_process() if list(repo.glob(".vamos/checkpoints/*/last.pt")) else None
        if process:
            time.sleep(random.uniform(0.0, 0.5))
            process.send_signal(signal.SIGKILL)
            killed.append(process.pid)
            return
        time.sleep(0.02)


def lock_mlflow_db_when_train_starts(db: Path, seconds: float, held: list) -> None:
    """Another writer holds the MLflow SQLite database (BEGIN EXCLUSIVE) as training starts."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and train_process() is None:
        time.sleep(0.02)
    locker = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(float(sys.argv[2])); c.rollback()"),
        str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    held.append(locker.stdout.readline().strip())
    locker.wait()


@pytest.mark.slow
def test_a_train_killed_in_one_run_resumes_in_the_next_with_the_same_weights(prefect_server, tmp_path, mlflow_store):
    """SIGKILL of `vamos train` in a flow run; the next run, while another writer holds the MLflow
    database for seconds, resumes from the checkpoint and ends with the weights of an uninterrupted
    training. Then overrides run as a DVC experiment, leaving params.yaml alone."""
    import torch
    from mlflow import MlflowClient

    repo = make_dvc_repo(tmp_path / "repo")
    set_params(repo, **{"train.epochs": 3, "train.checkpoint_every": 3, "flow.retry_delays_seconds": [1, 2]})
    killed: list = []
    killer = threading.Thread(target=kill_train_after_its_first_checkpoint, args=(repo, killed))
    killer.start()
    state = vamos_pipeline(str(repo), return_state=True)
    killer.join()
    assert killed and state.is_failed()
    assert "stage 'train' failed: killed by signal SIGKILL" in str(state.message)
    (checkpoint,) = repo.glob(".vamos/checkpoints/*/last.pt")
    steps_at_kill = torch.load(checkpoint, weights_only=True)["progress"]["step"]
    killed_run = json.loads((repo / ".vamos" / "run.json").read_text())["run_id"]

    db = Path(mlflow_store.removeprefix("sqlite:///"))
    held: list = []
    locker = threading.Thread(target=lock_mlflow_db_when_train_starts, args=(db, 5, held))
    locker.start()
    resumed = vamos_pipeline(str(repo))
    locker.join()
    assert held == ["locked"]
    assert resumed["statuses"] == {"ingest": "skipped", "prepare": "skipped", "embed": "skipped", "train": "ran",
                                   "evaluate": "ran", "register": "ran"}
    assert resumed["registry"]["alias"] == "champion"
    # (`vamos` runs this checkout's pipeline code, which the checkpoint's fingerprint covers: edit it
    # between the two runs and the second trains from scratch)
    assert torch.load(checkpoint, weights_only=True)["progress"]["step"] > steps_at_kill
    assert resumed["registry"]["run_id"] == killed_run  # the same MLflow run, continued and finished
    assert MlflowClient(mlflow_store).get_run(killed_run).info.status == "FINISHED"

    straight = tmp_path / "straight"  # the same inputs, trained without interruption
    shutil.copytree(repo, straight)
    shutil.rmtree(straight / ".vamos")
    shutil.rmtree(straight / "models" / "seq2seq")
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'straight.db'}"}
    trained = subprocess.run(["vamos", "train"], cwd=straight, env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-2000:]
    a, b = (torch.load(root / "models/seq2seq/model.pt", weights_only=True)["state_dict"] for root in (repo, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    committed = (repo / "params.yaml").read_bytes()
    state = vamos_pipeline(str(repo), overrides={"train.hidden_size": 32}, return_state=True)
    experiment = state.result()
    assert (repo / "params.yaml").read_bytes() == committed
    name = experiment["experiment"]
    # It runs in a copy without the workspace's git-ignored outputs: DVC restores what its run-cache
    # holds, and runs the stages with uncached outputs (embed, train) again.
    assert experiment["statuses"]["train"] == "ran" and experiment["statuses"]["prepare"] == "restored"
    runs = MlflowClient(mlflow_store).search_runs(
        [MlflowClient(mlflow_store).get_experiment_by_name("vamos").experiment_id],
        filter_string=f"tags.`dvc.experiment` = '{name}'")
    assert len(runs) == 1 and runs[0].data.params["train.hidden_size"] == "32"
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo)
    assert name in shown.stdout
    table = asyncio.run(artifact_of(state.state_details.flow_run_id)).data
    assert f"`{name}`" in table and f"[{runs[0].info.run_id}](" in table
    assert "| reports/metrics.json | test.bleu |" in table  # dvc metrics diff HEAD <the experiment>


@pytest.mark.slow
@pytest.mark.parametrize("overrides, named", [({"train.hidden_size": 1}, "train.hidden_size"),
                                              ({"train.hiden_size": 64}, "train.hiden_size")])
def test_bad_overrides_fail_before_any_stage(prefect_server, tmp_path, mlflow_store, overrides, named):
    repo = make_dvc_repo(tmp_path / "repo")
    state = vamos_pipeline(str(repo), overrides=overrides, return_state=True)
    assert state.is_failed() and named in str(state.message)
    assert not (repo / "data" / "raw").exists()


@pytest.mark.slow
def test_a_dvc_lock_held_by_another_process_is_retried(prefect_server, tmp_path, mlflow_store):
    """Another process holds DVC's repository lock for seconds: the stage runner exits 75 and the
    flow retries it with back-off until the lock is free."""
    repo = make_flaky_repo(tmp_path / "repo", "0")
    set_params(repo, **{"flow.retry_delays_seconds": [4, 4, 4]})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, zc.lockfile; lock = zc.lockfile.LockFile(sys.argv[1]); print('locked', flush=True); "
        "time.sleep(6); lock.close()"), str(repo / ".dvc" / "tmp" / "lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    state = vamos_pipeline(str(repo), return_state=True)
    holder.wait()
    assert state.is_completed(), state.message
    (task_run,) = [t for t in asyncio.run(task_runs_of(state.state_details.flow_run_id)) if t.name == "dvc repro flaky"]
    assert task_run.run_count >= 2 and (repo / "attempts").read_text() == "1"


def test_a_timeout_kills_the_group_when_its_leader_exits_first_leaving_a_child_on_the_pipe(tmp_path):
    """The stage runner can die before `vamos train`, which keeps the output pipe open: the timeout
    still kills the group, and the call returns on time rather than when the orphan ends."""
    started = time.monotonic()
    code, timed_out, tail = stream(["sh", "-c", "sleep 60 & echo $!"], str(tmp_path), 1, logging.getLogger("test"))
    assert time.monotonic() - started < 15
    assert timed_out and code == 0  # the leader exited by itself; the group outlived it
    orphan = int(tail.splitlines()[-1])
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE

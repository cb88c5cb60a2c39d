"""Register, promote and translate against a real `mlflow server` process (SQLite backend,
proxied artifacts in a temp dir), as a team with a shared tracking server would; and a register
that the server's going away cuts short, then retried."""
import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.registry import CHALLENGER, CHAMPION, register
from pipeline.storage import MODEL_FILE
from tests.conftest import MlflowServer, broken_model, run, use_store
from tests.test_registry import NAME

pytestmark = pytest.mark.slow


@pytest.fixture
def tracking_server(trained_copy, tmp_path, monkeypatch):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        use_store(monkeypatch, server.uri)
        yield server
    finally:
        server.stop()


def test_register_promote_and_translate_through_a_tracking_server(tracking_server, trained_copy):
    params, test = load_params(), pd.read_parquet("data/prepared/test.parquet")
    mlflow.set_experiment("vamos")
    with mlflow.start_run() as training:  # the server's own run for the model trained here
        pass
    first = register(params, MODEL_FILE, training.info.run_id, test)
    assert first["version"] == 1 and first["alias"] == CHAMPION
    second = register(params, broken_model(trained_copy), training.info.run_id, test)
    assert second["version"] == 2 and second["alias"] == CHALLENGER and second["compared_with"] == 1

    client = MlflowClient()
    client.set_registered_model_alias(NAME, CHAMPION, "2")  # promoted by hand
    served = mlflow.pyfunc.load_model(f"models:/{NAME}/2").predict(["The red dog sleeps."])
    translated = run([sys.executable, "-m", "pipeline.cli", "translate", "--model", f"models:/{NAME}@{CHAMPION}",
                      "The red dog sleeps."], trained_copy)
    assert translated.returncode == 0, translated.stderr
    assert translated.stdout.strip() == served[0]

    third = register(params, MODEL_FILE, training.info.run_id, test)
    assert third["version"] == 1 and third["compared_with"] == 2  # the hand-picked champion
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2



# `register` in a process of its own, whose MlflowClient kills the tracking server (SIGKILL to its
# process group: gone at once, as a crashed host or an OOM kill) just before one chosen call, which
# then fails as the server's going away makes it fail. Where it is cut is chosen, not raced.
REGISTER = """
import os, signal, socket, sys, time, urllib.parse
import pandas as pd
from mlflow import MlflowClient
from pipeline.config import load_params
from pipeline.registry import register
from pipeline.storage import MODEL_FILE

run_id, server_group, method, argument = sys.argv[1:]
call = getattr(MlflowClient, method)

def cut(self, *args, **kwargs):
    if argument in ("", *map(str, args)):
        os.killpg(int(server_group), signal.SIGKILL)
        server = urllib.parse.urlparse(os.environ["MLFLOW_TRACKING_URI"])
        for _ in range(200):  # until its port is closed
            try:
                socket.create_connection((server.hostname, server.port), timeout=0.1).close()
                time.sleep(0.05)
            except OSError:
                break
    return call(self, *args, **kwargs)

setattr(MlflowClient, method, cut)
register(load_params(), MODEL_FILE, run_id, pd.read_parquet("data/prepared/test.parquet"))
"""
CUTS = {  # where: (the MlflowClient method, an argument that picks the call, "" for its first)
    "before the version is created (the model's files uploaded)": ("_create_model_version", ""),
    "in the middle of the version's tags": ("set_model_version_tag", "promotion"),
    "before the alias is set": ("set_registered_model_alias", ""),
}


@pytest.mark.parametrize("cut", CUTS)
def test_a_register_cut_short_by_the_server_finishes_on_retry_with_one_version(tracking_server, trained_copy, cut):
    """The tracking server is killed in the middle of `register` and started again: the retry
    finishes with exactly one version, every tag of its decision, the record on its run, and the
    alias the rule gave it."""
    server = tracking_server
    mlflow.set_experiment("vamos")
    with mlflow.start_run() as training:
        pass
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # fail at once, not after minutes of retries
    cut_short = subprocess.run([sys.executable, "-c", REGISTER, training.info.run_id, str(server.process.pid),
                                *CUTS[cut]], cwd=trained_copy, env=env, capture_output=True, text=True, timeout=600)
    assert cut_short.returncode != 0 and "Connection refused" in cut_short.stderr, cut_short.stderr[-3000:]
    assert server.process.wait(timeout=30) == -9  # the server was killed there, not before
    server.start()

    record = register(load_params(), MODEL_FILE, training.info.run_id, pd.read_parquet("data/prepared/test.parquet"))
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{NAME}'")
    assert [v.version for v in versions] == ["1"] and record["version"] == 1 and record["alias"] == CHAMPION
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == "1"
    tags = versions[0].tags
    assert tags["alias_applied"] == "true" and json.loads(tags["promotion"]) == record
    assert {"model_md5", "model_key", "decision_key", "git_commit", "test_sha256"} <= tags.keys()
    assert client.get_run(training.info.run_id).data.tags["registry.decision"] == "v1: champion"
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}").predict(["The red dog sleeps."])
    assert served[0].strip()

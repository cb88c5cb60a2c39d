"""Register, promote and translate against a real `mlflow server` process (SQLite backend,
proxied artifacts in a temp dir), as a team with a shared tracking server would."""
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.registry import CHALLENGER, CHAMPION, register
from pipeline.storage import MODEL_FILE
from tests.conftest import broken_model, run, use_store
from tests.test_registry import NAME

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tracking_server(trained_copy, tmp_path, monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield use_store(monkeypatch, uri)
    finally:
        server.terminate()
        server.wait(timeout=30)


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

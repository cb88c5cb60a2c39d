"""pipeline/team.py: a team's MLflow server with logins and roles, tested against a real
`mlflow server --app-name basic-auth` on 127.0.0.1 and the real register and translate."""
from __future__ import annotations

import configparser
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.registry import CHALLENGER, CHAMPION, register
from pipeline.storage import MODEL_FILE
from pipeline.team import PIPELINE, READER, RELEASE_MANAGER, ROLES, auth_config
from tests.conftest import REPO, broken_model, run, use_store, wait_healthy
from tests.test_mlflow_ui import free_port, stop
from tests.test_registry import NAME

TEAM = [sys.executable, "-m", "pipeline.team"]
USERS = {PIPELINE: "vamos-ci", RELEASE_MANAGER: "alice", READER: "bob"}
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@dataclass
class Server:
    uri: str
    folder: Path
    passwords: dict[str, str]  # user -> password, as the set-up wrote them

    def env(self, user: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
        if user:
            env.update(zip(CREDENTIALS, (user, self.passwords[user])))
        return {**env, "MLFLOW_TRACKING_URI": self.uri}


def login(monkeypatch, server: Server, user: str) -> None:
    """This process's MLflow client acts as `user` from now on (it reads the variables per request)."""
    for key, value in zip(CREDENTIALS, (user, server.passwords[user])):
        monkeypatch.setenv(key, value)


def test_the_config_holds_no_password_and_denies_by_default():
    config = configparser.ConfigParser()
    config.read_string(auth_config("sqlite:////srv/auth.db"))
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert "admin_password" not in config["mlflow"]
    assert config["mlflow"]["database_uri"] == "sqlite:////srv/auth.db"
    assert ROLES[READER] == {"experiment": "READ", "registered_model": "READ"}


@pytest.fixture
def secured_server(trained_copy, tmp_path, monkeypatch):
    """A basic-auth tracking server with the three roles and a user in each, set up by the CLI
    as its admin, the admin's password only in the server's and the set-up's environment."""
    folder = tmp_path / "server"
    folder.mkdir()
    config, admin_password = folder / "basic_auth.ini", secrets.token_urlsafe(16)
    done = run([*TEAM, "mlflow-config", str(config), "--auth-db", f"sqlite:///{folder / 'auth.db'}"], REPO)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    server_env = {**env, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"{uri}/health", process, folder / "server.log")
        secrets_dir = tmp_path / "secrets"
        admin_env = {**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin_password}
        done = run([*TEAM, "mlflow-roles", "--tracking-uri", uri, "--pipeline", USERS[PIPELINE],
                    "--release-manager", USERS[RELEASE_MANAGER], "--reader", USERS[READER],
                    "--secrets", str(secrets_dir)], REPO, env=admin_env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("(created;") == 3, done.stdout
        again = run([*TEAM, "mlflow-roles", "--tracking-uri", uri, "--reader", USERS[READER],
                     "--secrets", str(secrets_dir)], REPO, env=admin_env)
        assert again.returncode == 0 and "(exists; password unchanged)" in again.stdout, again.stderr
        assert {p.stat().st_mode & 0o777 for p in secrets_dir.iterdir()} == {0o600}
        passwords = {p.name: p.read_text().strip() for p in secrets_dir.iterdir()}
        use_store(monkeypatch, uri)
        yield Server(uri, folder, passwords)
    finally:
        stop(process)


def status_of(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user:
        import base64

        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def refused(call) -> str:
    """The error of a call the server must refuse."""
    with pytest.raises(Exception) as error:
        call()
    return str(error.value)


@pytest.mark.slow
def test_roles_decide_who_moves_champion(secured_server, trained_copy, monkeypatch):
    server = secured_server
    pipeline, manager, reader = USERS[PIPELINE], USERS[RELEASE_MANAGER], USERS[READER]
    search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert status_of(search) == 401
    assert status_of(search, reader, "not-the-password") == 401
    assert status_of(search, reader, server.passwords[reader]) == 200

    # The pipeline's service account registers; the rule alone decides the alias.
    login(monkeypatch, server, pipeline)
    params, test = load_params(), pd.read_parquet("data/prepared/test.parquet")
    mlflow.set_experiment("vamos")
    with mlflow.start_run() as training:
        pass
    first = register(params, MODEL_FILE, training.info.run_id, test)
    assert first["version"] == 1 and first["alias"] == CHAMPION
    second = register(params, broken_model(trained_copy), training.info.run_id, test)
    assert second["version"] == 2 and second["alias"] == CHALLENGER

    client = MlflowClient()
    login(monkeypatch, server, reader)
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == "1"  # a reader sees...
    assert "403" in refused(lambda: client.set_registered_model_alias(NAME, CHAMPION, "2"))  # ...and moves nothing
    assert "403" in refused(lambda: client.delete_registered_model_alias(NAME, CHAMPION))
    assert "403" in refused(lambda: client.create_run(client.get_experiment_by_name("vamos").experiment_id))
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == "1"

    login(monkeypatch, server, manager)
    assert "403" in refused(lambda: client.delete_registered_model(NAME))  # may promote, not delete
    client.set_registered_model_alias(NAME, CHAMPION, "2")

    # A reader's `vamos translate` follows the hand-picked champion.
    login(monkeypatch, server, reader)
    served = mlflow.pyfunc.load_model(f"models:/{NAME}/2").predict(["The red dog sleeps."])
    translated = run([sys.executable, "-m", "pipeline.cli", "translate", "The red dog sleeps."], trained_copy,
                     env=server.env(reader))
    assert translated.returncode == 0, translated.stderr
    assert translated.stdout.strip() == served[0]
    anonymous = run([sys.executable, "-m", "pipeline.cli", "translate", "The red dog sleeps."], trained_copy,
                    env=server.env(None))
    assert anonymous.returncode != 0 and "401" in anonymous.stderr

    # The service account's password is in no stored param, tag, artifact, report or output.
    planted = server.passwords[pipeline].encode()
    stored = [server.folder / "mlflow.db", *(server.folder / "artifacts").rglob("*"),
              *(trained_copy / "reports").rglob("*"), *(trained_copy / "data").rglob("*"),
              *(trained_copy / "models").rglob("*")]
    leaks = [str(p) for p in stored if p.is_file() and planted in p.read_bytes()]
    assert not leaks

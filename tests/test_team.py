"""pipeline/team.py: a team's MLflow server with logins and roles, tested against a real
`mlflow server --app-name basic-auth` on 127.0.0.1 and the real register and translate."""
from __future__ import annotations

import configparser
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.registry import CHALLENGER, CHAMPION, register
from pipeline.storage import MODEL_FILE
from pipeline.team import PIPELINE, READER, RELEASE_MANAGER
from tests.conftest import REPO, MlflowServer, broken_model, free_port, http_status, run, stop, use_store
from tests.test_mlflow_ui import ALIAS_TAG, artifacts_dir, chromium_page, give_alias_in_ui, open_registered_model
from tests.test_registry import NAME

TEAM = [sys.executable, "-m", "pipeline.team"]
DENIED = "PERMISSION_DENIED"  # how MLflow's client reads a 403
USERS = {PIPELINE: "vamos-ci", RELEASE_MANAGER: "alice", READER: "bob"}
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@dataclass
class Team:
    server: MlflowServer
    passwords: dict[str, str]  # user -> password, as the set-up wrote them

    @property
    def uri(self) -> str:
        return self.server.uri

    def env(self, user: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
        if user:
            env.update(zip(CREDENTIALS, (user, self.passwords[user])))
        return {**env, "MLFLOW_TRACKING_URI": self.uri}


def login(monkeypatch, server: Team, user: str) -> None:
    """This process's MLflow client acts as `user` from now on (it reads the variables per request)."""
    for key, value in zip(CREDENTIALS, (user, server.passwords[user])):
        monkeypatch.setenv(key, value)


def test_the_config_holds_no_password_denies_by_default_and_is_private(tmp_path):
    path = tmp_path / "auth.ini"
    done = run([*TEAM, "mlflow-config", str(path), "--auth-db", "sqlite:////srv/auth.db"], REPO)
    assert done.returncode == 0, done.stderr
    assert path.stat().st_mode & 0o777 == 0o600  # a database URI may carry a password
    config = configparser.ConfigParser()
    config.read(path)
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert config["mlflow"]["database_uri"] == "sqlite:////srv/auth.db"
    assert not [key for key in config["mlflow"] if "password" in key]


def test_a_user_named_for_two_roles_is_refused_before_any_request(tmp_path):
    """ensure_user gives a user one vamos role and takes the others away: two would end as the last."""
    done = run([*TEAM, "mlflow-roles", "--tracking-uri", "http://127.0.0.1:9", "--pipeline", "vamos-ci",
                "--release-manager", "alice", "--reader", "alice", "--reader", "bob",
                "--secrets", str(tmp_path / "secrets")], REPO)
    assert done.returncode == 2
    assert "alice is named for two" in done.stderr and "bob" not in done.stderr
    assert not (tmp_path / "secrets").exists()  # refused before any user was made


@pytest.fixture
def secured_server(trained_copy, tmp_path, monkeypatch):
    """A basic-auth tracking server with workspaces, the three roles and a user in each, set up by
    the CLI as its admin, the admin's password only in the server's and the set-up's environment."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.mlflow/credentials of this machine's
    folder = tmp_path / "server"
    folder.mkdir()
    config, admin_password = folder / "basic_auth.ini", secrets.token_urlsafe(16)
    done = run([*TEAM, "mlflow-config", str(config), "--auth-db", f"sqlite:///{folder / 'auth.db'}"], REPO)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    server = MlflowServer(folder, ("--app-name", "basic-auth", "--enable-workspaces"),
                          {**env, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    server.start()
    try:
        secrets_dir = tmp_path / "secrets"
        admin_env = {**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin_password}
        done = run([*TEAM, "mlflow-roles", "--tracking-uri", server.uri, "--pipeline", USERS[PIPELINE],
                    "--release-manager", USERS[RELEASE_MANAGER], "--reader", USERS[READER],
                    "--secrets", str(secrets_dir)], REPO, env=admin_env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("(created;") == 3, done.stdout
        # As docs/team.md says: the admin's password is needed at the first start only.
        server.stop()
        del server.env["MLFLOW_AUTH_ADMIN_PASSWORD"]
        server.start()
        again = run([*TEAM, "mlflow-roles", "--tracking-uri", server.uri, "--reader", USERS[READER],
                     "--reader", "carol", "--secrets", str(secrets_dir)], REPO, env=admin_env)
        assert again.returncode == 0 and "(exists; password unchanged)" in again.stdout, again.stderr
        moved = run([*TEAM, "mlflow-roles", "--tracking-uri", server.uri, "--release-manager", "carol",
                     "--secrets", str(secrets_dir)], REPO, env=admin_env)
        assert moved.returncode == 0, moved.stderr
        assert roles_of(server.uri, "carol", admin_env) == [RELEASE_MANAGER]  # moved, not added
        assert {p.stat().st_mode & 0o777 for p in secrets_dir.iterdir()} == {0o600}
        passwords = {p.name: p.read_text().strip() for p in secrets_dir.iterdir()}
        use_store(monkeypatch, server.uri)
        yield Team(server, passwords)
    finally:
        server.stop()


def roles_of(uri: str, user: str, admin_env: dict[str, str]) -> list[str]:
    done = run([sys.executable, "-c", "import sys; from mlflow.server import get_app_client; "
                "print(*sorted(r.name for r in get_app_client('basic-auth', tracking_uri=sys.argv[1])"
                ".list_user_roles(sys.argv[2])))", uri, user], REPO, env=admin_env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def refused(call) -> str:
    """The error code of a call the server must refuse (a 403 reads PERMISSION_DENIED)."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as error:
        call()
    return error.value.error_code


@pytest.mark.slow
def test_roles_decide_who_moves_champion(secured_server, trained_copy, monkeypatch):
    server = secured_server
    pipeline, manager, reader = USERS[PIPELINE], USERS[RELEASE_MANAGER], USERS[READER]
    search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search) == 401
    assert http_status(search, login=(reader, "not-the-password")) == 401
    assert http_status(search, login=(reader, server.passwords[reader])) == 200

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
    assert DENIED == refused(lambda: client.set_registered_model_alias(NAME, CHAMPION, "2"))  # ...and moves nothing
    assert DENIED == refused(lambda: client.delete_registered_model_alias(NAME, CHAMPION))
    assert DENIED == refused(lambda: client.create_run(client.get_experiment_by_name("vamos").experiment_id))
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == "1"

    # Only the pipeline creates: no one else can take a language pair's model name before it does.
    for user in (reader, manager):
        login(monkeypatch, server, user)
        assert DENIED == refused(lambda: client.create_registered_model("vamos-de-en"))
        assert DENIED == refused(lambda: client.create_experiment("squatted"))

    # In the UI, as people do it: the reader's alias editor is refused, the release manager's saves.
    for user, status in ((reader, 403), (manager, 200)):
        with chromium_page(login=(user, server.passwords[user])) as page:
            open_registered_model(page, server.uri)
            with page.expect_response(lambda r: "registered-models/alias" in r.url and r.request.method == "POST") \
                    as answer:
                editor = give_alias_in_ui(page, "2", "1", keep_own_aliases=True)  # removing one needs MANAGE
            assert answer.value.status == status
            if status == 200:
                editor.wait_for(state="hidden")
                page.get_by_text(ALIAS_TAG).first.wait_for()  # the version page shows its new alias
            else:  # the editor stays open with MLflow's message for a refusal it cannot read
                editor.get_by_text("INTERNAL_ERROR").wait_for()
            page.screenshot(path=str(artifacts_dir() / f"team-{user}-alias-editor.png"))
        assert client.get_model_version_by_alias(NAME, CHAMPION).version == ("1" if user == reader else "2")

    login(monkeypatch, server, manager)
    assert DENIED == refused(lambda: client.delete_registered_model(NAME))  # may promote, not delete

    # A reader's `vamos translate` follows the hand-picked champion, not the latest version.
    sentence = "The red dog sleeps."
    login(monkeypatch, server, reader)
    answers = {v: mlflow.pyfunc.load_model(f"models:/{NAME}/{v}").predict([sentence])[0] for v in ("1", "2")}
    assert answers["1"] != answers["2"]  # the broken model answers otherwise

    def translated() -> str:
        done = run([sys.executable, "-m", "pipeline.cli", "translate", sentence], trained_copy, env=server.env(reader))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert translated() == answers["2"]
    login(monkeypatch, server, manager)
    client.set_registered_model_alias(NAME, CHAMPION, "1")  # back to an older version than the latest
    assert translated() == answers["1"]
    anonymous = run([sys.executable, "-m", "pipeline.cli", "translate", sentence], trained_copy,
                    env=server.env(None))
    assert anonymous.returncode != 0 and "401" in anonymous.stderr, anonymous.stderr[-2000:]

    # The service account's password is in no stored param, tag, artifact, log, report or output.
    planted = server.passwords[pipeline].encode()
    stored = [*server.server.folder.rglob("*"), *trained_copy.rglob("*")]  # stores, logs, reports, outputs
    leaks = [str(p) for p in stored if p.is_file() and planted in p.read_bytes()]
    assert not leaks


NGINX = "/usr/sbin/nginx"
NGINX_MAIN = """daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{}}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {server};
}}
"""


@pytest.fixture
def proxy_login(tmp_path):
    """A certificate for 127.0.0.1 and one login in an htpasswd file, made as docs/team.md says."""
    tls = tmp_path / "tls"
    tls.mkdir()
    made = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem")],
               tmp_path)
    assert made.returncode == 0, made.stderr
    password = secrets.token_urlsafe(16)
    hashed = run(["openssl", "passwd", "-6", "-stdin"], tmp_path, input=password + "\n")
    assert hashed.returncode == 0, hashed.stderr
    (tls / "htpasswd").write_text(f"alice:{hashed.stdout.strip()}\n")
    return tls, ("alice", password)


@pytest.mark.slow
def test_the_served_model_behind_the_documented_nginx_proxy(trained_copy, tmp_path, proxy_login):
    """deploy/nginx-serve.conf, filled in, in front of a real `mlflow models serve`: TLS, 401 without
    the login or with a wrong one, the model's answer with it, 404 for the rest, 413 for big bodies."""
    import string

    import requests

    from pipeline.serving import running_server

    if not Path(NGINX).exists():
        pytest.fail(f"{NGINX} is missing: run `bash scripts/setup.sh` (it installs Debian's nginx)")
    tls, login = proxy_login
    port = free_port()
    with running_server(f"models:/{NAME}@{CHAMPION}", cwd=tmp_path) as (direct, _):
        server_block = tmp_path / "vamos-serve.conf"
        server_block.write_text(string.Template((REPO / "deploy" / "nginx-serve.conf").read_text()).substitute(
            listen=f"127.0.0.1:{port}", server_name="127.0.0.1", certificate=tls / "cert.pem",
            certificate_key=tls / "key.pem", logins=tls / "htpasswd", upstream=direct.removeprefix("http://")))
        (tmp_path / "nginx.conf").write_text(NGINX_MAIN.format(tmp=tmp_path, server=server_block))
        checked = run([NGINX, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], tmp_path)
        assert checked.returncode == 0, checked.stderr
        with open(tmp_path / "nginx.out", "w") as out:
            nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proxy = f"https://127.0.0.1:{port}"
            session = requests.Session()
            session.trust_env = False  # a CA bundle named in the environment would override verify
            session.verify = str(tls / "cert.pem")  # the proxy's own certificate, checked
            body = {"inputs": ["The red dog sleeps."]}
            for _ in range(100):  # until nginx listens
                assert nginx.poll() is None, (tmp_path / "nginx.out").read_text()
                try:
                    session.get(f"{proxy}/ping", timeout=5)
                    break
                except requests.ConnectionError:
                    time.sleep(0.1)
            assert session.get(f"{proxy}/ping", timeout=5).status_code == 200  # open, for load balancers
            assert session.post(f"{proxy}/invocations", json=body, timeout=60).status_code == 401
            assert session.post(f"{proxy}/invocations", json=body, auth=(login[0], "wrong"), timeout=60).status_code == 401
            answered = session.post(f"{proxy}/invocations", json=body, auth=login, timeout=120)
            assert answered.status_code == 200, answered.text
            assert answered.json() == requests.post(f"{direct}/invocations", json=body, timeout=120).json()
            assert session.get(f"{proxy}/version", auth=login, timeout=5).status_code == 404
            big = {"inputs": ["The red dog sleeps. " * 5000]}
            assert session.post(f"{proxy}/invocations", json=big, auth=login, timeout=60).status_code == 413
        finally:
            stop(nginx)

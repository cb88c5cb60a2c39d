"""Shared fixtures: a tiny corpus made here, a small-params project directory, a real MLflow
store on SQLite in a temp dir, and one trained tiny model per session."""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.tracking import offline_environment

offline_environment()  # before anything imports mlflow, which reads its telemetry switch on import
from pipeline.serving import free_port  # noqa: E402 (shared with the tests that import it from here)

REPO = Path(__file__).resolve().parent.parent
# The stages shell out to `vamos` (DVC, Prefect): put this interpreter's scripts first on PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

NOUNS = {"dog": "perro", "cat": "gato", "king": "rey", "man": "hombre", "horse": "caballo", "bird": "pájaro",
         "son": "hijo", "brother": "hermano"}
ADJECTIVES = {"red": "rojo", "big": "grande", "small": "pequeño", "old": "viejo", "good": "bueno",
              "black": "negro"}
VERBS = {"sleeps": "duerme", "eats": "come", "runs": "corre", "sings": "canta", "walks": "camina"}


def tiny_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """A small, learnable English-Spanish corpus: 'The red dog sleeps.' -> 'El perro rojo duerme.'"""
    pairs = [(f"The {a} {n} {v}.", f"El {NOUNS[n]} {ADJECTIVES[a]} {VERBS[v]}.")
             for n, a, v in itertools.product(NOUNS, ADJECTIVES, VERBS)]
    random.Random(seed).shuffle(pairs)
    return pairs


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s}\t{t}\tCC-BY 2.0 (tests)\n" for s, t in pairs), encoding="utf-8")
    return path


def small_params(**overrides) -> dict:
    """The project's params.yaml, shrunk so that every stage takes seconds."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["sources"] = [
        {"kind": "sword", "name": "bible", "library": "/usr/share/sword", "src_module": "engWEB2015eb",
         "tgt_module": "spaRV1909eb", "books": ["Ruth"]},
        {"kind": "folder", "name": "incoming", "path": "data/incoming"},
    ]
    params["prepare"]["split"] = {"valid": 0.05, "test": 0.05}
    params["prepare"]["vocab"]["min_freq"] = 1
    params["embed"].update(vector_size=24, epochs=5, min_count=1)
    # Full softmax: on a few hundred words sampling saves nothing, and 50 draws are too noisy to learn from.
    params["train"].update(hidden_size=48, epochs=3, batch_tokens=200, sampled_softmax=0, max_minutes=None,
                           checkpoint_every=10, patience=3, lr=0.01, threads=1,
                           embedding_std=1.0, lr_decay=0.9, dropout=0.0, word_dropout=0.0, label_smoothing=0.0,
                           # A tiny run plans fewer steps than the default warm-up, and the resume
                           # tests raise the budget, which under cosine starts a new training.
                           lr_schedule="plateau", warmup_steps=0)
    params["evaluate"].update(beam_size=3, heatmaps=2, samples=5)
    params["register"].update(min_score=0.0, bootstrap_samples=200)  # any tiny model may be a first champion
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    return params


def make_project(root: Path, params: dict | None = None) -> Path:
    """A project directory with params.yaml and the tiny corpus in data/incoming."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params or small_params(), sort_keys=False))
    write_tsv(root / "data" / "incoming" / "tiny.tsv", tiny_pairs())
    return root


def use_store(monkeypatch, uri: str) -> str:
    """Point this process (MLflow keeps a global URI once set) and the stages it starts at a store."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    return use_store(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_store) -> Path:
    """A fresh project directory, made the working directory (stages use relative paths)."""
    root = make_project(tmp_path / "project")
    monkeypatch.chdir(root)
    return root


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """Every stage run once, in order, on the tiny corpus; the tests read its outputs."""
    from pipeline.config import load_params
    from pipeline.stages import STAGES

    # Enough epochs for the tiny model to learn the synthetic grammar (the tests check it did).
    root = make_project(tmp_path_factory.mktemp("trained") / "project",
                        small_params(**{"train.epochs": 12, "train.patience": 12}))
    old_cwd, old_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)
    try:
        params = load_params()
        for stage in STAGES.values():
            stage(params)
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return root


@pytest.fixture
def trained_copy(trained_project, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained project (its MLflow store included), as the working directory."""
    root = tmp_path / "project"
    shutil.copytree(trained_project, root)
    use_store(monkeypatch, f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.chdir(root)
    return root


def broken_model(root: Path) -> Path:
    """root's model.pt with its decoder zeroed, as root/broken.pt: a model that translates nothing well."""
    import torch

    from pipeline.storage import MODEL_FILE

    bundle = torch.load(root / MODEL_FILE, weights_only=True)
    bundle["state_dict"] = {k: torch.zeros_like(v) if k.startswith("decoder.rnn") else v
                            for k, v in bundle["state_dict"].items()}
    torch.save(bundle, root / "broken.pt")
    return root / "broken.pt"


def run(cmd: list[str], cwd: Path, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)


def make_dvc_repo(root: Path) -> Path:
    """A git + DVC repository holding the real dvc.yaml, the pipeline code it depends on, small
    params and the tiny corpus; committed, as a user's checkout would be."""
    make_project(root, small_params(**{"train.epochs": 2}))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"],
                [*dvc, "init", "-q"], [*dvc, "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        result = run(cmd, root)
        assert result.returncode == 0, result.stderr
    return root


def http_status(url: str, *, login: tuple[str, str] | None = None, data: bytes | None = None) -> int:
    """The HTTP status a server answers to a GET (or, with `data`, a JSON POST), with a basic-auth
    login or none."""
    import base64

    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def stop(process: subprocess.Popen) -> None:
    """End a server started in its own session, with the workers it forked: SIGTERM the group, and
    after a grace period SIGKILL what is left of it, even when its leader has already exited (a
    worker that outlived it would keep the port that a restart reuses)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts, both under `folder`)
    that a test can kill and start again on the same port and stores; `args` and `env` add to its
    command line and environment (a login app, its config)."""

    def __init__(self, folder: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.folder, self.args, self.env = folder, args, env
        self.port, self.process = free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db, self.log = folder / "mlflow.db", folder / "server.log"

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", *self.args, "--host", "127.0.0.1", "--port",
                 str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}",
                 "--artifacts-destination", str(self.folder / "artifacts")],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(f"{self.uri}/health", self.process, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop(self.process)


def wait_healthy(health_url: str, server, log: Path, timeout: float = 120) -> None:
    """Poll a server's health URL until it answers 200; fail with its log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{health_url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")

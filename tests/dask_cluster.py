"""A real Dask cluster on 127.0.0.1 for tests: a `dask scheduler` process and two `dask worker`
processes (one thread each), started from this repository's environment and stopped after."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {seconds} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def dask_scheduler(tmp_path_factory):
    """The address (tcp://127.0.0.1:PORT) of a scheduler with two worker processes connected."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    # The workers import pipeline.* from this checkout, as the stage's own process does.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    processes = [subprocess.Popen(dask + ["--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                          "--scheduler-file", str(scheduler_file)], env=env, cwd=folder,
                                  stdout=subprocess.DEVNULL, stderr=open(folder / "scheduler.log", "w"))]
    try:
        _wait_for(scheduler_file)
        address = json.loads(scheduler_file.read_text())["address"]
        for n in range(2):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                 "--nworkers", "1", "--no-dashboard", "--name", f"worker-{n}"],
                env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=open(folder / f"worker-{n}.log", "w")))
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

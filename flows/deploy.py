"""Serve the pipeline flow on a cron schedule against a (local) Prefect server.

    prefect server start                       # terminal 1, http://127.0.0.1:4200
    python -m flows.deploy --cron "0 3 * * *"  # terminal 2: serves the deployment until stopped
"""
from __future__ import annotations

from pathlib import Path

import typer

from flows.pipeline_flow import vamos_pipeline

DEFAULT_CRON = "0 3 * * *"  # nightly; a run with no new data costs seconds


def build_deployment(cron: str = DEFAULT_CRON, project: Path = Path("."), name: str = "nightly"):
    # concurrency_limit=1: DVC locks the workspace, so two runs of one checkout must never overlap.
    return vamos_pipeline.to_deployment(
        name=name, cron=cron, concurrency_limit=1, parameters={"project": str(project.resolve())},
        description="Reproduce the vamos DVC pipeline, then register and maybe promote the model",
        tags=["vamos"])


def main(cron: str = typer.Option(DEFAULT_CRON, help="when to run (cron syntax, the server's time zone)"),
         project: Path = typer.Option(Path("."), help="the vamos checkout to reproduce"),
         name: str = typer.Option("nightly", help="deployment name")) -> None:
    from prefect import serve

    serve(build_deployment(cron, project, name))


if __name__ == "__main__":
    typer.run(main)

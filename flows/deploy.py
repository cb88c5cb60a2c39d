"""Serve the pipeline flow on a cron schedule against a (local) Prefect server.

    prefect server start                       # terminal 1, http://127.0.0.1:4200
    python -m flows.deploy --cron "0 3 * * *"  # terminal 2: serves the deployment until stopped

The same deployment on a work pool, run by workers, is prefect.yaml (`prefect deploy -n nightly`);
both allow one run at a time and cancel a run that starts while another runs (CONCURRENCY).
"""
from __future__ import annotations

from pathlib import Path

import typer
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline_flow import vamos_pipeline

DEFAULT_CRON = "0 3 * * *"  # nightly; a run with no new data costs seconds

# One run of a checkout at a time: DVC locks the workspace (and the runs would race on its outputs
# and MLflow store). A run that starts while another runs is cancelled rather than queued: the next
# scheduled run does whatever it would have done, and runs never pile up behind a long or stuck one.
# prefect.yaml's `concurrency_limit` says the same (tests/test_worker.py checks that they agree).
CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def build_deployment(cron: str = DEFAULT_CRON, project: Path = Path("."), name: str = "nightly"):
    return vamos_pipeline.to_deployment(
        name=name, cron=cron, concurrency_limit=CONCURRENCY, parameters={"project": str(project.resolve())},
        description="Reproduce the vamos DVC pipeline, then register and maybe promote the model",
        tags=["vamos"])


def main(cron: str = typer.Option(DEFAULT_CRON, help="when to run (cron syntax, the server's time zone)"),
         project: Path = typer.Option(Path("."), help="the vamos checkout to reproduce"),
         name: str = typer.Option("nightly", help="deployment name")) -> None:
    from prefect import serve

    serve(build_deployment(cron, project, name))


if __name__ == "__main__":
    typer.run(main)

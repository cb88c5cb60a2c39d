"""The Markdown summary of a flow run (the Prefect artifact `vamos-metrics`), made from what the run
gathered (flows/summary_inputs.py): no Prefect, no server, no files, so a test can read it directly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPORTS = ("metrics", "registry", "train", "train_speed")  # reports/<name>.json that the summary shows
MLFLOW_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s default address, for a store without a web address


@dataclass(frozen=True)
class MlflowRun:
    """Where the model's MLflow run is: the tracking URI, and the run and its experiment when known."""

    uri: str
    run_id: str | None = None
    experiment_id: str = "0"


@dataclass(frozen=True)
class Experiment:
    """The DVC experiment a run made instead of a commit's pipeline: its name and git ref (None: not found)."""

    name: str
    ref: str | None


def run_summary(statuses: dict[str, str], reports: dict[str, dict], metrics_diff: dict | str, mlflow: MlflowRun,
                remote: str = "", experiment: Experiment | None = None) -> str:
    """The run's Markdown: each stage's status, the model's test metrics, its MLflow run and registered
    version, and `dvc metrics diff HEAD` (its parsed JSON, or why it failed)."""
    stages = ", ".join(f"{stage}: {status}" for stage, status in statuses.items())
    rows = [*_experiment_rows(experiment), *_metric_rows(reports), *mlflow_links(mlflow, reports["registry"]),
            ("pushed to", remote or ("not pushed (an experiment)" if experiment else "no DVC remote"))]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (f"# vamos run\n\nStages: {stages}\n\n| metric | value |\n|---|---|\n{table}\n\n"
            f"## Against the last commit\n\n{metrics_diff_table(metrics_diff)}\n")


def _experiment_rows(experiment: Experiment | None) -> list[tuple[str, str]]:
    if not experiment:
        return []
    return [("DVC experiment",
             f"`{experiment.name}` ({experiment.ref or 'ref not found'}): `dvc exp apply {experiment.name}`")]


def _metric_rows(reports: dict[str, dict]) -> list[tuple[str, Any]]:
    metrics, registry, train, speed = (reports[name] for name in REPORTS)
    test = metrics.get("test", {})
    return [
        ("test BLEU (beam)", test.get("bleu", "")), ("test chrF (beam)", test.get("chrf", "")),
        ("test TER (beam)", test.get("ter", "")), ("test BLEU (greedy)", test.get("greedy", {}).get("bleu", "")),
        *((f"test BLEU / chrF, {origin}", f"{scores['bleu']} / {scores['chrf']} ({scores['sentences']} sentences)")
          for origin, scores in test.get("by_source", {}).items()),
        ("best valid BLEU", train.get("best_valid_bleu", "")),
        ("training minutes", speed.get("train_minutes", "")), ("stopped by", train.get("stopped_by", "")),
        ("registered", f"{registry.get('model', '')} v{registry.get('version', '')} → {registry.get('alias', '')}"),
    ]


def mlflow_links(mlflow: MlflowRun, registry: dict) -> list[tuple[str, str]]:
    """Markdown links to the model's MLflow run and registered version. A file or SQLite store has no web
    address: the links then point at `mlflow ui` on its default port, started as the row says."""
    if mlflow.uri.startswith(("http://", "https://")):
        base, how = mlflow.uri.rstrip("/"), ""
    else:
        base, how = MLFLOW_UI, f" (after `mlflow ui --backend-store-uri {mlflow.uri}`)"
    rows = [("MLflow store", f"`{mlflow.uri}`")]
    if mlflow.run_id:
        rows.append(("MLflow run",
                     f"[{mlflow.run_id}]({base}/#/experiments/{mlflow.experiment_id}/runs/{mlflow.run_id}){how}"))
    if registry.get("version"):
        model, version = registry.get("model", ""), registry["version"]
        rows.append(("model version", f"[{model} v{version}]({base}/#/models/{model}/versions/{version}){how}, "
                                      f"alias {registry.get('alias') or 'none'}"))
    return rows


def metrics_diff_table(diff: dict | str) -> str:
    """`dvc metrics diff --json`'s output as a Markdown table (a string: why the diff failed)."""
    if isinstance(diff, str):
        return f"(`dvc metrics diff HEAD` failed: {diff})"
    rows = [f"| {path} | {metric} | {change.get('old', '')} | {change.get('new', '')} | {change.get('diff', '')} |"
            for path, metrics in diff.items() for metric, change in metrics.items()
            if not isinstance(change.get("new"), (dict, list))]
    if not rows:
        return "No metric changed since the last commit (`dvc metrics diff HEAD`)."
    return "| file | metric | HEAD | this run | change |\n|---|---|---|---|---|\n" + "\n".join(rows)

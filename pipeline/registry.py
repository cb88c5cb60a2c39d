"""Log the trained model to MLflow as a pyfunc translator, register it, and move the aliases:
`champion` only to a version that beats the current champion on test BLEU, else `challenger`."""
from __future__ import annotations

import logging
from pathlib import Path

import pipeline
from pipeline.config import Params
from pipeline.tracking import mlflow_setup

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
EXAMPLE = ["Let's go.", "In the beginning God created the heavens and the earth."]


def champion_score(client, name: str, metric: str) -> float | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return client.get_run(version.run_id).data.metrics.get(f"test_{metric}")


def register(params: Params, model_file: Path, run_id: str, metrics: dict) -> dict:
    """Returns {'version', 'alias', 'score', 'previous_champion_score'}."""
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from pipeline.serving import CHECKPOINT, TranslatorModel

    cfg = params.registry
    mlflow = mlflow_setup(cfg.experiment)
    client = MlflowClient()
    search = params.evaluate
    python_model = TranslatorModel(search.beam_size, search.length_penalty, search.max_len_ratio)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="translator",
            python_model=python_model,
            artifacts={CHECKPOINT: str(model_file)},
            code_paths=[str(Path(pipeline.__file__).parent)],
            signature=infer_signature(EXAMPLE, ["¡Vamos!", "En el principio creó Dios los cielos y la tierra."],
                                      params={"beam_size": search.beam_size}),
            input_example=EXAMPLE,
            pip_requirements=_requirements(),
        )
    previous = champion_score(client, cfg.model_name, cfg.metric)
    version = mlflow.register_model(info.model_uri, cfg.model_name).version
    score = metrics[cfg.metric]
    alias = CHAMPION if previous is None or score > previous else CHALLENGER
    client.set_registered_model_alias(cfg.model_name, alias, version)
    client.set_model_version_tag(cfg.model_name, version, f"test_{cfg.metric}", str(score))
    log.info("registered %s version %s (test %s %.2f) as %s; previous champion: %s", cfg.model_name, version,
             cfg.metric, score, alias, "none" if previous is None else f"{previous:.2f}")
    return {"model": cfg.model_name, "version": int(version), "alias": alias, "score": score,
            "previous_champion_score": previous, "run_id": run_id}


def _requirements() -> list[str]:
    from importlib.metadata import version

    # Lower bounds, not pins: a serving machine with a GPU keeps its own torch build.
    packages = ("torch", "mlflow", "sacremoses", "numpy", "pandas", "pyyaml", "pydantic")
    return [f"{pkg}>={version(pkg).split('+')[0]}" for pkg in packages]

"""The file MLflow logs as the translator model ("models from code"). MLflow runs it at load
time, after putting the model's bundled copy of `pipeline` first on sys.path; the instance it
sets reads its search settings and limits from `model_config` and its weights from the
checkpoint artifact in `load_context`. Nothing is pickled."""
import mlflow

from pipeline.serving import TranslatorModel

mlflow.models.set_model(TranslatorModel())

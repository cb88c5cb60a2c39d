import mlflow
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.registry import register
from pipeline.storage import MODEL_FILE, read_json
from tests.conftest import ADJECTIVES, NOUNS, VERBS


def test_champion_moves_only_to_a_better_model(trained_copy):
    params = load_params()
    run_id = read_json("models/seq2seq/run.json")["run_id"]
    first = read_json("reports/registry.json")
    worse = register(params, MODEL_FILE, run_id, {"bleu": first["score"] - 1.0})
    assert worse["alias"] == "challenger" and worse["version"] == 2
    better = register(params, MODEL_FILE, run_id, {"bleu": first["score"] + 1.0})
    assert better["alias"] == "champion" and better["previous_champion_score"] == first["score"]
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("vamos-en-es", "champion").version) == better["version"]
    assert int(client.get_model_version_by_alias("vamos-en-es", "challenger").version) == 2


def test_champion_pyfunc_translates_text(trained_copy):
    model = mlflow.pyfunc.load_model("models:/vamos-en-es@champion")
    outputs = model.predict(["The red dog sleeps.", "The old king eats."])
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs)
    learned = set(NOUNS.values()) | set(ADJECTIVES.values()) | set(VERBS.values())
    assert any(word.strip(".") in learned for word in outputs[0].split())  # learned from the tiny corpus
    assert model.predict(["The red dog sleeps."], params={"beam_size": 1})[0]


def test_run_has_params_metrics_and_tags(trained_copy):
    run = MlflowClient().get_run(read_json("models/seq2seq/run.json")["run_id"])
    assert run.data.params["train.hidden_size"] == "48"
    for key in ("train_loss", "valid_loss", "valid_bleu", "test_bleu", "test_chrf"):
        assert key in run.data.metrics
    assert len(MlflowClient().get_metric_history(run.info.run_id, "valid_loss")) >= 1
    assert run.data.tags["git_commit"] and "dvc.prepared_md5" in run.data.tags

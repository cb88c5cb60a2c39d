"""Registration and promotion against a real MLflow store: fair comparison on the current test
split, a margin and a significance test, idempotent retries, hand-moved aliases respected."""
import json
import multiprocessing
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.config import ParamsError, Params, load_params
from pipeline.registry import (CHALLENGER, CHAMPION, decide, file_md5, logged_model_id, model_checkpoint, paired_bootstrap,
                               register)
from pipeline.storage import MODEL_FILE, read_json
from tests.conftest import ADJECTIVES, NOUNS, VERBS, broken_model

NAME = "vamos-en-es"


def params_with(**register_params) -> Params:
    return Params.model_validate({"register": register_params})


def test_decide_asks_for_a_margin_and_significance():
    params = params_with(min_gain=1.0, max_p=0.05)
    assert decide(params, 30.0, {"delta": 2.0, "p_value": 0.01}).alias == CHAMPION
    assert decide(params, 30.0, {"delta": 0.5, "p_value": 0.001}).alias == CHALLENGER  # under the margin
    assert decide(params, 30.0, {"delta": 3.0, "p_value": 0.2}).alias == CHALLENGER  # noise
    assert decide(params, 30.0, {"delta": -3.0, "p_value": 0.001}).alias == CHALLENGER  # worse


def test_decide_follows_each_metrics_direction():
    ter = params_with(metric="ter", min_gain=1.0, min_score=60.0)
    assert decide(ter, 50.0, {"delta": -2.0, "p_value": 0.01}).alias == CHAMPION  # TER fell: better
    assert decide(ter, 50.0, {"delta": 2.0, "p_value": 0.01}).alias == CHALLENGER
    assert decide(ter, 50.0, None).alias == CHAMPION  # 50 is under the TER ceiling of 60
    assert decide(ter, 70.0, None).alias is None
    assert decide(params_with(min_score=10.0), 9.0, None).alias is None
    assert decide(params_with(min_score=10.0), 11.0, None).alias == CHAMPION


def test_metric_without_a_direction_is_rejected_with_the_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("register:\n  metric: accuracy\n")
    with pytest.raises(ParamsError, match="register.*accuracy"):
        load_params(path)


def test_paired_bootstrap_tells_noise_from_a_real_gain():
    references = [f"el perro {i} duerme en la casa" for i in range(60)]
    good = list(references)
    bad = [f"un gato {i} come" for i in range(60)]
    same = paired_bootstrap("bleu", good, good, references, 300, seed=1, lang="es")
    assert same["delta"] == 0 and same["p_value"] > 0.5 and same["delta_95ci"] == [0.0, 0.0]
    gain = paired_bootstrap("bleu", good, bad, references, 300, seed=1, lang="es")
    assert gain["delta"] > 50 and gain["p_value"] < 0.05 and gain["delta_95ci"][0] > 0
    assert paired_bootstrap("bleu", good, bad, references, 300, seed=1, lang="es") == gain  # seeded


def any_gain_promotes(params: Params) -> Params:
    """These params promote any positive gain, so a test knows which alias a better model gets."""
    raw = params.model_dump(by_alias=True)
    return Params.model_validate({**raw, "register": {**raw["register"], "min_gain": 0.0, "max_p": 1.0}})


def test_first_run_registered_a_champion_with_its_comparison_record(trained_copy):
    record = read_json("reports/registry.json")
    assert record["alias"] == CHAMPION and record["version"] == 1 and record["compared_with"] is None
    assert record["test_sentences"] == len(pd.read_parquet("data/prepared/test.parquet"))
    version = MlflowClient().get_model_version(NAME, "1")
    assert version.tags["model_md5"] == file_md5(MODEL_FILE) == record["model_md5"]
    assert version.tags["test_sha256"] == record["test_sha256"] and version.tags["git_commit"]
    assert "decision" in version.description and record["test_sha256"][:12] in version.description
    # The version's logged model names the data it was judged on: the test split, by its md5.
    model = MlflowClient().get_logged_model(logged_model_id(version))
    (judged,) = [m for m in model.metrics if m.key == "registry_bleu"]
    assert (judged.key, judged.value) == ("registry_bleu", record["score"])
    assert judged.dataset_name == "test" and judged.dataset_digest == file_md5("data/prepared/test.parquet")


def test_register_is_idempotent(trained_copy):
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    test = pd.read_parquet("data/prepared/test.parquet")
    again = register(params, MODEL_FILE, run_id, test)
    assert again == read_json("reports/registry.json")  # the recorded decision, so registry.json is unchanged
    assert len(MlflowClient().search_model_versions(f"name='{NAME}'")) == 1


def test_a_worse_model_becomes_challenger_and_retries_reuse_its_version(trained_copy):
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    test = pd.read_parquet("data/prepared/test.parquet")
    worse = broken_model(trained_copy)
    record = register(params, worse, run_id, test)
    assert record["version"] == 2 and record["alias"] == CHALLENGER and record["compared_with"] == 1
    comparison = record["comparison"]
    assert comparison["delta"] < 0 and comparison["delta_95ci"][0] <= comparison["delta"] <= comparison["delta_95ci"][1]
    assert comparison["champion"] == read_json("reports/registry.json")["score"]  # same data, same decoder
    assert register(params, worse, run_id, test) == record  # a retry: same version, same decision
    client = MlflowClient()
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
    assert int(client.get_model_version_by_alias(NAME, CHALLENGER).version) == 2
    assert int(client.get_model_version_by_alias(NAME, CHAMPION).version) == 1
    logged = mlflow.artifacts.load_dict(f"runs:/{record['run_id']}/registry/version-2.json")
    assert logged["comparison"] == comparison
    assert client.get_run(record["run_id"]).data.metrics["registry_delta"] == comparison["delta"]


def test_a_hand_moved_champion_is_what_the_next_register_compares_with(trained_copy):
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    test = pd.read_parquet("data/prepared/test.parquet")
    broken = broken_model(trained_copy)
    register(params, broken, run_id, test)  # version 2
    client = MlflowClient()
    client.set_registered_model_alias(NAME, CHAMPION, "2")  # a person promotes the broken model
    served = model_checkpoint(f"models:/{NAME}@{CHAMPION}", trained_copy / "served")
    assert file_md5(served) == file_md5(broken)  # the alias serves the broken weights now
    record = register(any_gain_promotes(params), MODEL_FILE, run_id, test)  # version 1, compared anew
    assert record["version"] == 1 and record["compared_with"] == 2
    assert record["comparison"]["delta"] > 0 and record["alias"] == CHAMPION
    assert int(client.get_model_version_by_alias(NAME, CHAMPION).version) == 1


def test_a_model_from_a_dvc_experiment_never_becomes_champion(trained_copy, monkeypatch):
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    test = pd.read_parquet("data/prepared/test.parquet")
    register(params, broken_model(trained_copy), run_id, test)  # version 2
    client = MlflowClient()
    client.set_registered_model_alias(NAME, CHAMPION, "2")
    monkeypatch.setenv("DVC_EXP_NAME", "bigger-model")  # what `dvc exp run` sets for its stages
    # better (any gain promotes, so that only the experiment rule can hold it back), but its params
    # are not committed
    record = register(any_gain_promotes(params), MODEL_FILE, run_id, test)
    assert record["alias"] == CHALLENGER and "DVC experiment 'bigger-model'" in record["reason"]
    assert int(client.get_model_version_by_alias(NAME, CHAMPION).version) == 2
    monkeypatch.delenv("DVC_EXP_NAME")  # committed and run again: decided anew, not the experiment's record
    again = register(any_gain_promotes(params), MODEL_FILE, run_id, test)
    assert "experiment" not in again["reason"] and again["alias"] == CHAMPION


def test_a_changed_test_set_is_scored_again(trained_copy):
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    test = pd.read_parquet("data/prepared/test.parquet")
    register(params, broken_model(trained_copy), run_id, test)
    first = json.loads(MlflowClient().get_model_version(NAME, "2").tags["promotion"])
    fewer = register(params, trained_copy / "broken.pt", run_id, test.iloc[:-1])
    assert fewer["test_sentences"] == len(test) - 1 and fewer["test_sha256"] != first["test_sha256"]


def test_champion_pyfunc_translates_text(trained_copy):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
    outputs = model.predict(["The red dog sleeps.", "The old king eats."])
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs)
    learned = set(NOUNS.values()) | set(ADJECTIVES.values()) | set(VERBS.values())
    assert any(word.strip(".") in learned for word in outputs[0].split())  # learned from the tiny corpus
    served = model.unwrap_python_model()  # its own translator and search settings, on its device
    greedy = served.translator.translate(["The red dog sleeps."], **{**served.search, "beam_size": 1})
    assert model.predict(["The red dog sleeps."], params={"beam_size": 1}) == greedy
    with pytest.raises(Exception, match="beam_size"):  # the request's value is read and checked
        model.predict(["The red dog sleeps."], params={"beam_size": 0})


def test_run_has_params_metrics_and_tags(trained_copy):
    run = MlflowClient().get_run(read_json(".vamos/run.json")["run_id"])
    assert run.data.params["train.hidden_size"] == "48"
    for key in ("train_loss", "valid_loss", "valid_bleu", "test_bleu", "test_chrf", "registry_bleu",
                "test_bible_bleu", "test_incoming_chrf"):  # each source of the mixed test split too
        assert key in run.data.metrics
    assert len(MlflowClient().get_metric_history(run.info.run_id, "valid_loss")) >= 1
    assert run.data.tags["git_commit"] and "dvc.prepared_md5" in run.data.tags


def test_a_repeat_register_leaves_a_hand_moved_alias_alone(trained_copy):
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    test = pd.read_parquet("data/prepared/test.parquet")
    register(params, broken_model(trained_copy), run_id, test)  # v2, challenger
    client = MlflowClient()
    client.set_registered_model_alias(NAME, CHALLENGER, "1")  # a person's choice, on purpose
    again = register(params, trained_copy / "broken.pt", run_id, test)  # the nightly repeat, same decision
    assert again["version"] == 2 and int(client.get_model_version_by_alias(NAME, CHALLENGER).version) == 1


def test_the_champions_weights_with_new_settings_become_champion(trained_copy):
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    test = pd.read_parquet("data/prepared/test.parquet")
    limits = Params.model_validate({**params.model_dump(by_alias=True), "serve": {"max_sentences": 8}})
    record = register(limits, MODEL_FILE, run_id, test)
    assert record["version"] == 2 and record["alias"] == CHAMPION and record["comparison"] is None
    assert "new search or serving settings" in record["reason"]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
    with pytest.raises(Exception, match="the limit is 8"):  # its own limit, not the first version's
        model.predict([f"The red dog sleeps {i}." for i in range(9)])


def register_when_released(root: str, tracking_uri: str, barrier, versions) -> None:
    """`register` of root/broken.pt in a process of its own, started at the barrier with another."""
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    test = pd.read_parquet("data/prepared/test.parquet")
    barrier.wait()
    versions.put(register(params, Path("broken.pt"), run_id, test)["version"])


def test_two_registrations_at_once_make_one_version(trained_copy):
    """As `dvc queue start -j 2` may: both processes look for the version before either makes it."""
    broken_model(trained_copy)
    spawn = multiprocessing.get_context("spawn")
    barrier, versions = spawn.Barrier(2), spawn.Queue()
    racers = [spawn.Process(target=register_when_released,
                            args=(str(trained_copy), os.environ["MLFLOW_TRACKING_URI"], barrier, versions))
              for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=600)
        assert racer.exitcode == 0
    first, second = versions.get(timeout=5), versions.get(timeout=5)
    client = MlflowClient()
    key = client.get_model_version(NAME, str(first)).tags["model_key"]
    keyed = [int(v.version) for v in client.search_model_versions(f"name='{NAME}'") if v.tags.get("model_key") == key]
    assert first == second and keyed == [first]


def test_two_pairs_live_side_by_side_each_with_its_own_champion(trained_copy):
    """The same store holds a second pair's model (named after the pair): its first version is its
    own champion, compared with nothing of the first pair's, and the first pair's champion stays."""
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    test = pd.read_parquet("data/prepared/test.parquet")
    raw = params.model_dump(by_alias=True)
    second = Params.model_validate({**raw, "prepare": {**raw["prepare"], "tgt_lang": "pt"},
                                    "register": {**raw["register"], "model_name": None}})
    assert second.registry.model_name == "vamos-en-pt"
    first_record = register(second, MODEL_FILE, run_id, test)
    assert (first_record["model"], first_record["version"], first_record["alias"]) == ("vamos-en-pt", 1, CHAMPION)
    assert first_record["compared_with"] is None
    worse = register(second, broken_model(trained_copy), run_id, test)
    assert (worse["version"], worse["compared_with"], worse["alias"]) == (2, 1, CHALLENGER)
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(NAME, CHAMPION).version) == 1
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1
    assert int(client.get_model_version_by_alias("vamos-en-pt", CHAMPION).version) == 1

"""The logged translator: limits at every entry point, the model as MLflow stores it, the model
run on its own bundled code in a clean process, and a real `mlflow models serve` over HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException

from pipeline.serving import (Limits, RequestError, check_beam_size, check_texts, plan_request, running_server,
                              split_sentences)
from tests.conftest import ADJECTIVES, NOUNS, REPO, VERBS

CHAMPION = "models:/vamos-en-es@champion"
SPANISH = set(NOUNS.values()) | set(ADJECTIVES.values()) | set(VERBS.values())
LIMITS = Limits(max_sentences=4, max_sentence_tokens=6)


def speaks_spanish(translation: str) -> bool:
    return any(word.strip(".,;:!?") in SPANISH for word in translation.split())


# --- limits, without a model ---------------------------------------------------------------

@pytest.mark.parametrize("beam", [1, 5, 16])
def test_beam_sizes_in_range_pass(beam):
    assert check_beam_size(beam) == beam


@pytest.mark.parametrize("beam", [0, 17, 500, -1, True, 2.5, "3", None])
def test_beam_sizes_out_of_range_or_not_integers_are_refused(beam):
    with pytest.raises(RequestError, match="beam_size must be an integer from 1 to 16"):
        check_beam_size(beam)


@pytest.mark.parametrize("value, named", [(None, "null"), (42, "int"), (["a"], "list")])
def test_non_strings_are_refused_by_position(value, named):
    with pytest.raises(RequestError, match=f"input 2 is .*{named}.*not a string"):
        check_texts(["fine", value])


def test_sentences_split_by_the_source_languages_rules():
    """A Spanish abbreviation (Sra.) ends no sentence by Spanish rules, one by English rules; a
    language pysbd lacks gets English's rules."""
    text = "La Sra. López llegó. Luego se fue."
    assert split_sentences(text, "es") == split_sentences(text, "es_ES") == ["La Sra. López llegó.", "Luego se fue."]
    assert split_sentences(text, "en") == ["La Sra.", "López llegó.", "Luego se fue."]
    assert split_sentences("One. Two.", "sw") == ["One.", "Two."]


def test_a_paragraph_splits_into_sentences_around_abbreviations():
    text = "Mr. Smith went to Washington D.C. on Jan. 5. He said: \"Let's go!\" Then he left."
    assert split_sentences(text) == ["Mr. Smith went to Washington D.C. on Jan. 5.", "He said: \"Let's go!\"",
                                     "Then he left."]


def test_blank_lines_plan_no_decoding_and_short_lines_stay_whole():
    plan = plan_request(["", "   ", "a b. c d."], str.split, LIMITS)
    assert plan == [[], [], [["a", "b.", "c", "d."]]]


def test_a_long_line_is_split_into_sentences_first():
    assert plan_request(["a b c. d e f. g h."], str.split, LIMITS) == [[["a", "b", "c."], ["d", "e", "f."], ["g", "h."]]]


def test_paragraph_mode_splits_every_line():
    assert plan_request(["a b. c d."], str.split, LIMITS, paragraphs=True) == [[["a", "b."], ["c", "d."]]]


def test_a_sentence_still_too_long_is_refused_naming_the_limit():
    with pytest.raises(RequestError, match=r"input 2 has 7 tokens; the limit is 6 \(serve.max_sentence_tokens\)"):
        plan_request(["ok.", "one two three four five six seven."], str.split, LIMITS)


def test_too_many_sentences_after_splitting_are_refused_naming_the_limit():
    with pytest.raises(RequestError, match=r"5 sentences .* the limit is 4 \(serve.max_sentences\)"):
        plan_request(["a b c. d e f. g h i.", "j.", "k."], str.split, LIMITS)
    with pytest.raises(RequestError, match=r"5 texts .* limit is 4"):
        plan_request(["a"] * 5, str.split, LIMITS)


def test_a_huge_line_is_refused_before_tokenising():
    def tokenize(_):
        raise AssertionError("tokenised a request that cannot fit")

    with pytest.raises(RequestError, match="characters in one request"):
        plan_request(["x" * 10_000], tokenize, LIMITS)


# --- the logged model ----------------------------------------------------------------------

def champion_dir(dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=CHAMPION, dst_path=str(dst)))


def test_the_model_is_logged_from_code_with_its_config_and_mlflows_pins(trained_copy, tmp_path):
    local = champion_dir(tmp_path / "model")
    flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / "translator_model.py").is_file() and not list(local.glob("*.pkl"))
    assert flavor["config"] == {"beam_size": 3, "length_penalty": 1.0, "max_len_ratio": 1.5,
                                "max_sentences": 64, "max_sentence_tokens": 128, "decode_batch": 32,
                                "unk_dictionary": False,
                                "shortlist": False, "precision": "bfloat16", "unk_penalty": 2.0}
    assert (local / "code" / "pipeline" / "serving.py").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    assert f"mlflow=={mlflow.__version__}" in requirements
    assert any(r.startswith("cloudpickle==") for r in requirements)
    assert any(r.startswith("torch>=") for r in requirements) and not any(r.startswith("vamos") for r in requirements)


def test_signature_is_strings_in_and_out_with_a_beam_size_param(trained_copy):
    signature = mlflow.models.get_model_info(CHAMPION).signature
    assert [c.type.name for c in signature.inputs.inputs] == ["string"]
    assert [c.type.name for c in signature.outputs.inputs] == ["string"]
    assert [(p.name, p.default) for p in signature.params.params] == [("beam_size", 3)]


def test_a_request_decoded_in_length_sorted_sub_batches_translates_as_one_batch(trained_copy):
    """serve.decode_batch splits a request into length-sorted batches and puts the translations back
    in order: on this small model, the same words as one batch (a large model under bf16 rounds a
    few sentences differently at another batch size: docs/benchmarks.md)."""
    model = mlflow.pyfunc.load_model(CHAMPION).unwrap_python_model()
    clauses = [f"the {a} {n} {v}" for a, n, v in zip(ADJECTIVES, NOUNS, VERBS)]
    texts = [" and ".join(clauses[:k]).capitalize() + "." for k in (1, 3, 2, 4, 1, 3)] * 5  # mixed lengths
    assert model.batch_size == 32
    model.batch_size = 64
    whole = model.translate(texts)
    model.batch_size = 4
    assert model.translate(texts) == whole


def test_pyfunc_translates_and_enforces_the_limits(trained_copy):
    model = mlflow.pyfunc.load_model(CHAMPION)
    good, blank, paragraph = model.predict(["The red dog sleeps.", "  ", "The old king eats. " * 30])
    assert speaks_spanish(good) and blank == ""
    assert paragraph.count(".") >= 15  # 150 tokens: split into its 30 sentences, each translated
    bad_requests = [
        (["The red dog sleeps."], {"beam_size": 0}, "beam_size must be an integer from 1 to 16"),
        (["The red dog sleeps."], {"beam_size": 500}, "beam_size must be an integer from 1 to 16"),
        ([None], None, "Expected type str, but got NoneType"),
        ([42], None, "Expected type str, but got int"),
        (["The red dog sleeps."] * 65, None, "the limit is 64 sentences"),
        (["dog " * 200], None, "the limit is 128 (serve.max_sentence_tokens)"),
    ]
    for inputs, params, message in bad_requests:
        with pytest.raises(MlflowException, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
            model.predict(inputs, params=params)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


CLEAN_PROCESS = """
import json, sys
import mlflow
local = mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[1], dst_path=sys.argv[2])
model = mlflow.pyfunc.load_model(local)
import pipeline
print(json.dumps({"local": local, "pipeline": pipeline.__file__, "sys_path": sys.path,
                  "translations": model.predict(["The red dog sleeps.", ""])}))
"""


def test_the_registered_model_runs_on_its_bundled_code_in_a_clean_process(trained_copy, tmp_path):
    """`code_paths` only prepends to sys.path: in this test process the checkout's `pipeline` is
    already imported, so the model must be tried where only its own copy can be found."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([sys.executable, "-I", "-c", CLEAN_PROCESS, CHAMPION, str(tmp_path / "download")],
                            cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["pipeline"]).is_relative_to(Path(report["local"]) / "code")
    assert not any(Path(p or ".").resolve() == REPO for p in report["sys_path"])
    good, blank = report["translations"]
    assert speaks_spanish(good) and blank == ""


# --- a real server ---------------------------------------------------------------------------

BAD_REQUESTS = {
    "null": ({"inputs": [None]}, "NoneType"),
    "number": ({"inputs": [42]}, "got int"),
    "beam 0": ({"inputs": ["The red dog sleeps."], "params": {"beam_size": 0}}, "beam_size must be an integer"),
    "beam 500": ({"inputs": ["The red dog sleeps."], "params": {"beam_size": 500}}, "beam_size must be an integer"),
    "too many": ({"inputs": ["The red dog sleeps."] * 65}, "serve.max_sentences"),
    "over-long": ({"inputs": ["dog " * 300]}, "serve.max_sentence_tokens"),
}


@pytest.mark.slow
def test_rest_server_answers_bad_requests_with_4xx_and_stays_healthy(trained_copy, tmp_path):
    with running_server(CHAMPION, cwd=tmp_path, start_timeout=180) as (base, server):
        url = f"{base}/invocations"
        first = requests.post(url, json={"inputs": ["The red dog sleeps.", ""]}, timeout=60)
        assert first.status_code == 200, first.text
        translation, blank = first.json()["predictions"]
        assert speaks_spanish(translation) and blank == ""

        for name, (payload, expected) in BAD_REQUESTS.items():
            assert_clean_refusal(requests.post(url, json=payload, timeout=60), expected, name)
        malformed = requests.post(url, data=b'{"inputs": [', headers={"Content-Type": "application/json"}, timeout=60)
        assert_clean_refusal(malformed, "JSON", "malformed JSON")

        again = requests.post(url, json={"inputs": ["The old king eats."], "params": {"beam_size": 1}}, timeout=60)
        assert again.status_code == 200 and speaks_spanish(again.json()["predictions"][0])
    assert server.poll() is not None  # stopped with the context


def assert_clean_refusal(response: requests.Response, expected: str, name: str) -> None:
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:500])
    body = response.json()
    assert "stack_trace" not in body and "Traceback" not in response.text, name
    # MLflow's server prefixes "Failed to predict data '<the request>'.\nError: "; ours is the last line.
    assert expected in body["message"], (name, body["message"][-500:])

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app, is_temporary
from pipeline.config import load_params
from pipeline.registry import register
from pipeline.storage import read_json
from tests.conftest import ADJECTIVES, NOUNS, VERBS, broken_model, run

runner = CliRunner()


MODEL_FILE = "models/seq2seq/model.pt"
SPANISH = set(NOUNS.values()) | set(ADJECTIVES.values()) | set(VERBS.values())


def translate(*args: str, input: str | None = None):
    return runner.invoke(app, ["translate", *args], input=input)


def speaks_spanish(line: str) -> bool:
    return any(word.strip(".,;:!?") in SPANISH for word in line.split())


def test_translate_a_model_file_from_arguments_and_stdin(trained_copy):
    result = translate("--model", MODEL_FILE, "The red dog sleeps.", "")
    assert result.exit_code == 0, result.output
    first, blank = result.stdout.splitlines()
    assert speaks_spanish(first) and blank == ""
    piped = translate("--model", MODEL_FILE, "--beam", "2", input="The old king eats.\nThe small bird sings.\n")
    assert piped.exit_code == 0 and len(piped.stdout.splitlines()) == 2


def test_translate_uses_the_registered_model_by_alias_version_or_uri(trained_copy):
    params, run_id = load_params(), read_json(".vamos/run.json")["run_id"]
    broken = broken_model(trained_copy)
    register(params, broken, run_id, pd.read_parquet("data/prepared/test.parquet"))  # v2: worse, a challenger
    outputs = {spec: translate("--model", spec, "The red dog sleeps.") for spec in
               ("champion", "1", "models:/vamos-en-es@champion", "2", "challenger", "models:/vamos-en-es/2")}
    for spec, result in outputs.items():
        assert result.exit_code == 0, (spec, result.output)
    champion = outputs["champion"].stdout
    assert speaks_spanish(champion) and translate("The red dog sleeps.").stdout == champion  # the default
    assert outputs["1"].stdout == outputs["models:/vamos-en-es@champion"].stdout == champion
    assert outputs["2"].stdout == outputs["challenger"].stdout == outputs["models:/vamos-en-es/2"].stdout
    assert outputs["2"].stdout != champion


def test_a_document_file_in_paragraph_mode_gives_one_line_per_line(trained_copy):
    document = Path("document.en")
    document.write_text("The red dog sleeps. The old king eats.\n\nThe small bird sings.\n", encoding="utf-8")
    result = translate("--input", str(document), "--output", "document.es", "--paragraphs")
    assert result.exit_code == 0, result.output
    paragraph, blank, last = Path("document.es").read_text(encoding="utf-8").splitlines()
    assert paragraph.count(".") >= 2 and blank == "" and speaks_spanish(last)
    assert not list(Path(".").glob(".document.es.*"))  # written atomically: no temporary file left


def test_attention_heatmap_of_one_sentence(trained_copy):
    result = translate("--model", MODEL_FILE, "--attention", "attention.png", "The red dog sleeps.")
    assert result.exit_code == 0, result.output
    assert Path("attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and speaks_spanish(result.stdout)


@pytest.mark.parametrize("args, stdin, message", [
    ([], "", "empty input"),
    ([], "\n  \n", "empty input"),
    (["--input", "no-such-file.txt"], None, "no such file: no-such-file.txt"),
    (["--model", "missing.pt", "Hello."], None, "no such model file"),
    (["dog " * 200], None, "the limit is 128 (serve.max_sentence_tokens)"),
    (["--beam", "0", "The red dog sleeps."], None, "beam_size must be an integer from 1 to 16"),
    (["--attention", "a.png", "--paragraphs", "The red dog sleeps. The old king eats."], None, "exactly one sentence"),
])
def test_bad_input_is_a_clear_error_with_exit_code_2(trained_copy, args, stdin, message):
    result = translate("--model", MODEL_FILE, *args, input=stdin) if "--model" not in args \
        else translate(*args, input=stdin)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_training_checkpoint_is_refused_as_a_model_with_exit_code_2(trained_copy):
    [checkpoint] = Path(".vamos/checkpoints").glob("*/last.pt")
    result = translate("--model", str(checkpoint), "The red dog sleeps.")
    assert result.exit_code == 2, result.output
    assert f"{checkpoint} is a training checkpoint" in result.output and MODEL_FILE in result.output
    assert "Traceback" not in result.output


def test_restoring_a_version_registered_without_a_dvc_lock_is_a_clear_error(trained_copy):
    """The tiny project's stages ran without DVC, so version 1's run logged no dvc.lock. Its
    checkout is made a git repository and the version tagged with its commit, as from `dvc repro`."""
    email, name = "user.email=t@t", "user.name=t"
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "-c", email, "-c", name, "commit", "-qm", "p"]):
        assert run(cmd, trained_copy).returncode == 0
    commit = run(["git", "rev-parse", "HEAD"], trained_copy).stdout.strip()
    MlflowClient().set_model_version_tag("vamos-en-es", "1", "git_commit", commit)
    into = trained_copy.parent / "v1"
    result = runner.invoke(app, ["restore", "1", "--into", str(into)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "dvc.lock" in result.output and "Traceback" not in result.output
    assert not into.exists()  # nothing left behind: the same command can run again once it can work


def test_translate_without_a_registered_model_explains(tmp_path, monkeypatch, mlflow_store):
    monkeypatch.chdir(tmp_path)
    result = translate("Hello.")
    assert result.exit_code == 2
    assert "models:/vamos-en-es@champion" in result.output
    assert "dvc repro" in result.output and "set_registered_model_alias" in result.output


def test_check_prints_resolved_params(trained_copy):
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 0 and '"vamos-en-es"' in result.output


def test_missing_input_is_a_clear_error(tmp_path, monkeypatch):
    from tests.conftest import make_project

    make_project(tmp_path / "p")
    monkeypatch.chdir(tmp_path / "p")
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 2
    assert "data/raw/pairs: run `vamos" in result.output


def test_a_file_lock_held_elsewhere_is_a_temporary_failure(tmp_path):
    """As when `vamos register` waits too long for another's lock: exit 75, retried."""
    from filelock import FileLock, Timeout

    with FileLock(tmp_path / "register.lock"):
        with pytest.raises(Timeout) as waited:
            FileLock(tmp_path / "register.lock").acquire(timeout=0)
    wrapped = RuntimeError("register failed")
    wrapped.__cause__ = waited.value
    assert is_temporary(waited.value) and is_temporary(wrapped)

from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_translate_a_model_file_from_arguments_and_stdin(trained_copy):
    result = runner.invoke(app, ["translate", "--model", "models/seq2seq/model.pt", "The red dog sleeps."])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 1
    piped = runner.invoke(app, ["translate", "--model", "models/seq2seq/model.pt", "--beam", "2"],
                          input="The old king eats.\nThe small bird sings.\n")
    assert piped.exit_code == 0 and len(piped.output.strip().splitlines()) == 2


def test_translate_uses_the_registered_champion(trained_copy):
    result = runner.invoke(app, ["translate", "The red dog sleeps."])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_translate_without_a_registered_model_explains(tmp_path, monkeypatch, mlflow_store):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["translate", "Hello."])
    assert result.exit_code == 2
    assert "dvc repro" in result.output


def test_check_prints_resolved_params(trained_copy):
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 0 and '"vamos-en-es"' in result.output


def test_missing_input_is_a_clear_error(tmp_path, monkeypatch):
    from tests.conftest import make_project

    make_project(tmp_path / "p")
    monkeypatch.chdir(tmp_path / "p")
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 2
    assert "pairs.parquet" in result.output

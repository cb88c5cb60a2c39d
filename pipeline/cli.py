"""`vamos <stage>`: the thin command line that dvc.yaml calls, plus `vamos translate`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.tracking import offline_environment

offline_environment()
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="vamos: train, evaluate, register and use an English->Spanish translator.")
PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="the params file")


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, console=_stderr_console())])
    for noisy in ("gensim", "alembic", "mlflow", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _run_stage(name: str, params_file: Path) -> None:
    from pipeline.config import ParamsError, load_params
    from pipeline.corpus import CorpusError
    from pipeline.stages import STAGES

    _setup_logging()
    try:
        params = load_params(params_file)
        STAGES[name](params)
    except (ParamsError, CorpusError, FileNotFoundError) as e:
        _stderr_console().print(f"[bold red]vamos {name}: error:[/] {e}")
        raise typer.Exit(2) from None


def _stage_command(name: str, doc: str) -> None:
    def command(params: Path = PARAMS) -> None:
        _run_stage(name, params)

    command.__doc__ = doc
    app.command(name)(command)


for _name, _doc in [
    ("ingest", "Read the corpus sources, clean them, and count every dropped pair by reason."),
    ("prepare", "Tokenise, split by a hash of the pair id, and build the vocabularies."),
    ("embed", "Train word2vec embeddings for each language and evaluate them."),
    ("train", "Train the LSTM encoder-decoder with attention (resumes from its last checkpoint)."),
    ("evaluate", "Score the test split with sacrebleu (BLEU, chrF, TER), greedy and beam."),
    ("register", "Log the model to MLflow, register it, and move the champion/challenger alias."),
]:
    _stage_command(_name, _doc)


@app.command()
def check(params: Path = PARAMS) -> None:
    """Validate the params file and print it resolved."""
    from pipeline.config import ParamsError, load_params

    try:
        typer.echo(load_params(params).model_dump_json(indent=2, by_alias=True))
    except ParamsError as e:
        _stderr_console().print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


@app.command()
def restore(
    version: int = typer.Argument(..., help="the registered version of the model to restore"),
    into: Path = typer.Option(..., "--into", help="an empty folder for the restored checkout (a git worktree)"),
    params: Path = PARAMS,
) -> None:
    """Restore a registered version: its commit, its dvc.lock, and its data and model from the DVC remote."""
    from pipeline.config import ParamsError, load_params
    from pipeline.restore import RestoreError, restore as restore_version

    _setup_logging()
    try:
        result = restore_version(load_params(params), version, into)
    except (ParamsError, RestoreError) as e:
        _stderr_console().print(f"[bold red]vamos restore: error:[/] {e}")
        raise typer.Exit(2) from None
    typer.echo(f"restored version {result['version']} (commit {result['git_commit'][:10]}) into {result['path']}; "
               f"model md5 {result['model_md5']} matches the registry")


@app.command()
def translate(
    text: Optional[list[str]] = typer.Argument(None, help="sentences to translate; none: read lines from stdin"),
    model: str = typer.Option("models:/vamos-en-es@champion", help="an MLflow model URI, or a model.pt file"),
    beam: Optional[int] = typer.Option(None, help="beam size (default: the model's)"),
) -> None:
    """Translate English to Spanish with the registered champion (or any model)."""
    import warnings

    logging.basicConfig(level=logging.WARNING)
    # MLflow nags about type hints on every load; the model's signature is logged explicitly.
    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    lines = list(text) if text else [line.rstrip("\n") for line in sys.stdin]
    if not lines:
        raise typer.Exit(0)
    params = {"beam_size": beam} if beam else None
    if model.endswith(".pt"):
        from pipeline.model import load_translator

        outputs = load_translator(model).translate(lines, **(params or {}))
    else:
        from pipeline.tracking import mlflow_setup

        mlflow = mlflow_setup()
        try:
            pyfunc = mlflow.pyfunc.load_model(model)
        except Exception as e:  # MLflow raises several types for a missing model or alias
            _stderr_console().print(f"[bold red]error:[/] cannot load {model}: {e}\n"
                                    "Run the pipeline first (dvc repro), or pass --model models/seq2seq/model.pt")
            raise typer.Exit(2) from None
        outputs = pyfunc.predict(lines, params=params) if params else pyfunc.predict(lines)
    for line in outputs:
        typer.echo(line)


if __name__ == "__main__":
    app()
